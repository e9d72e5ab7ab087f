"""The shop's API (/v1) through real HTTP on loopback: pushed returns tracked and reported as feed
items are, the reads, a check now, keys with scopes, address ranges and rates, an audit trail,
and every refusal an RFC 9457 problem. The storage behind it on both backends."""

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openapi_spec_validator import validate as validate_openapi

import standin
import tracker
from conftest import (ROOT, TOKEN, api_key_in, config_toml, counts_in, free_port, helper_of, ledger_of, make_config,
                      running, running_daemon, scenario, scraped, wait_until, wait_until_sync)

ALL_SCOPES = ("returns:read", "returns:write", "shipments:check")


def with_api(config: tracker.Config, **api: Any) -> tracker.Config:
    return dataclasses.replace(config, api=tracker.ApiConfig(listen="127.0.0.1:0", **api))


class Client:
    """The shop's side: one key, the API's address."""

    def __init__(self, http: aiohttp.ClientSession, address: str, key: str | None) -> None:
        self.http, self.root, self.key = http, f"http://{address}", key

    async def call(self, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None,
                   raw: bytes | None = None) -> tuple[int, Any, Any]:
        sent = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        sent.update(headers or {})
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None and "Content-Type" not in sent:
            sent["Content-Type"] = "application/json"
        async with self.http.request(method, self.root + path, data=data, headers=sent) as resp:
            text = await resp.text()
            return resp.status, (json.loads(text) if text else None), resp.headers


@contextlib.asynccontextmanager
async def api_daemon(config: tracker.Config) -> AsyncIterator[tuple[tracker.Daemon, aiohttp.ClientSession]]:
    async with running_daemon(config) as daemon, aiohttp.ClientSession() as http:
        yield daemon, http


@contextlib.asynccontextmanager
async def quiet_api(start_partner, db_path: Path, key_name: str = "order-system", returns: int = 5,
                    **key_options: Any) -> AsyncIterator[tuple[Client, list[dict[str, Any]]]]:
    """A daemon with the API on, against a partner whose feed lists nothing yet (its clock held):
    what the state holds came by the API. A client with a key of every scope, and the partner's returns."""
    partner = start_partner(scenario(returns=returns))
    partner.call(partner.standin.hold_clock)
    key = await api_key_in(db_path, key_name, **key_options)
    async with api_daemon(with_api(make_config(db_path, partner.url))) as (daemon, http):
        yield Client(http, daemon.api_address, key), items_of(partner)


def api_on(backend: str, partner_url: str, tmp_path: Path) -> tracker.Config:
    """The API on, its state in `backend`: a SQLite file's path or a PostgreSQL database's URL."""
    config = with_api(make_config(tmp_path / "unused.db", partner_url))
    if backend.startswith("postgresql://"):
        return dataclasses.replace(config, storage=dataclasses.replace(config.storage, url=backend, lease_s=3.0))
    return dataclasses.replace(config, storage=dataclasses.replace(config.storage, path=backend))


def items_of(partner: standin.ThreadedStandIn) -> list[dict[str, Any]]:
    """Every return the partner knows, as its feed would list it."""
    return partner.call(lambda: [dict(item) for box in partner.standin.boxes for item in box.items])


def reported_all(partner: standin.ThreadedStandIn, where: str | Path):
    async def check() -> bool:
        ledger = await ledger_of(partner)
        counts = await counts_in(where)
        return ledger["finished"] and ledger["missing"] == 0 and counts.get("reports.pending", 0) == 0
    return check


def assert_problem(status: int, body: Any, headers: Any, expected: int, slug: str) -> None:
    assert status == expected, body
    assert headers["Content-Type"].startswith("application/problem+json")
    assert body["type"] == f"/v1/problems/{slug}" and body["status"] == expected and body["title"]
    assert body["detail"] and body["instance"].startswith("/")


# ── where it is served: a process of its own, or the daemon's loop ─────────────────────────


@pytest.mark.parametrize("own_process", [True, False], ids=["own process", "daemon's loop"])
async def test_the_api_answers_and_is_counted_on_the_daemons_metrics_wherever_it_is_served(
        start_partner, db_path: Path, own_process: bool) -> None:
    partner = start_partner(scenario(returns=5))
    partner.call(partner.standin.hold_clock)
    key = await api_key_in(db_path, "order-system")
    async with api_daemon(with_api(make_config(db_path, partner.url), own_process=own_process)) as (daemon, http):
        assert (helper_of(os.getpid(), tracker.API_PROCESS_COMMAND) is not None) == own_process
        item = items_of(partner)[0]
        client = Client(http, daemon.api_address, key)
        assert (await client.call("POST", "/v1/returns", item))[0] == 201
        assert (await client.call("GET", f"/v1/returns/{item['id']}"))[0] == 200
        assert (await Client(http, daemon.api_address, None).call("GET", f"/v1/returns/{item['id']}"))[0] == 401
        counted = [await scraped(daemon, sample) for sample in (
            'tracker_api_requests_total{route="push_one",status="201"}',
            'tracker_api_requests_total{route="get_return",status="200"}',
            'tracker_api_requests_total{route="get_return",status="401"}',
            'tracker_api_refusals_total{reason="unauthorized"}')]
    assert counted == [1, 1, 1, 1]


