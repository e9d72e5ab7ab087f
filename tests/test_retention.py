"""Retention (storage.keep_days): finished rows older than that — boxes closed and every return in
them reported or cancelled, with their returns, reports, attempts, histories, corrections and
resolved quarantine entries — are deleted in small batches, one transaction each; nothing
unfinished ever; the file gives the space back."""

import asyncio
import json
import signal
import sqlite3
from pathlib import Path

import tracker
from conftest import config_toml, create_schema, open_backend, wait_until_sync

DAY = 86400.0
NOW = 1_800_000_000.0
OLD, RECENT = NOW - 100 * DAY, NOW - 10 * DAY
CUTOFF = NOW - 90 * DAY


def delivered(shipment: str) -> tracker.BoxUpdate:
    return tracker.BoxUpdate(shipment_number=shipment, state=tracker.BoxState.DELIVERED, next_check_at=None,
                             not_found=0, errors=0, registered=True, last_status="delivered",
                             delivered_at="2026-01-01T00:00:00Z", history=(tracker.StatusChange(status="delivered",
                                                                                                at=1.0),))


def done(return_id: str) -> tracker.ReportUpdate:
    return tracker.ReportUpdate(return_id=return_id, state=tracker.ReportState.DONE, next_attempt_at=None,
                                outcome="recorded", last_error=None, attempt=1, http_status=200)


async def history_of_every_kind(store: tracker.StateStore) -> None:
    """Boxes named for what retention must do with them."""
    names = ["GONE_REPORTED", "GONE_CANCELLED", "KEPT_PENDING", "KEPT_REPORTED_LATELY", "KEPT_STALE",
             "KEPT_CLOSED_LATELY", "KEPT_TRACKING"]
    items = tuple(tracker.ReturnItem(id=f"R_{n}", order_number="O", order_item_number="1", shipment_number=n,
                                     requested_at=None) for n in names)
    broken = (tracker.QuarantinedItem(return_id="R_GONE_REPORTED", reason="order_number is null",
                                      raw='{"id": "R_GONE_REPORTED"}'),
              tracker.QuarantinedItem(return_id="BAD_1", reason="id is missing", raw='{"x": 1}'))
    await store.commit([tracker.FeedPage(items=items, quarantined=broken, next_cursor="c", has_more=False,
                                         first_checks=tuple((n, OLD) for n in names))], OLD)
    await store.commit([tracker.FeedPage(items=(items[0],), quarantined=(), next_cursor="c", has_more=False,
                                         first_checks=(("GONE_REPORTED", OLD),))], OLD)  # resolves it
    await store.commit([tracker.FeedPage(items=(tracker.ReturnItem(id="R_GONE_REPORTED", order_number="O",
                                                                   order_item_number="2",
                                                                   shipment_number="GONE_REPORTED", requested_at=None),
                                                                   ),
                                         quarantined=(), next_cursor="c", has_more=False, first_checks=())],
                                         OLD)  # a correction
    await store.commit([tracker.FeedPage(items=(tracker.ReturnItem(id="order:O:2", order_number="O",
                                                                   order_item_number="2",
                                                                   shipment_number="GONE_REPORTED", requested_at=None),
                                                ), quarantined=(), next_cursor=None, has_more=False, source="shop")],
                       OLD)  # pushed without an id: a second name of R_GONE_REPORTED
    await store.commit([delivered(n) for n in ("GONE_REPORTED", "KEPT_PENDING", "KEPT_REPORTED_LATELY")] + [
        tracker.BoxUpdate(shipment_number="GONE_CANCELLED", state=tracker.BoxState.CANCELLED, next_check_at=None,
                          not_found=0, errors=0, registered=True, last_status="cancelled"),
        tracker.BoxUpdate(shipment_number="KEPT_STALE", state=tracker.BoxState.STALE, next_check_at=None, not_found=9,
                          errors=0, registered=False)], OLD)
    await store.commit([done("R_GONE_REPORTED")], OLD)
    await store.commit([done("R_KEPT_REPORTED_LATELY")], RECENT)
    await store.commit([delivered("KEPT_CLOSED_LATELY")], RECENT)
    await store.commit([done("R_KEPT_CLOSED_LATELY")], RECENT)
    await store.commit([tracker.FeedPage(items=(), quarantined=(), next_cursor="c", has_more=False, first_checks=())],
                       NOW)
    # the open quarantine entry of BAD_1 is resolved long ago too
    if store.db.dialect is tracker.Dialect.POSTGRESQL:
        await store.db.query("UPDATE quarantine SET resolved_at = %s WHERE return_id = 'BAD_1'", (OLD,))
    else:
        with sqlite3.connect(store.where) as conn:
            conn.execute("UPDATE quarantine SET resolved_at = ? WHERE return_id = 'BAD_1'", (OLD,))


