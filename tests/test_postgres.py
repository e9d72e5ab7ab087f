"""PostgreSQL as the state's home (`storage.url`): the daemon, its commands and its failures on a
real PostgreSQL server — a throwaway cluster the tests start on a loopback port. The store's rules
themselves run on both backends in tests/test_storage.py and tests/test_corrections.py."""

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import prometheus_client
import pytest

import standin
import tracker
from conftest import (ROOT, TOKEN, DaemonProcess, PostgresCluster, assert_nothing_lost_nothing_early, config_toml,
                      counts_in, everything_reported, ledger_of, make_config, run_daemon_until, running_daemon,
                      running_daemons, scenario, throwaway_cluster, wait_until)


def on_postgres(config: tracker.Config, url: str) -> tracker.Config:
    """The config with its state in PostgreSQL; leases of 3 s, so takeovers happen within a test."""
    return dataclasses.replace(config, storage=dataclasses.replace(config.storage, url=url, lease_s=3.0))


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os
    return subprocess.run([sys.executable, str(ROOT / "tracker.py"), *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, tracker.ENV_TOKEN: TOKEN, **(env or {})})


# ── the daemon on PostgreSQL ────────────────────────────────────────────────────────────────


async def test_every_item_is_reported_once_with_the_state_in_postgresql(start_partner, db_path: Path,
                                                                       pg_url: str) -> None:
    partner = start_partner(scenario(returns=300, reissue_share=0.1, fix_share=0.05, relist_share=0.1,
                                     faults=standin.Faults(error_share=0.05, garbled_share=0.02, reset_share=0.02)))
    config = on_postgres(make_config(db_path, partner.url), pg_url)
    await run_daemon_until(config, everything_reported(partner, pg_url))
    ledger = await ledger_of(partner)
    assert_nothing_lost_nothing_early(ledger)
    assert not db_path.exists()  # nothing went to the SQLite file
    counts = await counts_in(pg_url)
    assert counts["reports.done"] == ledger["expected"]


async def test_two_instances_share_the_work_and_each_item_is_reported_once(start_partner, db_path: Path,
                                                                          pg_url: str) -> None:
    partner = start_partner(scenario(returns=600, arrive_over_s=3.0, reissue_share=0.05,
                                     faults=standin.Faults(error_share=0.03, reset_share=0.02)))
    config = on_postgres(make_config(db_path, partner.url), pg_url)
    async with running_daemons(config, 2) as daemons:
        await wait_until(everything_reported(partner, pg_url), 60, what="every report, from two instances")
    ledger = await ledger_of(partner)
    assert_nothing_lost_nothing_early(ledger)
    for daemon in daemons:  # both did a share of the tracking and the reporting
        calls = {line.split("{")[1].split("}")[0]: float(line.split()[-1])
                 for line in prometheus_client.generate_latest(daemon.metrics.registry).decode().splitlines()
                 if line.startswith("tracker_partner_calls_total{") and 'outcome="ok"' in line}
        assert calls.get('endpoint="tracking",outcome="ok"', 0) > 0
        assert calls.get('endpoint="results",outcome="ok"', 0) > 0


# ── surviving the database ──────────────────────────────────────────────────────────────────


