"""`tracker.py requeue`: after an operator fixes the cause, dead reports, stale boxes and
quarantined returns go back into the pipeline — and only those asked for."""

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import tracker
from conftest import ROOT, config_toml

GOOD = {"id": "RET_7", "order_number": "20261124-0007", "order_item_number": "1", "shipment_number": "SHP_7"}


async def seed(db: Path) -> None:
    """Two dead reports, two stale boxes, and two quarantined items: one that passes today's
    validation (an older rule rejected it) and one that is still broken."""
    store = await tracker.Store.open(str(db))
    now = time.time()
    items = tuple(tracker.ReturnItem(id=f"RET_{i}", order_number=f"2026-{i}", order_item_number="1",
                                     shipment_number=f"SHP_{i}", requested_at=None) for i in (1, 2, 3, 4))
    quarantined = (tracker.QuarantinedItem(return_id="RET_7", reason="order_number looked odd", raw=json.dumps(GOOD)),
                   tracker.QuarantinedItem(return_id="BAD_1", reason="order_number is missing",
                                           raw=json.dumps({"id": "BAD_1"})))
    await store.commit([tracker.FeedPage(items=items, quarantined=quarantined, next_cursor="c1", has_more=False,
                                         first_checks=tuple((i.shipment_number, now) for i in items))], now)
    await store.commit([
        tracker.BoxUpdate(shipment_number="SHP_1", state=tracker.BoxState.DELIVERED, next_check_at=None, not_found=0,
                          errors=0, registered=True, last_status="delivered", delivered_at="2026-11-24T10:00:00Z"),
        tracker.BoxUpdate(shipment_number="SHP_2", state=tracker.BoxState.DELIVERED, next_check_at=None, not_found=0,
                          errors=0, registered=True, last_status="delivered", delivered_at="2026-11-24T10:00:00Z"),
        tracker.BoxUpdate(shipment_number="SHP_3", state=tracker.BoxState.STALE, next_check_at=None, not_found=9,
                          errors=0, registered=False),
        tracker.BoxUpdate(shipment_number="SHP_4", state=tracker.BoxState.STALE, next_check_at=None, not_found=9,
                          errors=0, registered=False),
    ], now)
    await store.commit([tracker.ReportUpdate(return_id=f"RET_{i}", state=tracker.ReportState.DEAD,
                                             next_attempt_at=None, outcome="refused", last_error="422 unknown")
                        for i in (1, 2)], now)
    await store.close()


def requeue(db: Path, *args: str) -> str:
    config = db.with_name("config.toml")
    config.write_text(config_toml("http://127.0.0.1:1/api/external/data", db))
    result = subprocess.run([sys.executable, str(ROOT / "tracker.py"), "requeue", *args, "--config", str(config)],
                            capture_output=True, text=True, timeout=30)  # no token needed
    assert result.returncode == 0, result.stderr
    return result.stdout


def query(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


async def test_requeue_dead_puts_every_dead_report_back_to_be_sent(db_path: Path) -> None:
    await seed(db_path)
    out = requeue(db_path, "dead")
    assert out.strip() == "2 dead report(s) queued to be sent again: RET_1, RET_2"
    rows = query(db_path, "SELECT state, attempts, next_attempt_at <= strftime('%s','now') + 1 FROM reports")
    assert rows == [("pending", 0, 1), ("pending", 0, 1)]


async def test_requeue_with_ids_moves_only_those_and_names_the_ones_not_found(db_path: Path) -> None:
    await seed(db_path)
    out = requeue(db_path, "dead", "RET_2", "RET_99")
    assert "1 dead report(s) queued to be sent again: RET_2" in out
    assert "not found in that state: RET_99" in out
    assert query(db_path, "SELECT return_id, state FROM reports ORDER BY return_id") == [
        ("RET_1", "dead"), ("RET_2", "pending")]


async def test_requeue_stale_tracks_the_boxes_again_with_a_fresh_stale_clock(db_path: Path) -> None:
    await seed(db_path)
    before = time.time()
    out = requeue(db_path, "stale", "SHP_3")
    assert out.strip() == "1 stale box(es) tracked again: SHP_3"
    [(state, not_found, first_seen)] = query(
        db_path, "SELECT state, not_found, first_seen_at FROM boxes WHERE shipment_number = 'SHP_3'")
    assert (state, not_found) == ("tracking", 0) and first_seen >= before
    assert query(db_path, "SELECT state FROM boxes WHERE shipment_number = 'SHP_4'") == [("stale",)]


async def test_requeue_quarantined_collects_what_now_validates_and_keeps_the_rest(db_path: Path) -> None:
    await seed(db_path)
    out = requeue(db_path, "quarantined")
    assert "1 quarantined return(s) collected: RET_7" in out
    assert "still invalid, left in quarantine: BAD_1: order_number is missing" in out
    assert query(db_path, "SELECT shipment_number FROM returns WHERE id = 'RET_7'") == [("SHP_7",)]
    assert query(db_path, "SELECT state FROM boxes WHERE shipment_number = 'SHP_7'") == [("tracking",)]
    assert query(db_path, "SELECT return_id FROM quarantine WHERE resolved_at IS NULL") == [("BAD_1",)]


async def test_nothing_to_requeue_says_so(db_path: Path) -> None:
    await seed(db_path)
    requeue(db_path, "dead")
    assert requeue(db_path, "dead").strip() == "0 dead report(s) queued to be sent again"
