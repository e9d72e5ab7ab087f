"""Webhooks: the shop's receivers told when a pickup is collected or cancelled, as Standard Webhooks
say — verified here as a receiver does, with the maintained `standardwebhooks` library, never our
own code. Each cause is announced under one webhook-id (the receiver counts distinct ids), on
every retry and replay; a receiver that fails is retried on its schedule; one that answers 410 is
disabled until an operator enables it again."""

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import standardwebhooks
from aiohttp import web

import standin
import tracker
from conftest import (ROOT, api_key_in, config_toml, everything_reported, free_port, helper_of, make_config, running,
                      running_daemon, scenario, scraped, wait_until, wait_until_sync)

SECRET = "whsec_" + "c2VjcmV0LW9mLXRoZS1yZWZ1bmRzLXJlY2VpdmVyLTMyYg=="  # 32 bytes
OLD_SECRET = "whsec_" + "b2xkLXNlY3JldC1vZi10aGUtcmVmdW5kcy1yZWNlaXZlcg=="


class Receiver:
    """A shop's receiver on loopback: verifies every delivery with the library, keeps each event
    by its webhook-id, and answers as `answer(n)` says for its n-th call (200 by default)."""

    def __init__(self, secret: str, answer: Callable[[int], int] = lambda n: 200) -> None:
        self.verifier = standardwebhooks.Webhook(secret)
        self.answer = answer
        self.events: dict[str, dict[str, Any]] = {}  # webhook-id → payload, from 2xx answers
        self.accepted = 0  # 2xx answers given: more than len(events) if an event came twice
        self.calls = 0
        self.bad_signatures = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        body = await request.read()
        try:
            payload = self.verifier.verify(body, dict(request.headers))
        except standardwebhooks.webhooks.WebhookVerificationError:
            self.bad_signatures += 1
            return web.Response(status=400)
        status = self.answer(self.calls)
        if 200 <= status < 300:
            self.accepted += 1
            self.events.setdefault(request.headers["webhook-id"], payload)
        return web.Response(status=status)

    def of_type(self, kind: str) -> dict[str, str]:
        """subject (the return id) → webhook-id, of the events of this type received."""
        return {payload["data"]["id"]: msg_id for msg_id, payload in self.events.items() if payload["type"] == kind}


