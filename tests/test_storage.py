"""The state database: hot-path queries stay index searches as history grows, the single writer
is never interleaved with and batches what arrives together, and the file is private."""

import asyncio
import contextlib
import re
import json
import sqlite3
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog

import tracker
from conftest import create_schema, open_backend, wait_until


SQLITE = tracker.STATEMENTS[tracker.Dialect.SQLITE]  # each statement as the SQLite backend runs it


def query_plan(db: Path, sql: str) -> list[str]:
    names = re.findall(r"(?<!:):(\w+)", sql)
    params = dict.fromkeys(names, 0) if names else (0,) * sql.count("?")
    with sqlite3.connect(db) as conn:
        return [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]


def write_history(db: Path, finished: int, unfinished: int) -> None:
    """Finished returns (delivered boxes, done reports) and a few still in flight."""
    now = time.time()
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO boxes (shipment_number, state, next_check_at, first_seen_at) VALUES (?, ?, ?, ?)",
            [(f"S{i}", "delivered" if i < finished else "tracking", None if i < finished else now, now)
             for i in range(finished + unfinished)])
        conn.executemany(
            "INSERT INTO reports (return_id, order_number, order_item_number, shipment_number, collected_at,"
            " state, next_attempt_at, queued_at) VALUES (?, 'o', '1', ?, 'c', ?, ?, ?)",
            [(f"R{i}", f"S{i}", "done" if i < finished else "pending", None if i < finished else now, now)
             for i in range(finished + unfinished)])
        conn.execute("ANALYZE")  # statistics that make a scan look cheap must not change the plan


def plan_over_history(db: Path, sql: str) -> list[str]:
    """The plan of `sql` on a database with much finished history and a small backlog."""
    create_schema(db)
    write_history(db, finished=20000, unfinished=50)
    return query_plan(db, sql)


def indexes(db: Path) -> dict[str, str]:
    """Each index's name and its CREATE statement."""
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT name, COALESCE(sql, '') FROM sqlite_master WHERE type = 'index'"))


@pytest.mark.parametrize("name", sorted(tracker.HOT_PATH_SQL))
def test_hot_path_query_searches_a_partial_index_and_never_scans(name: str, db_path: Path) -> None:
    plan = plan_over_history(db_path, SQLITE[name])
    assert plan and all(step.startswith("SEARCH") for step in plan), plan
    assert not any("TEMP B-TREE" in step for step in plan), plan  # no per-query sort of the backlog


@pytest.mark.parametrize("name", sorted(tracker.PAGE_SQL))
def test_per_page_statement_starts_from_the_pages_ids_and_never_scans_a_table(name: str, db_path: Path) -> None:
    plan = plan_over_history(db_path, SQLITE[name])
    scans = [step for step in plan if step.startswith("SCAN")]
    assert all("VIRTUAL TABLE" in step for step in scans), plan  # json_each over the page, nothing else


@pytest.mark.parametrize("name", sorted(tracker.SHOW_SQL))
def test_show_statement_searches_an_index_and_never_scans_a_table(name: str, db_path: Path) -> None:
    create_schema(db_path)
    write_history(db_path, finished=20000, unfinished=50)
    with sqlite3.connect(db_path) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        explained = conn.execute("EXPLAIN QUERY PLAN " + SQLITE[name], {"keys": json.dumps(["R1", "SHP1"])})
        plan = [row[3] for row in explained]
    searched = {step.split()[1] for step in plan if step.startswith("SEARCH")}
    scanned = {step.split()[1] for step in plan if step.startswith("SCAN")}
    parts = {table for part, (table, _, _) in tracker.STORY_PARTS.items() if f" AS {part}" in SQLITE[name]}
    assert searched >= parts  # every part read…
    assert not scanned & tables, plan  # …by an index: only the statement's own few rows are scanned


