#!/usr/bin/env python3
"""The partner stand-in: a simulator of ../shared/partner-api.md for tests, the demo and the
benchmarks. It plays a seeded scenario — a burst of returns, pickups whose statuses advance on
a compressed clock, relisted, corrected and broken feed items, unknown statuses, and the partner's faults
(5xx, 429 with Retry-After, slow and hanging answers, garbled 200s, resets, an outage) — and
keeps a ledger of what the caller did, for tests to assert on. Its unpublished rate limit takes the
shapes real partners' do (RateLimiter): a token bucket of any depth or a fixed one-second window,
per endpoint or shared by all, constant or changing on a schedule.

    python standin.py --port 8080 --returns 30000 --seconds 20     (prints one JSON line: urls)

Admin paths (not part of the partner's contract):
    GET  /_ledger     what was recorded, duplicated, premature, missing; calls by endpoint/answer
    POST /_faults     change fault settings mid-run, e.g. {"outage_s": 5} starts a 5 s outage
    POST /_slack      a Slack incoming-webhook stand-in (429 when posted to faster than 1/s)
    GET  /_slack      the messages it received
"""

import argparse
import asyncio
import base64
import bisect
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import math
import random
import threading
import time
import urllib.request
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web

API_PREFIX = "/api/external/data"
EPOCH = dt.datetime(2026, 11, 24, 9, 0, 0, tzinfo=dt.UTC)  # scenario time 0 on the partner's clock
UNKNOWN_STATUS = "held_at_depot"


@dataclasses.dataclass(frozen=True)
class Faults:
    """The partner's misbehaviour. Shares are per call, drawn from the scenario's seeded RNG."""

    latency_ms: tuple[float, float] = (0.0, 0.0)
    error_share: float = 0.0  # 500/502/503/504
    garbled_share: float = 0.0  # 200 with HTML, truncated JSON, {"data": null}, wrong types
    slow_share: float = 0.0
    slow_s: float = 1.0
    hang_share: float = 0.0  # no answer for hang_s (past any sane client timeout)
    hang_s: float = 30.0
    reset_share: float = 0.0  # /results only: records, then drops the connection before answering
    rate_limit_per_s: float = 0.0  # per endpoint (or shared: limit_shared); 0 = unlimited
    # "bucket": refills continuously, holds bucket_depth_s of calls; "window": N per window of the
    # clock; "anchored": N per window counted from the first call after the last one ended;
    # "sliding": N in any window_s (a log of the calls let through); "stepped": a bucket refilled
    # by a window's N at each window's start, holding bucket_depth_s of calls (at least one window's)
    limiter: str = "bucket"
    bucket_depth_s: float = 0.1
    window_s: float = 1.0  # a window's length: rate_limit_per_s × window_s calls in each
    limit_shared: bool = False  # one limit for every endpoint together
    limit_schedule: tuple[tuple[float, float], ...] = ()  # (from scenario second, calls/s): the limit changes
    outage_at_s: float | None = None  # every call answers 503 during the window…
    outage_s: float = 0.0
    outage_says_when: bool = True  # …with Retry-After: the time left (maintenance), or none (a crash)
    storm_at_s: float | None = None  # the rate limit drops to storm_limit_per_s during the window
    storm_s: float = 0.0
    storm_limit_per_s: float = 10.0
    feed_down: bool = False  # /returns answers 503 throughout (tracking and results work): push the returns instead

    def __post_init__(self) -> None:
        if self.limiter not in LIMITERS:
            raise ValueError(f"limiter must be one of {', '.join(LIMITERS)}, not {self.limiter!r}")
        object.__setattr__(self, "limit_schedule", tuple(tuple(step) for step in self.limit_schedule))


LIMITERS = ("bucket", "window", "anchored", "sliding", "stepped")