async def test_an_api_process_that_dies_is_started_again_and_readyz_says_so_meanwhile(start_partner,
                                                                                     db_path: Path) -> None:
    partner = start_partner(scenario(returns=5))
    key = await api_key_in(db_path, "order-system")
    async with api_daemon(with_api(make_config(db_path, partner.url))) as (daemon, http):
        first = helper_of(os.getpid(), tracker.API_PROCESS_COMMAND)
        assert first is not None
        os.kill(first, signal.SIGKILL)

        async def not_ready() -> bool:
            async with http.get(f"http://{daemon.http_address}/readyz") as answer:
                return answer.status == 503 and "the API's process is not running" in (await answer.json())["problems"]

        async def answering_again() -> bool:
            second = helper_of(os.getpid(), tracker.API_PROCESS_COMMAND)
            with contextlib.suppress(aiohttp.ClientError):
                return second not in (None, first) and (await Client(http, daemon.api_address, key).call(
                    "GET", "/v1/returns?limit=1"))[0] == 200
            return False

        await wait_until(not_ready, 10, interval_s=0.02, what="/readyz to say the API's process is not running")
        await wait_until(answering_again, 30, what="a new API process answering")


def test_a_daemon_killed_with_sigkill_takes_its_api_process_with_it(start_partner, daemon_process,
                                                                    tmp_path: Path) -> None:
    partner = start_partner(scenario(returns=5))
    daemon = daemon_process(config_toml(partner.url, tmp_path / "tracker.db").replace(
        '[api]\nlisten = ""', f'[api]\nlisten = "127.0.0.1:{free_port()}"')).start()
    helper = wait_until_sync(lambda: helper_of(daemon.pid, tracker.API_PROCESS_COMMAND), 30,
                             what="the daemon's API process")
    daemon.kill9()
    wait_until_sync(lambda: not running(helper), 10, what="the API process to leave with its daemon (its stdin closed)")


@pytest.mark.parametrize("own_process", [True, False], ids=["own process", "daemon's loop"])
def test_a_daemon_whose_api_cannot_listen_says_why_and_exits(start_partner, daemon_process, tmp_path: Path,
                                                             own_process: bool) -> None:
    """Under systemd a start that hangs sits in `activating` for TimeoutStartSec, then loops."""
    partner = start_partner(scenario(returns=5))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        daemon = daemon_process(config_toml(partner.url, tmp_path / "tracker.db").replace(
            '[api]\nlisten = ""', f'[api]\nlisten = "127.0.0.1:{taken.getsockname()[1]}"').replace(
            "own_process = true", f"own_process = {str(own_process).lower()}")).start()
        code = daemon.wait(30)
    assert code == tracker.EXIT_FAILURE
    assert "tracker: cannot start:" in daemon.log()
    assert "address already in use" in daemon.log()


# ── pushed returns: the same pipeline as the feed's ────────────────────────────────────────


async def test_returns_pushed_while_the_feed_is_down_are_tracked_and_each_reported_once(
        start_partner, backend: str, tmp_path: Path) -> None:
    partner = start_partner(scenario(returns=200, faults=standin.Faults(feed_down=True)))
    key = await api_key_in(backend, "order-system")
    items = items_of(partner)
    async with api_daemon(api_on(backend, partner.url, tmp_path)) as (daemon, http):
        client = Client(http, daemon.api_address, key)
        for start in range(0, len(items), 80):
            status, body, _ = await client.call("POST", "/v1/returns/batch", {"returns": items[start:start + 80]})
            assert status == 200 and body["rejected"] == 0, body
        again, body, _ = await client.call("POST", "/v1/returns/batch", {"returns": items[:10]})  # sent twice
        assert again == 200 and body["accepted"] == 10 and body["new"] == 0
        await wait_until(reported_all(partner, backend), 60, what="every pushed return reported")
    ledger = await ledger_of(partner)
    assert ledger["recorded"] == ledger["expected"] > 0
    assert ledger["premature"] == ledger["unknown"] == ledger["mismatched"] == 0
    assert ledger["calls"]["returns"].get("200", 0) == 0  # nothing came by the feed