@pytest.mark.parametrize("name", sorted(tracker.OPERATOR_SQL))
def test_operator_statement_reads_only_the_partial_index_of_its_state(name: str, db_path: Path) -> None:
    plan = plan_over_history(db_path, SQLITE[name])
    partial = {name for name, sql in indexes(db_path).items() if " WHERE " in sql}
    scans = [step for step in plan if step.startswith("SCAN")]
    ranges = [step for step in plan
              if step.startswith("SEARCH") and step.split(" INDEX ")[-1].split(" (")[0] in partial]
    assert scans or ranges, plan  # it reads a state's partial index, whole or a range of it
    for step in scans:  # the backlog or the few stale/dead rows: never the finished history
        assert "VIRTUAL TABLE" in step or step.split(" INDEX ")[-1] in partial, plan


async def test_a_version_2_database_trades_its_full_state_indexes_for_partial_ones(db_path: Path) -> None:
    await (await tracker.Store.open(str(db_path))).close()
    write_history(db_path, finished=300, unfinished=20)
    with sqlite3.connect(db_path) as conn:  # as version 2 left it
        conn.execute("DROP INDEX boxes_stale")
        conn.execute("DROP INDEX reports_dead")
        conn.execute("CREATE INDEX boxes_by_state ON boxes (state)")
        conn.execute("CREATE INDEX reports_by_state ON reports (state)")
        conn.execute("PRAGMA user_version = 2")
    readonly = await tracker.Store.open(str(db_path), readonly=True)  # `status` before any upgrade
    try:
        assert len(await readonly.oldest_tracking_boxes(50)) == 20
        assert await readonly.dead_reports(50) == []
    finally:
        await readonly.close()
    store = await tracker.Store.open(str(db_path))
    try:
        assert (await store.db.query("PRAGMA user_version", ()))[0][0] == tracker.SCHEMA_VERSION
    finally:
        await store.close()
    assert {"boxes_stale", "reports_dead"} <= indexes(db_path).keys()
    assert not {"boxes_by_state", "reports_by_state"} & indexes(db_path).keys()


def test_hot_path_queries_return_only_unfinished_rows_in_due_order(db_path: Path) -> None:
    create_schema(db_path)
    write_history(db_path, finished=100, unfinished=3)
    asyncio.run(assert_due_rows(db_path))


async def assert_due_rows(db_path: Path) -> None:
    store = await tracker.Store.open(str(db_path))
    try:
        due = await store.due_boxes(time.time() + 1, 10)
        assert [b.shipment_number for b in due] == ["S100", "S101", "S102"]
        assert [r.return_id for r in await store.due_reports(time.time() + 1, 10)] == ["R100", "R101", "R102"]
        assert await store.next_box_due_at() is not None
        assert await store.oldest_pending_report_queued_at() is not None
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def running_committer(where: str | Path,
                            **options: Any) -> AsyncIterator[tuple[tracker.StateStore, tracker.Committer]]:
    """A store and its committer, running; `options` go to Committer (on_committed, gather_s …)."""
    store = await open_backend(where)
    options = {"on_committed": lambda result: None, "on_failure": lambda exc: None, **options}
    committer = tracker.Committer(store, log=structlog.get_logger(), **options)
    runner = asyncio.create_task(committer.run())
    try:
        yield store, committer
    finally:
        committer.close()
        await runner
        await store.close()


async def test_writability_probes_never_break_a_commit_in_progress(backend: str) -> None:
    """The housekeeping probe and the stages' transitions share one writer: a probe that opened its
    own transaction on that connection used to end a commit half-way (and lose its batch)."""
    failures: list[Exception] = []
    async with running_committer(backend, on_failure=failures.append) as (_, committer):
        page = tracker.FeedPage(items=(), quarantined=(), next_cursor="c1", has_more=False)
        submits = [committer.submit(page) for _ in range(300)]
        probes = [committer.probe() for _ in range(50)]
        results = await asyncio.gather(*submits, *probes)
    assert failures == []
    assert all(results[300:])


