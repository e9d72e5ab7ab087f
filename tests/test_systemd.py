"""tracker.service under a real systemd. This machine has none as PID 1, so the tests boot one in
namespaces of their own (sysboot.py: its root an overlay whose changes live in memory, nothing of
the machine's written), install the tracker into it with `./install --system` against the partner
stand-in on loopback, and drive it as an operator would: systemctl, journalctl, the files.

The module's systemd is booted once and the service installed once; each behaviour test starts the
service afresh against a stand-in of its own. Tests of bad input and the credential probe boot a
systemd of their own (about a second)."""

import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import pty
import re
import select
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import standin
import sysboot
from conftest import (ROOT, TOKEN, assert_nothing_lost_nothing_early, everything_reported, free_port, make_config,
                      scenario, wait_until_sync)

UNIT = "tracker.service"
DB = "/var/lib/tracker/tracker.db"
INSTALLED = ("/opt/tracker", "/etc/tracker", "/etc/systemd/system/tracker.service")
INSTALL = f"{sysboot.CHECKOUT}/install"
UNIT_STARTED = "39f53479d3a045ac8e11786248231fbf"  # journal MESSAGE_ID: a unit's start job finished
BURST = dict(returns=600, arrive_over_s=4.0)  # long enough to be interrupted half way


def install(host: sysboot.BootedSystemd, *args: str, token: str = "",
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`./install ARGS` from the checkout inside, the token (if any) on its standard input."""
    return host.run(INSTALL, *args, input=token, check=False, timeout=timeout, cwd=sysboot.CHECKOUT)


def installed_paths(host: sysboot.BootedSystemd) -> list[str]:
    return [path for path in INSTALLED if host.path(path).exists()]


def reported(partner: standin.ThreadedStandIn) -> bool:
    return asyncio.run(everything_reported(partner)())


class Service:
    """tracker.service in the booted systemd, as an operator drives it."""

    def __init__(self, host: sysboot.BootedSystemd) -> None:
        self.host = host
        self.port = free_port()  # its /healthz, /readyz, /metrics: the network is this machine's
        self.api_port = free_port()  # the shop's API, served by a process of its own in the unit

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.host.run("systemctl", *args, check=check, timeout=timeout)

    def show(self, *properties: str) -> dict[str, str]:
        out = self.systemctl("show", UNIT, *(f"--property={p}" for p in properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def main_pid(self) -> int:
        return int(self.show("MainPID")["MainPID"])

    def restarts(self) -> int:
        return int(self.show("NRestarts")["NRestarts"])

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        target = self.host.path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        os.chmod(target, mode)

    def configure(self, partner: standin.ThreadedStandIn, token: str | None = None) -> None:
        """The operator's edit of /etc/tracker/config.toml: this partner, the tests' fast schedule,
        ports of its own, the shop's API on; the token in the file only when given."""
        sections = dataclasses.asdict(make_config(Path(DB), partner.url))
        del sections["partner"]["token"]
        if token is not None:
            sections["partner"]["token"] = token
        sections["http"]["listen"] = f"127.0.0.1:{self.port}"
        sections["api"]["listen"] = f"127.0.0.1:{self.api_port}"
        self.write("/etc/tracker/config.toml", standin.daemon_config_toml(sections, "edited by the systemd tests"))

    def start_fresh(self, partner: standin.ThreadedStandIn, token: str | None = None) -> None:
        """Stopped, its database removed, configured for this partner, started (its start limit reset)."""
        self.systemctl("stop", UNIT)
        self.host.run("rm", "-f", DB, f"{DB}-wal", f"{DB}-shm", f"{DB}.lock")
        self.configure(partner, token)
        self.systemctl("reset-failed", UNIT, check=False)
        self.systemctl("start", UNIT, timeout=30)

    @contextmanager
    def dropin(self, name: str, text: str) -> Iterator[None]:
        path = f"/etc/systemd/system/{UNIT}.d/{name}.conf"
        self.write(path, text)
        self.systemctl("daemon-reload")
        try:
            yield
        finally:
            self.host.path(path).unlink()
            self.systemctl("daemon-reload")

    def journal(self, since: float) -> list[dict[str, Any]]:
        """The unit's journal entries since then: the daemon's lines and systemd's about it."""
        out = self.host.run("journalctl", "-u", UNIT, f"--since=@{int(since)}", "-o", "json", "--no-pager").stdout
        entries = [e for e in map(json.loads, out.splitlines())  # --since has whole seconds; the entries have µs
                   if int(e["__REALTIME_TIMESTAMP"]) >= since * 1e6]
        for entry in entries:
            if isinstance(entry.get("MESSAGE"), list):  # journald's form for a message that is not text
                entry["MESSAGE"] = bytes(entry["MESSAGE"]).decode(errors="replace")
        return entries

    def output(self, since: float) -> list[str]:
        """The daemon's lines, as journald received them from its standard output and error."""
        return [e["MESSAGE"] for e in self.journal(since)
                if e.get("_SYSTEMD_UNIT") == UNIT and e.get("_TRANSPORT") == "stdout"]

    def events(self, since: float) -> list[dict[str, Any]]:
        """Its JSON lines (a config file's warning at start is a line of text on standard error)."""
        return [json.loads(line) for line in self.output(since) if line.startswith("{")]

    def said_by_systemd(self, since: float) -> list[str]:
        return [e["MESSAGE"] for e in self.journal(since) if e.get("_PID") == "1"]

    def readiness(self) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=5) as answer:
                return answer.status, json.load(answer)
        except urllib.error.HTTPError as refused:
            return refused.code, json.load(refused)

    def refuses_token(self) -> bool:
        try:
            status, body = self.readiness()
        except OSError:
            return False
        return status == 503 and any("refuses the token" in p for p in body["problems"])

    def wait_for_event(self, since: float, event: str, timeout_s: float = 30) -> dict[str, Any]:
        return wait_until_sync(lambda: next((e for e in self.events(since) if e["event"] == event), None),
                               timeout_s, 0.2, what=f"{event} in the journal")

    def wait_restarted(self, restarts_before: int, pid_before: int, timeout_s: float = 60) -> None:
        def back() -> bool:
            state = self.show("NRestarts", "MainPID", "ActiveState", "SubState")
            return (int(state["NRestarts"]) > restarts_before and int(state["MainPID"]) not in (0, pid_before)
                    and (state["ActiveState"], state["SubState"]) == ("active", "running"))
        wait_until_sync(back, timeout_s, 0.2, what="systemd to restart the service")