async def test_a_return_the_feed_lists_after_it_was_pushed_is_one_return(start_partner, db_path: Path) -> None:
    partner = start_partner(scenario(returns=60, arrive_over_s=1.5))
    partner.call(partner.standin.hold_clock)  # the feed lists nothing until the pushes are in
    key = await api_key_in(db_path, "order-system")
    async with api_daemon(with_api(make_config(db_path, partner.url))) as (daemon, http):
        client = Client(http, daemon.api_address, key)
        status, body, _ = await client.call("POST", "/v1/returns/batch", {"returns": items_of(partner)})
        assert status == 200 and body["new"] == 60
        partner.call(partner.standin.restart_clock)
        await wait_until(reported_all(partner, db_path), 40, what="every return reported")
    ledger = await ledger_of(partner)
    assert ledger["recorded"] == ledger["expected"] > 0  # (a 409 may settle a report resent after a lost answer)
    assert (await counts_in(db_path))["returns"] == 60  # the feed's listings were the same returns


def without_id(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k != "id"}


def order_name(item: dict[str, Any]) -> str:
    return f"order:{item['order_number']}:{item['order_item_number']}"


async def test_returns_pushed_without_id_then_listed_by_the_feed_are_one_return_each_reported_once(
        start_partner, backend: str, tmp_path: Path) -> None:
    partner = start_partner(scenario(returns=60, arrive_over_s=1.5))
    partner.call(partner.standin.hold_clock)  # the feed lists nothing until the pushes are in
    items = items_of(partner)
    changed = {**without_id(items[0]), "requested_at": "2026-11-20T08:00:00Z"}  # the feed's will differ
    key = await api_key_in(backend, "order-system")
    async with api_daemon(api_on(backend, partner.url, tmp_path)) as (daemon, http):
        client = Client(http, daemon.api_address, key)
        status, body, _ = await client.call("POST", "/v1/returns/batch",
                                            {"returns": [changed, *map(without_id, items[1:])]})
        assert status == 200 and body["new"] == 60
        partner.call(partner.standin.restart_clock)
        await wait_until(reported_all(partner, backend), 40, what="every return reported")
        status, found, _ = await client.call("GET", f"/v1/returns/{items[0]['id']}")  # the feed's id finds it
    ledger = await ledger_of(partner)
    assert ledger["recorded"] == ledger["expected"] > 0 and ledger["unknown"] == 0
    assert (await counts_in(backend))["returns"] == 60  # the feed's listings were the same returns
    assert status == 200 and found["id"] == order_name(items[0]) and found["also_known_as"] == [items[0]["id"]]
    assert found["source"] == "order-system" and found["report"]["state"] == "done"
    assert [(c["fields"], c["source"]) for c in found["corrections"]] == [(["requested_at"], "feed")]


async def test_a_return_the_feed_listed_first_is_found_under_the_name_a_push_without_id_gives_it(
        start_partner, db_path: Path) -> None:
    partner = start_partner(scenario(returns=5))
    items = items_of(partner)
    key = await api_key_in(db_path, "order-system")
    async with api_daemon(with_api(make_config(db_path, partner.url))) as (daemon, http):
        client = Client(http, daemon.api_address, key)
        await wait_until(reported_all(partner, db_path), 30, what="every return reported")
        status, body, headers = await client.call("POST", "/v1/returns", without_id(items[0]))
        _, by_name, _ = await client.call("GET", f"/v1/returns/{order_name(items[0])}")
    assert status == 200 and body["id"] == items[0]["id"] and headers["Location"] == f"/v1/returns/{items[0]['id']}"
    assert by_name["id"] == items[0]["id"] and by_name["also_known_as"] == [order_name(items[0])]
    assert body["source"] == "feed" and body["corrections"] == []
    assert (await counts_in(db_path))["returns"] == 5  # one return each, one report each


async def test_one_pushed_return_answers_201_with_its_story_then_200(start_partner, db_path: Path) -> None:
    async with quiet_api(start_partner, db_path) as (client, items):
        item = items[0]
        status, body, headers = await client.call("POST", "/v1/returns", item)
        assert status == 201 and body["id"] == item["id"] and headers["Location"] == f"/v1/returns/{item['id']}"
        assert body["box"]["shipment_number"] == item["shipment_number"] and body["box"]["state"] == "tracking"
        assert body["report"] is None and body["corrections"] == []
        status, body, _ = await client.call("POST", "/v1/returns", item)
        assert status == 200 and body["id"] == item["id"]


async def test_a_return_without_id_is_named_by_its_order_item(start_partner, db_path: Path) -> None:
    async with quiet_api(start_partner, db_path) as (client, items):
        item = {k: v for k, v in items[0].items() if k != "id"}
        status, body, _ = await client.call("POST", "/v1/returns", item)
        name = f"order:{item['order_number']}:{item['order_item_number']}"
        assert status == 201 and body["id"] == name
        status, found, _ = await client.call("GET", f"/v1/returns/{name}")
        assert status == 200 and found["order_item_number"] == item["order_item_number"]