def cut_every_connection(url: str) -> int:
    """pg_terminate_backend for every session of the tracker's database but this one."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            " WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchall()
    return len(rows)


async def readyz(daemon: tracker.Daemon) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.get(f"http://{daemon.http_address}/readyz") as resp:
        return resp.status, await resp.json()


def recorded_at_least(partner: standin.ThreadedStandIn, n: int):
    """The partner has recorded n reports."""
    async def check() -> bool:
        return (await ledger_of(partner))["recorded"] >= n
    return check


async def test_cut_connections_and_a_database_restart_lose_nothing_and_report_nothing_twice(
        start_partner, postgres: PostgresCluster, db_path: Path, pg_url: str) -> None:
    partner = start_partner(scenario(returns=400, arrive_over_s=4.0, step_s=(0.3, 0.8)))
    config = on_postgres(make_config(db_path, partner.url), pg_url)
    async with running_daemon(config) as daemon:
        await wait_until(recorded_at_least(partner, 50), 30, what="the first reports")
        assert cut_every_connection(pg_url) >= 1
        await wait_until(recorded_at_least(partner, 150), 30, what="reports after every connection was cut")
        postgres.stop("immediate")  # a crash: no checkpoint, recovery on start

        async def not_ready() -> bool:
            status, body = await readyz(daemon)
            return status == 503 and "the state database is not writable" in body["problems"]

        await wait_until(not_ready, 30, what="/readyz to say the database is not writable")
        postgres.start()
        await wait_until(everything_reported(partner, pg_url), 60, what="every report after the restart")
    ledger = await ledger_of(partner)
    assert_nothing_lost_nothing_early(ledger)  # each once; a report resent after a cut got a 409


def returns_in(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM returns").fetchone()[0]


def wal_writer_of(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'walwriter'").fetchone()[0]


def unflushed_wal(url: str) -> int:
    """Bytes of WAL the server holds only in its memory: the commits a crash now takes back."""
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT pg_current_wal_insert_lsn() - pg_current_wal_flush_lsn()").fetchone()[0]


async def test_a_crash_that_takes_back_acknowledged_commits_loses_no_return(start_partner, db_path: Path) -> None:
    """Under synchronous_commit = off (or after a failover to an asynchronous standby) a crash takes
    back the last commits the database had answered — feed pages among them — while the daemon,
    which lived through it, has paged on. It reads the feed again from the cursor the database
    still holds: every return is tracked and reported, once. The WAL writer is held still while
    the feed is paged, so the crash certainly takes pages back."""
    with throwaway_cluster(loses_last_commits=True) as lossy:
        url = lossy.new_database()
        partner = start_partner(scenario(returns=300, arrive_over_s=6.0, step_s=(0.3, 0.8)))
        config = on_postgres(make_config(db_path, partner.url), url)
        async with running_daemon(config):
            await wait_until(lambda: asyncio.to_thread(lambda: returns_in(url) >= 20), 30, what="the first returns")
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("CHECKPOINT")  # the schema, the feed's lease and the first pages: on disk
            writer = wal_writer_of(url)
            os.kill(writer, signal.SIGSTOP)
            try:
                stored = returns_in(url)
                await wait_until(lambda: asyncio.to_thread(lambda: returns_in(url) >= stored + 100), 30,
                                 what="100 more returns, stored only in the server's memory")
                assert unflushed_wal(url) > 0
            finally:
                os.kill(writer, signal.SIGKILL)  # the server restarts itself, recovering what reached the disk
            await wait_until(everything_reported(partner, url), 90, what="every report after the crash")
    assert_nothing_lost_nothing_early(await ledger_of(partner))


# ── the commands, and the password ──────────────────────────────────────────────────────────

PASSWORD = "s3cret-pg-pass:/@word"


def database_with_password(postgres: PostgresCluster) -> str:
    """A new database owned by a role that must give a password (scram-sha-256 on loopback); its
    URL, without the password."""
    url = postgres.new_database()
    name = url.rsplit("/", 1)[1]
    role = f"{name}_owner"
    with psycopg.connect(postgres.url(), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'")  # our own names: no quoting needed
        conn.execute(f"ALTER DATABASE {name} OWNER TO {role}")
        conn.execute(f"GRANT ALL ON SCHEMA public TO {role}")
    hba = postgres.data / "pg_hba.conf"
    hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    postgres.reload()
    return f"postgresql://{role}@127.0.0.1:{postgres.port}/{name}"


def test_commands_run_on_postgresql_with_the_password_from_a_credential_and_never_show_it(
        start_partner, postgres: PostgresCluster, tmp_path: Path) -> None:
    partner = start_partner(scenario(returns=30, step_s=(0.05, 0.1)))
    url = database_with_password(postgres)
    config = tmp_path / "config.toml"
    config.write_text(config_toml(partner.url, tmp_path / "unused.db"))
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "database_password").write_text(PASSWORD + "\n")
    env = {tracker.ENV_DATABASE_URL: url, "CREDENTIALS_DIRECTORY": str(credentials)}

    without = cli("once", "--config", str(config), env={tracker.ENV_DATABASE_URL: url})
    assert without.returncode == 1 and "password" in without.stderr  # libpq says what is missing

    outputs = [cli("once", "--config", str(config), env=env) for _ in range(3)]  # feed, then checks, reports
    outputs.append(status := cli("status", "--config", str(config), env=env))
    outputs.append(shown := cli("show", "--json", partner.call(lambda: partner.standin.boxes[0].items[0]["id"]),
                                "--config", str(config), env=env))
    outputs.append(exported := cli("export", "--config", str(config), env=env))
    outputs.append(checked := cli("check-config", "--config", str(config), env=env))
    outputs.append(requeued := cli("requeue", "dead", "--config", str(config), env=env))
    assert all(out.returncode == 0 for out in outputs), [out.stderr for out in outputs]
    assert f"postgresql://{url.split('//')[1].split('@')[0]}@127.0.0.1:{postgres.port}/" in status.stdout
    assert json.loads(shown.stdout)["returns"]
    assert len(exported.stdout.splitlines()) == 31  # a header and every return
    assert "database postgresql://" in checked.stdout
    assert "dead report(s)" in requeued.stdout
    for out in [without, *outputs]:
        assert PASSWORD not in out.stdout + out.stderr
        assert "s3cret" not in out.stdout + out.stderr
    assert not (tmp_path / "unused.db").exists()


# ── moving from one host's SQLite file to PostgreSQL ────────────────────────────────────────


async def test_migrate_copies_everything_and_the_daemon_goes_on_from_postgresql(start_partner, db_path: Path,
                                                                                pg_url: str, tmp_path: Path) -> None:
    partner = start_partner(scenario(returns=300, step_s=(0.5, 1.0), reissue_share=0.1, fix_share=0.05,
                                     broken_share=0.02))
    config_file = tmp_path / "config.toml"
    config_file.write_text(config_toml(partner.url, db_path))

    async def half_reported() -> bool:
        ledger = await ledger_of(partner)
        return ledger["recorded"] >= ledger["expected"] // 2

    await run_daemon_until(make_config(db_path, partner.url), half_reported)
    moved = await asyncio.to_thread(cli, "migrate", "--to", pg_url, "--config", str(config_file))
    assert moved.returncode == 0, moved.stderr
    assert "returns" in moved.stdout and "rows" in moved.stdout
    from_sqlite = await asyncio.to_thread(cli, "export", "--format", "jsonl", "--config", str(config_file))
    from_postgres = await asyncio.to_thread(cli, "export", "--format", "jsonl", "--config", str(config_file),
                                            env={tracker.ENV_DATABASE_URL: pg_url})
    assert from_sqlite.returncode == from_postgres.returncode == 0
    assert from_postgres.stdout == from_sqlite.stdout and from_sqlite.stdout  # every return, every field
    assert (await counts_in(pg_url)) == (await counts_in(db_path))

    again = await asyncio.to_thread(cli, "migrate", "--to", pg_url, "--config", str(config_file))
    assert again.returncode == 1 and "not empty" in again.stderr

    await run_daemon_until(on_postgres(make_config(db_path, partner.url), pg_url), everything_reported(partner, pg_url))
    ledger = await ledger_of(partner)
    assert_nothing_lost_nothing_early(ledger)


# ── sharing the work: claims, the feed's lease, alerts, limits ─────────────────────────────


@contextlib.asynccontextmanager
async def instances(url: str, n: int = 2, lease_s: float = 30.0) -> AsyncIterator[list[tracker.Store]]:
    """n instances' stores on one database (each its own identity, as on separate hosts)."""
    stores = [await tracker.Store.open(url, lease_s=lease_s) for _ in range(n)]
    try:
        yield stores
    finally:
        for store in stores:
            await store.close()


