"""PostgreSQL as the state's home (`storage.url`): the daemon, its commands and its failures on a
real PostgreSQL server — a throwaway cluster the tests start on a loopback port. The store's rules
themselves run on both backends in tests/test_storage.py and tests/test_corrections.py."""

import asyncio
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

import standin
import tracker
from conftest import (ROOT, TOKEN, PostgresCluster, config_toml, counts_in, everything_reported, ledger_of,
                      make_config, run_daemon_until, scenario, wait_until)


def on_postgres(config: tracker.Config, url: str) -> tracker.Config:
    return dataclasses.replace(config, storage=dataclasses.replace(config.storage, url=url))


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
    assert ledger["missing"] == ledger["premature"] == ledger["unknown"] == ledger["mismatched"] == 0
    assert ledger["recorded"] == ledger["expected"]
    assert not db_path.exists()  # nothing went to the SQLite file
    counts = await counts_in(pg_url)
    assert counts["reports.done"] == ledger["expected"]


async def test_a_second_daemon_on_the_same_database_refuses_to_start(start_partner, db_path: Path,
                                                                     pg_url: str) -> None:
    partner = start_partner(scenario(returns=20))
    config = on_postgres(make_config(db_path, partner.url), pg_url)
    first = tracker.Daemon(config)
    running = asyncio.create_task(first.run())
    try:
        await asyncio.wait_for(first.started.wait(), 10)
        with pytest.raises(RuntimeError, match="another tracker instance"):
            await tracker.Daemon(config).run()
    finally:
        first.stop()
        await running


# ── surviving the database ──────────────────────────────────────────────────────────────────


def cut_every_connection(url: str) -> int:
    """pg_terminate_backend for every session of the tracker's database but this one."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            " WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchall()
    return len(rows)


async def readyz(daemon: tracker.Daemon) -> tuple[int, dict]:
    import aiohttp
    async with aiohttp.ClientSession() as http, http.get(f"http://{daemon.http_address}/readyz") as resp:
        return resp.status, await resp.json()


async def test_cut_connections_and_a_database_restart_lose_nothing_and_report_nothing_twice(
        start_partner, postgres: PostgresCluster, db_path: Path, pg_url: str) -> None:
    partner = start_partner(scenario(returns=400, arrive_over_s=4.0, step_s=(0.3, 0.8)))
    config = on_postgres(make_config(db_path, partner.url), pg_url)
    daemon = tracker.Daemon(config)
    running = asyncio.create_task(daemon.run())

    def recorded_at_least(n: int):
        async def check() -> bool:
            if running.done():
                running.result()
            return (await ledger_of(partner))["recorded"] >= n
        return check

    try:
        await wait_until(recorded_at_least(50), 30, what="the first reports")
        assert cut_every_connection(pg_url) >= 1
        await wait_until(recorded_at_least(150), 30, what="reports after every connection was cut")
        postgres.stop("immediate")  # a crash: no checkpoint, recovery on start

        async def not_ready() -> bool:
            status, body = await readyz(daemon)
            return status == 503 and "the state database is not writable" in body["problems"]

        await wait_until(not_ready, 30, what="/readyz to say the database is not writable")
        postgres.start()
        await wait_until(everything_reported(partner, pg_url), 60, what="every report after the restart")
    finally:
        daemon.stop()
        await running
    ledger = await ledger_of(partner)
    assert ledger["missing"] == ledger["premature"] == ledger["mismatched"] == 0
    assert ledger["recorded"] == ledger["expected"]  # each once; a report resent after a cut got a 409


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
    assert all(out.returncode == 0 for out in outputs), [out.stderr for out in outputs]
    assert f"postgresql://{url.split('//')[1].split('@')[0]}@127.0.0.1:{postgres.port}/" in status.stdout
    assert json.loads(shown.stdout)["returns"]
    assert len(exported.stdout.splitlines()) == 31  # a header and every return
    assert "database postgresql://" in checked.stdout
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
    assert ledger["missing"] == ledger["premature"] == ledger["mismatched"] == 0
    assert ledger["recorded"] == ledger["expected"]
