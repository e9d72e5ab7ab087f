"""Retention over a year: a database holding a year of sales events (30,000 returns a week,
finished), retention at storage.keep_days, and what it leaves — the file's size, and what a burst
then costs the SQLite writer against an empty database.

    .venv/bin/python bench/retention.py [--weeks 52] [--per-week 30000] [--keep-days 90]

Prints: the year's file size; retention's time and the size it leaves; the size after one more
week is written and retention runs again (it should not grow); and bench/store_writes.py's burst
(30,000 returns) on that file and on an empty one, three times each, interleaved.
"""

import argparse
import asyncio
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tracker  # noqa: E402
from store_writes import write_burst  # noqa: E402  (bench/ is this script's directory, first on sys.path)

WEEK = 7 * 86400.0


def write_week(db: Path, week: int, per_week: int, at: float) -> None:
    """A sales event's returns, two a box, all finished a day later: nine boxes in ten delivered and
    reported, one cancelled — with their status histories and report attempts."""
    rows_r, rows_b, rows_h, rows_p, rows_a = [], [], [], [], []
    for n in range(per_week // 2):
        box = f"W{week:03d}B{n:06d}"
        cancelled = n % 10 == 0
        closed = at + 86400 + n * 0.01
        rows_b.append((box, "cancelled" if cancelled else "delivered", at, closed, at, "2026-11-24T10:00:00Z"))
        rows_h += [(box, at + 60, "requested", at + 900), (box, at + 39600, "assigned", at + 40000),
                   (box, at + 50000, "picking_up", at + 50400),
                   (box, closed - 60, "cancelled" if cancelled else "delivered", closed)]
        for k in (1, 2):
            rid = f"W{week:03d}R{n:06d}{k}"
            rows_r.append((rid, f"O{week:03d}{n:06d}", str(k), box, "2026-11-24T09:00:00Z", at))
            if not cancelled:
                rows_p.append((rid, f"O{week:03d}{n:06d}", str(k), box, "2026-11-24T10:00:00Z", closed, closed))
                rows_a.append((rid, 1, closed, "recorded", 200, 0.05))
    with sqlite3.connect(db) as conn:
        conn.executemany("INSERT INTO returns (id, order_number, order_item_number, shipment_number, requested_at,"
                         " seen_at) VALUES (?, ?, ?, ?, ?, ?)", rows_r)
        conn.executemany("INSERT INTO boxes (shipment_number, state, first_seen_at, closed_at, requested_at,"
                         " delivered_at) VALUES (?, ?, ?, ?, ?, ?)", rows_b)
        conn.executemany("INSERT INTO box_history (shipment_number, changed_at, status, seen_at) VALUES (?, ?, ?, ?)",
                         rows_h)
        conn.executemany("INSERT INTO reports (return_id, order_number, order_item_number, shipment_number,"
                         " collected_at, state, queued_at, done_at, outcome, accepted_revision)"
                         " VALUES (?, ?, ?, ?, ?, 'done', ?, ?, 'recorded', 0)", rows_p)
        conn.executemany("INSERT INTO report_attempts (return_id, attempt, attempted_at, outcome, http_status,"
                         " latency_s) VALUES (?, ?, ?, ?, ?, ?)", rows_a)


def size_mb(db: Path) -> float:
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return db.stat().st_size / 1e6


async def retain(db: Path, keep_days: int) -> tuple[int, int, float]:
    """Retention to the end, batch after batch: boxes deleted, batches, the longest batch in seconds."""
    store = await tracker.Store.open(str(db))
    boxes = batches = 0
    longest = 0.0
    try:
        while True:
            started = time.perf_counter()
            pruned = (await store.commit([tracker.Prune(cutoff=time.time() - keep_days * 86400,
                                                        limit=tracker.RETENTION_BATCH)],
                                         time.time())).pruned
            longest = max(longest, time.perf_counter() - started)
            boxes, batches = boxes + pruned, batches + 1
            if pruned < tracker.RETENTION_BATCH:
                return boxes, batches, longest
    finally:
        await store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weeks", type=int, default=52)
    parser.add_argument("--per-week", type=int, default=30_000)
    parser.add_argument("--keep-days", type=int, default=90)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tracker-bench-retention-") as work:
        db = Path(work) / "year.db"
        asyncio.run(_create(db))
        now = time.time()
        started = time.monotonic()
        for week in range(args.weeks):
            write_week(db, week, args.per_week, now - (args.weeks - week) * WEEK)
        print(f"a year: {args.weeks} weeks x {args.per_week:,} returns written in {time.monotonic() - started:.0f} s;"
              f" file {size_mb(db):,.0f} MB")
        started = time.monotonic()
        boxes, batches, longest = asyncio.run(retain(db, args.keep_days))
        print(f"retention (keep_days {args.keep_days}): {boxes:,} boxes in {batches:,} batches, "
              f"{time.monotonic() - started:.0f} s, longest batch {longest * 1000:.0f} ms; file {size_mb(db):,.0f} MB")
        kept = size_mb(db)
        write_week(db, args.weeks, args.per_week, now)  # the next sales event
        print(f"one more week: file {size_mb(db):,.0f} MB")
        boxes, batches, longest = asyncio.run(retain(db, args.keep_days - 7))  # and a week later, the oldest goes
        after = size_mb(db)
        print(f"retention a week on: {boxes:,} boxes; file {after:,.0f} MB ({(after / kept - 1) * 100:+.1f}% against "
              "before the week)")
        cpu: dict[str, list[float]] = {"empty": [], "a year, retained": []}
        for _ in range(3):
            for name in cpu:
                copy = Path(work) / "burst.db"
                for suffix in ("", "-wal", "-shm"):
                    Path(str(copy) + suffix).unlink(missing_ok=True)
                if name != "empty":
                    shutil.copy(db, copy)
                writer_cpu, _ = asyncio.run(write_burst(str(copy), 30_000))
                cpu[name].append(writer_cpu)
        for name, values in cpu.items():
            print(f"burst of 30,000 returns on {name:<16}: SQLite writer {', '.join(f'{v:.2f}' for v in values)} CPU-s"
                  f" (median {sorted(values)[1]:.2f})")
    return 0


async def _create(db: Path) -> None:
    await (await tracker.Store.open(str(db))).close()


if __name__ == "__main__":
    sys.exit(main())