async def test_transitions_arriving_within_the_gather_window_share_one_transaction(backend: str) -> None:
    """A commit costs about the same for one transition as for a hundred: one arriving while the
    committer gathers joins the batch instead of waiting for a transaction of its own."""
    commits: list[tracker.CommitResult] = []
    async with running_committer(backend, on_committed=commits.append, gather_s=0.5) as (store, committer):
        first = asyncio.create_task(committer.submit(tracker.Heartbeat()))
        await asyncio.sleep(0)  # one scheduling turn: `first` has queued its transition

        async def first_taken() -> bool:  # the committer holds it and is gathering
            return committer.queued == 0 and not first.done()

        await wait_until(first_taken, timeout_s=5, interval_s=0.001, what="the committer to take the first")
        second = asyncio.create_task(committer.submit(tracker.FeedPage(items=(), quarantined=(), next_cursor="c2",
                                                                       has_more=False)))
        await asyncio.gather(first, second)
        assert len(commits) == 1
        assert await store.feed_cursor() == "c2"


async def test_a_feed_page_is_committed_without_waiting_for_the_gather_window(backend: str) -> None:
    """The feed asks for its next page only once this one is stored: a page waiting out the window
    would slow a backlog's catch-up by the window for every 500 returns."""
    async with running_committer(backend, gather_s=60.0) as (store, committer):
        await asyncio.wait_for(committer.submit(tracker.FeedPage(items=(), quarantined=(), next_cursor="c1",
                                                                 has_more=True)), timeout=10)
        assert await store.feed_cursor() == "c1"


def feed_page(read_from: str | None, next_cursor: str, return_id: str) -> tracker.FeedPage:
    item = tracker.ReturnItem(id=return_id, order_number=f"O-{return_id}", order_item_number="1",
                              shipment_number=f"S-{return_id}", requested_at="2026-12-01T10:00:00Z")
    return tracker.FeedPage(items=(item,), quarantined=(), next_cursor=next_cursor, has_more=True,
                            first_checks=((item.shipment_number, 0.0),), read_from=tracker.SentCursor(cursor=read_from))


async def test_a_feed_page_read_from_a_cursor_the_database_no_longer_holds_is_not_stored(backend: str) -> None:
    """A database that lost its latest commits (a crash under synchronous_commit = off, a failover
    to an asynchronous standby) holds an older cursor than the one the feed loop paged on from: a
    page read past the lost ones would skip their returns for good. It is refused, and says what
    the database holds, so the loop reads the feed again from there."""
    async with running_committer(backend) as (store, committer):
        first = await committer.submit(feed_page(None, "c1", "R1"))
        refused = await committer.submit(feed_page("c2", "c3", "R3"))  # as if the page to c2 were lost
        again = await committer.submit(feed_page("c1", "c2", "R2"))
        stored = (await store.counts())["returns"], await store.feed_cursor()
    assert first.cursor_moved is None and first.returns_added == 1
    assert refused.cursor_moved == "c1" and refused.returns_added == 0
    assert again.cursor_moved is None and again.returns_added == 1
    assert stored == (2, "c2")


async def test_stories_of_many_keys_read_together_tell_each_as_its_own_read_does(backend: str) -> None:
    """A webhook sender reads its deliveries' stories STORY_BATCH at a time: a return id, an order
    number naming two returns, a shipment number, a key naming nothing — each the story its own
    read tells, on either backend."""
    items = [tracker.ReturnItem(id=f"R{n}", order_number="O-1" if n < 2 else f"O-{n}", order_item_number=str(n),
                                shipment_number=f"S-{n // 2}", requested_at="2026-12-01T10:00:00Z")
             for n in range(4)]
    async with running_committer(backend) as (store, committer):
        await committer.submit(tracker.FeedPage(items=tuple(items), quarantined=(), next_cursor="c", has_more=False,
                                                first_checks=tuple((f"S-{n}", 0.0) for n in range(2)),
                                                read_from=tracker.SentCursor(cursor=None)))
        keys = ["R3", "O-1", "S-1", "nothing", *(f"R{n}" for n in range(tracker.STORY_BATCH))]
        together = await store.stories(keys)
        alone = {key: await store.story(key) for key in keys}
    assert together == alone
    assert {r["id"] for r in together["O-1"]["returns"]} == {"R0", "R1"}
    assert {r["id"] for r in together["S-1"]["returns"]} == {"R2", "R3"}
    assert together["nothing"]["returns"] == [] and together["R3"]["boxes"][0]["shipment_number"] == "S-1"


