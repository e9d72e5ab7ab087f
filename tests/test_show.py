"""`tracker.py show ID…`: one return's whole story, found by its return id, order number or shipment
number — as customer service asks it a day later."""

import asyncio
import contextlib
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import standin
import tracker
from conftest import ROOT, config_toml, everything_reported, make_config, run_daemon_until, scenario


@pytest.fixture
def reported_burst(start_partner, db_path: Path) -> tuple[standin.ThreadedStandIn, Path]:
    """A small burst, reported in full (one report answered 503 once), and a config file for the CLI."""
    faults = standin.Faults(error_share=0.05)
    partner = start_partner(scenario(returns=60, cancel_share=0.0, max_items_per_box=2, faults=faults))
    asyncio.run(run_daemon_until(make_config(db_path, partner.url), everything_reported(partner, db_path)))
    config = db_path.with_name("config.toml")
    config.write_text(config_toml(partner.url, db_path))
    return partner, config


def run_show(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "tracker.py"), "show", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=30)  # no token: show needs none


def first_box(partner: standin.ThreadedStandIn) -> standin.Box:
    return partner.call(lambda: next(b for b in partner.standin.boxes if len(b.items) == 2))


def test_show_by_return_id_tells_collection_box_history_report_attempts_and_where_it_stands(reported_burst) -> None:
    partner, config = reported_burst
    box = first_box(partner)
    result = run_show(config, box.items[0]["id"])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"return {box.items[0]['id']} — order {box.items[0]['order_number']}" in out
    assert "collected from the feed" in out
    for _, status in box.timeline:
        assert f"  {status} " in out  # every status the box passed, with the partner's time
    attempts = re.findall(r"#(\d+) (\w+)\s+HTTP (\S+)", out)
    assert attempts and attempts[-1][1:] in (("recorded", "200"), ("duplicate", "409"))
    assert [int(n) for n, _, _ in attempts] == list(range(1, len(attempts) + 1))  # every attempt, in order
    assert "now: reported: the partner" in out


def test_show_by_order_number_lists_every_item_of_the_order(reported_burst) -> None:
    partner, config = reported_burst
    box = first_box(partner)
    out = run_show(config, box.items[0]["order_number"]).stdout
    assert all(f"return {item['id']}" in out for item in box.items)


def test_show_by_shipment_number_lists_the_returns_in_the_box(reported_burst) -> None:
    partner, config = reported_burst
    box = first_box(partner)
    out = run_show(config, box.shipment_number).stdout
    assert all(f"return {item['id']}" in out for item in box.items)
    assert out.count(f"box {box.shipment_number}: delivered") == len(box.items)


def test_show_json_is_one_object_per_id_for_scripts(reported_burst) -> None:
    partner, config = reported_burst
    box = first_box(partner)
    result = run_show(config, "--json", box.items[0]["id"], box.shipment_number)
    stories = [json.loads(line) for line in result.stdout.splitlines()]
    assert [s["query"] for s in stories] == [box.items[0]["id"], box.shipment_number]
    first = stories[0]
    assert [r["id"] for r in first["returns"]] == [box.items[0]["id"]]
    assert [h["status"] for h in first["history"]] == [status for _, status in box.timeline]
    assert first["reports"][0]["state"] == "done" and first["attempts"][-1]["outcome"] in ("recorded", "duplicate")
    assert first["now"][box.items[0]["id"]].startswith("reported")


def test_show_an_unknown_id_says_so_and_exits_1(reported_burst) -> None:
    _, config = reported_burst
    result = run_show(config, "RET_NOT_THERE")
    assert result.returncode == 1
    assert "no return, order or shipment is known as 'RET_NOT_THERE'" in result.stderr
    assert "RET_NOT_THERE" not in result.stdout.replace("tracker show RET_NOT_THERE", "")


@contextlib.asynccontextmanager
async def a_delivered_return(db_path: Path) -> AsyncIterator[tracker.Store]:
    """A store holding return R1 in box S1, delivered: its report is pending, not yet sent."""
    store = await tracker.Store.open(str(db_path))
    try:
        item = tracker.ReturnItem(id="R1", order_number="O1", order_item_number="1", shipment_number="S1",
                                  requested_at=None)
        await store.commit([tracker.FeedPage(items=(item,), quarantined=(), next_cursor="c", has_more=False,
                                             first_checks=(("S1", 0.0),))], 1.0)
        await store.commit([tracker.BoxUpdate(shipment_number="S1", state=tracker.BoxState.DELIVERED,
                                              next_check_at=None, not_found=0, errors=0, registered=True,
                                              last_status="delivered",
                                              delivered_at="2026-11-24T10:00:00Z")], 2.0)
        yield store
    finally:
        await store.close()


async def test_show_tells_a_pending_report_its_failed_attempt_and_next_try(db_path: Path) -> None:
    async with a_delivered_return(db_path) as store:
        await store.commit([tracker.ReportUpdate(return_id="R1", state=tracker.ReportState.PENDING,
                                                 next_attempt_at=100.0, outcome=None, last_error="server_error: 503",
                                                 attempt=1, http_status=503, latency_s=0.2)], 3.0)
        story = await store.story("R1")
    assert [(a["attempt"], a["outcome"], a["http_status"]) for a in story["attempts"]] == [(1, "retry", 503)]
    now = tracker.where_it_stands("R1", story)
    assert "report pending after 1 attempt(s), last attempt: server_error: 503" in now
    assert "next attempt at 1970-01-01 00:01:40Z" in now


async def test_report_attempts_are_kept_for_the_latest_attempts_per_report(db_path: Path) -> None:
    async with a_delivered_return(db_path) as store:
        for attempt in range(1, tracker.ATTEMPTS_PER_REPORT + 6):
            await store.commit([tracker.ReportUpdate(return_id="R1", state=tracker.ReportState.PENDING,
                                                     next_attempt_at=100.0, outcome=None, last_error="timeout",
                                                     attempt=attempt)], 2.0 + attempt)
        attempts = [a["attempt"] for a in (await store.story("R1"))["attempts"]]
    assert attempts == list(range(6, tracker.ATTEMPTS_PER_REPORT + 6))
