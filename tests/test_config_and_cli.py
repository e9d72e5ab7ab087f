"""Configuration and command line: a wrong value stops the start with exit 2 and one line naming
the key; overrides come from the environment and systemd credentials; bad arguments get usage."""

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tracker
from conftest import ROOT, TOKEN

VALID = """
[partner]
base_url = "http://127.0.0.1:1/api/external/data"
timeout_s = 2
[storage]
path = "state.db"
[schedule]
track_every_s = 0.2
detect_within_s = 0.2
"""


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in (tracker.ENV_TOKEN, "CREDENTIALS_DIRECTORY")}
    return subprocess.run([sys.executable, str(ROOT / "tracker.py"), *args], capture_output=True, text=True,
                          env={**clean, **(env or {})}, cwd=cwd, timeout=30)


@pytest.mark.parametrize(("change", "key"), [
    (("timeout_s = 2", 'timeout_s = "ten"'), "partner.timeout_s"),
    (("timeout_s = 2", "timeout_s = 2\ncolour = 1"), "partner.colour"),
    (('base_url = "http://127.0.0.1:1/api/external/data"', ""), "partner.base_url"),
    (('base_url = "http://127.0.0.1:1/api/external/data"', 'base_url = "ftp://partner"'), "partner.base_url"),
    (("[storage]", "[storage]\n[partnr]"), "partnr"),
    (("[schedule]", "[limits]\nconcurrency = 0\n[schedule]"), "limits.concurrency"),
    (("[schedule]", "[limits]\nrate_per_s = true\n[schedule]"), "limits.rate_per_s"),
    (("[schedule]", '[http]\nlisten = "9108"\n[schedule]'), "http.listen"),
    (("track_every_s = 0.2", "track_every_s = -1"), "schedule.track_every_s"),
    (("detect_within_s = 0.2", "detect_within_s = 0"), "schedule.detect_within_s"),
    (("detect_within_s = 0.2", 'detect_within_s = 0.2\ntimezone = "Mars/Olympus_Mons"'), "schedule.timezone"),
    (("[schedule]", '[log]\nlevel = "loud"\n[schedule]'), "log.level"),
    (("timeout_s = 2", "timeout_s = 2\n["), "config"),
    (('path = "state.db"', 'path = "state.db"\nurl = "mysql://db/tracker"'), "storage.url"),
    (('path = "state.db"', 'path = "state.db"\nurl = "postgresql://db/tracker"\nlease_s = 3'), "storage.lease_s"),
])
def test_bad_config_exits_2_naming_the_key_and_starts_nothing(tmp_path: Path, change: tuple[str, str],
                                                              key: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(VALID.replace(*change))
    result = run_cli("run", "--config", str(config), env={tracker.ENV_TOKEN: TOKEN})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tracker: config error: {key}:"), result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "state.db").exists()


def test_missing_token_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(VALID)
    result = run_cli("run", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.startswith("tracker: config error: partner.token: missing required value")


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = run_cli("run", "--config", str(tmp_path / "nope.toml"), env={tracker.ENV_TOKEN: TOKEN})
    assert result.returncode == 2 and "file not found" in result.stderr


def test_the_shipped_config_is_valid_once_a_token_is_given() -> None:
    config = tracker.load_config(ROOT / "config.toml", {tracker.ENV_TOKEN: TOKEN})
    assert config.http.listen == "127.0.0.1:9108"
    assert config.partner.token == TOKEN


def test_fractional_seconds_and_whole_numbers_are_both_accepted(tmp_path: Path) -> None:
    config_path = tmp_path / "config.toml"
    config_path.write_text(VALID)
    config = tracker.load_config(config_path, {tracker.ENV_TOKEN: TOKEN})
    assert config.schedule.track_every_s == 0.2
    assert config.partner.timeout_s == 2.0 and isinstance(config.partner.timeout_s, float)


def test_relative_storage_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    config_path = tmp_path / "config.toml"
    config_path.write_text(VALID)
    config = tracker.load_config(config_path, {tracker.ENV_TOKEN: TOKEN})
    assert config.storage.path == str(tmp_path / "state.db")


def test_environment_overrides_the_file_and_the_credential_overrides_both(tmp_path: Path) -> None:
    config_path = tmp_path / "config.toml"
    config_path.write_text(VALID.replace("timeout_s = 2", 'timeout_s = 2\ntoken = "from-file"')
                           + '[slack]\nwebhook_url = "https://hooks.example/file"\n')
    assert tracker.load_config(config_path, {}).partner.token == "from-file"
    env = {tracker.ENV_TOKEN: "from-env", tracker.ENV_WEBHOOK: "https://hooks.example/env"}
    config = tracker.load_config(config_path, env)
    assert config.partner.token == "from-env"
    assert config.slack.webhook_url == "https://hooks.example/env"
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "partner_token").write_text("from-credential\n")
    env["CREDENTIALS_DIRECTORY"] = str(credentials)
    assert tracker.load_config(config_path, env).partner.token == "from-credential"


def test_a_lease_shorter_than_two_call_timeouts_matters_only_on_postgresql(tmp_path: Path) -> None:
    config_path = tmp_path / "config.toml"
    config_path.write_text(VALID.replace('path = "state.db"', 'path = "state.db"\nlease_s = 3'))  # timeout 2 s
    assert tracker.load_config(config_path, {tracker.ENV_TOKEN: TOKEN}).storage.lease_s == 3  # SQLite: unused
    with pytest.raises(tracker.ConfigError, match="storage.lease_s: must be at least twice partner.timeout_s"):
        tracker.load_config(config_path, {tracker.ENV_TOKEN: TOKEN, tracker.ENV_DATABASE_URL: "postgresql://db/t"})


def test_the_database_password_comes_from_a_credential_and_is_a_secret(tmp_path: Path) -> None:
    config_path = tmp_path / "config.toml"
    config_path.write_text(VALID.replace('path = "state.db"', 'path = "state.db"\nurl = "postgresql://tracker@db/t"'))
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "database_password").write_text("pg-Secret/9\n")
    config = tracker.load_config(config_path, {tracker.ENV_TOKEN: TOKEN, "CREDENTIALS_DIRECTORY": str(credentials)})
    assert config.storage.url == "postgresql://tracker:pg-Secret%2F9@db/t"
    assert "pg-Secret/9" in config.secrets and config.storage.url in config.secrets
    assert config.storage.where == "postgresql://tracker@db:5432/t"
    assert "pg-Secret" not in repr(config)


