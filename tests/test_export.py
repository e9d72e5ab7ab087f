"""`tracker.py export`: every return as CSV or JSON lines, streamed in constant memory, and the
closed boxes' recorded histories in the format `replay` reads."""

import asyncio
import csv
import io
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tracker
from conftest import (ROOT, config_toml, create_schema, everything_reported, make_config, run_daemon_until,
                      scenario)


@pytest.fixture
def reported(start_partner, db_path: Path) -> Path:
    """A small burst (some boxes cancelled) fully reported; the config file the CLI reads."""
    partner = start_partner(scenario(returns=120, cancel_share=0.2))
    asyncio.run(run_daemon_until(make_config(db_path, partner.url), everything_reported(partner, db_path)))
    config = db_path.with_name("config.toml")
    config.write_text(config_toml(partner.url, db_path))
    return config


def run_export(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "tracker.py"), "export", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=120)


def test_csv_has_one_row_per_return_with_its_box_and_report(reported: Path) -> None:
    result = run_export(reported)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    with sqlite3.connect(reported.with_name("tracker.db")) as conn:
        expected = dict(conn.execute("SELECT r.id, p.state FROM returns r LEFT JOIN reports p ON p.return_id = r.id"))
    assert {row["return_id"]: row["report_state"] or None for row in rows} == expected
    delivered = [row for row in rows if row["box_state"] == "delivered"]
    assert delivered and all(row["report_outcome"] in ("recorded", "duplicate") and row["reported_at"]
                             for row in delivered)
    assert all(row["report_state"] == "" for row in rows if row["box_state"] == "cancelled")


def test_jsonl_and_a_state_filter(reported: Path) -> None:
    rows = [json.loads(line) for line in run_export(reported, "--format", "jsonl", "--state", "cancelled").stdout
            .splitlines()]
    assert rows and {row["box_state"] for row in rows} == {"cancelled"}


def test_since_and_until_bound_when_the_return_was_collected(reported: Path) -> None:
    assert run_export(reported, "--until", "2000-01-01").stdout.count("\n") == 1  # the header alone
    tomorrow = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86400))
    assert run_export(reported, "--since", tomorrow).stdout.count("\n") == 1
    assert run_export(reported, "--since", "2000-01-01").stdout.count("\n") == 121
    bad = run_export(reported, "--since", "last week")
    assert bad.returncode == 2 and "not a date" in bad.stderr


async def recorded_pickups(db: Path, boxes: int) -> None:
    """Boxes collected at 20:00, registered ten minutes on, delivered next day 11:00 (one in five
    cancelled instead) — the times our clock and the partner's share in production."""
    t0 = 1794488400.0  # a Friday 20:00 in Seoul
    store = await tracker.Store.open(str(db))
    try:
        items = tuple(tracker.ReturnItem(id=f"R{k}", order_number="O", order_item_number="1", shipment_number=f"S{k}",
                                         requested_at="2026-11-13T11:00:00Z") for k in range(boxes))
        await store.commit([tracker.FeedPage(items=items, quarantined=(), next_cursor="c", has_more=False,
                                             first_checks=tuple((f"S{k}", t0) for k in range(boxes)))], t0)
        for k in range(boxes):
            final = "cancelled" if k % 5 == 0 else "delivered"
            history = (tracker.StatusChange(status="requested", at=t0), tracker.StatusChange(status="assigned",
                                                                                             at=t0 + 11 * 3600),
                       tracker.StatusChange(status=final, at=t0 + 15 * 3600 + 60 * k))
            state = tracker.BoxState.CANCELLED if final == "cancelled" else tracker.BoxState.DELIVERED
            registered = tracker.BoxUpdate(shipment_number=f"S{k}", state=tracker.BoxState.TRACKING,
                                           next_check_at=t0 + 3600, not_found=0, errors=0, registered=True,
                                           last_status="requested",
                                           history=history[:1])
            await store.commit([registered], t0 + 600)
            await store.commit([tracker.BoxUpdate(shipment_number=f"S{k}", state=state, next_check_at=None,
                                                  not_found=0, errors=0, registered=True, last_status=final,
                                                  delivered_at="2026-11-14T02:00:00Z",
                                                  history=history[1:])], t0 + 16 * 3600)
    finally:
        await store.close()


def test_timelines_of_the_closed_boxes_replay_as_they_happened(db_path: Path, tmp_path: Path) -> None:
    asyncio.run(recorded_pickups(db_path, 20))
    config = tmp_path / "config.toml"
    config.write_text(config_toml("http://127.0.0.1:1/api/external/data", db_path))
    exported = run_export(config, "--timelines").stdout
    boxes = [json.loads(line) for line in exported.splitlines()]
    assert len(boxes) == 20
    first = next(b for b in boxes if b["shipment_number"] == "S1")
    assert [e["status"] for e in first["events"]] == ["requested", "assigned", "delivered"]
    assert first["items"] == 1 and first["registered_at"] == 1794488400.0 + 600
    (tmp_path / "history.jsonl").write_text(exported)
    elsewhere = tmp_path / "replay"  # no config.toml there: the default schedule, as in production
    elsewhere.mkdir()
    replay = subprocess.run([sys.executable, str(ROOT / "tracker.py"), "replay", str(tmp_path / "history.jsonl")],
                            cwd=elsewhere, capture_output=True, text=True, timeout=120)
    report = json.loads(replay.stdout.splitlines()[-1])
    assert report["boxes"] == 20 and report["delivered"] == 16 and report["undetected"] == 0


def test_export_memory_does_not_grow_with_the_table(tmp_path: Path) -> None:
    """Peak memory exporting 300,000 returns is within a few MB of exporting 30,000."""
    peaks = {}
    for returns in (30_000, 300_000):
        db = tmp_path / f"{returns}.db"
        create_schema(db)
        with sqlite3.connect(db) as conn:
            conn.executemany("INSERT INTO returns (id, order_number, order_item_number, shipment_number, requested_at,"
                             " seen_at) VALUES (?, 'O', '1', ?, '2026-11-24T09:00:00Z', 1.0)",
                             ((f"R{i}", f"S{i // 2}") for i in range(returns)))
        config = tmp_path / f"{returns}.toml"
        config.write_text(config_toml("http://127.0.0.1:1/api/external/data", db))
        probe = ("import resource, subprocess, sys\n"  # the export as its only child, then that child's peak
                 "with open(sys.argv[1], 'w') as out:\n"
                 "    subprocess.run([sys.executable] + sys.argv[2:], stdout=out, check=True)\n"
                 "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        exported = tmp_path / f"{returns}.csv"
        result = subprocess.run([sys.executable, "-c", probe, str(exported), str(ROOT / "tracker.py"), "export",
                                 "--config", str(config)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        with exported.open() as rows:
            assert sum(1 for _ in rows) == returns + 1  # every return, and the header
        peaks[returns] = int(result.stdout)  # KiB
    assert peaks[300_000] - peaks[30_000] < 10 * 1024, peaks