def wait_mid_burst(partner: standin.ThreadedStandIn) -> None:
    """Until the partner has recorded some of the burst's reports, and not all."""
    def some() -> dict[str, Any] | None:
        ledger = partner.ledger()
        return ledger if ledger["recorded"] >= 20 else None
    ledger = wait_until_sync(some, 30, 0.05, what="the first reports")
    assert ledger["recorded"] < ledger["expected"], "the burst ended before the interruption"


# ── fixtures ────────────────────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def module_partner() -> Iterator[standin.ThreadedStandIn]:
    """The stand-in the service is installed against (the tests then start stand-ins of their own)."""
    partner = standin.ThreadedStandIn(scenario(returns=50))
    partner.start()
    yield partner
    partner.stop()


@pytest.fixture(scope="module", autouse=True)
def canary() -> Iterator[Path]:
    """A file in this machine's /tmp from before the boot: systemd-tmpfiles empties /tmp as seen
    from inside, which must not be this one."""
    path = Path("/tmp", f"tracker-systemd-canary-{os.getpid()}")
    path.write_text("still here")
    yield path
    path.unlink()


@pytest.fixture(scope="module")
def installation(canary: Path, booted_systemd: sysboot.BootedSystemd,
                 module_partner: standin.ThreadedStandIn) -> dict[str, Any]:
    """`sudo ./install --system --base-url …` with the token on standard input, once for the module, on
    a machine without python3-venv (as bare Debian and Ubuntu images come)."""
    booted_systemd.run("dpkg", "--remove", "python3-venv", "python3.11-venv")
    cannot = booted_systemd.run("/usr/bin/python3", "-m", "venv", "/tmp/venv", check=False)
    started = time.monotonic()
    result = install(booted_systemd, "--system", "--base-url", module_partner.url, token=TOKEN + "\n")
    return {"result": result, "seconds": time.monotonic() - started, "venv_before": cannot}