async def test_a_pushed_return_that_changes_fields_is_a_correction(start_partner, db_path: Path) -> None:
    async with quiet_api(start_partner, db_path) as (client, items):
        item = items[0]
        await client.call("POST", "/v1/returns", item)
        status, body, _ = await client.call("POST", "/v1/returns", {**item, "order_item_number": "99"})
        assert status == 200 and body["order_item_number"] == "99"
        assert body["corrections"][0]["fields"] == ["order_item_number"]
        assert body["corrections"][0]["before"] == {"order_item_number": item["order_item_number"]}
        assert body["corrections"][0]["source"] == "order-system"  # the key's name


async def test_invalid_returns_are_refused_in_the_answer_and_nothing_is_quarantined(start_partner,
                                                                                 db_path: Path) -> None:
    partner = start_partner(scenario(returns=5))
    key = await api_key_in(db_path, "order-system")
    good = items_of(partner)[0]
    async with api_daemon(with_api(make_config(db_path, partner.url))) as (daemon, http):
        client = Client(http, daemon.api_address, key)
        status, body, headers = await client.call("POST", "/v1/returns", {"order_number": "O1"})
        assert_problem(status, body, headers, 422, "invalid-return")
        status, body, headers = await client.call("POST", "/v1/returns", {**good, "colour": "red"})
        assert_problem(status, body, headers, 422, "invalid-return")
        status, body, _ = await client.call("POST", "/v1/returns/batch", {"returns": [
            good, {"id": "R-x", "order_number": "", "order_item_number": "1", "shipment_number": "S"}, 42]})
        assert status == 200 and (body["accepted"], body["rejected"]) == (1, 2)
        assert [r["status"] for r in body["results"]] == ["accepted", "rejected", "rejected"]
        assert all(r["reason"] for r in body["results"][1:])
    assert (await counts_in(db_path))["quarantine.open"] == 0


# ── the reads ───────────────────────────────────────────────────────────────────────────────


async def test_a_return_is_found_by_id_order_and_shipment_and_listed_by_cursor(start_partner, backend: str,
                                                                              tmp_path: Path) -> None:
    partner = start_partner(scenario(returns=30))
    config = with_api(make_config(tmp_path / "unused.db", partner.url))
    storage = (dataclasses.replace(config.storage, url=backend, lease_s=3.0) if backend.startswith("postgresql://")
               else dataclasses.replace(config.storage, path=backend))
    config = dataclasses.replace(config, storage=storage)
    key = await api_key_in(backend, "customer-service", ("returns:read",))
    async with api_daemon(config) as (daemon, http):
        await wait_until(reported_all(partner, backend), 30, what="the burst reported")
        client = Client(http, daemon.api_address, key)
        item = items_of(partner)[0]
        status, one, _ = await client.call("GET", f"/v1/returns/{item['id']}")
        assert status == 200 and one["shipment_number"] == item["shipment_number"]
        assert one["box"]["history"] and one["summary"]
        status, by_order, _ = await client.call("GET", f"/v1/returns?order_number={item['order_number']}")
        assert status == 200 and item["id"] in [r["id"] for r in by_order["returns"]]
        status, box, _ = await client.call("GET", f"/v1/shipments/{item['shipment_number']}")
        assert status == 200 and item["id"] in [r["id"] for r in box["returns"]] and box["history"]
        seen, cursor = [], None
        while True:
            status, page, _ = await client.call("GET", "/v1/returns?limit=7" + (f"&cursor={cursor}" if cursor else ""))
            assert status == 200 and len(page["returns"]) <= 7
            seen += [r["id"] for r in page["returns"]]
            if not page["has_more"]:
                break
            cursor = page["next_cursor"]
        assert sorted(seen) == sorted(i["id"] for i in items_of(partner)) and len(seen) == len(set(seen))
        status, body, headers = await client.call("GET", "/v1/returns/NOPE")
        assert_problem(status, body, headers, 404, "not-found")
        status, body, headers = await client.call("GET", "/v1/returns?limit=0")
        assert_problem(status, body, headers, 400, "invalid-parameter")


# ── a check now ─────────────────────────────────────────────────────────────────────────────


async def test_a_check_now_is_made_at_once_then_cools_down_and_a_closed_box_is_409(start_partner,
                                                                                db_path: Path) -> None:
    partner = start_partner(scenario(returns=20, step_s=(30.0, 60.0)))  # the box stays open through the test
    slow = dataclasses.replace(make_config(db_path, partner.url).schedule, track_every_s=3600.0, detect_within_s=3600.0)
    config = with_api(make_config(db_path, partner.url, schedule=slow))
    key = await api_key_in(db_path, "customer-service", ("returns:read", "shipments:check"))
    async with api_daemon(config) as (daemon, http):
        client = Client(http, daemon.api_address, key)
        shipment = items_of(partner)[0]["shipment_number"]

        async def checks() -> int:
            status, box, _ = await client.call("GET", f"/v1/shipments/{shipment}")
            return box["checks"] if status == 200 else -1
        await wait_until(lambda: checks_at_least(checks, 0), 20, what="the box stored")
        before = await checks()
        status, body, _ = await client.call("POST", f"/v1/shipments/{shipment}/check")
        assert status == 202 and body == {"shipment_number": shipment, "check": "queued"}
        await wait_until(lambda: checks_at_least(checks, before + 1), 10, what="the check made now")
        status, body, headers = await client.call("POST", f"/v1/shipments/{shipment}/check")
        assert_problem(status, body, headers, 429, "check-cooling-down")
        assert 1 <= int(headers["Retry-After"]) <= tracker.CHECK_COOLDOWN_S
        status, body, headers = await client.call("POST", "/v1/shipments/NOPE/check")
        assert_problem(status, body, headers, 404, "not-found")