async def due_boxes_listed(store: tracker.StateStore, n: int) -> list[str]:
    items = tuple(tracker.ReturnItem(id=f"R{k}", order_number="O", order_item_number="1", shipment_number=f"S{k}",
                                     requested_at=None) for k in range(n))
    await store.commit([tracker.FeedPage(items=items, quarantined=(), next_cursor="c", has_more=False,
                                         first_checks=tuple((f"S{k}", 0.0) for k in range(n)))], 1.0)
    return [f"S{k}" for k in range(n)]


def claimed_by(store: tracker.Store, kind: str = "boxes"):
    async def check() -> list[Any]:
        return await (store.due_boxes if kind == "boxes" else store.due_reports)(time.time(), 100)
    return check


async def test_a_due_box_is_claimed_by_one_instance_until_its_lease_runs_out(pg_url: str) -> None:
    async with instances(pg_url, lease_s=1.0) as (a, b):
        listed = await due_boxes_listed(a, 10)
        assert sorted(box.shipment_number for box in await a.due_boxes(time.time(), 100)) == listed
        assert await b.due_boxes(time.time(), 100) == []  # held by a
        taken = await wait_until(claimed_by(b), 10, what="b to take over a's lapsed claims")
        assert sorted(box.shipment_number for box in taken) == listed