@pytest.fixture
def service(installation: dict[str, Any], booted_systemd: sysboot.BootedSystemd) -> Iterator[Service]:
    assert installation["result"].returncode == 0, installation["result"].stdout + installation["result"].stderr
    yield Service(booted_systemd)


# ── the boot itself ─────────────────────────────────────────────────────────────────────────


def test_the_booted_systemd_empties_its_own_tmp_never_this_machines(booted_systemd: sysboot.BootedSystemd,
                                                                    canary: Path) -> None:
    tmpfiles = booted_systemd.run("systemctl", "show", "systemd-tmpfiles-setup.service", "--property=Result",
                                  "--property=ActiveState").stdout.split()
    assert tmpfiles == ["Result=success", "ActiveState=active"]  # it ran: `D /tmp` emptied /tmp inside
    assert booted_systemd.run("cat", str(canary), check=False).returncode != 0  # not seen inside
    assert canary.read_text() == "still here"
    assert booted_systemd.run("systemctl", "is-system-running").stdout.strip() == "running"


# ── bad input: a clear error, nothing installed ─────────────────────────────────────────────


@pytest.mark.parametrize("argv, token, says", [
    (("sh", "-c", 'install -m 0755 "$0" /tmp/install && exec setpriv --reuid=nobody --regid=nogroup --clear-groups '
      '/tmp/install --system --base-url http://127.0.0.1:1/api', INSTALL), "t", "must run as root"),
    ((INSTALL, "--system"), "a-token\n", "no --base-url given and standard input is not a terminal"),
    ((INSTALL, "--system", "--base-url", "ftp://partner.example/api"), "a-token\n",
     "must be an http:// or https:// URL"),
    ((INSTALL, "--system", "--base-url", "http://127.0.0.1:1/api"), "", "no partner token on standard input"),
    ((INSTALL, "--system", "--base-url", "http://127.0.0.1:1/api"), "two words\n", "must not contain white space"),
    (("unshare", "--mount", "sh", "-c", 'mount -t tmpfs none /run && exec "$0" "$@"', INSTALL, "--system",
      "--base-url", "http://127.0.0.1:1/api"), "a-token\n", "systemd is not running on this machine"),
], ids=["not-root", "no-base-url-without-a-terminal", "not-an-http-url", "no-token", "token-with-a-space",
        "no-systemd-running"])
def test_install_system_refuses_bad_input_with_a_clear_error_and_installs_nothing(
        fresh_systemd: sysboot.BootedSystemd, argv: tuple[str, ...], token: str, says: str) -> None:
    result = fresh_systemd.run(*argv, input=token, check=False, cwd=sysboot.CHECKOUT)
    assert result.returncode != 0
    assert says in result.stderr, result.stderr
    assert installed_paths(fresh_systemd) == []
    assert not list(fresh_systemd.path("/opt").glob("tracker*"))  # no staging directory left either