async def checks_at_least(checks, n: int) -> bool:
    return await checks() >= n


async def test_a_check_of_a_box_no_longer_tracked_is_409_with_its_state(start_partner, db_path: Path) -> None:
    partner = start_partner(scenario(returns=20))
    key = await api_key_in(db_path, "customer-service", ("shipments:check",))
    async with api_daemon(with_api(make_config(db_path, partner.url))) as (daemon, http):
        await wait_until(reported_all(partner, db_path), 30, what="every box closed")
        client = Client(http, daemon.api_address, key)
        shipment = items_of(partner)[0]["shipment_number"]
        status, body, headers = await client.call("POST", f"/v1/shipments/{shipment}/check")
        assert_problem(status, body, headers, 409, "shipment-closed")
        assert body["state"] in ("delivered", "cancelled")


# ── keys, scopes, address ranges, rates ─────────────────────────────────────────────────────


@pytest.mark.parametrize("case", ["no key", "not a key", "unknown key", "revoked", "expired", "wrong scope",
                                  "wrong address", "spoofed X-Forwarded-For"])
async def test_a_request_without_a_usable_key_is_refused(start_partner, db_path: Path, case: str) -> None:
    partner = start_partner(scenario(returns=5))
    partner.call(partner.standin.hold_clock)  # the feed lists nothing: what is stored came by the API
    options: dict[str, Any] = {}
    if case == "expired":
        options["expires_at"] = time.time() - 1
    if case in ("wrong address", "spoofed X-Forwarded-For"):
        options["allow"] = ("10.1.2.3/32",)
    scopes = ("returns:read",) if case == "wrong scope" else ALL_SCOPES
    key = await api_key_in(db_path, "refunds", scopes, **options)
    if case == "revoked":
        store = await tracker.Store.open(str(db_path))
        await store.revoke_api_key("refunds", time.time())
        await store.close()
    sent = {"no key": None, "not a key": "hunter2", "unknown key": tracker.new_api_key()}.get(case, key)
    headers = {"X-Forwarded-For": "10.1.2.3"} if case == "spoofed X-Forwarded-For" else {}
    async with api_daemon(with_api(make_config(db_path, partner.url))) as (daemon, http):
        client = Client(http, daemon.api_address, sent)
        status, body, answer = await client.call("POST", "/v1/returns", items_of(partner)[0], headers=headers)
        expected = 403 if case in ("wrong scope", "wrong address", "spoofed X-Forwarded-For") else 401
        slug = {"wrong scope": "scope-missing"}.get(case, "address-not-allowed" if expected == 403 else "unauthorized")
        assert_problem(status, body, answer, expected, slug)
        if expected == 401:
            assert answer["WWW-Authenticate"].startswith("Bearer")
        refusals = await scraped(daemon, f'tracker_api_refusals_total{{reason="{slug}"}}')
    assert refusals == 1
    assert (await counts_in(db_path))["returns"] == 0  # nothing pushed


async def test_a_trusted_proxys_x_forwarded_for_is_believed(start_partner, db_path: Path) -> None:
    partner = start_partner(scenario(returns=5))
    partner.call(partner.standin.hold_clock)  # the feed lists nothing: the push is the return's first listing
    key = await api_key_in(db_path, "refunds", allow=("10.1.2.3/32",))
    config = with_api(make_config(db_path, partner.url), trusted_proxies=("127.0.0.0/8",))
    async with api_daemon(config) as (daemon, http):
        client = Client(http, daemon.api_address, key)
        item = items_of(partner)[0]
        status, _, _ = await client.call("POST", "/v1/returns", item, headers={"X-Forwarded-For": "10.1.2.3"})
        assert status == 201
        status, body, headers = await client.call("POST", "/v1/returns", item, headers={"X-Forwarded-For": "10.9.9.9"})
        assert_problem(status, body, headers, 403, "address-not-allowed")