def test_secrets_are_not_in_the_config_repr(tmp_path: Path) -> None:
    config_path = tmp_path / "config.toml"
    config_path.write_text(VALID + '[slack]\nwebhook_url = "https://hooks.example/T000/SECRET"\n')
    config = tracker.load_config(config_path, {tracker.ENV_TOKEN: TOKEN})
    assert TOKEN not in repr(config) and "SECRET" not in repr(config)


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["run", "--bogus"], ["demo", "--returns", "many"]])
def test_bad_arguments_print_usage_and_exit_2(args: list[str]) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert "usage: tracker.py" in result.stderr


def test_status_without_a_database_says_so_and_exits_1(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(VALID)
    result = run_cli("status", "--config", str(config))  # no token needed to read the state
    assert result.returncode == 1
    assert "no state database" in result.stderr


def test_the_daemon_freezes_its_start_up_objects_and_collects_young_ones_rarely() -> None:
    thresholds = gc.get_threshold()
    try:
        tracker.settle_garbage_collector()
        assert gc.get_threshold() == (tracker.GC_YOUNG_THRESHOLD, *thresholds[1:])
        assert gc.get_freeze_count() > 0  # modules and config: out of every collection's scan
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def test_a_command_whose_reader_went_away_ends_quietly(tmp_path: Path) -> None:
    """`tracker.py status | head` closes the pipe early: no BrokenPipeError traceback on stderr."""
    event = {"shipment_number": "S", "requested_at": 0.0, "registered_at": 0.0,
             "events": [{"status": "requested", "at": 0.0}, {"status": "delivered", "at": 3600.0}]}
    (tmp_path / "timelines.jsonl").write_text(json.dumps(event) + "\n")
    proc = subprocess.Popen([sys.executable, str(ROOT / "tracker.py"), "replay", "timelines.jsonl"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first line is written
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert stderr == ""