async def test_claims_kept_alive_are_never_taken_over(pg_url: str) -> None:
    async with instances(pg_url, lease_s=1.0) as (a, b):
        listed = await due_boxes_listed(a, 5)
        await a.due_boxes(time.time(), 100)
        deadline = time.monotonic() + 3.0  # three leases long
        while time.monotonic() < deadline:
            await a.fleet.renew(listed, [])
            assert await b.due_boxes(time.time(), 100) == []
            await asyncio.sleep(0.2)


async def test_an_instance_leaving_hands_its_claims_back_at_once(pg_url: str) -> None:
    async with instances(pg_url, lease_s=600.0) as (a, b):
        listed = await due_boxes_listed(a, 5)
        await a.due_boxes(time.time(), 100)
        await a.fleet.leave()
        assert sorted(box.shipment_number for box in await b.due_boxes(time.time(), 100)) == listed


async def test_an_answer_made_under_a_lapsed_claim_is_not_stored(pg_url: str) -> None:
    async with instances(pg_url, lease_s=1.0) as (a, b):
        await due_boxes_listed(a, 1)
        (stale,) = await a.due_boxes(time.time(), 100)
        (current,) = await wait_until(claimed_by(b), 10, what="b to take the lapsed claim")
        late = tracker.BoxUpdate(shipment_number="S0", state=tracker.BoxState.DELIVERED, next_check_at=None,
                                 not_found=0, errors=0, registered=True, last_status="delivered",
                                 delivered_at="2026-11-24T10:00:00Z", claim=stale.claim)
        assert (await a.commit([late], 2.0)).lost_claims == {"S0"}
        assert (await counts_in(pg_url)).get("boxes.tracking") == 1  # a's answer changed nothing
        fresh = tracker.BoxUpdate(shipment_number="S0", state=tracker.BoxState.DELIVERED, next_check_at=None,
                                  not_found=0, errors=0, registered=True, last_status="delivered",
                                  delivered_at="2026-11-24T10:00:00Z", claim=current.claim)
        assert (await b.commit([fresh], 3.0)).lost_claims == frozenset()
        assert (await counts_in(pg_url)).get("boxes.delivered") == 1


async def test_a_feed_page_read_under_a_lease_since_taken_over_is_not_stored(pg_url: str) -> None:
    async with instances(pg_url, lease_s=1.0) as (a, b):
        assert (first := await a.fleet.lead_feed()) is not None
        assert await b.fleet.lead_feed() is None  # a pages the feed
        second = await wait_until(b.fleet.lead_feed, 10, what="b to take the lapsed feed lease")
        assert second > first
        page = tracker.FeedPage(items=(tracker.ReturnItem(id="R1", order_number="O", order_item_number="1",
                                                          shipment_number="S1", requested_at=None),), quarantined=(),
                                                          next_cursor="from-a", has_more=False, epoch=first)
        with pytest.raises(tracker.LeaseLost):
            await a.commit([page], 2.0)  # a paused former leader: it moves nothing
        assert await b.feed_cursor() is None and (await counts_in(pg_url))["returns"] == 0
        await b.commit([dataclasses.replace(page, next_cursor="from-b", epoch=second)], 3.0)
        assert await a.feed_cursor() == "from-b"


def returns_page(*ids: str) -> tracker.FeedPage:
    return tracker.FeedPage(items=tuple(tracker.ReturnItem(id=i, order_number=f"O-{i}", order_item_number="1",
                                                           shipment_number=f"S-{i}", requested_at=None) for i in ids),
                            quarantined=(), next_cursor=None, has_more=False)


def a_lock_is_awaited(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE NOT granted)").fetchone()[0]


