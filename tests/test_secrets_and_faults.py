"""A refused token, a broken config, a full or damaged database, and secrets: each gives one clear
message, loses nothing, and lets no secret out."""

import asyncio
import json
import os
import signal
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

import tracker
from conftest import (TOKEN, config_toml, everything_reported, ledger_of, make_config, running_daemon, scenario,
                      wait_until, wait_until_sync)
from test_config_and_cli import VALID, run_cli

WEBHOOK = "https://hooks.slack.test/services/T000/B000/very-secret-path"


# ── a refused token ─────────────────────────────────────────────────────────────────────────


async def test_a_refused_token_lets_one_trial_call_out_and_holds_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracker, "UNAUTHORIZED_RETRY_S", 0.2)
    changes: list[bool] = []
    gate = tracker.TokenGate(changes.append)
    gate.record(tracker.Outcome.UNAUTHORIZED, trial=False)
    assert gate.refused and changes == [True]
    callers = {asyncio.create_task(gate.admit()) for _ in range(2)}
    done, held = await asyncio.wait(callers, timeout=2, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1 and done.pop().result() is True  # the trial, once the interval has passed
    await asyncio.sleep(0)
    assert len(held) == 1 and not next(iter(held)).done()  # held while the trial is out
    gate.record(tracker.Outcome.OK, trial=True)
    assert await asyncio.wait_for(held.pop(), 1) is False and not gate.refused and changes == [True, False]


async def test_a_new_token_is_tried_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = tracker.TokenGate(lambda refused: None)
    gate.record(tracker.Outcome.UNAUTHORIZED, trial=False)  # next trial 10 s away
    waiting = asyncio.create_task(gate.admit())
    await asyncio.sleep(0)
    assert not waiting.done()
    gate.new_token()
    assert await asyncio.wait_for(waiting, 1) is True


def http_get(address: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def listening_address(log: str) -> str | None:
    for line in log.splitlines():
        if '"http.listening"' in line:
            return json.loads(line)["address"]
    return None


def test_a_revoked_token_alerts_once_calls_once_per_10_s_and_sighup_recovers(start_partner, daemon_process,
                                                                             tmp_path: Path) -> None:
    partner = start_partner(scenario(returns=30, token="the-rotated-token"))
    text = config_toml(partner.url, tmp_path / "tracker.db").replace("[partner]", '[partner]\ntoken = "old-token"')
    daemon = daemon_process(text, env={tracker.ENV_TOKEN: ""})
    os.chmod(daemon.config_path, 0o600)
    daemon.start()
    wait_until_sync(lambda: '"partner.token_refused"' in daemon.log(), 15, what="the token refused")
    address = wait_until_sync(lambda: listening_address(daemon.log()), 5, what="the HTTP address")
    status, body = http_get(address, "/readyz")
    assert status == 503 and "refuses the token on /returns" in body
    wait_until_sync(lambda: partner.ledger()["calls"]["returns"].get("401", 0) >= 2, 15, what="the second trial")
    first_trial_count = partner.ledger()["calls"]["returns"]["401"]
    assert first_trial_count == 2  # one at the start, one 10 s later: not one per retry
    # with a timeout change too, which a reload does not apply: the log names what needs a restart
    daemon.config_path.write_text(text.replace("old-token", "the-rotated-token").replace("timeout_s = 1.0",
                                                                                      "timeout_s = 2.0"))
    daemon.signal(signal.SIGHUP)
    wait_until_sync(lambda: partner.ledger()["missing"] == 0 and partner.ledger()["finished"], 30,
                    what="everything reported after the reload")
    assert http_get(address, "/readyz")[0] == 200
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(10) == 0
    log = daemon.log()
    alerts = [json.loads(line) for line in log.splitlines() if '"alert.raised"' in line]
    assert [a["key"] for a in alerts if a["key"].startswith("unauthorized")] == ["unauthorized:returns"]
    reloaded = [json.loads(line) for line in log.splitlines() if '"config.reloaded"' in line]
    assert [(r["token_changed"], r["needs_restart_for"]) for r in reloaded] == [(True, ["partner"])]
    assert "old-token" not in log and "the-rotated-token" not in log


# ── config ──────────────────────────────────────────────────────────────────────────────────


def test_check_config_validates_without_starting_anything(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(VALID)
    result = run_cli("check-config", "--config", str(config), env={tracker.ENV_TOKEN: TOKEN})
    assert result.returncode == 0 and "ok" in result.stdout and TOKEN not in result.stdout + result.stderr
    assert not (tmp_path / "state.db").exists()


def test_check_config_names_the_bad_key_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(VALID.replace("timeout_s = 2", "timeout_s = 2\nretries = 3"))
    result = run_cli("check-config", "--config", str(config), env={tracker.ENV_TOKEN: TOKEN})
    assert result.returncode == 2 and result.stderr.strip() == "tracker: config error: partner.retries: unknown key"


def test_a_mistyped_token_is_not_echoed_in_the_config_error(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(VALID.replace("[partner]", "[partner]\ntoken = 987654321"))
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 2 and "partner.token: expected a string, got int" in result.stderr
    assert "987654321" not in result.stderr


@pytest.mark.parametrize(("mode", "warned"), [(0o644, True), (0o600, False)])
def test_a_config_file_holding_the_token_that_others_can_read_is_warned_about(tmp_path: Path, mode: int,
                                                                              warned: bool) -> None:
    config = tmp_path / "config.toml"
    config.write_text(VALID.replace("[partner]", f'[partner]\ntoken = "{TOKEN}"'))
    os.chmod(config, mode)
    result = run_cli("check-config", "--config", str(config))
    assert result.returncode == 0
    assert ("can be read by other users" in result.stderr and "chmod 600" in result.stderr) is warned
    assert TOKEN not in result.stderr + result.stdout


# ── storage faults ──────────────────────────────────────────────────────────────────────────


async def break_storage(daemon: tracker.Daemon, fault: str) -> None:
    """Make every write that needs it fail the way SQLite fails on a bad disk. "full": SQLite's
    own cap on the file's size, so growing it fails with SQLITE_FULL as on a full disk.
    "read-only": query_only, so every write fails with SQLITE_READONLY as on a read-only mount.
    The test reaches the daemon's SQLite writer connection to do it."""
    assert daemon.store is not None
    writer = daemon.store.db.writer
    if fault == "full":
        pages = (await writer.execute_fetchall("PRAGMA page_count"))[0][0]
        await writer.execute(f"PRAGMA max_page_count = {int(pages)}")
    else:
        await writer.execute("PRAGMA query_only = ON")


async def repair_storage(daemon: tracker.Daemon) -> None:
    assert daemon.store is not None
    writer = daemon.store.db.writer
    await writer.execute("PRAGMA max_page_count = 1000000000")
    await writer.execute("PRAGMA query_only = OFF")


@pytest.mark.parametrize("fault", ["full", "read-only"])
async def test_a_full_or_read_only_disk_pauses_work_alerts_and_recovers_by_itself_losing_nothing(
        start_partner, db_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    monkeypatch.setattr(tracker, "STORAGE_SETTLE_S", 1.0)
    partner = start_partner(scenario(returns=400, arrive_over_s=2.0))
    partner.call(partner.standin.hold_clock)
    daemon = tracker.Daemon(make_config(db_path, partner.url))
    with capture_logs() as logs:
        await run_through_a_storage_fault(daemon, partner, db_path, fault)
    alerts = [e for e in logs if e["event"] == "alert.raised"]
    assert any(a["key"] == "storage" and "Cannot write the state database" in a["text"] for a in alerts), alerts
    ledger = await ledger_of(partner)
    assert ledger["missing"] == 0 and ledger["premature"] == 0 and ledger["unknown"] == 0


async def run_through_a_storage_fault(daemon: tracker.Daemon, partner, db_path: Path, fault: str) -> None:
    async with running_daemon(daemon):
        await wait_until(lambda: asyncio.sleep(0, daemon.started.is_set()), 10, what="the daemon started")
        await break_storage(daemon, fault)
        partner.call(partner.standin.restart_clock)
        await wait_until(lambda: asyncio.sleep(0, "the state database is not writable" in daemon.readiness()),
                         20, what="readiness to report the broken disk")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://{daemon.http_address}/readyz") as resp:
                assert resp.status == 503
        await repair_storage(daemon)
        await wait_until(everything_reported(partner, db_path), 60, what="everything reported after recovery")
        await wait_until(lambda: asyncio.sleep(0, daemon.readiness() == []), 20, what="ready again")


def test_a_damaged_database_stops_the_start_with_a_clear_message(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE filler (x TEXT)")
        conn.executemany("INSERT INTO filler VALUES (?)", [("x" * 500,) for _ in range(200)])
        conn.execute("CREATE INDEX filler_x ON filler (x)")
    with open(db, "r+b") as f:  # scribble over pages in the middle of the file
        f.seek(4096 * 3)
        f.write(b"\xff" * 4096 * 4)
    config = tmp_path / "config.toml"
    config.write_text(VALID)
    result = run_cli("run", "--config", str(config), env={tracker.ENV_TOKEN: TOKEN})
    assert result.returncode == 1
    assert "cannot start" in result.stderr and ("integrity check" in result.stderr or "malformed" in result.stderr)


# ── the HTTP server and secrets ─────────────────────────────────────────────────────────────


async def test_the_http_server_answers_only_get_on_its_paths_and_never_a_secret(start_partner,
                                                                               db_path: Path) -> None:
    partner = start_partner(scenario(returns=20))
    config = make_config(db_path, partner.url, slack=tracker.SlackConfig(webhook_url=WEBHOOK))
    async with running_daemon(config) as daemon:
        await wait_until(lambda: asyncio.sleep(0, daemon.http_address), 10, what="listening")
        host = daemon.http_address
        assert host is not None and host.startswith("127.0.0.1:")
        async with aiohttp.ClientSession() as http:
            for method, path, expected in (("POST", "/metrics", 405), ("DELETE", "/readyz", 405),
                                           ("GET", "/admin", 404), ("PUT", "/healthz", 405)):
                async with http.request(method, f"http://{host}{path}") as resp:
                    assert resp.status == expected, (method, path)
            bodies = []
            for path in ("/healthz", "/readyz", "/metrics"):
                async with http.get(f"http://{host}{path}") as resp:
                    bodies.append(await resp.text())
    for body in bodies:
        assert TOKEN not in body and WEBHOOK not in body and "very-secret-path" not in body


def test_secrets_hidden_in_nested_fields_and_tracebacks_never_reach_the_log() -> None:
    import io
    out = io.StringIO()
    tracker.REDACT.set_secrets([TOKEN, WEBHOOK])
    tracker.configure_logging("info", out)
    log = tracker.structlog.get_logger("secrets-test")
    log.info("nested", request={"headers": {"Authorization": f"Bearer {TOKEN}"}, "url": WEBHOOK})
    try:
        raise RuntimeError(f"failed posting to {WEBHOOK} with Bearer someone-elses-token")
    except RuntimeError:
        log.exception("failed")
    text = out.getvalue()
    tracker.structlog.reset_defaults()
    assert TOKEN not in text and WEBHOOK not in text and "someone-elses-token" not in text
    assert text.count("[redacted]") >= 3