def test_install_system_asks_on_a_terminal_and_never_echoes_the_token(fresh_systemd: sysboot.BootedSystemd) -> None:
    # Answered with a token it refuses, so that the test ends before the venv is built.
    controller, terminal = pty.openpty()
    command = ["nsenter", "-t", str(fresh_systemd.pid), "-a", "--", "/usr/bin/env", "-i", f"--chdir={sysboot.CHECKOUT}",
               f"PATH={sysboot.PATH}", "HOME=/root", INSTALL, "--system"]
    process = subprocess.Popen(command, stdin=terminal, stdout=terminal, stderr=terminal)
    os.close(terminal)
    screen = b""

    def read_until(text: bytes) -> None:
        nonlocal screen
        deadline = time.monotonic() + 30
        while text not in screen:
            assert time.monotonic() < deadline, f"no {text!r} on the terminal: {screen!r}"
            if select.select([controller], [], [], 0.5)[0]:
                try:
                    screen += os.read(controller, 4096)
                except OSError:  # the other end closed: the script ended
                    break

    try:
        read_until(b"Partner API base URL")
        os.write(controller, b"http://127.0.0.1:1/api/external/data\n")
        read_until(b"Partner API token (not echoed): ")
        os.write(controller, b"secret with-a-space\n")
        read_until(b"must not contain white space")
        assert process.wait(30) != 0
    finally:
        process.kill()
        os.close(controller)
    assert b"http://127.0.0.1:1/api/external/data" in screen  # the URL is echoed as typed
    assert b"secret" not in screen
    assert installed_paths(fresh_systemd) == []


# ── credentials: this environment, or a real limit? ─────────────────────────────────────────

PROBE_UNIT = """[Service]
{user}
LoadCredential=secret:/etc/probe-secret
ExecStart=/bin/sh -c 'stat -c "%%a %%U" "$CREDENTIALS_DIRECTORY"; cat "$CREDENTIALS_DIRECTORY/secret" && echo; \
    findmnt -n -o FSTYPE "$CREDENTIALS_DIRECTORY"'
"""


def credential_probe(host: sysboot.BootedSystemd, user: str) -> list[str]:
    """A unit that prints its credential's directory (mode, owner), the credential and the
    directory's file system, as the user the line `user` makes it run as: the lines it printed."""
    name = f"probe-{len(user)}.service"
    host.run("sh", "-c", "printf probe-secret > /etc/probe-secret && chmod 600 /etc/probe-secret")
    host.run("sh", "-c", f"cat > /etc/systemd/system/{name}", input=PROBE_UNIT.format(user=user))
    host.run("systemctl", "daemon-reload")
    host.run("systemctl", "start", "--wait", name, check=False)
    return host.run("journalctl", "-u", name, "_TRANSPORT=stdout", "-o", "cat").stdout.splitlines()


def test_a_credential_reaches_a_dynamic_user_where_mounts_propagate_as_on_a_host() -> None:
    # systemd builds a unit's credentials on a ramfs in a helper process's own mount namespace and
    # moves it onto /run/credentials/<unit>; the manager's namespace sees it only through mount
    # propagation. systemd makes / shared when the kernel starts it, and leaves it to the container
    # manager otherwise: `unshare --mount` makes every mount private. Booted that way, the
    # credential never arrives and /run/credentials/<unit> stays an empty directory of mode 0700
    # root — EACCES for a dynamic user, for every unit. The same machine, booted with shared
    # propagation as a host's systemd makes it, gives the same unit its credential.
    with sysboot.booted_systemd(ROOT, propagation="private") as private:
        # The directory the unit gets is /run's own (tmpfs), not the credential's ramfs...
        assert credential_probe(private, "DynamicUser=yes") == [
            "700 root", "cat: /run/credentials/probe-15.service/secret: Permission denied", "tmpfs"]
        # ...and it is empty: root, who may look, finds no credential and no mount on it.
        assert credential_probe(private, "") == [
            "700 root", "cat: /run/credentials/probe-0.service/secret: No such file or directory"]
    with sysboot.booted_systemd(ROOT, propagation="shared") as shared:
        assert credential_probe(shared, "DynamicUser=yes")[1:] == ["probe-secret", "ramfs"]
    assert private.leftovers() == shared.leftovers() == []


# ── installing ──────────────────────────────────────────────────────────────────────────────