async def test_a_list_cursor_never_passes_a_return_that_a_running_transaction_adds(pg_url: str) -> None:
    """Two instances adding returns at once, a shop paging by cursor between their commits: the
    one that began later commits later, so every return is listed once — none numbered below a
    cursor already handed out."""
    async with instances(pg_url, n=3) as (a, b, reader):
        a_added, a_may_go_on, b_added, b_may_commit = (asyncio.Event() for _ in range(4))

        def adding(store: tracker.Store, first: str, added: asyncio.Event, go_on: asyncio.Event, then: str | None):
            async def work(tx: tracker.Transaction) -> None:
                for return_id in (first, then) if then else (first,):
                    if return_id == then:
                        await go_on.wait()
                    await store.fleet.fence_page(tx, returns_page(return_id))
                    await tx.execute("insert_return", (return_id, f"O-{return_id}", "1", f"S-{return_id}", None,
                                                       1.0, "feed"))
                    added.set()
                if then is None:
                    await go_on.wait()
            return store.db.in_transaction(work)

        slow = asyncio.create_task(adding(a, "RA1", a_added, a_may_go_on, "RA2"))
        await a_added.wait()
        late = asyncio.create_task(adding(b, "RB", b_added, b_may_commit, None))
        await wait_until(lambda: asyncio.to_thread(lambda: b_added.is_set() or a_lock_is_awaited(pg_url)),
                         10, what="b's return added or waiting its turn")
        a_may_go_on.set()
        await slow
        await asyncio.wait_for(b_added.wait(), 10)
        first = await reader.list_returns(after=0, since=0.0, state=None, limit=100)  # a shop pages meanwhile
        b_may_commit.set()
        await late
        then = await reader.list_returns(after=first[-1][1], since=0.0, state=None, limit=100)
    assert sorted(return_id for return_id, _ in first + then) == ["RA1", "RA2", "RB"]  # each listed, once


async def test_an_alert_is_sent_by_one_instance_of_the_fleet_per_window(pg_url: str) -> None:
    async with instances(pg_url) as (a, b):
        assert await a.fleet.alert_once("stale", 60.0)
        assert not await b.fleet.alert_once("stale", 60.0)  # a sent it
        assert await b.fleet.alert_once("quarantine", 60.0)
        assert await b.fleet.alert_once("stale", 0.0)  # its window has passed


async def test_live_instances_count_themselves_and_split_the_partners_limits(pg_url: str) -> None:
    async with instances(pg_url, n=3) as stores:
        for store in stores:  # each joins the fleet when it first counts it
            await store.fleet.count()
        assert [await store.fleet.count() for store in stores] == [3, 3, 3]
        await stores[2].fleet.leave()
        assert await stores[0].fleet.count() == 2  # at once: its membership went with its session
    config = make_config(Path("unused.db"), "http://127.0.0.1:9",
                         limits=tracker.LimitsConfig(concurrency=16, rate_per_s=300.0))
    async with aiohttp.ClientSession() as session:
        client = tracker.PartnerClient(config, session, tracker.Metrics(), lambda *args: None)
        client.share_limits(3)
        assert all(rate.max_rate == 100.0 and rate.rate <= 100.0 for rate in client.rates.values())
        assert client.call_slots == 6  # ⌈16 / 3⌉


def fleet_changes(daemon: DaemonProcess) -> list[dict[str, Any]]:
    """The daemon's `fleet.changed` log lines: instances counted, and its share of the rate."""
    lines = (json.loads(line) for line in daemon.log().splitlines() if '"fleet.changed"' in line)
    return [line for line in lines if line.get("event") == "fleet.changed"]