@dataclasses.dataclass(frozen=True)
class Scenario:
    seed: int = 1
    returns: int = 1000
    arrive_over_s: float = 5.0
    max_items_per_box: int = 3
    step_s: tuple[float, float] = (0.5, 1.5)  # between status advances
    cancel_share: float = 0.05
    unregistered_share: float = 0.3  # boxes answering 404 for a while after their return arrives
    unregistered_s: tuple[float, float] = (0.5, 2.0)
    never_registered_share: float = 0.0  # boxes the carrier never registers (they go stale)
    relist_share: float = 0.02  # returns listed again unchanged (as they are at that moment)
    # Corrections (the partner re-emits a return when it corrects it; the latest listing is the truth):
    reissue_share: float = 0.0  # boxes whose waybill is reissued before pickup: the old one ends cancelled
    fix_share: float = 0.0  # returns first listed with a typo in order_number or order_item_number
    correction_delay_s: tuple[float, float] = (0.2, 5.0)  # reissue (or first listing) → corrected listing
    broken_correction_share: float = 0.0  # corrections also listed once unusable (a field null)
    broken_share: float = 0.0
    unknown_status_share: float = 0.0
    token: str = "standin-token"
    faults: Faults = Faults()

    @classmethod
    def demo(cls, returns: int = 30000, seconds: float = 20.0, seed: int = 1) -> "Scenario":
        """A sales-event burst on a compressed clock, with mild faults; 5% of waybills are reissued."""
        return cls(
            seed=seed, returns=returns, arrive_over_s=seconds, step_s=(2.0, 6.0),
            unregistered_s=(1.0, 5.0), never_registered_share=0.002, relist_share=0.02,
            reissue_share=0.05, fix_share=0.002, correction_delay_s=(1.0, 20.0), broken_correction_share=0.02,
            broken_share=0.001, unknown_status_share=0.01, token="demo-token",
            faults=Faults(latency_ms=(10, 50), error_share=0.01, garbled_share=0.003, slow_share=0.005,
                          slow_s=1.0, hang_share=0.001, hang_s=30.0, reset_share=0.002,
                          rate_limit_per_s=2000),
        )


@dataclasses.dataclass
class Box:
    shipment_number: str
    items: list[dict[str, str]]
    arrive_at: float
    registered_at: float | None  # None: never registered
    timeline: list[tuple[float, str]]  # (time, status), ascending

    def status_at(self, now: float) -> str | None:
        current = None
        for at, status in self.timeline:
            if at > now:
                break
            current = status
        return current

    @property
    def final_status(self) -> str | None:
        return self.timeline[-1][1] if self.timeline else None

    @property
    def ends_at(self) -> float:
        return self.timeline[-1][0] if self.timeline else self.arrive_at