def rows(db: Path, sql: str) -> list:
    with sqlite3.connect(db) as conn:
        return [row[0] if len(row) == 1 else row for row in conn.execute(sql)]


async def column(store: tracker.StateStore, sql: str) -> list:
    return [row[0] for row in await store.db.query(sql, ())]


async def test_retention_deletes_exactly_the_finished_rows_past_keep_days(backend: str) -> None:
    store = await open_backend(backend)
    try:
        await history_of_every_kind(store)
        assert await column(store, "SELECT return_id FROM return_names") == ["R_GONE_REPORTED"]
        result = await store.commit([tracker.Prune(cutoff=CUTOFF, limit=100)], NOW)
        counts = await store.counts()
        assert result.pruned == 2
        assert sorted(await column(store, "SELECT shipment_number FROM boxes")) == [
            "KEPT_CLOSED_LATELY", "KEPT_PENDING", "KEPT_REPORTED_LATELY", "KEPT_STALE", "KEPT_TRACKING"]
        assert sorted(await column(store, "SELECT id FROM returns")) == [
            "R_KEPT_CLOSED_LATELY", "R_KEPT_PENDING", "R_KEPT_REPORTED_LATELY", "R_KEPT_STALE", "R_KEPT_TRACKING"]
        for table, key in (("reports", "return_id"), ("report_attempts", "return_id"), ("corrections", "return_id"),
                           ("box_history", "shipment_number"), ("quarantine", "return_id"),
                           ("return_names", "return_id")):
            assert not [r for r in await column(store, f"SELECT {key} FROM {table}") if r and "GONE" in r], table
        assert await column(store, "SELECT return_id FROM quarantine") == []  # both resolved long ago
    finally:
        await store.close()
    assert counts["returns"] == 5 and counts.get("boxes.delivered") == 3 and counts.get("reports.done") == 2
    assert counts.get("boxes.cancelled", 0) == 0 and counts.get("corrections", 0) == 0


async def test_retention_goes_a_batch_at_a_time_oldest_first(backend: str) -> None:
    store = await open_backend(backend)
    try:
        items = tuple(tracker.ReturnItem(id=f"R{k}", order_number="O", order_item_number="1", shipment_number=f"S{k}",
                                         requested_at=None) for k in range(5))
        await store.commit([tracker.FeedPage(items=items, quarantined=(), next_cursor="c", has_more=False,
                                             first_checks=tuple((f"S{k}", OLD) for k in range(5)))], OLD)
        for k in range(5):
            await store.commit([tracker.BoxUpdate(shipment_number=f"S{k}", state=tracker.BoxState.CANCELLED,
                                                  next_check_at=None, not_found=0, errors=0, registered=True,
                                                  last_status="cancelled")],
                               OLD + k)
        assert (await store.commit([tracker.Prune(cutoff=CUTOFF, limit=2)], NOW)).pruned == 2
        assert sorted(await column(store, "SELECT shipment_number FROM boxes")) == ["S2", "S3", "S4"]
    finally:
        await store.close()


async def test_a_failed_retention_batch_changes_nothing(db_path: Path) -> None:
    store = await tracker.Store.open(str(db_path))
    try:
        await history_of_every_kind(store)
        before = {t: rows(db_path, f"SELECT COUNT(*) FROM {t}")[0] for t in ("boxes", "returns", "reports")}
        with sqlite3.connect(db_path) as conn:  # the batch fails at its last table: disk full, say
            conn.execute("CREATE TRIGGER refuse BEFORE DELETE ON boxes BEGIN SELECT RAISE(ABORT, 'full'); END")
        try:
            await store.commit([tracker.Prune(cutoff=CUTOFF, limit=100)], NOW)
        except sqlite3.DatabaseError:
            pass
        else:
            raise AssertionError("the batch should have failed")
    finally:
        await store.close()
    assert {t: rows(db_path, f"SELECT COUNT(*) FROM {t}")[0] for t in ("boxes", "returns", "reports")} == before


