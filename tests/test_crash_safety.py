"""kill -9 and SIGTERM against the real daemon process: nothing lost, nothing repeated beyond
what was in flight, and a clean exit within seconds."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import standin
import tracker
from conftest import ROOT, TOKEN, config_toml, scenario, wait_until_sync


def pending_reports(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT COUNT(*) FROM reports WHERE state = 'pending'").fetchone()[0]


def test_kill_9_mid_burst_then_restart_loses_nothing(start_partner, daemon_process, tmp_path: Path) -> None:
    faults = standin.Faults(latency_ms=(1, 5), error_share=0.02, garbled_share=0.01, reset_share=0.01)
    partner = start_partner(scenario(returns=3000, arrive_over_s=4.0, relist_share=0.02, faults=faults))
    db = tmp_path / "tracker.db"
    daemon = daemon_process(config_toml(partner.url, db))
    for cycle, kill_after_recorded in enumerate((200, 900, 1800)):
        daemon.start()
        wait_until_sync(lambda n=kill_after_recorded: partner.ledger()["recorded"] >= n, 40,
                        what=f"cycle {cycle}: {kill_after_recorded} reports recorded")
        daemon.kill9()
    daemon.start()
    wait_until_sync(lambda: (ledger := partner.ledger())["finished"] and ledger["missing"] == 0
                    and pending_reports(db) == 0, 60,
                    what="every reportable item recorded, and known to be, after the restarts")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(15) == 0
    ledger = partner.ledger()
    assert ledger["recorded"] == ledger["expected"] > 2000
    assert ledger["premature"] == ledger["unknown"] == ledger["mismatched"] == 0
    assert ledger["feed_from_start"] == 1  # the cursor survived every kill: the feed was never re-read
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM returns").fetchone()[0] == 3000
        assert conn.execute("SELECT COUNT(*) FROM reports WHERE state != 'done'").fetchone()[0] == 0


def test_sigterm_exits_0_within_seconds_even_with_calls_hanging(start_partner, daemon_process,
                                                                 tmp_path: Path) -> None:
    # Every third call hangs for a minute and the daemon's own timeout is longer than that grace.
    faults = standin.Faults(hang_share=0.3, hang_s=60.0)
    partner = start_partner(scenario(returns=500, faults=faults))
    db = tmp_path / "tracker.db"
    text = config_toml(partner.url, db, timeout_s=30.0)
    daemon = daemon_process(text).start()
    wait_until_sync(lambda: sum(partner.ledger()["calls"].get("tracking", {}).values()) > 50, 30,
                    what="tracking under way")
    hanging_before = partner.ledger()["calls"]["tracking"].get("hang", 0)
    assert hanging_before > 0
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(10) == 0
    assert time.monotonic() - started < 5.0  # grace is 1 s; the hanging calls were cancelled
    assert '"shutdown.complete"' in daemon.log()
    with sqlite3.connect(db) as conn:  # what did not finish is still there, to be done after a restart
        assert conn.execute("SELECT COUNT(*) FROM boxes WHERE state = 'tracking'").fetchone()[0] > 0


def test_a_second_daemon_on_the_same_database_refuses_to_start(start_partner, daemon_process,
                                                               tmp_path: Path) -> None:
    partner = start_partner(scenario(returns=10))
    text = config_toml(partner.url, tmp_path / "tracker.db")
    first = daemon_process(text).start()
    wait_until_sync(lambda: '"daemon.started"' in first.log(), 15, what="the first daemon to start")
    second = daemon_process(text)
    second.log_path = tmp_path / "second.log"
    second.start()
    assert second.wait(15) == 1
    assert "already running" in second.log()
    first.signal(signal.SIGTERM)
    assert first.wait(10) == 0


A_BUG_IN_THE_TRACKING_STAGE = """
import sys
import tracker

async def a_bug(self, box):
    raise ZeroDivisionError("a bug in the tracking stage")

tracker.Stages.check_box = a_bug  # no partner answer can do this: only a bug can
sys.exit(tracker.main(["run", "--config", sys.argv[1]]))
"""


def test_a_failing_stage_stops_the_daemon_naming_the_failure_with_exit_code_1(start_partner, tmp_path: Path) -> None:
    partner = start_partner(scenario(returns=20))
    config = tmp_path / "config.toml"
    config.write_text(config_toml(partner.url, tmp_path / "tracker.db"))
    done = subprocess.run([sys.executable, "-c", A_BUG_IN_THE_TRACKING_STAGE, str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={**os.environ, tracker.ENV_TOKEN: TOKEN})
    assert done.returncode == 1, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    failed = [e for e in events if e["event"] == "daemon.stage_failed"]
    assert len(failed) == 1 and failed[0]["stage"] == "track"
    assert failed[0]["error"] == "ZeroDivisionError: a bug in the tracking stage"
    assert events[-1]["event"] == "shutdown.complete"  # the other stages drained as at SIGTERM
    assert "stopped: the track stage failed: ZeroDivisionError: a bug in the tracking stage" in done.stderr