def iso(t: float) -> str:
    return (EPOCH + dt.timedelta(seconds=t)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def build_world(s: Scenario) -> tuple[list[Box], list[tuple[float, dict[str, Any]]]]:
    """The boxes and the feed (time-ordered entries) the scenario will play. A box's items are the
    returns whose final version lies in it (a reissued waybill's box ends with none)."""
    rng = random.Random(s.seed)
    boxes: list[Box] = []
    feed: list[tuple[float, dict[str, Any]]] = []
    made = 0
    while made < s.returns:
        n = min(rng.randint(1, s.max_items_per_box), s.returns - made)
        box_no = len(boxes) + 1
        arrive = rng.uniform(0, s.arrive_over_s)
        shipment = f"SHP_{box_no:08d}"
        order = f"20261124-{box_no:06d}"
        items = [
            {"id": f"RET_{made + k + 1:08d}", "order_number": order, "order_item_number": str(k + 1),
             "shipment_number": shipment, "requested_at": iso(arrive)}
            for k in range(n)
        ]
        made += n
        if rng.random() < s.never_registered_share:
            registered, timeline = None, []
        else:
            registered = arrive + (rng.uniform(*s.unregistered_s) if rng.random() < s.unregistered_share else 0.0)
            t = registered
            timeline = [(t, "requested")]
            steps = ["assigned", "picking_up"]
            if rng.random() < s.unknown_status_share:
                steps.insert(1, UNKNOWN_STATUS)
            steps.append("cancelled" if rng.random() < s.cancel_share else "delivered")
            for status in steps:
                t += rng.uniform(*s.step_s)
                timeline.append((t, status))
        box = Box(shipment, items, arrive, registered, timeline)
        boxes.append(box)
        # What each item's listings change, and when: [(time, {field: value})], the first listing at 0.
        changes: list[list[tuple[float, dict[str, str]]]] = [[] for _ in items]
        if s.reissue_share and len(timeline) > 1 and rng.random() < s.reissue_share:
            boxes.append(reissue(rng, s, box, changes))
        if s.fix_share:
            for k, item in enumerate(items):
                if rng.random() < s.fix_share:
                    field = rng.choice(["order_number", "order_item_number"])
                    changes[k].append((arrive + rng.uniform(*s.correction_delay_s), {field: item[field]}))
                    item[field] = item[field] + "0"  # first listed with a typo; the correction fixes it
        for k, item in enumerate(items):
            versions = listings(item, sorted(changes[k], key=lambda change: change[0]))
            feed.append((arrive + k * 1e-6, versions[0][1]))
            feed.extend(versions[1:])
            if s.broken_correction_share and len(versions) > 1 and rng.random() < s.broken_correction_share:
                at, version = rng.choice(versions[1:])
                feed.append((at + 1e-6, {**version, rng.choice(["shipment_number", "order_number"]): None}))
            if rng.random() < s.relist_share:
                at = arrive + rng.uniform(0.5, 5.0)
                feed.append((at, dict(version_at(versions, at))))
    for i in range(int(round(s.returns * s.broken_share))):
        feed.append((rng.uniform(0, s.arrive_over_s), broken_item(rng, i)))
    feed.sort(key=lambda entry: entry[0])
    by_shipment = {box.shipment_number: box for box in boxes}
    for box in boxes:
        box.items = []
    for versions in versions_by_return(feed).values():
        final = versions[-1][1]
        by_shipment[final["shipment_number"]].items.append(final)
    return boxes, feed


def versions_by_return(feed: list[tuple[float, dict[str, Any]]]) -> dict[str, list[tuple[float, dict[str, Any]]]]:
    """Each return's usable listings in feed order (unusable ones correct nothing)."""
    versions: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for at, item in feed:
        if usable(item):
            versions.setdefault(item["id"], []).append((at, item))
    return versions


def reissue(rng: random.Random, s: Scenario, box: Box, changes: list[list[tuple[float, dict[str, str]]]]) -> Box:
    """The carrier reissues the box's waybill before its pickup ends: the old waybill ends cancelled
    then, the pickup goes on under the new one, and each item is relisted with the new waybill."""
    at = rng.uniform(box.timeline[0][0], box.timeline[-1][0])
    final = box.timeline[-1][1]
    box.timeline = [event for event in box.timeline if event[0] < at] + [(at, "cancelled")]
    new = Box(box.shipment_number + "R", [], at, at, [(at, "requested")])
    t = at
    for status in ("assigned", "picking_up", final):
        t += rng.uniform(*s.step_s)
        new.timeline.append((t, status))
    for k in range(len(box.items)):
        changes[k].append((at + rng.uniform(*s.correction_delay_s), {"shipment_number": new.shipment_number}))
    return new


def listings(first: dict[str, Any], changes: list[tuple[float, dict[str, str]]]) -> list[tuple[float, dict[str, Any]]]:
    """An item's versions in time order: the first listing (time 0), then each change applied to the last."""
    versions = [(0.0, dict(first))]
    for at, change in changes:
        versions.append((at, {**versions[-1][1], **change}))
    return versions


def version_at(versions: list[tuple[float, dict[str, Any]]], now: float) -> dict[str, Any]:
    """The version listed last by `now` (the first one before any was listed): the partner's truth."""
    current = versions[0][1]
    for at, version in versions[1:]:
        if at > now:
            break
        current = version
    return current


def broken_item(rng: random.Random, i: int) -> dict[str, Any]:
    item: dict[str, Any] = {"id": f"BAD_{i:06d}", "order_number": f"BAD-{i}", "order_item_number": "1",
                            "shipment_number": f"SHP_BAD_{i:06d}", "requested_at": iso(0)}
    field = rng.choice(["id", "order_number", "order_item_number", "shipment_number"])
    kind = rng.choice(["missing", "null", "number", "empty"])
    if kind == "missing":
        del item[field]
    else:
        item[field] = {"null": None, "number": 12345, "empty": ""}[kind]
    return item


class RateLimiter:
    """The partner's unpublished rate limit, kept as real partners keep theirs: a token bucket of a
    given depth (calls refill continuously at the limit; a full bucket lets depth × limit through at
    once), a fixed window (limit × window_s calls per window of the clock, counted from its start),
    one anchored at the first call after the last ended, a sliding window (limit × window_s in
    any window_s), or a bucket refilled in steps (a window's calls at each window's start); per
    endpoint or one limit shared by all; the limit constant, changing on a schedule, or dropping
    during a storm."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, when)
        self._windows: dict[str, tuple[float, int]] = {}  # key → (window's start, calls let through in it)
        self._logs: dict[str, deque[float]] = defaultdict(deque)  # sliding: admit times

    def limit_at(self, now: float) -> float:
        f = self.faults
        if f.storm_at_s is not None and f.storm_at_s <= now < f.storm_at_s + f.storm_s:
            return f.storm_limit_per_s
        limit = f.rate_limit_per_s
        for since, scheduled in f.limit_schedule:
            if now >= since:
                limit = scheduled
        return limit

    def admit(self, endpoint: str, now: float, clock: float | None = None) -> bool:
        """May a call to `endpoint` go through at scenario time `now`? Buckets and windows run on
        `clock`, the machine's monotonic clock unless given (the scenario's may be held)."""
        limit = self.limit_at(now)
        if not limit:
            return True
        key = "all" if self.faults.limit_shared else endpoint
        now = time.monotonic() if clock is None else clock
        length, shape = self.faults.window_s, self.faults.limiter
        allowed = limit * length
        if shape in ("window", "anchored"):
            start, used = self._windows.get(key, (-math.inf, 0))
            if now >= start + length:  # a new window: of the clock's, or from this call
                start, used = (math.floor(now / length) * length if shape == "window" else now), 0
            if used >= allowed:
                return False
            self._windows[key] = (start, used + 1)
            return True
        if shape == "sliding":
            log = self._logs[key]
            while log and log[0] <= now - length:
                log.popleft()
            if len(log) >= allowed:
                return False
            log.append(now)
            return True
        depth = max(1.0, limit * self.faults.bucket_depth_s)
        tokens, last = self._buckets.get(key, (depth, now))
        if shape == "stepped":
            depth = max(depth, allowed)
            steps = math.floor(now / length) - math.floor(last / length)
            tokens = min(depth, tokens + steps * allowed)
        else:
            tokens = min(depth, tokens + (now - last) * limit)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        return True


class Ledger:
    """What the caller did. `missing` is only final once the scenario has played out."""

    def __init__(self) -> None:
        self.recorded: dict[str, dict[str, Any]] = {}
        self.recorded_items: set[tuple[str, str]] = set()
        self.duplicates = 0
        self.changed_duplicates: list[str] = []  # a 409 to a body other than the one recorded under its key
        self.stale: list[str] = []  # reports carrying fields a correction in the feed had already replaced
        self.superseded: list[str] = []  # recorded under fields a correction listed later replaced
        self.premature: list[str] = []
        self.unknown: list[str] = []
        self.mismatched: list[str] = []
        self.calls: dict[str, Counter[str]] = defaultdict(Counter)
        self.feed_from_start = 0  # /returns calls without a cursor: a restarted caller re-reading
        self.feed_acknowledged = 0  # the furthest cursor the caller sent back: it has stored all before it
        self.overlapping_checks = 0  # tracking calls for a waybill while another call for it was being answered
        # endpoint → tenth of a scenario second → [calls the rate limit let through, calls it refused]
        self.by_tenth: dict[str, dict[int, list[int]]] = defaultdict(dict)
        self.first_call_s: float | None = None
        self.last_recorded_s: float | None = None

    def count(self, endpoint: str, answer: str) -> None:
        self.calls[endpoint][answer] += 1

    def count_limited(self, endpoint: str, now: float, refused: bool) -> None:
        if not math.isfinite(now):
            return  # the scenario's clock is held: nothing counts yet
        if self.first_call_s is None:
            self.first_call_s = now
        tally = self.by_tenth[endpoint].setdefault(math.floor(now * 10), [0, 0])
        tally[refused] += 1


class StandIn:
    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.faults = scenario.faults
        self.boxes, self.feed = build_world(scenario)
        self.feed_times = [t for t, _ in self.feed]
        self.by_shipment = {b.shipment_number: b for b in self.boxes}
        self.versions = versions_by_return(self.feed)
        self.final = {return_id: versions[-1][1] for return_id, versions in self.versions.items()}
        self.by_order_item = {(version["order_number"], version["order_item_number"]): return_id
                              for return_id, versions in self.versions.items() for _, version in versions
                              if isinstance(version.get("order_number"), str)}
        self.world = {  # what the scenario lists, counted once (the ledger is read twice a second)
            "broken": sum(1 for _, item in self.feed if item.get("id") not in self.versions),
            "broken_corrections": sum(1 for _, item in self.feed if item.get("id") in self.versions
                                      and not usable(item)),
            "corrections": sum(1 for versions in self.versions.values()
                               for (_, a), (_, b) in zip(versions, versions[1:]) if not _same_item(a, b)),
            "reissued": sum(1 for b in self.boxes if b.shipment_number.endswith("R")),
        }
        self.expected = {item["id"] for b in self.boxes if b.final_status == "delivered" for item in b.items}
        self.ends_at = max([b.ends_at for b in self.boxes] + [self.scenario.arrive_over_s] +
                           [t for t, _ in self.feed[-1:]])
        self.ledger = Ledger()
        self._being_checked: Counter[str] = Counter()  # waybill → tracking calls being answered now
        self.slack_messages: list[dict[str, Any]] = []
        self.slack_hang_s = 0.0  # > 0: the webhook takes this long to answer (a broken Slack)
        self._slack_last = 0.0
        self._rng = random.Random(scenario.seed + 1)
        self.limiter = RateLimiter(self.faults)
        self._t0 = time.monotonic()
        self._runner: web.AppRunner | None = None
        self.url = ""

    # ── clock ───────────────────────────────────────────────────────────────────────────────

    def now(self) -> float:
        return time.monotonic() - self._t0

    def restart_clock(self) -> None:
        self._t0 = time.monotonic()

    def hold_clock(self) -> None:
        """Nothing has happened yet, until restart_clock(): lets a test set up its observers first."""
        self._t0 = math.inf

    @property
    def finished(self) -> bool:
        return self.now() > self.ends_at

    # ── server ──────────────────────────────────────────────────────────────────────────────

    def app(self) -> web.Application:
        logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)  # resets are on purpose
        app = web.Application(middlewares=[self._partner_behaviour])
        app.router.add_get(f"{API_PREFIX}/returns", self.get_returns)
        app.router.add_get(f"{API_PREFIX}/tracking", self.get_tracking)
        app.router.add_post(f"{API_PREFIX}/results", self.post_results)
        app.router.add_get("/_ledger", self.get_ledger)
        app.router.add_get("/_shop/returns", self.get_shop_returns)
        app.router.add_post("/_faults", self.post_faults)
        app.router.add_post("/_slack", self.post_slack)
        app.router.add_get("/_slack", self.get_slack)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        self.root = f"http://{bound_host}:{bound_port}"
        self.url = self.root + API_PREFIX
        self.restart_clock()
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _partner_behaviour(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.path.startswith(API_PREFIX):
            return await handler(request)
        endpoint = request.path.rsplit("/", 1)[-1]
        if endpoint != "tracking":
            return await self._behave(request, handler, endpoint)
        # Several tracker instances must never check one box at once (each holds a claim on it).
        # A call that hangs here past the caller's timeout overlaps its own retry: count those out
        # by running the chaos tests without hangs.
        shipment = request.query.get("shipment_number", "")
        if self._being_checked[shipment]:
            self.ledger.overlapping_checks += 1
        self._being_checked[shipment] += 1
        try:
            return await self._behave(request, handler, endpoint)
        finally:
            self._being_checked[shipment] -= 1

    async def _behave(self, request: web.Request, handler: Any, endpoint: str) -> web.StreamResponse:
        f, rng, now = self.faults, self._rng, self.now()
        if f.outage_at_s is not None and f.outage_at_s <= now < f.outage_at_s + f.outage_s:
            self.ledger.count(endpoint, "503-outage")
            if not f.outage_says_when:
                return _error(503, "unavailable")
            return _error(503, "maintenance", retry_after=str(max(1, round(f.outage_at_s + f.outage_s - now))))
        admitted = self.limiter.admit(endpoint, now)
        self.ledger.count_limited(endpoint, now, refused=not admitted)
        if not admitted:
            self.ledger.count(endpoint, "429")
            return _error(429, "too many requests", retry_after="1")
        if request.headers.get("Authorization") != f"Bearer {self.scenario.token}":
            self.ledger.count(endpoint, "401")
            return _error(401, "unauthorized")
        if f.latency_ms[1] > 0:
            await asyncio.sleep(rng.uniform(*f.latency_ms) / 1000)
        roll = rng.random()
        if roll < f.hang_share:
            self.ledger.count(endpoint, "hang")
            await asyncio.sleep(f.hang_s)
            return _error(504, "gateway timeout")
        roll -= f.hang_share
        if roll < f.error_share:
            status = rng.choice([500, 502, 503, 504])
            self.ledger.count(endpoint, str(status))
            return _error(status, "server error")
        roll -= f.error_share
        if roll < f.slow_share:
            await asyncio.sleep(f.slow_s)
        response = await handler(request)
        roll = rng.random()
        if roll < f.garbled_share:
            self.ledger.count(endpoint, "200-garbled")
            return self._garbled(rng)
        if endpoint == "results" and roll < f.garbled_share + f.reset_share:
            self.ledger.count(endpoint, "reset")
            if request.transport is not None:
                request.transport.close()  # the report was recorded; the caller never hears so
            raise ConnectionResetError("stand-in reset")
        self.ledger.count(endpoint, str(response.status))
        return response

    @staticmethod
    def _garbled(rng: random.Random) -> web.Response:
        kind = rng.choice(["html", "truncated", "null", "types"])
        if kind == "html":
            return web.Response(status=200, text="<html><body>502 Bad Gateway</body></html>",
                                content_type="text/html")
        body = {"truncated": '{"data": [{"shipment_number": "SHP_', "null": '{"data": null}',
                "types": '{"data": 42, "next_cursor": 7, "has_more": "yes"}'}[kind]
        return web.Response(status=200, text=body, content_type="application/json")

    # ── the contract ────────────────────────────────────────────────────────────────────────

    async def get_returns(self, request: web.Request) -> web.Response:
        if self.faults.feed_down:
            return _error(503, "the returns feed is down")
        try:
            limit = int(request.query.get("limit", "100"))
            start = _decode_cursor(request.query.get("cursor"))
        except ValueError:
            return _error(400, "bad cursor or limit")
        if not 1 <= limit <= 500:
            return _error(400, "limit must be 1..500")
        if "cursor" not in request.query:
            self.ledger.feed_from_start += 1
        self.ledger.feed_acknowledged = max(self.ledger.feed_acknowledged, start)
        visible = bisect.bisect_right(self.feed_times, self.now())
        end = min(visible, start + limit)
        data = [item for _, item in self.feed[start:end]] if end > start else []
        return web.json_response({"data": data, "next_cursor": _encode_cursor(max(start, end)),
                                  "has_more": end < visible})

    async def get_shop_returns(self, request: web.Request) -> web.Response:
        """The shop's own view of the returns (its order system knows each one as it is created):
        what the feed would list by now, from position `cursor`, whether the feed is down or not —
        what the demo's --feed-down pushes through the tracker's API instead."""
        start = int(request.query.get("cursor", "0"))
        visible = bisect.bisect_right(self.feed_times, self.now())
        return web.json_response({"data": [item for _, item in self.feed[start:visible]], "next_cursor": visible,
                                  "finished": visible == len(self.feed)})

    async def get_tracking(self, request: web.Request) -> web.Response:
        box = self.by_shipment.get(request.query.get("shipment_number", ""))
        now = self.now()
        if box is None or box.registered_at is None or now < box.registered_at:
            return _error(404, "unknown shipment")
        history = [{"shipment_number": box.shipment_number, "return_status": status, "updated_at": iso(at)}
                   for at, status in box.timeline if at <= now]
        return web.json_response({"data": history})

    async def post_results(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(422, "body is not JSON")
        fields = ("order_number", "order_item_number", "shipment_number", "result", "collected_at")
        if not isinstance(body, dict) or not all(isinstance(body.get(k), str) for k in fields):
            return _error(422, "bad body")
        # Recorded by order item: a caller that never learnt the partner's return id (a return the
        # shop pushed to it) keys its report by a name of its own.
        key = request.headers.get("Idempotency-Key", "")
        if key not in self.versions:
            key = self.by_order_item.get((body["order_number"], body["order_item_number"]), key)
        versions = self.versions.get(key)
        if versions is None or not any(_same_item(body, version) for _, version in versions):
            self.ledger.unknown.append(key)
            return _error(422, "unknown order item")
        order_item = (body["order_number"], body["order_item_number"])
        if key in self.ledger.recorded or order_item in self.ledger.recorded_items:
            self.ledger.duplicates += 1
            if key in self.ledger.recorded and not _same_item(body, self.ledger.recorded[key]):
                self.ledger.changed_duplicates.append(key)
            return _error(409, "duplicate")
        # Judged against the return as the feed lists it now: an older version's order item or
        # waybill no longer exists on the partner's side.
        current = version_at(versions, self.now())
        if not _same_item(body, current):
            self.ledger.stale.append(key)
            return _error(422, "unknown order item" if body["shipment_number"] == current["shipment_number"]
                          else "shipment not collected")
        box = self.by_shipment[current["shipment_number"]]
        if box.status_at(self.now()) != "delivered" or body["result"] != "collected":
            self.ledger.premature.append(key)
            return _error(422, "shipment not collected")
        delivered_at = next(at for at, status in box.timeline if status == "delivered")
        if body["collected_at"] != iso(delivered_at):
            self.ledger.mismatched.append(key)
        self.ledger.recorded[key] = body
        self.ledger.last_recorded_s = self.now()
        self.ledger.recorded_items.add(order_item)
        if not _same_item(body, self.final[key]):
            self.ledger.superseded.append(key)
        return web.json_response({"data": {"result": True}})

    def superseded(self) -> list[str]:
        """Reports recorded under fields a later correction changed: the caller could not have known
        when it sent them, and must tell a person rather than send them again."""
        return sorted(self.ledger.superseded)

    # ── admin ───────────────────────────────────────────────────────────────────────────────

    def summary(self) -> dict[str, Any]:
        missing = sorted(self.expected - self.ledger.recorded.keys())
        return {
            "finished": self.finished,
            "now_s": round(self.now(), 3),
            "ends_at_s": round(self.ends_at, 3),
            "returns": self.scenario.returns,
            "feed_entries": len(self.feed),
            "feed_visible": bisect.bisect_right(self.feed_times, self.now()),
            "feed_acknowledged": self.ledger.feed_acknowledged,
            **self.world,
            "boxes": len(self.boxes),
            "expected": len(self.expected),
            "recorded": len(self.ledger.recorded),
            "duplicates": self.ledger.duplicates,
            "changed_duplicates": len(self.ledger.changed_duplicates),
            "stale": len(self.ledger.stale),
            "superseded": len(self.ledger.superseded),
            "premature": len(self.ledger.premature),
            "unknown": len(self.ledger.unknown),
            "mismatched": len(self.ledger.mismatched),
            "missing": len(missing),
            "missing_sample": missing[:20],
            "unexpected": sorted(self.ledger.recorded.keys() - self.expected)[:20],
            "calls": {e: dict(c) for e, c in self.ledger.calls.items()},
            "feed_from_start": self.ledger.feed_from_start,
            "overlapping_checks": self.ledger.overlapping_checks,
            "slack_messages": len(self.slack_messages),
            "first_call_s": self.ledger.first_call_s,
            "last_recorded_s": self.ledger.last_recorded_s,
            "by_tenth": {e: {str(k): v for k, v in tenths.items()} for e, tenths in self.ledger.by_tenth.items()},
        }

    async def get_ledger(self, _request: web.Request) -> web.Response:
        return web.json_response(self.summary())

    async def post_faults(self, request: web.Request) -> web.Response:
        changes = await request.json()
        if "outage_s" in changes and "outage_at_s" not in changes:
            changes["outage_at_s"] = self.now()
        for key in ("latency_ms",):
            if key in changes:
                changes[key] = tuple(changes[key])
        self.faults = self.limiter.faults = dataclasses.replace(self.faults, **changes)
        return web.json_response(dataclasses.asdict(self.faults))

    async def post_slack(self, request: web.Request) -> web.Response:
        if self.slack_hang_s:
            await asyncio.sleep(self.slack_hang_s)
        now = time.monotonic()
        if now - self._slack_last < 1.0:
            return web.Response(status=429, text="rate_limited", headers={"Retry-After": "1"})
        self._slack_last = now
        self.slack_messages.append(await request.json())
        return web.Response(text="ok")

    async def get_slack(self, _request: web.Request) -> web.Response:
        return web.json_response(self.slack_messages)


RETURN_FIELDS = ("id", "order_number", "order_item_number", "shipment_number")


def usable(item: dict[str, Any]) -> bool:
    return all(isinstance(item.get(k), str) and item[k] for k in RETURN_FIELDS)


def _same_item(body: dict[str, Any], version: dict[str, Any]) -> bool:
    """Whether a report body carries this version's order item and waybill."""
    return all(body.get(k) == version.get(k) for k in ("order_number", "order_item_number", "shipment_number"))