async def test_a_killed_instances_share_returns_to_the_survivors_within_five_seconds(
        start_partner, pg_url: str, tmp_path: Path) -> None:
    partner = start_partner(scenario(returns=50))
    config = tmp_path / "config.toml"
    # leases of 30 s (the default): what a dead instance held passes on then, but its share of the
    # rate must not wait for that
    config.write_text(fleet_config(partner.url, tmp_path / "unused.db", pg_url, rate_per_s=300, lease_s=30.0))
    fleet = [DaemonProcess(config, tmp_path / f"tracker-{n}.log").start() for n in range(3)]
    try:
        for daemon in fleet:
            await wait_until(lambda: asyncio.to_thread(lambda: [c for c in fleet_changes(daemon)
                                                                 if c["instances"] == 3]),
                             30, what="each instance to count three")
        victim, survivors = fleet[0], fleet[1:]
        killed_at = time.monotonic()
        victim.kill9()

        def halved() -> bool:
            return all(any(c["instances"] == 2 and c["rate_per_s"] == 150.0 for c in fleet_changes(d))
                       for d in survivors)
        await wait_until(lambda: asyncio.to_thread(halved), 10, what="both survivors at half the rate")
        assert time.monotonic() - killed_at < 5.0
    finally:
        for daemon in fleet:
            daemon.stop()


def fleet_gauge(daemon: tracker.Daemon) -> float:
    line = next(line for line in prometheus_client.generate_latest(daemon.metrics.registry).decode().splitlines()
                if line.startswith("tracker_fleet_instances "))
    return float(line.split()[-1])


def member_sessions(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = 'tracker-member'"
                            " AND datname = current_database()").fetchone()[0]


async def test_after_every_connection_is_cut_no_instance_counts_fewer_than_the_fleet(
        start_partner, pg_url: str, tmp_path: Path) -> None:
    partner = start_partner(scenario(returns=50))
    config = on_postgres(make_config(tmp_path / "unused.db", partner.url), pg_url)
    async with running_daemons(config, 3) as daemons:
        await wait_until(lambda: asyncio.sleep(0, all(fleet_gauge(d) == 3 for d in daemons)), 30,
                         what="each instance to count three")
        assert await asyncio.to_thread(cut_every_connection, pg_url) >= 3
        # Each reconnects on its own tick and, meanwhile, sees the others gone. Watched until every
        # one has joined again and its settling time has passed: none ever counts fewer than three.
        seen: set[float] = set()
        rejoined_at = None
        deadline = time.monotonic() + 30
        while rejoined_at is None or time.monotonic() < rejoined_at + tracker.FLEET_SETTLE_S + 1.0:
            assert time.monotonic() < deadline, "the instances did not join the fleet again"
            seen |= {fleet_gauge(d) for d in daemons}
            if rejoined_at is None and await asyncio.to_thread(member_sessions, pg_url) == 3:
                rejoined_at = time.monotonic()
            await asyncio.sleep(0.05)
        assert seen == {3.0}


async def test_a_database_restart_mid_burst_draws_no_burst_of_429s(
        start_partner, postgres: PostgresCluster, pg_url: str, tmp_path: Path) -> None:
    # The fleet's cap a tenth under the partner's limit: three shares at their cap leave the bucket
    # room for a loaded machine's jitter, one instance that believed itself alone would not.
    partner = start_partner(scenario(returns=3000, arrive_over_s=2.0, step_s=(0.05, 0.1),
                                     faults=standin.Faults(latency_ms=(5, 20), rate_limit_per_s=330)))
    config = tmp_path / "config.toml"
    config.write_text(fleet_config(partner.url, tmp_path / "unused.db", pg_url, rate_per_s=300))
    fleet = [DaemonProcess(config, tmp_path / f"tracker-{n}.log").start() for n in range(3)]
    try:
        async def under_way() -> bool:
            return (await ledger_of(partner))["recorded"] >= 300
        await wait_until(under_way, 60, what="the burst under way")
        for daemon in fleet:
            await wait_until(lambda: asyncio.to_thread(lambda: [c for c in fleet_changes(daemon)
                                                                 if c["instances"] == 3]),
                             30, what="each instance to count three")
        postgres.stop("immediate")
        restarted_tenth = math.floor(await asyncio.to_thread(partner.call, lambda: partner.standin.now() * 10))
        postgres.start()
        await wait_until(everything_reported(partner, pg_url), 60, what="every report after the restart")
        counts = [[c["instances"] for c in fleet_changes(daemon)] for daemon in fleet]  # before the kills below
    finally:
        for daemon in fleet:
            daemon.stop()
    for counted in counts:  # once three, always three: none believed for a moment it was alone
        assert set(counted[counted.index(3):]) == {3}, counts
    ledger = await ledger_of(partner)
    assert_nothing_lost_nothing_early(ledger)
    after = {(endpoint, int(tenth)): counts for endpoint, tenths in ledger["by_tenth"].items()
             for tenth, counts in tenths.items()
             if restarted_tenth <= int(tenth) < restarted_tenth + 100}  # the ten seconds after it
    through, refused = sum(c[0] for c in after.values()), sum(c[1] for c in after.values())
    assert through > 0 and refused <= 0.02 * (through + refused), \
        (through, refused, {at: c for at, c in sorted(after.items()) if c[1]})