async def test_a_revoked_key_is_refused_within_a_second_of_the_revoke(start_partner, db_path: Path) -> None:
    partner = start_partner(scenario(returns=5))
    key = await api_key_in(db_path, "refunds", ("returns:read",))
    async with api_daemon(with_api(make_config(db_path, partner.url))) as (daemon, http):
        client = Client(http, daemon.api_address, key)
        assert (await client.call("GET", "/v1/returns?limit=1"))[0] == 200
        store = await tracker.Store.open(str(db_path))
        await store.revoke_api_key("refunds", time.time())
        await store.close()
        revoked_at = time.monotonic()

        async def refused() -> bool:
            return (await client.call("GET", "/v1/returns?limit=1"))[0] == 401
        await wait_until(refused, 5, what="the revoke to take effect")
        assert time.monotonic() - revoked_at <= tracker.API_KEY_CACHE_S + 0.5


async def test_a_key_past_its_rate_gets_429_with_retry_after(start_partner, db_path: Path) -> None:
    partner = start_partner(scenario(returns=5))
    key = await api_key_in(db_path, "refunds", ("returns:read",), rate_per_s=5.0)
    async with api_daemon(with_api(make_config(db_path, partner.url))) as (daemon, http):
        client = Client(http, daemon.api_address, key)
        answers = [await client.call("GET", "/v1/returns?limit=1") for _ in range(12)]
    statuses = [status for status, _, _ in answers]
    assert statuses[:5] == [200] * 5 and 429 in statuses[5:]
    status, body, headers = next(a for a in answers if a[0] == 429)
    assert_problem(status, body, headers, 429, "rate-limited")
    assert int(headers["Retry-After"]) >= 1


# ── what HTTP means ─────────────────────────────────────────────────────────────────────────


async def test_bad_requests_get_the_problem_http_means(start_partner, db_path: Path) -> None:
    partner = start_partner(scenario(returns=5))
    key = await api_key_in(db_path, "refunds")
    config = with_api(make_config(db_path, partner.url), max_body_bytes=4096)
    async with api_daemon(config) as (daemon, http):
        client = Client(http, daemon.api_address, key)
        cases = [
            (("POST", "/v1/returns"), {"raw": b"{not json"}, 400, "invalid-json"),
            (("POST", "/v1/returns"), {"raw": b"x" * 5000}, 413, "body-too-large"),
            (("POST", "/v1/returns"), {"raw": b"{}", "headers": {"Content-Type": "text/plain"}}, 415,
             "unsupported-media-type"),
            (("POST", "/v1/returns/batch"), {"raw": b'{"returns": []}'}, 422, "invalid-batch"),
            (("GET", "/v1/nowhere"), {}, 404, "not-found"),
            (("DELETE", "/v1/returns"), {}, 405, "method-not-allowed"),
        ]
        for (method, path), options, expected, slug in cases:
            status, body, headers = await client.call(method, path, **options)
            assert_problem(status, body, headers, expected, slug)
        big = {"returns": [items_of(partner)[0]] * (tracker.API_BATCH_MAX + 1)}
        roomy = with_api(make_config(db_path, partner.url))
    async with api_daemon(roomy) as (daemon, http):
        status, body, headers = await Client(http, daemon.api_address, key).call("POST", "/v1/returns/batch", big)
        assert_problem(status, body, headers, 422, "batch-too-large")


async def test_the_openapi_document_is_valid_and_served_as_kept_in_the_repository(start_partner,
                                                                                db_path: Path) -> None:
    kept = json.loads((ROOT / "openapi.json").read_text())
    validate_openapi(kept)  # OpenAPI 3.1, by openapi-spec-validator
    partner = start_partner(scenario(returns=5))
    async with api_daemon(with_api(make_config(db_path, partner.url))) as (daemon, http):
        status, served, _ = await Client(http, daemon.api_address, None).call("GET", "/v1/openapi.json")
    assert status == 200 and served == kept
    assert {route.path for route in tracker.API_ROUTES} == set(kept["paths"])
    assert {(route.method.lower(), route.path) for route in tracker.API_ROUTES} == {
        (method, path) for path, operations in kept["paths"].items() for method in operations}


# ── the audit trail and the key commands ────────────────────────────────────────────────────


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "tracker.py"), *args], capture_output=True, text=True,
                          timeout=60)


async def test_keys_are_made_listed_and_revoked_by_the_cli_shown_once_and_every_change_audited(
        start_partner, tmp_path: Path) -> None:
    partner = start_partner(scenario(returns=5))
    db = tmp_path / "tracker.db"
    config = tmp_path / "config.toml"
    config.write_text(config_toml(partner.url, db))
    made = await asyncio.to_thread(cli, "api-key", "create", "refunds", "--scope", "returns:read",
                                   "--allow", "10.0.0.0/8", "--rate", "20", "--config", str(config))
    assert made.returncode == 0, made.stderr
    secret = made.stdout.split()[-1]
    assert tracker.api_key_well_formed(secret) and secret.startswith("trk_")
    listed = await asyncio.to_thread(cli, "api-key", "list", "--config", str(config))
    assert "refunds" in listed.stdout and "10.0.0.0/8" in listed.stdout and "active" in listed.stdout
    assert secret not in listed.stdout and secret[4:] not in db.read_bytes().decode("latin-1")  # a hash only
    twice = await asyncio.to_thread(cli, "api-key", "create", "refunds", "--scope", "returns:read",
                                    "--config", str(config))
    assert twice.returncode == 1 and "exists already" in twice.stderr
    revoked = await asyncio.to_thread(cli, "api-key", "revoke", "refunds", "--config", str(config))
    assert revoked.returncode == 0
    assert "revoked" in (await asyncio.to_thread(cli, "api-key", "list", "--config", str(config))).stdout
    audit = await asyncio.to_thread(cli, "audit", "--config", str(config))
    assert audit.returncode == 0 and "api-key.create" in audit.stdout and "api-key.revoke" in audit.stdout
    bad = await asyncio.to_thread(cli, "api-key", "create", "x", "--scope", "everything", "--config", str(config))
    assert bad.returncode == 2