def test_install_system_installs_and_starts_the_service_in_one_command(installation: dict[str, Any],
                                                                       service: Service,
                                                                       module_partner: standin.ThreadedStandIn) -> None:
    out = installation["result"].stdout
    assert "Active: active (running)" in out and "installed: /opt/tracker" in out  # systemctl status, at the end
    # python3-venv was missing (the venv could not be made) and is there now:
    assert installation["venv_before"].returncode != 0 and "ensurepip is not" in installation["venv_before"].stdout
    assert "installing Debian's python3-venv" in installation["result"].stderr
    assert service.host.run("dpkg-query", "-W", "-f=${Status}", "python3-venv").stdout == "install ok installed"
    assert service.systemctl("is-enabled", UNIT).stdout.strip() == "enabled"
    config = service.host.path("/etc/tracker/config.toml").read_text()
    assert f'base_url = "{module_partner.url}"' in config and f'path = "{DB}"' in config
    token = service.host.path("/etc/tracker/partner_token")
    assert token.read_text().strip() == TOKEN and (token.stat().st_mode & 0o777, token.stat().st_uid) == (0o600, 0)
    assert TOKEN not in installation["result"].stdout + installation["result"].stderr
    assert (service.host.path("/etc/systemd/system/tracker.service").read_text()
            == (ROOT / "tracker.service").read_text())