def test_an_older_file_switches_to_incremental_vacuum_and_gives_space_back(db_path: Path) -> None:
    create_schema(db_path)
    with sqlite3.connect(db_path) as conn:  # as a file made before retention: no auto_vacuum
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.execute("PRAGMA auto_vacuum = NONE")
        conn.execute("VACUUM")
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
        conn.executemany("INSERT INTO boxes (shipment_number, state, first_seen_at, closed_at) VALUES (?, ?, ?, ?)",
                         [(f"S{k:06d}" + "x" * 200, "cancelled", OLD, OLD) for k in range(20000)])

    async def prune_all() -> int:
        store = await tracker.Store.open(str(db_path))
        try:
            total = 0
            while (pruned := (await store.commit([tracker.Prune(cutoff=CUTOFF, limit=5000)], NOW)).pruned):
                total += pruned
            return total
        finally:
            await store.close()

    size_before = db_path.stat().st_size
    assert asyncio.run(prune_all()) == 20000
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert db_path.stat().st_size < size_before / 4


def test_kill_9_in_the_middle_of_retention_loses_nothing_unfinished(daemon_process, tmp_path: Path) -> None:
    db = tmp_path / "tracker.db"
    create_schema(db)
    with sqlite3.connect(db) as conn:  # 10,000 finished boxes a year old, and 100 returns still in flight
        conn.executemany("INSERT INTO boxes (shipment_number, state, first_seen_at, closed_at) VALUES (?, ?, ?, ?)",
                         [(f"OLD{k}", "cancelled", 1.0, 1.0 + k) for k in range(10000)])
        conn.executemany("INSERT INTO returns (id, order_number, order_item_number, shipment_number, seen_at)"
                         " VALUES (?, 'O', '1', ?, 1.0)", [(f"R_OLD{k}", f"OLD{k}") for k in range(10000)])
        conn.executemany("INSERT INTO boxes (shipment_number, state, next_check_at, first_seen_at) VALUES (?, ?, ?, ?)",
                         [(f"LIVE{k}", "tracking", 4e9, 1.0) for k in range(100)])
        conn.executemany("INSERT INTO returns (id, order_number, order_item_number, shipment_number, seen_at)"
                         " VALUES (?, 'O', '1', ?, 1.0)", [(f"R_LIVE{k}", f"LIVE{k}") for k in range(100)])
    text = config_toml("http://127.0.0.1:1/api/external/data", db).replace("keep_days = 90", "keep_days = 1")
    daemon = daemon_process(text).start()
    wait_until_sync(lambda: '"storage.pruned"' in daemon.log(), 30, what="retention under way")
    daemon.kill9()
    with sqlite3.connect(db) as conn:
        left = conn.execute("SELECT COUNT(*) FROM boxes WHERE state = 'cancelled'").fetchone()[0]
        assert 0 < left < 10000  # killed in the middle
        assert conn.execute("SELECT COUNT(*) FROM boxes WHERE state = 'tracking'").fetchone()[0] == 100
        assert conn.execute("SELECT COUNT(*) FROM returns WHERE id LIKE 'R_LIVE%'").fetchone()[0] == 100
        orphans = conn.execute("SELECT COUNT(*) FROM returns r LEFT JOIN boxes b ON b.shipment_number ="
                               " r.shipment_number WHERE b.shipment_number IS NULL").fetchone()[0]
        assert orphans == 0  # a batch went whole or not at all
        counted = dict(((k, s), n) for k, s, n in conn.execute("SELECT kind, state, n FROM state_counts"))
        assert counted[("boxes", "cancelled")] == left and counted[("returns", "")] == left + 100
    daemon.start()
    wait_until_sync(lambda: rows(db, "SELECT COUNT(*) FROM boxes WHERE state = 'cancelled'")[0] == 0, 60,
                    what="retention to finish after the restart")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(15) == 0
    assert rows(db, "SELECT COUNT(*) FROM returns")[0] == 100
    assert json.loads(json.dumps(rows(db, "PRAGMA integrity_check"))) == ["ok"]