async def test_every_write_request_is_one_audit_row(start_partner, db_path: Path) -> None:
    async with quiet_api(start_partner, db_path) as (client, items):
        key = client.key
        await client.call("POST", "/v1/returns", items[0], headers={"X-Request-Id": "req-1"})
        await client.call("POST", "/v1/returns/batch", {"returns": items[1:3]})
        await client.call("POST", "/v1/returns", {"order_number": "O"})
        await client.call("POST", f"/v1/shipments/{items[0]['shipment_number']}/check")
        await client.call("GET", f"/v1/returns/{items[0]['id']}")  # a read: not audited
    store = await tracker.Store.open(str(db_path))
    try:
        rows = await store.audit_since(0.0)
    finally:
        await store.close()
    assert [(r["action"], r["result"]) for r in rows] == [
        ("returns.push", "ok"), ("returns.push_batch", "ok"), ("returns.push", "invalid-return"),
        ("shipments.check", "ok")]
    assert all(r["key_name"] == "order-system" and r["source_ip"] == "127.0.0.1" for r in rows)
    assert rows[0]["target"] == items[0]["id"] and rows[0]["request_id"] == "req-1"
    assert rows[1]["target"].startswith("2 accepted")
    assert TOKEN not in json.dumps(rows) and key not in json.dumps(rows)


async def test_the_cli_check_queues_an_open_box_and_says_why_not_for_others(start_partner, tmp_path: Path) -> None:
    partner = start_partner(scenario(returns=20))
    partner.call(partner.standin.hold_clock)
    db = tmp_path / "tracker.db"
    config = tmp_path / "config.toml"
    config.write_text(config_toml(partner.url, db))
    item = items_of(partner)[0]
    key = await api_key_in(db, "order-system")
    async with api_daemon(with_api(make_config(db, partner.url))) as (daemon, http):
        await Client(http, daemon.api_address, key).call("POST", "/v1/returns", item)
    first = await asyncio.to_thread(cli, "check", item["shipment_number"], "NOPE", "--config", str(config))
    assert first.returncode == 1
    assert f"{item['shipment_number']}: queued" in first.stdout and "NOPE: no such shipment" in first.stdout
    again = await asyncio.to_thread(cli, "check", item["shipment_number"], "--config", str(config))
    assert again.returncode == 1 and "try again later" in again.stdout


# ── Idempotency-Key ─────────────────────────────────────────────────────────────────────────


async def test_an_idempotency_key_replays_the_first_answer_and_refuses_another_body(start_partner,
                                                                                  backend: str) -> None:
    partner = start_partner(scenario(returns=5))
    partner.call(partner.standin.hold_clock)
    config = with_api(make_config(Path(backend) if not backend.startswith("postgresql") else Path("unused.db"),
                                  partner.url))
    if backend.startswith("postgresql://"):
        config = dataclasses.replace(config, storage=dataclasses.replace(config.storage, url=backend, lease_s=3.0))
    key = await api_key_in(backend, "order-system")
    items = items_of(partner)
    async with api_daemon(config) as (daemon, http):
        client = Client(http, daemon.api_address, key)
        once = {"Idempotency-Key": "batch-0001"}
        first = await client.call("POST", "/v1/returns/batch", {"returns": items[:3]}, headers=once)
        again = await client.call("POST", "/v1/returns/batch", {"returns": items[:3]}, headers=once)
        assert first[0] == again[0] == 200 and first[1] == again[1] and first[1]["new"] == 3
        assert again[2]["Idempotent-Replayed"] == "true"
        other = await client.call("POST", "/v1/returns/batch", {"returns": items[3:]}, headers=once)
        assert_problem(*other, 422, "idempotency-key-reused")
        refused = await client.call("POST", "/v1/returns", {"order_number": "O"}, headers={"Idempotency-Key": "k2"})
        replayed = await client.call("POST", "/v1/returns", {"order_number": "O"}, headers={"Idempotency-Key": "k2"})
        assert refused[0] == replayed[0] == 422 and refused[1] == replayed[1]  # a refusal is replayed too
        too_long = await client.call("POST", "/v1/returns", items[0], headers={"Idempotency-Key": "k" * 300})
        assert_problem(*too_long, 400, "invalid-idempotency-key")
    assert (await counts_in(backend))["returns"] == 3