def _error(status: int, message: str, retry_after: str | None = None) -> web.Response:
    headers = {"Retry-After": retry_after} if retry_after else None
    return web.json_response({"error": message}, status=status, headers=headers)


def _encode_cursor(position: int) -> str:
    return base64.urlsafe_b64encode(f"pos:{position}".encode()).decode()


def _decode_cursor(cursor: str | None) -> int:
    if cursor is None:
        return 0
    text = base64.urlsafe_b64decode(cursor.encode()).decode()
    if not text.startswith("pos:"):
        raise ValueError(cursor)
    return int(text[4:])


def daemon_config_toml(sections: dict[str, Any], comment: str = "") -> str:
    """A tracker config file from {section: {key: value}} (or, for an array of tables such as
    [[webhook]], {section: [{key: value}, …]}): what tests, the demo and the benchmarks run the
    daemon with against this stand-in. (JSON scalars and lists of them are valid TOML values.)"""
    lines = [f"# {comment}"] if comment else []
    for section, values in sections.items():
        for table, header in ([(t, f"[[{section}]]") for t in values] if isinstance(values, (list, tuple))
                              else [(values, f"[{section}]")]):
            lines += ["", header] + [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


def read_ledger(root: str) -> dict[str, Any]:
    """GET /_ledger of a stand-in running in another process (the benchmarks)."""
    with urllib.request.urlopen(root + "/_ledger", timeout=10) as resp:
        return json.load(resp)


# ── how a caller used the rate limit (tests and bench/rate_limit.py) ───────────────────────


@dataclasses.dataclass(frozen=True)
class LimitUse:
    """How well a caller used the partner's rate limit over a burst, read from the ledger's calls
    per tenth of a second. The limit that binds is the results endpoint's (it needs the most calls),
    or the one limit all endpoints share."""

    busy_s: float  # from the first call until the last report was recorded
    floor_s: float  # the least time the limit allows: minimum calls ÷ the limit (over its schedule)
    share: float  # calls let through ÷ the limit, from reaching 90% until a second before the end
    refused_share: float  # calls answered 429, of all calls
    to_90_s: float | None  # first call → the first second letting through ≥ 90% of the limit
    follow_s: tuple[tuple[float, float | None], ...]  # (limit change at, seconds until followed)

    @property
    def against_floor(self) -> float:
        return self.busy_s / self.floor_s


def minimum_calls(summary: dict[str, Any], page_size: int) -> dict[str, int]:
    """What any caller must spend: a page per page_size listings, a tracking call per box, a report
    per collected return."""
    return {"returns": math.ceil(summary["feed_entries"] / page_size), "tracking": summary["boxes"],
            "results": summary["expected"]}


def limit_use(summary: dict[str, Any], faults: Faults, page_size: int = 500) -> LimitUse:
    limiter = RateLimiter(faults)
    first, last = summary["first_call_s"], summary["last_recorded_s"]
    need = minimum_calls(summary, page_size)
    tenths: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for endpoint, counts in summary["by_tenth"].items():
        if faults.limit_shared or endpoint == "results":
            for tenth, (through, refused) in counts.items():
                tenths[int(tenth)][0] += through
                tenths[int(tenth)][1] += refused
    floor = _floor_s(limiter, first, sum(need.values()) if faults.limit_shared else max(need.values()))
    calls = sum(sum(sum(t) for t in counts.values()) for counts in summary["by_tenth"].values())
    refused = sum(sum(t[1] for t in counts.values()) for counts in summary["by_tenth"].values())

    def second_ending(tenth: int) -> tuple[int, int, float]:
        """Calls let through and refused in the second ending with this tenth, and its mean limit."""
        window = range(tenth - 9, tenth + 1)
        return (sum(tenths[t][0] for t in window if t in tenths), sum(tenths[t][1] for t in window if t in tenths),
                sum(limiter.limit_at(t / 10 + 0.05) for t in window) / 10)

    start, end = math.floor(first * 10), math.floor(last * 10)
    reached = next((t for t in range(start + 9, end + 1) if (w := second_ending(t))[0] >= 0.9 * w[2]), None)
    follow = []
    for at, _ in faults.limit_schedule:
        if first < at < last:
            followed = next((t for t in range(math.ceil(at * 10) + 9, end + 1)
                             if (w := second_ending(t))[0] >= 0.9 * w[2] and w[1] <= 0.05 * (w[0] + w[1])), None)
            follow.append((at, None if followed is None else (followed + 1) / 10 - at))
    hold_from = (reached - 9) if reached is not None else start
    hold = range(hold_from, max(hold_from + 1, end - 9))
    through = sum(tenths[t][0] for t in hold if t in tenths)
    allowed = sum(limiter.limit_at(t / 10 + 0.05) for t in hold) / 10
    return LimitUse(busy_s=last - first, floor_s=floor, share=through / allowed, refused_share=refused / max(calls, 1),
                    to_90_s=None if reached is None else (reached + 1) / 10 - first, follow_s=tuple(follow))


def _floor_s(limiter: RateLimiter, first: float, calls: int) -> float:
    """Seconds from `first` until the limit, as it changes, has allowed `calls` calls."""
    allowed, t, step = 0.0, first, 0.01
    while allowed < calls:
        allowed += limiter.limit_at(t) * step
        t += step
    return t - first


@contextmanager
def running_in_thread(scenario: Scenario) -> Iterator["ThreadedStandIn"]:
    """The stand-in on its own event loop in a background thread, for synchronous callers."""
    handle = ThreadedStandIn(scenario)
    handle.start()
    try:
        yield handle
    finally:
        handle.stop()


class ThreadedStandIn:
    def __init__(self, scenario: Scenario) -> None:
        self.standin = StandIn(scenario)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="standin", daemon=True)

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.standin.start(), self.loop).result(timeout=10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    async def _shutdown(self) -> None:
        await self.standin.stop()
        leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in leftovers:  # handlers still "hanging" on purpose
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)

    @property
    def url(self) -> str:
        return self.standin.url

    @property
    def root(self) -> str:
        return self.standin.root

    def call(self, fn: Any, *args: Any) -> Any:
        """Run fn(*args) on the stand-in's loop (its state is not thread-safe) and return its result."""
        async def run() -> Any:
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=10)

    def ledger(self) -> dict[str, Any]:
        return self.call(self.standin.summary)

    def set_faults(self, **changes: Any) -> None:
        self.call(lambda: setattr(self.standin, "faults", dataclasses.replace(self.standin.faults, **changes)))


def _tuples(values: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--returns", type=int, default=30000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scenario", default=None, help="JSON overrides of the demo scenario's fields")
    args = parser.parse_args()
    scenario = Scenario.demo(args.returns, args.seconds, args.seed)
    if args.scenario:
        overrides: dict[str, Any] = _tuples(json.loads(args.scenario))  # JSON lists are the ranges' tuples
        if "faults" in overrides:
            fault_overrides: dict[str, Any] = _tuples(overrides["faults"])
            overrides["faults"] = dataclasses.replace(scenario.faults, **fault_overrides)
        scenario = dataclasses.replace(scenario, **overrides)

    async def serve() -> None:
        standin = StandIn(scenario)
        await standin.start(args.host, args.port)
        print(json.dumps({"url": standin.url, "root": standin.root, "token": scenario.token,
                          "slack": standin.root + "/_slack"}), flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