@contextlib.asynccontextmanager
async def receiving(receiver: Receiver, port: int = 0) -> AsyncIterator[Receiver]:
    app = web.Application()
    app.router.add_post("/hooks", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    host, port = runner.addresses[0][:2]
    receiver.url = f"http://{host}:{port}/hooks"
    try:
        yield receiver
    finally:
        await runner.cleanup()


def with_webhook(config: tracker.Config, url: str, **options: Any) -> tracker.Config:
    webhook = tracker.WebhookConfig(name="refunds", url=url, events=("return.collected", "return.cancelled"),
                                    secret=SECRET, retry_schedule_s=(0.0, 0.1, 0.2, 0.4, 0.8), timeout_s=2.0,
                                    cancel_hold_s=0.0)  # no reissues in these scenarios but where a test says
    return dataclasses.replace(config, webhook=(dataclasses.replace(webhook, **options),))


def in_backend(config: tracker.Config, backend: str) -> tracker.Config:
    if backend.startswith("postgresql://"):
        return dataclasses.replace(config, storage=dataclasses.replace(config.storage, url=backend, lease_s=3.0))
    return dataclasses.replace(config, storage=dataclasses.replace(config.storage, path=backend))


async def ids_in(where: str, sql: str) -> set[str]:
    store = await tracker.Store.open(where)
    try:
        return {row[0] for row in await store.db.query(sql, ())}
    finally:
        await store.close()


def announced(receiver: Receiver, kind: str, expected: set[str]):
    async def check() -> bool:
        return set(receiver.of_type(kind)) >= expected
    return check


async def all_announced(partner: standin.ThreadedStandIn, receiver: Receiver, where: str) -> tuple[set[str], set[str]]:
    """Once every report is made and every collected and cancelled return announced: their ids."""
    await wait_until(everything_reported(partner, where), 60, what="every report")
    reported = await ids_in(where, "SELECT return_id FROM reports WHERE state = 'done'")
    cancelled = await ids_in(where, "SELECT r.id FROM returns r JOIN boxes b"
                                    " ON b.shipment_number = r.shipment_number WHERE b.state = 'cancelled'")
    await wait_until(announced(receiver, "return.collected", reported), 30, what="every collection announced")
    await wait_until(announced(receiver, "return.cancelled", cancelled), 30, what="every cancel announced")
    return reported, cancelled


async def test_every_collected_and_cancelled_return_is_announced_once_signed(start_partner, backend: str,
                                                                             tmp_path: Path) -> None:
    partner = start_partner(scenario(returns=80, cancel_share=0.2))
    async with receiving(Receiver(SECRET)) as receiver:
        config = in_backend(with_webhook(make_config(tmp_path / "unused.db", partner.url), receiver.url), backend)
        async with running_daemon(config):
            reported, cancelled = await all_announced(partner, receiver, backend)
    assert reported and cancelled
    assert set(receiver.of_type("return.collected")) == reported  # each collected return, and only those
    assert set(receiver.of_type("return.cancelled")) == cancelled
    assert receiver.bad_signatures == 0 and receiver.accepted == len(receiver.events)  # none came twice
    collected = next(p for p in receiver.events.values() if p["type"] == "return.collected")
    assert collected["timestamp"] == collected["data"]["report"]["collected_at"]  # when the courier collected it


async def test_three_instances_on_postgresql_announce_each_cause_once_though_the_deliverer_stops(
        start_partner, pg_url: str, tmp_path: Path) -> None:
    """With several instances one delivers at a time (the feed's leader); stopped mid-burst, its
    deliveries go on from another instance, under the same webhook-ids."""
    partner = start_partner(scenario(returns=150, cancel_share=0.2, arrive_over_s=3.0, step_s=(0.3, 0.8)))
    async with receiving(Receiver(SECRET)) as receiver:
        config = in_backend(with_webhook(make_config(tmp_path / "unused.db", partner.url), receiver.url), pg_url)
        async with contextlib.AsyncExitStack() as fleet:
            stacks = [await fleet.enter_async_context(contextlib.AsyncExitStack()) for _ in range(3)]
            daemons = [await stack.enter_async_context(running_daemon(config)) for stack in stacks]

            async def under_way() -> bool:
                return len(receiver.events) >= 20
            await wait_until(under_way, 40, what="the first deliveries")
            leaders = [n for n, daemon in enumerate(daemons) if await scraped(daemon, "tracker_feed_leader") == 1]
            assert len(leaders) == 1, leaders
            await stacks[leaders[0]].aclose()  # the deliverer stops; another takes over
            others = [daemon for n, daemon in enumerate(daemons) if n != leaders[0]]
            reported, cancelled = await all_announced(partner, receiver, pg_url)
            delivered_by_others = sum([await scraped(daemon, 'tracker_webhook_deliveries_total{endpoint="refunds",'
                                                             'state="delivered"}') for daemon in others])
    assert reported and cancelled and delivered_by_others > 0
    assert set(receiver.of_type("return.collected")) == reported
    assert set(receiver.of_type("return.cancelled")) == cancelled
    assert len(receiver.events) == len(reported) + len(cancelled)  # each cause under one webhook-id
    assert receiver.bad_signatures == 0


async def test_a_waybill_the_carrier_reissued_is_no_cancel_when_its_correction_comes_within_the_hold(
        start_partner, db_path: Path) -> None:
    """The carrier ends a waybill it reissues `cancelled`, as it ends one the customer withdrew; the
    feed's correction moving the returns to the new waybill may come after the tracker saw that.
    A return.cancelled waits cancel_hold_s, and such a correction within it takes it back: the
    refund service never hears "withdrawn" for a return that goes on under another waybill."""
    partner = start_partner(scenario(returns=60, reissue_share=0.5, cancel_share=0.15, correction_delay_s=(0.6, 1.2)))
    async with receiving(Receiver(SECRET)) as receiver:
        config = with_webhook(make_config(db_path, partner.url), receiver.url, cancel_hold_s=2.0)
        async with running_daemon(config):
            await wait_until(everything_reported(partner, db_path), 40, what="every report")
            withdrawn = await ids_in(str(db_path), "SELECT r.id FROM returns r JOIN boxes b ON b.shipment_number"
                                                   " = r.shipment_number WHERE b.state = 'cancelled'")
            await wait_until(announced(receiver, "return.cancelled", withdrawn), 20, what="every withdrawal announced")
            reissued_after_the_cancel = await ids_in(str(db_path), (
                "SELECT c.return_id FROM corrections c JOIN boxes b"
                " ON b.shipment_number = json_extract(c.before, '$.shipment_number')"
                " WHERE b.state = 'cancelled' AND b.closed_at < c.corrected_at"))
    assert withdrawn and reissued_after_the_cancel  # both cases happened
    assert set(receiver.of_type("return.cancelled")) == withdrawn


async def test_a_receiver_failing_at_first_gets_every_event_under_its_one_id(start_partner, db_path: Path) -> None:
    partner = start_partner(scenario(returns=40, cancel_share=0.0))
    async with receiving(Receiver(SECRET, answer=lambda n: 500 if n <= 8 else 200)) as receiver:
        config = with_webhook(make_config(db_path, partner.url), receiver.url, retry_schedule_s=(0.0,) + (0.2,) * 9)
        async with running_daemon(config):  # the first calls fail, and the breaker opens
            await wait_until(everything_reported(partner, db_path), 40, what="every report")
            reported = await ids_in(str(db_path), "SELECT return_id FROM reports WHERE state = 'done'")
            await wait_until(announced(receiver, "return.collected", reported), 20, what="every collection announced")
    assert receiver.calls > len(receiver.events)  # retried
    assert receiver.accepted == len(receiver.events) == len(reported)  # each once


async def test_rotation_signs_with_both_secrets_so_a_receiver_holding_the_old_one_verifies(
        start_partner, db_path: Path) -> None:
    partner = start_partner(scenario(returns=10, cancel_share=0.0))
    async with receiving(Receiver(OLD_SECRET)) as receiver:
        config = with_webhook(make_config(db_path, partner.url), receiver.url, previous_secret=OLD_SECRET)
        async with running_daemon(config):
            await wait_until(everything_reported(partner, db_path), 40, what="every report")
            reported = await ids_in(str(db_path), "SELECT return_id FROM reports WHERE state = 'done'")
            await wait_until(announced(receiver, "return.collected", reported), 20, what="every collection announced")
    assert receiver.bad_signatures == 0


@pytest.mark.parametrize("failure, status, options, why", [
    ("410", 410, {}, "answered 410 Gone"),
    # 500s open the endpoint's breaker first: the deliveries waiting at it when the endpoint is
    # disabled must leave it free for those after the enable
    ("500s past disable_after_s", 500, {"disable_after_s": 1.0}, "failing for over"),
], ids=["410", "failing too long"])
async def test_a_receiver_disabled_gets_what_it_missed_once_enabled(
        start_partner, tmp_path: Path, failure: str, status: int, options: dict[str, Any], why: str) -> None:
    db_path = tmp_path / "tracker.db"
    partner = start_partner(scenario(returns=20, cancel_share=0.0))
    gone = True
    async with receiving(Receiver(SECRET, answer=lambda n: status if gone else 200)) as receiver:
        config = with_webhook(make_config(db_path, partner.url, slack=tracker.SlackConfig(
            webhook_url=partner.root + "/_slack")), receiver.url, **options)
        sections = json.loads(json.dumps(dataclasses.asdict(config)))
        for webhook in sections["webhook"]:
            del webhook["secret"], webhook["previous_secret"]  # an operator's shell has no secrets
        (tmp_path / "config.toml").write_text(standin.daemon_config_toml(sections))
        async with running_daemon(config) as daemon:
            await wait_until(everything_reported(partner, db_path), 40, what="every report")

            async def disabled() -> bool:
                return any("Webhook endpoint refunds is disabled" in m["text"]
                           for m in partner.call(lambda: list(partner.standin.slack_messages)))
            await wait_until(disabled, 20, what="the endpoint disabled and said on Slack")
            calls_when_disabled = receiver.calls
            failing_since = await wait_until(lambda: scraped(daemon, 'tracker_webhook_endpoint_failing_since_'
                                                                     'timestamp_seconds{endpoint="refunds"}'),
                                             20, what="the endpoint's failing since on /metrics")
            listed = await asyncio.to_thread(subprocess.run, [
                sys.executable, str(ROOT / "tracker.py"), "webhooks", "list",
                "--config", str(tmp_path / "config.toml")],
                capture_output=True, text=True, check=True)
            await asyncio.sleep(2 * tracker.Dispatcher.IDLE_POLL_S)  # a window of the senders' polls, to see nothing
            calls_while_disabled = receiver.calls - calls_when_disabled
            gone = False
            # in a thread: the daemon runs in this loop, and a transaction of its held open while the
            # loop waited for the command would hold the command's write off until it gave up
            enabled = await asyncio.to_thread(subprocess.run, [
                sys.executable, str(ROOT / "tracker.py"), "webhooks", "enable", "refunds",
                "--config", str(tmp_path / "config.toml")], capture_output=True, text=True)
            assert enabled.returncode == 0 and "refunds: enabled" in enabled.stdout, enabled.stderr
            reported = await ids_in(str(db_path), "SELECT return_id FROM reports WHERE state = 'done'")
            await wait_until(announced(receiver, "return.collected", reported), 20, what="what it missed delivered")
    assert calls_when_disabled > 0 and calls_while_disabled == 0
    assert time.time() - 60 < failing_since < time.time()
    assert "disabled" in listed.stdout and why in listed.stdout, listed.stdout
    assert receiver.accepted == len(receiver.events) == len(reported)


async def test_a_replayed_event_comes_again_under_the_same_id(start_partner, tmp_path: Path) -> None:
    db_path = tmp_path / "tracker.db"
    partner = start_partner(scenario(returns=5, cancel_share=0.0))
    async with receiving(Receiver(SECRET)) as receiver:
        config = with_webhook(make_config(db_path, partner.url), receiver.url)
        (tmp_path / "config.toml").write_text(config_toml(partner.url, db_path) + "\n[[webhook]]\nname = \"refunds\"\n"
                                              f"url = \"{receiver.url}\"\n")
        async with running_daemon(config):
            await wait_until(everything_reported(partner, db_path), 40, what="every report")
            reported = await ids_in(str(db_path), "SELECT return_id FROM reports WHERE state = 'done'")
            await wait_until(announced(receiver, "return.collected", reported), 20, what="every collection announced")
            msg_id = sorted(receiver.events)[0]
            before = receiver.accepted
            replayed = await asyncio.to_thread(subprocess.run, [  # in a thread: see the 410 test
                sys.executable, str(ROOT / "tracker.py"), "webhooks", "replay", msg_id,
                "--config", str(tmp_path / "config.toml")], capture_output=True, text=True)
            assert replayed.returncode == 0, replayed.stderr

            async def came_again() -> bool:
                return receiver.accepted > before
            await wait_until(came_again, 20, what="the replayed event")
    assert replayed.returncode == 0 and f"{msg_id} → refunds" in replayed.stdout, replayed.stderr
    assert len(receiver.events) == len(reported) and receiver.accepted == before + 1  # the same id again


async def test_a_returns_story_in_show_and_the_api_tells_each_event_and_its_delivery(start_partner,
                                                                                      tmp_path: Path) -> None:
    db_path = tmp_path / "tracker.db"
    partner = start_partner(scenario(returns=5, cancel_share=0.0))
    key = await api_key_in(db_path, "refund-service", scopes=("returns:read",))
    async with receiving(Receiver(SECRET)) as receiver:
        config = with_webhook(make_config(db_path, partner.url), receiver.url)
        config = dataclasses.replace(config, api=tracker.ApiConfig(listen="127.0.0.1:0"))
        (tmp_path / "config.toml").write_text(config_toml(partner.url, db_path))
        async with running_daemon(config) as daemon:
            await wait_until(everything_reported(partner, db_path), 40, what="every report")
            reported = await ids_in(str(db_path), "SELECT return_id FROM reports WHERE state = 'done'")
            await wait_until(announced(receiver, "return.collected", reported), 20, what="every collection announced")
            return_id = sorted(reported)[0]
            msg_id = receiver.of_type("return.collected")[return_id]

            async def delivery_recorded() -> dict[str, Any] | None:  # the receiver answers before the commit
                async with aiohttp.ClientSession() as http, http.get(
                        f"http://{daemon.api_address}/v1/returns/{return_id}",
                        headers={"Authorization": f"Bearer {key}"}) as answer:
                    story = await answer.json()
                states = [d["state"] for e in story["webhooks"] for d in e["deliveries"]]
                return story if states and "pending" not in states else None
            story = await wait_until(delivery_recorded, 10, what="the delivery's answer committed")
            shown = await asyncio.to_thread(subprocess.run, [  # in a thread: see the 410 test
                sys.executable, str(ROOT / "tracker.py"), "show", return_id, "--config", str(tmp_path / "config.toml")],
                capture_output=True, text=True)
    (event,) = [e for e in story["webhooks"] if e["type"] == "return.collected"]
    assert event["id"] == msg_id and event["announced_at"]
    (delivery,) = event["deliveries"]
    assert delivery["endpoint"] == "refunds" and delivery["state"] == "delivered" and delivery["last_status"] == 200
    assert delivery["attempts"] == 1 and delivery["delivered_at"] and delivery["next_attempt_at"] is None
    assert "webhooks" not in receiver.events[msg_id]["data"]  # a body never tells of its own delivery
    assert shown.returncode == 0, shown.stderr
    assert f"webhook return.collected {msg_id}" in shown.stdout
    assert "→ refunds: delivered" in shown.stdout and "1 attempt(s), last answer HTTP 200" in shown.stdout


class HeldStories:
    """A store whose story reads wait until released; each read's keys, in order."""

    def __init__(self, failure: Exception | None = None) -> None:
        self.reads: list[list[str]] = []
        self.release = asyncio.Event()
        self.failure = failure

    async def stories(self, keys: list[str], *, webhooks: bool = True) -> dict[str, dict[str, Any]]:
        self.reads.append(list(keys))
        await self.release.wait()
        if self.failure is not None:
            raise self.failure
        return {key: {"key": key} for key in keys}


async def started(reader: tracker.StoryReader, keys: list[str]) -> list[asyncio.Task[Any]]:
    """A delivery's task for each key, every one asking within the same turn of the loop (what the
    reader batches by), and the first of them reading for all when this returns."""
    tasks = [asyncio.create_task(reader.story(key)) for key in keys]
    await asyncio.sleep(0)  # the loop's turns, not time: each task asks in the first
    await asyncio.sleep(0)  # and the first takes them all to read in the second
    return tasks


async def test_stories_asked_for_in_one_turn_are_read_together_in_batches() -> None:
    store = HeldStories()
    reader = tracker.StoryReader(store)
    keys = [f"RET_{n}" for n in range(tracker.STORY_BATCH + 3)]
    tasks = await started(reader, keys)
    store.release.set()
    answers = await asyncio.gather(*tasks)
    assert [a["key"] for a in answers] == keys
    assert store.reads == [keys[:tracker.STORY_BATCH], keys[tracker.STORY_BATCH:]]


async def test_a_delivery_cancelled_while_its_story_is_read_leaves_the_others_their_stories() -> None:
    store = HeldStories()
    reader = tracker.StoryReader(store)
    tasks = await started(reader, ["A", "B", "C"])
    tasks[1].cancel()
    store.release.set()
    assert [(await tasks[0])["key"], (await tasks[2])["key"]] == ["A", "C"]
    with pytest.raises(asyncio.CancelledError):
        await tasks[1]


async def test_when_the_delivery_reading_for_the_others_is_cancelled_they_read_again() -> None:
    store = HeldStories()
    reader = tracker.StoryReader(store)
    tasks = await started(reader, ["A", "B", "C"])
    tasks[0].cancel()  # the first to ask reads for all
    await wait_until(lambda: asyncio.sleep(0, len(store.reads) == 2), 5, what="the others' read again")
    store.release.set()
    assert [(await tasks[1])["key"], (await tasks[2])["key"]] == ["B", "C"]
    assert store.reads == [["A", "B", "C"], ["B", "C"]]


async def test_a_story_read_that_fails_leaves_every_waiting_delivery_pending() -> None:
    store = HeldStories(failure=sqlite3.OperationalError("disk I/O error"))
    reader = tracker.StoryReader(store)
    tasks = await started(reader, ["A", "B", "C"])
    store.release.set()
    for task in tasks:  # StorageUnavailable: the dispatcher leaves the delivery due, to be tried again
        with pytest.raises(tracker.StorageUnavailable, match="disk I/O error"):
            await task


@pytest.mark.parametrize("table, problem", [
    ('name = "Refunds!"\nurl = "http://x.example/h"', "webhook.name"),
    ('name = "refunds"\nurl = "ftp://x.example/h"', "webhook.refunds.url"),
    ('name = "refunds"\nurl = "http://x.example/h"\nevents = ["return.lost"]', "webhook.refunds.events"),
    ('name = "refunds"\nurl = "http://x.example/h"\nretry_schedule_s = []', "webhook.refunds.retry_schedule_s"),
    ('name = "refunds"\nurl = "http://x.example/h"\nsecret = "hunter2"', "webhook.refunds.secret"),
    ('name = "refunds"\nurl = "http://x.example/h"', "webhook.refunds.secret: missing"),
])
def test_a_wrong_webhook_table_stops_the_start_with_its_key(tmp_path: Path, table: str, problem: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(config_toml("http://127.0.0.1:1/api", tmp_path / "t.db") + "\n[[webhook]]\n" + table + "\n")
    result = subprocess.run([sys.executable, str(ROOT / "tracker.py"), "check-config", "--config", str(config)],
                            capture_output=True, text=True, env={"TRACKER_PARTNER_TOKEN": "t", "PATH": "/usr/bin"})
    assert result.returncode == 2 and f"config error: {problem}" in result.stderr, result.stderr
    assert "hunter2" not in result.stderr


def test_a_webhook_secret_comes_from_its_credential_and_never_shows(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "webhook_refunds").write_text(SECRET + "\n")
    config = tmp_path / "config.toml"
    config.write_text(config_toml("http://127.0.0.1:1/api", tmp_path / "t.db")
                      + '\n[[webhook]]\nname = "refunds"\nurl = "http://x.example/h"\n')
    loaded = tracker.load_config(config, {"TRACKER_PARTNER_TOKEN": "t", "CREDENTIALS_DIRECTORY": str(credentials)})
    assert loaded.webhook[0].secret == SECRET and SECRET in loaded.secrets  # redacted wherever it would appear
    assert SECRET not in repr(loaded)
    result = subprocess.run([sys.executable, str(ROOT / "tracker.py"), "check-config", "--config", str(config)],
                            capture_output=True, text=True,
                            env={"TRACKER_PARTNER_TOKEN": "t", "CREDENTIALS_DIRECTORY": str(credentials),
                                 "PATH": "/usr/bin"})
    assert result.returncode == 0 and "webhooks refunds" in result.stdout and SECRET not in result.stdout


async def test_stale_waybills_and_corrections_are_announced_each_once(start_partner, db_path: Path) -> None:
    partner = start_partner(scenario(returns=60, cancel_share=0.0, never_registered_share=0.1, reissue_share=0.1,
                                     fix_share=0.05))
    async with receiving(Receiver(SECRET)) as receiver:
        config = with_webhook(make_config(db_path, partner.url), receiver.url,
                              events=("return.corrected", "shipment.stale"))
        async with running_daemon(config):
            await wait_until(everything_reported(partner, db_path), 40, what="every report")
            stale = await wait_until(lambda: ids_in(str(db_path), "SELECT shipment_number FROM boxes"
                                                                   " WHERE state = 'stale'"), 20,
                                     what="the never-registered waybills stale")  # stale_after_s: 3 s

            async def all_stale() -> bool:
                return {p["data"]["shipment_number"] for p in receiver.events.values()
                        if p["type"] == "shipment.stale"} >= stale
            await wait_until(all_stale, 20, what="every stale waybill announced")
            corrected = await ids_in(str(db_path), "SELECT return_id FROM corrections")
            await wait_until(announced(receiver, "return.corrected", corrected), 20, what="every correction announced")
    assert stale and corrected
    assert {p["type"] for p in receiver.events.values()} == {"shipment.stale", "return.corrected"}  # as subscribed
    stale_event = next(p for p in receiver.events.values() if p["type"] == "shipment.stale")
    assert stale_event["data"]["state"] == "stale" and stale_event["data"]["returns"]
    assert receiver.accepted == len(receiver.events) and receiver.bad_signatures == 0


async def test_a_pickup_overdue_is_announced_once_a_box_with_the_shipments_story(start_partner,
                                                                                 db_path: Path) -> None:
    partner = start_partner(scenario(returns=20, step_s=(30.0, 60.0)))  # no box is collected in the test
    overdue_soon = dataclasses.replace(make_config(db_path, partner.url).schedule, overdue_after_s=0.5)
    async with receiving(Receiver(SECRET)) as receiver:
        config = with_webhook(make_config(db_path, partner.url, schedule=overdue_soon), receiver.url,
                              events=("pickup.overdue",))
        async with running_daemon(config):
            tracked = await wait_until(lambda: ids_in(str(db_path), "SELECT shipment_number FROM boxes"
                                                                   " WHERE state = 'tracking'"), 20, what="boxes")

            async def all_overdue() -> bool:
                return {p["data"]["shipment_number"] for p in receiver.events.values()} >= tracked
            await wait_until(all_overdue, 30, what="every open box announced overdue")
    assert {p["type"] for p in receiver.events.values()} == {"pickup.overdue"}
    assert receiver.accepted == len(receiver.events) and receiver.bad_signatures == 0  # once a box
    overdue = next(iter(receiver.events.values()))
    assert overdue["data"]["state"] == "tracking" and overdue["data"]["returns"]


# ── receivers that fail: down, hostile, and the tracker killed mid-delivery ────────────────


def two_receivers(config: tracker.Config, good: str, bad: str, **bad_options: Any) -> tracker.Config:
    """`refunds` at `good`, and `hostile` at `bad`: both take every collected return."""
    refunds = with_webhook(config, good).webhook[0]
    hostile = dataclasses.replace(refunds, name="hostile", url=bad, **bad_options)
    return dataclasses.replace(config, webhook=(refunds, hostile))


@contextlib.asynccontextmanager
async def misbehaving(behaviour: str) -> AsyncIterator[str]:
    """A receiver on loopback that reads a delivery's headers and then: never answers, answers 200
    with an endless body, answers a megabyte of headers, or resets the connection. Its URL."""
    handlers: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await reader.readuntil(b"\r\n\r\n")
            if behaviour == "no answer":
                await asyncio.Event().wait()  # until the test ends
            elif behaviour == "endless body":
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                while True:
                    writer.write(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
                    await writer.drain()
            elif behaviour == "huge headers":
                writer.write(b"HTTP/1.1 200 OK\r\nX-Junk: " + b"y" * 1_000_000 + b"\r\n\r\n")
                await writer.drain()
            elif behaviour == "reset":
                writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                           struct.pack("ii", 1, 0))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the tracker gave up on it
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hooks"
    finally:
        server.close()
        for handler in handlers:
            handler.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


@pytest.mark.parametrize("behaviour", ["no answer", "endless body", "huge headers", "reset"])
async def test_a_hostile_receiver_never_holds_up_another_or_the_pipeline(start_partner, db_path: Path,
                                                                         behaviour: str) -> None:
    partner = start_partner(scenario(returns=60, cancel_share=0.0))
    async with receiving(Receiver(SECRET)) as receiver, misbehaving(behaviour) as bad_url:
        config = two_receivers(make_config(db_path, partner.url), receiver.url, bad_url, timeout_s=0.5,
                               retry_schedule_s=(0.0, 0.5, 1.0, 60.0))
        async with running_daemon(config):
            await wait_until(everything_reported(partner, db_path), 40, what="every report")
            reported = await ids_in(str(db_path), "SELECT return_id FROM reports WHERE state = 'done'")
            await wait_until(announced(receiver, "return.collected", reported), 20, what="the good receiver told")

            async def hostile_states() -> set[str]:
                return await ids_in(str(db_path), "SELECT state FROM webhook_deliveries WHERE endpoint = 'hostile'")
            if behaviour == "endless body":  # a 200 is an answer: the tracker reads no receiver's body
                await wait_until(lambda: states_are(hostile_states, {"delivered"}), 20, what="all delivered")
            hostile = await hostile_states()
    assert receiver.accepted == len(receiver.events) == len(reported) and receiver.bad_signatures == 0
    assert hostile and ("delivered" not in hostile) == (behaviour != "endless body")


async def states_are(states: Callable[[], Awaitable[set[str]]], expected: set[str]) -> bool:
    return await states() == expected


async def test_a_receiver_down_for_a_while_gets_every_event_under_its_one_id_when_it_is_back(
        start_partner, db_path: Path) -> None:
    partner = start_partner(scenario(returns=60, cancel_share=0.0))
    port = free_port()
    receiver = Receiver(SECRET)
    config = with_webhook(make_config(db_path, partner.url), f"http://127.0.0.1:{port}/hooks",
                          retry_schedule_s=(0.0,) + (0.5,) * 40)
    async with running_daemon(config):
        await wait_until(everything_reported(partner, db_path), 40, what="every report, the receiver down")
        failed = await ids_in(str(db_path), "SELECT event_id FROM webhook_deliveries WHERE attempts > 0")
        async with receiving(receiver, port):
            reported = await ids_in(str(db_path), "SELECT return_id FROM reports WHERE state = 'done'")
            await wait_until(announced(receiver, "return.collected", reported), 30, what="every event, once back")
    assert failed  # it was tried while down
    assert set(receiver.of_type("return.collected")) == reported
    assert receiver.accepted == len(receiver.events) == len(reported)


async def test_kill_9_mid_delivery_announces_each_cause_under_one_id(start_partner, daemon_process,
                                                                     tmp_path: Path) -> None:
    """A delivery answered but not yet stored when the tracker dies is sent again after the restart
    — under the same webhook-id, so the receiver's count of distinct ids is one a return."""
    partner = start_partner(scenario(returns=600, arrive_over_s=3.0, cancel_share=0.0))
    db = tmp_path / "tracker.db"
    async with receiving(Receiver(SECRET)) as receiver:
        daemon = daemon_process(config_toml(partner.url, db) + (
            f'\n[[webhook]]\nname = "refunds"\nurl = "{receiver.url}"\nevents = ["return.collected"]\n'
            f'secret = "{SECRET}"\nretry_schedule_s = [0, 0.2, 0.4, 0.8, 1.6]\n')).start()

        async def under_way() -> bool:
            return len(receiver.events) >= 50
        await wait_until(under_way, 60, what="deliveries under way")
        daemon.kill9()
        daemon.start()
        await wait_until(everything_reported(partner, db), 90, what="every report")
        reported = await ids_in(str(db), "SELECT return_id FROM reports WHERE state = 'done'")
        await wait_until(announced(receiver, "return.collected", reported), 30, what="every collection told")
    assert set(receiver.of_type("return.collected")) == reported
    assert len(receiver.events) == len(reported)  # one id a return, however many times it came


# ── the webhooks' own process ──────────────────────────────────────────────────────────────


async def test_a_webhooks_process_killed_mid_burst_is_started_again_and_every_cause_comes_once(
        start_partner, db_path: Path) -> None:
    partner = start_partner(scenario(returns=400, arrive_over_s=2.0, cancel_share=0.0))
    async with receiving(Receiver(SECRET)) as receiver:
        config = with_webhook(make_config(db_path, partner.url), receiver.url)
        async with running_daemon(config) as daemon:
            async def under_way() -> bool:
                return len(receiver.events) >= 20
            await wait_until(under_way, 60, what="deliveries under way")
            first = helper_of(os.getpid(), tracker.WEBHOOK_PROCESS_COMMAND)
            assert first is not None
            os.kill(first, signal.SIGKILL)

            async def not_ready() -> bool:
                return "the webhooks' process is not running" in daemon.readiness()

            async def started_again() -> bool:
                return helper_of(os.getpid(), tracker.WEBHOOK_PROCESS_COMMAND) not in (None, first)
            await wait_until(not_ready, 10, interval_s=0.02, what="readiness: the webhooks' process is not running")
            await wait_until(started_again, 30, what="a new webhooks' process")
            await wait_until(everything_reported(partner, db_path), 60, what="every report")
            reported = await ids_in(str(db_path), "SELECT return_id FROM reports WHERE state = 'done'")
            await wait_until(announced(receiver, "return.collected", reported), 30, what="every collection announced")
            assert daemon.readiness() == []
    assert set(receiver.of_type("return.collected")) == reported
    assert receiver.bad_signatures == 0


def test_a_daemon_killed_with_sigkill_takes_its_webhooks_process_with_it(start_partner, daemon_process,
                                                                         tmp_path: Path) -> None:
    partner = start_partner(scenario(returns=5))
    receiver = f"http://127.0.0.1:{free_port()}/hooks"
    daemon = daemon_process(config_toml(partner.url, tmp_path / "tracker.db") + (
        f'\n[[webhook]]\nname = "refunds"\nurl = "{receiver}"\nsecret = "{SECRET}"\n')).start()
    helper = wait_until_sync(lambda: helper_of(daemon.pid, tracker.WEBHOOK_PROCESS_COMMAND), 30,
                             what="the daemon's webhooks' process")
    daemon.kill9()
    wait_until_sync(lambda: not running(helper), 10, what="the webhooks' process to leave with its daemon")


async def test_a_daemon_stopped_leaves_no_webhooks_process_behind(start_partner, db_path: Path) -> None:
    partner = start_partner(scenario(returns=5))
    config = with_webhook(make_config(db_path, partner.url), f"http://127.0.0.1:{free_port()}/hooks")
    async with running_daemon(config):
        helper = helper_of(os.getpid(), tracker.WEBHOOK_PROCESS_COMMAND)
        assert helper is not None and running(helper)
    assert not running(helper)