def test_the_installed_venv_comes_from_the_systems_python_and_holds_the_daemons_packages_only(service: Service) -> None:
    venv = "/opt/tracker/.venv"
    assert "home = /usr/bin" in service.host.path(f"{venv}/pyvenv.cfg").read_text()  # not pyenv's, under /root
    # Every module tracker.py imports is there (the check imports nothing: find_spec only)...
    check = ("import ast, importlib.util, sys; tree = ast.parse(open('/opt/tracker/tracker.py').read()); "
             "names = {a.name.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}"
             " | {n.module.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}; "
             "print(sorted(n for n in names if importlib.util.find_spec(n) is None))")
    missing = service.host.run(f"{venv}/bin/python", "-c", check, cwd="/opt/tracker").stdout.strip()
    assert missing == "['demo']"  # imported only by `tracker.py demo`, which lives in the checkout
    # ...and none of the development tools are.
    listed = {line.split("==")[0].lower().replace("_", "-") for line in
              service.host.run(f"{venv}/bin/python", "-m", "pip", "freeze", "--all").stdout.split()}
    assert {"aiohttp", "aiosqlite", "prometheus-client", "structlog", "psycopg", "psycopg-binary",
            "aiohttp-remotes", "standardwebhooks"} <= listed
    assert not listed & {"pytest", "hypothesis", "schemathesis", "pytest-xdist", "aioresponses", "requests",
                         "pyinstrument"}
    shipped = {p.name for p in service.host.path("/opt/tracker").iterdir()}
    assert not shipped & {"tests", "bench", ".tools", "standin.py", "pgcluster.py", "sysboot.py", ".git"}
    # A pinned version, from requirements.txt:
    pinned = next(line for line in (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("aiohttp=="))
    assert pinned.lower() in service.host.run(f"{venv}/bin/python", "-m", "pip", "freeze").stdout.lower().split()


# ── running ─────────────────────────────────────────────────────────────────────────────────


def test_the_service_is_active_only_after_the_daemon_says_ready(service: Service, start_partner) -> None:
    partner = start_partner(scenario(returns=30))
    since = time.time()
    service.start_fresh(partner)  # `systemctl start` of a Type=notify unit returns once READY=1 came
    with urllib.request.urlopen(f"http://127.0.0.1:{service.port}/healthz", timeout=5) as answer:
        assert answer.status == 200  # at once: no polling
    with urllib.request.urlopen(f"http://127.0.0.1:{service.api_port}/v1/openapi.json", timeout=5) as answer:
        assert answer.status == 200  # the API's own process runs in the sandbox too
    listening = service.wait_for_event(since, "http.listening")
    started = [e for e in service.journal(since) if e.get("MESSAGE_ID") == UNIT_STARTED]
    assert len(started) == 1
    listened_at = datetime.datetime.fromisoformat(listening["timestamp"]).timestamp()
    assert listened_at <= int(started[0]["_SOURCE_REALTIME_TIMESTAMP"]) / 1e6

    # A daemon that cannot listen never says READY=1: the start job fails, the unit is never active.
    service.systemctl("stop", UNIT)
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the last connection's TIME_WAIT
        taken.bind(("127.0.0.1", service.port))
        taken.listen()
        entered = service.show("ActiveEnterTimestampMonotonic")
        failed = service.systemctl("start", UNIT, check=False)
        assert failed.returncode != 0
        assert service.show("ActiveEnterTimestampMonotonic") == entered
        service.systemctl("stop", UNIT)
        service.systemctl("reset-failed", UNIT, check=False)


def test_a_hung_daemon_is_killed_by_the_watchdog_and_restarted_losing_nothing(service: Service, start_partner) -> None:
    partner = start_partner(scenario(**BURST))
    # RestartSec= shortened too: the kill -9 test waits out the unit's own.
    with service.dropin("watchdog", "[Service]\nWatchdogSec=3\nRestartSec=1\n"):
        since = time.time()
        service.start_fresh(partner)
        wait_mid_burst(partner)
        pid, restarts = service.main_pid(), service.restarts()
        service.systemctl("kill", "--kill-whom=main", "--signal=SIGSTOP", UNIT)  # the event loop hangs
        service.wait_restarted(restarts, pid)
        assert any("Watchdog timeout" in m for m in service.said_by_systemd(since))
        wait_until_sync(lambda: reported(partner), 60, 0.2, what="the burst to finish")
    assert_nothing_lost_nothing_early(partner.ledger())


def test_a_kill_9_mid_burst_is_restarted_by_restart_on_failure_and_the_burst_finishes(service: Service,
                                                                                      start_partner) -> None:
    partner = start_partner(scenario(**BURST))
    service.start_fresh(partner)
    wait_mid_burst(partner)
    pid, restarts = service.main_pid(), service.restarts()
    service.systemctl("kill", "--kill-whom=main", "--signal=SIGKILL", UNIT)
    service.wait_restarted(restarts, pid)
    wait_until_sync(lambda: reported(partner), 60, 0.2, what="the burst to finish")
    assert_nothing_lost_nothing_early(partner.ledger())


def test_systemctl_stop_mid_burst_exits_0_within_timeout_stop_sec_and_a_start_finishes_the_burst(
        service: Service, start_partner) -> None:
    partner = start_partner(scenario(**BURST))
    since = time.time()
    service.start_fresh(partner)
    wait_mid_burst(partner)
    timeout_stop_s = int(re.search(r"^TimeoutStopSec=(\d+)", (ROOT / "tracker.service").read_text(), re.M).group(1))
    began = time.monotonic()
    service.systemctl("stop", UNIT)
    took = time.monotonic() - began
    state = service.show("Result", "ExecMainCode", "ExecMainStatus")
    assert took < timeout_stop_s and state == {"Result": "success", "ExecMainCode": "1", "ExecMainStatus": "0"}
    assert service.wait_for_event(since, "shutdown.complete")
    service.systemctl("start", UNIT)
    wait_until_sync(lambda: reported(partner), 60, 0.2, what="the burst to finish")
    assert_nothing_lost_nothing_early(partner.ledger())


# ── a new token ─────────────────────────────────────────────────────────────────────────────

NEW_TOKEN = "rotated-token-7c1e"
NO_CREDENTIAL = "[Service]\nLoadCredential=\n"  # the token from elsewhere: a credential would win


def test_a_new_token_in_the_config_file_is_taken_by_systemctl_reload(service: Service, start_partner) -> None:
    partner = start_partner(scenario(returns=30, token=NEW_TOKEN))
    with service.dropin("token-in-file", NO_CREDENTIAL):
        since = time.time()
        service.start_fresh(partner, token="the-old-token")
        wait_until_sync(service.refuses_token, 30, 0.2, what="the partner to refuse the old token")
        pid = service.main_pid()
        service.configure(partner, token=NEW_TOKEN)
        service.systemctl("reload", UNIT)
        reloaded = service.wait_for_event(since, "config.reloaded")
        assert reloaded["token_changed"] is True and service.main_pid() == pid
        wait_until_sync(lambda: reported(partner), 60, 0.2, what="the reports, with the new token")
        journal = json.dumps(service.journal(since))
    assert "the-old-token" not in journal and NEW_TOKEN not in journal


def test_a_new_token_as_a_credential_or_in_the_environment_takes_a_restart(service: Service, start_partner) -> None:
    for source in ("credential", "environment"):
        partner = start_partner(scenario(returns=30, token=NEW_TOKEN))
        old = "[Service]\nLoadCredential=\nEnvironment=TRACKER_PARTNER_TOKEN=the-old-token\n"
        with service.dropin("token-in-env", old) if source == "environment" else contextlib.nullcontext():
            since = time.time()
            service.start_fresh(partner)  # the credential holds the installed token, which this partner refuses
            wait_until_sync(service.refuses_token, 30, 0.2, what=f"the partner to refuse the old {source} token")
            if source == "credential":
                service.write("/etc/tracker/partner_token", NEW_TOKEN + "\n", 0o600)
            else:
                service.write(f"/etc/systemd/system/{UNIT}.d/token-in-env.conf",
                              old.replace("the-old-token", NEW_TOKEN))
                service.systemctl("daemon-reload")
            try:
                service.systemctl("reload", UNIT)  # systemd 252 copies credentials at start; the environment is fixed
                assert service.wait_for_event(since, "config.reloaded")["token_changed"] is False, source
                assert service.refuses_token()
                service.systemctl("restart", UNIT)
                wait_until_sync(lambda: reported(partner), 60, 0.2, what=f"the reports, with the new {source} token")
            finally:
                service.write("/etc/tracker/partner_token", TOKEN + "\n", 0o600)
            stdout = json.dumps(service.events(since))
        assert "the-old-token" not in stdout and NEW_TOKEN not in stdout and TOKEN not in stdout


# ── the sandbox and the journal ─────────────────────────────────────────────────────────────


def test_the_database_belongs_to_the_dynamic_user_and_only_the_state_and_private_tmp_are_writable(
        service: Service, start_partner) -> None:
    partner = start_partner(scenario(returns=30))
    service.start_fresh(partner)
    wait_until_sync(lambda: reported(partner), 60, 0.2, what="the burst to finish")
    pid = service.main_pid()
    uid, gid = map(int, service.host.run("stat", "-c", "%u %g", f"/proc/{pid}").stdout.split())
    assert 61184 <= uid <= 65519  # systemd's range for dynamic users
    db = service.host.path("/var/lib/private/tracker/tracker.db").stat()
    assert (db.st_uid, db.st_mode & 0o777) == (uid, 0o600)
    assert os.readlink(service.host.path("/var/lib/tracker")) == "private/tracker"
    # Every file and directory the service's user may write, in the service's own mount namespace
    # (sockets are connected to, not written: journald's, the notify socket).
    found = service.host.run(
        "nsenter", "-t", str(pid), "-m", "-S", str(uid), "-G", str(gid), "--", "find", "/",
        "(", "-path", "/proc", "-o", "-path", "/sys", ")", "-prune", "-o",
        "(", "-type", "d", "-o", "-type", "f", "-o", "-type", "p", ")", "-writable", "-print",
        check=False).stdout.split()
    writable = {p for p in found if not p.startswith(("/var/lib/private/tracker/", "/tmp/", "/var/tmp/"))}
    assert writable == {"/var/lib/private/tracker", "/tmp", "/var/tmp", "/dev/mqueue"}, found
    # /tmp and /var/tmp are the service's own (PrivateTmp=), /dev/mqueue its own IPC namespace's.
    service.host.run("nsenter", "-t", str(pid), "-m", "--", "touch", "/tmp/the-services-own")
    assert not service.host.path("/tmp/the-services-own").exists()
    assert os.readlink(service.host.path(f"/proc/{pid}/ns/ipc")) != os.readlink(service.host.path("/proc/1/ns/ipc"))


def test_journald_gets_the_json_lines_and_readmes_jq_recipes_work_on_them(service: Service, start_partner) -> None:
    faults = standin.Faults(error_share=0.05)
    partner = start_partner(scenario(returns=100, broken_share=0.05, faults=faults))
    since = time.time()
    service.start_fresh(partner)
    wait_until_sync(lambda: reported(partner), 60, 0.2, what="the burst to finish")
    lines = service.output(since)
    assert len(lines) > 100 and all(json.loads(line)["event"] for line in lines)
    readme = (ROOT / "README.md").read_text()
    block = readme.split("Recipes (`-o cat` prints the JSON lines as they are", 1)[1].split("```sh\n", 1)[1]
    recipes = [line for line in block.split("```", 1)[0].splitlines() if line and not line.startswith("#")]
    assert len(recipes) == 5
    for recipe in recipes:
        out = service.host.run("bash", "-c", f"set -o pipefail; {recipe}", check=False)
        assert out.returncode == 0 and out.stdout.strip(), f"{recipe}\n{out.stderr}"
        if "jq -Rr" in recipe:
            assert all(re.fullmatch(r"\s*\d+ [a-z]+ [a-z_]+", line) for line in out.stdout.splitlines()), out.stdout
        else:
            assert all(json.loads(line) for line in out.stdout.splitlines())


# ── upgrading and removing ──────────────────────────────────────────────────────────────────


def test_install_system_again_upgrades_the_code_and_keeps_config_token_and_database(service: Service,
                                                                                      start_partner) -> None:
    partner = start_partner(scenario(returns=30))
    service.start_fresh(partner)
    wait_until_sync(lambda: reported(partner), 60, 0.2, what="the burst to finish")
    kept = {path: service.host.path(path).read_bytes() for path in ("/etc/tracker/config.toml",
                                                                       "/etc/tracker/partner_token")}
    database = service.host.path("/var/lib/private/tracker/tracker.db").stat().st_ino
    service.write("/opt/tracker/left-from-the-old-version", "")
    pid = service.main_pid()
    result = install(service.host, "--system", token="never-read\n")  # no prompt, no --base-url: it is an upgrade
    assert result.returncode == 0, result.stdout + result.stderr
    assert "upgraded" in result.stdout and "Active: active (running)" in result.stdout
    assert not service.host.path("/opt/tracker/left-from-the-old-version").exists()
    assert {path: service.host.path(path).read_bytes() for path in kept} == kept
    assert service.host.path("/var/lib/private/tracker/tracker.db").stat().st_ino == database
    assert service.main_pid() != pid
    assert not list(service.host.path("/opt").glob("tracker.*"))  # neither the staging nor the old tree left


def test_uninstall_removes_what_install_added_and_keeps_the_database_unless_purged(service: Service,
                                                                                    canary: Path) -> None:
    # Meanwhile this machine has none of it: the install lived in the namespace's overlay.
    assert [path for path in (*INSTALLED, "/var/lib/tracker", "/var/lib/private/tracker") if Path(path).exists()] == []
    assert canary.read_text() == "still here"
    result = service.host.run("/opt/tracker/install", "--uninstall", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert installed_paths(service.host) == []
    assert service.show("LoadState")["LoadState"] == "not-found"
    assert service.host.path("/var/lib/private/tracker/tracker.db").exists()
    purged = install(service.host, "--uninstall", "--purge")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert not service.host.path("/var/lib/private/tracker").exists()
    assert not service.host.path("/var/lib/tracker").is_symlink()