# ── chaos: three instances, kill -9, a cut, a database crash ───────────────────────────────


def fleet_config(partner_url: str, db_path: Path, url: str, rate_per_s: float, lease_s: float = 3.0) -> str:
    sections = json.loads(json.dumps(dataclasses.asdict(make_config(db_path, partner_url))))
    del sections["partner"]["token"]
    sections["storage"].update(url=url, lease_s=lease_s)
    sections["limits"].update(rate_per_s=rate_per_s, concurrency=24)
    return standin.daemon_config_toml(sections)


async def test_three_instances_lose_nothing_through_kill_9s_a_cut_and_a_database_crash(
        start_partner, postgres: PostgresCluster, pg_url: str, tmp_path: Path) -> None:
    import random
    partner = start_partner(scenario(returns=2500, arrive_over_s=6.0, reissue_share=0.03, fix_share=0.01,
                                     faults=standin.Faults(latency_ms=(5, 20), error_share=0.03, garbled_share=0.01,
                                                           reset_share=0.01, rate_limit_per_s=400)))
    config = tmp_path / "config.toml"
    config.write_text(fleet_config(partner.url, tmp_path / "unused.db", pg_url, rate_per_s=300))
    started = 0

    def start_one() -> DaemonProcess:
        nonlocal started
        started += 1
        return DaemonProcess(config, tmp_path / f"tracker-{started}.log").start()

    fleet = [start_one() for _ in range(3)]
    rng = random.Random(7)
    kills = 0
    try:
        t0 = time.monotonic()
        cut = crashed = False
        while not await everything_reported(partner, pg_url)():
            assert time.monotonic() - t0 < 150, await ledger_of(partner)
            await asyncio.sleep(2.0)
            victim = fleet.pop(rng.randrange(len(fleet)))
            victim.kill9()
            kills += 1
            fleet.append(start_one())
            elapsed = time.monotonic() - t0
            if not cut and elapsed > 4:
                cut = cut_every_connection(pg_url) > 0
            if not crashed and elapsed > 8:
                postgres.stop("immediate")
                await asyncio.sleep(1.0)
                postgres.start()
                crashed = True
        assert cut and crashed and kills >= 3
    finally:
        for daemon in fleet:
            daemon.stop()
    ledger = await ledger_of(partner)
    assert_nothing_lost_nothing_early(ledger)
    assert ledger["overlapping_checks"] == 0  # no box was ever checked by two instances at once
    calls = sum(sum(by_answer.values()) for by_answer in ledger["calls"].values())
    limited = sum(by_answer.get("429", 0) for by_answer in ledger["calls"].values())
    assert limited <= 0.02 * calls, ledger["calls"]  # the instances kept to their shares of 300/s


async def test_a_failover_to_a_synchronous_standby_mid_burst_loses_nothing(start_partner, db_path: Path) -> None:
    from pgcluster import throwaway_cluster
    partner = start_partner(scenario(returns=400, arrive_over_s=3.0, step_s=(0.3, 0.8)))
    with throwaway_cluster(durable=True) as primary:
        database = primary.new_database().rsplit("/", 1)[1]
        with throwaway_cluster(durable=True, standby_of=primary) as standby:
            # as README says: every host, and libpq connects only to the one that takes writes
            url = (f"postgresql://tracker@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/{database}"
                   "?target_session_attrs=read-write")
            async with running_daemon(on_postgres(make_config(db_path, partner.url), url)):
                await wait_until(recorded_at_least(partner, 100), 30, what="the first reports")
                primary.stop("immediate")  # the primary's host dies
                standby.promote()
                await wait_until(everything_reported(partner, url), 60, what="every report after the failover")
    ledger = await ledger_of(partner)
    assert_nothing_lost_nothing_early(ledger)