async def test_an_idempotency_key_still_being_answered_is_409(start_partner, db_path: Path) -> None:
    async with quiet_api(start_partner, db_path) as (client, items):
        batch = {"returns": items}
        first, second = await asyncio.gather(
            client.call("POST", "/v1/returns/batch", batch, headers={"Idempotency-Key": "same"}),
            client.call("POST", "/v1/returns/batch", batch, headers={"Idempotency-Key": "same"}))
    statuses = sorted([first[0], second[0]])
    if statuses == [200, 200]:  # the second came after the first was answered: a replay of it
        assert "true" in (first[2].get("Idempotent-Replayed"), second[2].get("Idempotent-Replayed"))
    else:  # never two pushes of one request
        assert statuses == [200, 409], statuses
        assert_problem(*(first if first[0] == 409 else second), 409, "idempotency-key-in-use")


# ── the document against the running API ────────────────────────────────────────────────────


async def test_schemathesis_finds_nothing_the_document_does_not_say(start_partner, db_path: Path) -> None:
    """The running API fuzzed from openapi.json by schemathesis, every check but one: no 5xx, every
    status, header and body as documented, schema-violating requests refused, a request without
    its key refused. Left out: that every schema-valid request is accepted — the document itself
    says which valid-looking ones are refused (422: a return the feed's checks refuse, an
    Idempotency-Key sent before with another body; 409, 429)."""
    partner = start_partner(scenario(returns=20))
    key = await api_key_in(db_path, "fuzz", rate_per_s=100_000)
    async with api_daemon(with_api(make_config(db_path, partner.url))) as (daemon, _):
        found = await asyncio.to_thread(subprocess.run, [
            str(Path(sys.executable).parent / "schemathesis"), "run", str(ROOT / "openapi.json"),
            "--url", f"http://{daemon.api_address}", "-H", f"Authorization: Bearer {key}", "--checks", "all",
            "--exclude-checks", "positive_data_acceptance", "--max-examples", "20", "--seed", "1",
            "--request-timeout", "5"], capture_output=True, text=True, timeout=240)
    assert found.returncode == 0, found.stdout[-6000:]
    assert "Test cases:" in found.stdout and " generated" in found.stdout


async def test_pushed_returns_survive_kill_9_and_a_batch_sent_again_is_not_pushed_twice(start_partner,
                                                                                        daemon_process,
                                                                                        tmp_path: Path) -> None:
    partner = start_partner(scenario(returns=300, faults=standin.Faults(feed_down=True)))
    db = tmp_path / "tracker.db"
    api = f"127.0.0.1:{free_port()}"
    daemon = daemon_process(config_toml(partner.url, db).replace('[api]\nlisten = ""', f'[api]\nlisten = "{api}"'))
    key = await api_key_in(db, "order-system", rate_per_s=10_000)
    items = items_of(partner)
    batches = [items[i:i + 50] for i in range(0, len(items), 50)]
    # a connection per request: one kept alive to the killed daemon's API process would be dead
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        client = Client(http, api, key)

        async def listening() -> bool:
            with contextlib.suppress(aiohttp.ClientError):
                return (await client.call("GET", "/v1/openapi.json"))[0] == 200
            return False
        daemon.start()
        await wait_until(listening, 30, what="the API")
        for number, batch in enumerate(batches[:3]):
            status, _, _ = await client.call("POST", "/v1/returns/batch", {"returns": batch},
                                             headers={"Idempotency-Key": f"b{number}"})
            assert status == 200
        helper = helper_of(daemon.pid, tracker.API_PROCESS_COMMAND)
        daemon.kill9()  # after three answered batches
        # its API process leaves when its stdin closes: until then it may still answer a request
        await wait_until(lambda: asyncio.to_thread(lambda: helper is None or not running(helper)), 10,
                         what="the killed daemon's API process gone")
        daemon.start()
        await wait_until(listening, 30, what="the API after the restart")
        for number, batch in enumerate(batches):  # every batch sent (again) with its key
            status, body, headers = await client.call("POST", "/v1/returns/batch", {"returns": batch},
                                                      headers={"Idempotency-Key": f"b{number}"})
            assert status == 200 and (headers.get("Idempotent-Replayed") == "true") == (number < 3)
        await wait_until(reported_all(partner, db), 60, what="every pushed return reported")
        daemon.signal(signal.SIGTERM)
        assert await asyncio.to_thread(daemon.wait, 15) == 0
    ledger = await ledger_of(partner)
    assert ledger["recorded"] == ledger["expected"] > 0 and ledger["premature"] == ledger["unknown"] == 0
    assert (await counts_in(db))["returns"] == len(items)  # each once