async def test_database_file_is_readable_by_its_owner_only(db_path: Path) -> None:
    store = await tracker.Store.open(str(db_path))
    await store.close()
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600


async def counted_by_hand(store: tracker.StateStore) -> dict[str, int]:
    counts = {"returns": (await store.db.query("SELECT COUNT(*) FROM returns", ()))[0][0]}
    for table in ("boxes", "reports"):
        counts.update({f"{table}.{state}": n for state, n in
                       await store.db.query(f"SELECT state, COUNT(*) FROM {table} GROUP BY state", ())})
    return counts


def without_quarantine(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if not k.startswith(("quarantine", "unknown_statuses"))}


async def test_state_counts_follow_every_transition_without_counting_the_tables(backend: str) -> None:
    store = await open_backend(backend)
    try:
        items = tuple(tracker.ReturnItem(id=f"R{i}", order_number="O", order_item_number=str(i),
                                         shipment_number=f"S{i % 3}", requested_at=None) for i in range(7))
        await store.commit([tracker.FeedPage(items=items, quarantined=(), next_cursor="c1", has_more=False,
                                             first_checks=tuple((f"S{i}", 0.0) for i in range(3)))], 1.0)
        await store.commit([tracker.BoxUpdate(shipment_number="S0", state=tracker.BoxState.DELIVERED,
                                              next_check_at=None, not_found=0, errors=0, registered=True,
                                              last_status="delivered",
                                              delivered_at="2026-11-24T10:00:00Z"),
                            tracker.BoxUpdate(shipment_number="S1", state=tracker.BoxState.CANCELLED,
                                              next_check_at=None, not_found=0, errors=0, registered=True,
                                              last_status="cancelled")], 2.0)
        await store.commit([tracker.ReportUpdate(return_id="R0", state=tracker.ReportState.DONE, next_attempt_at=None,
                                                 outcome="recorded", last_error=None),
                            tracker.ReportUpdate(return_id="R3", state=tracker.ReportState.DEAD, next_attempt_at=None,
                                                 outcome="refused", last_error="422")], 3.0)
        await store.requeue_dead_reports(None, 4.0)
        counts = without_quarantine(await store.counts())
        assert counts == await counted_by_hand(store)
    finally:
        await store.close()
    assert counts == {"returns": 7, "boxes.delivered": 1, "boxes.cancelled": 1, "boxes.tracking": 1,
                      "reports.done": 1, "reports.pending": 2}


async def test_a_version_1_database_gets_its_counts_once_on_open(db_path: Path) -> None:
    await (await tracker.Store.open(str(db_path))).close()
    write_history(db_path, finished=300, unfinished=20)
    with sqlite3.connect(db_path) as conn:  # as version 1 left it: no counts, no triggers
        for trigger in ("returns_counted", "boxes_counted", "boxes_recounted", "reports_counted", "reports_recounted"):
            conn.execute(f"DROP TRIGGER {trigger}")
        conn.execute("DROP TABLE state_counts")
        conn.execute("PRAGMA user_version = 1")
    readonly = await tracker.Store.open(str(db_path), readonly=True)  # `status` before any upgrade
    try:
        assert without_quarantine(await readonly.counts()) == await counted_by_hand(readonly)
    finally:
        await readonly.close()
    store = await tracker.Store.open(str(db_path))
    try:
        assert without_quarantine(await store.counts()) == await counted_by_hand(store)
        assert (await store.db.query("PRAGMA user_version", ()))[0][0] == tracker.SCHEMA_VERSION
    finally:
        await store.close()
