"""What on-call uses, checked against the real tools: a real Prometheus scraping the daemon and
evaluating every dashboard query and alert rule, promtool, /readyz, the systemd notify protocol
over a real datagram socket, and systemd-analyze on the unit."""

import asyncio
import contextlib
import http.server
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import standin
import tracker
from conftest import (ROOT, api_key_in, config_toml, everything_reported, free_port, make_config, running_daemon,
                      scenario, wait_until, wait_until_sync)


def tool(name: str) -> str:
    """prometheus/promtool from ./install (.tools/), else from PATH; a clear failure, never a skip."""
    local = ROOT / ".tools" / "usr" / "bin" / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: run ./install (it unpacks Debian's prometheus package into .tools/)")
    return found


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=60)


# ── promtool ────────────────────────────────────────────────────────────────────────────────

def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    result = run(tool("promtool"), "test", "rules", str(ROOT / "prometheus" / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_scrape_config_and_rules_are_valid() -> None:
    result = run(tool("promtool"), "check", "config", str(ROOT / "prometheus" / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 16 rules found" in result.stdout


async def test_metrics_pass_promtool_check_metrics(start_partner, db_path: Path) -> None:
    partner = start_partner(scenario(returns=100))
    async with running_daemon(make_config(db_path, partner.url)) as daemon:
        await wait_until(everything_reported(partner), 30, what="all reported")
        async with aiohttp.ClientSession() as http, http.get(f"http://{daemon.http_address}/metrics") as resp:
            exposition = await resp.text()
    result = await asyncio.to_thread(run, tool("promtool"), "check", "metrics", stdin=exposition)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not re.search(r'(shipment_number|return_id|order_number)="', exposition)  # bounded labels only


# ── a real Prometheus ───────────────────────────────────────────────────────────────────────

class Prometheus:
    def __init__(self, workdir: Path, target: str) -> None:
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ROOT / "prometheus" / "alerts.yml")],
            "scrape_configs": [{"job_name": "tracker", "static_configs": [{"targets": [target]}]}],
        }))
        self.log = open(workdir / "prometheus.log",
                        "wb")  # noqa: SIM115 -- open for the process's life; stop() closes it
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT)

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.load(resp)

    def query(self, expr: str) -> list[Any]:
        answer = self.api("/api/v1/query", query=expr)
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)
        self.log.close()


@pytest.fixture
def accepting_receiver() -> Iterator[str]:
    """A webhook receiver on loopback that accepts everything (this test counts, it does not verify):
    its URL."""
    class Accept(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 -- http.server's name
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Accept)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hooks"
    finally:
        server.shutdown()
        server.server_close()


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((ROOT / "grafana" / "dashboards" / "tracker.json").read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def test_real_prometheus_scrapes_the_daemon_and_every_dashboard_query_and_alert_rule_evaluates(
        start_partner, daemon_process, accepting_receiver: str, tmp_path: Path) -> None:
    faults = standin.Faults(latency_ms=(1, 5), error_share=0.03, rate_limit_per_s=400)
    partner = start_partner(scenario(returns=600, arrive_over_s=2.0, broken_share=0.01, never_registered_share=0.02,
                                     unknown_status_share=0.05, faults=faults))
    # As in production, Prometheus is scraping before the daemon starts, so it sees every counter from 0.
    address, api = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    prometheus = Prometheus(tmp_path, address)
    daemon = daemon_process(config_toml(partner.url, tmp_path / "tracker.db").replace(
        'listen = "127.0.0.1:0"', f'listen = "{address}"').replace('[api]\nlisten = ""', f'[api]\nlisten = "{api}"')
        + f'\n[[webhook]]\nname = "refunds"\nurl = "{accepting_receiver}"\n',
        env={tracker.ENV_WEBHOOK_SECRET + "REFUNDS": tracker.new_webhook_secret()})
    key = asyncio.run(api_key_in(tmp_path / "tracker.db", "customer-service", ("returns:read",)))
    partner.call(partner.standin.hold_clock)
    try:
        wait_until_sync(prometheus.ready, 30, what="Prometheus to be ready")
        daemon.start()
        wait_until_sync(lambda: prometheus.query('up{job="tracker"} == 1'), 30, what="the first scrape")
        partner.call(partner.standin.restart_clock)  # the burst starts now
        wait_until_sync(lambda: (ledger := partner.ledger())["finished"] and ledger["missing"] == 0, 40,
                        what="the burst to be reported")
        for sent in ({"Authorization": f"Bearer {key}"}, {}):  # the shop's API: one answered, one refused
            with contextlib.suppress(urllib.error.HTTPError):
                urllib.request.urlopen(urllib.request.Request(f"http://{api}/v1/returns?limit=1", headers=sent),
                                       timeout=10).close()
        # Enough scrapes since the work for every rate() window, and the row-count gauges refreshed.
        wait_until_sync(lambda: prometheus.query('count_over_time(up{job="tracker"}[20s]) >= 8'), 30,
                        what="eight scrapes")
        assert prometheus.query('up{job="tracker"}')[0]["value"][1] == "1"
        empty = [(title, expr) for title, expr in dashboard_queries()
                 if not prometheus.query(expr.replace("$__rate_interval", "5s"))]
        assert not empty, f"dashboard queries without data: {empty}"
        groups = prometheus.api("/api/v1/rules")["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert len(rules) == 16
        for rule in rules:
            prometheus.query(rule["query"])  # evaluates without error
        wait_until_sync(lambda: all(r["health"] == "ok" for g in prometheus.api("/api/v1/rules")["data"]["groups"]
                                    for r in g["rules"]), 10, what="every rule evaluated by Prometheus itself")
        def firing() -> set[str]:
            return {a["labels"]["alertname"] for a in prometheus.api("/api/v1/alerts")["data"]["alerts"]}
        # the burst had both; its never-registered waybills turn stale at their next check, which may
        # come after the last report
        wait_until_sync(lambda: {"TrackerStaleBoxes", "TrackerQuarantineGrowing"} <= firing(), 30,
                        what="the stale-boxes and quarantine alerts to fire")
    finally:
        prometheus.stop()
        daemon.signal(signal.SIGTERM)
        daemon.wait(15)


# ── /readyz ─────────────────────────────────────────────────────────────────────────────────

async def readyz(daemon: tracker.Daemon) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(f"http://{daemon.http_address}/readyz") as resp:
        return resp.status, await resp.json()


async def test_readyz_is_200_when_the_database_and_the_partner_are_usable(start_partner, db_path: Path) -> None:
    partner = start_partner(scenario(returns=50))
    async with running_daemon(make_config(db_path, partner.url)) as daemon:
        await wait_until(everything_reported(partner), 30, what="all reported")
        assert await readyz(daemon) == (200, {"ready": True, "problems": []})


async def test_readyz_is_503_while_a_circuit_is_open(start_partner, db_path: Path) -> None:
    partner = start_partner(scenario(returns=300, arrive_over_s=0.5,
                                     faults=standin.Faults(outage_at_s=0.8, outage_s=30.0, outage_says_when=False)))
    async with running_daemon(make_config(db_path, partner.url)) as daemon:  # (a crash: no Retry-After to wait out)
        async def not_ready() -> Any:
            status, body = await readyz(daemon) if daemon.http_address else (0, {})
            return status == 503 and any("circuit" in p for p in body["problems"]) and body
        body = await wait_until(not_ready, 20, what="/readyz to report the open circuit")
        assert body["ready"] is False


async def test_readyz_is_503_while_the_token_is_refused(start_partner, db_path: Path) -> None:
    partner = start_partner(scenario(returns=10, token="another-token"))
    async with running_daemon(make_config(db_path, partner.url)) as daemon:
        async def refused() -> Any:
            status, body = await readyz(daemon) if daemon.http_address else (0, {})
            return status == 503 and "the partner refuses the token on /returns" in body["problems"]
        assert await wait_until(refused, 20, what="/readyz to report the refused token")


async def test_the_http_server_serves_only_get_on_its_own_paths(start_partner, db_path: Path) -> None:
    partner = start_partner(scenario(returns=10))
    async with running_daemon(make_config(db_path, partner.url)) as daemon:
        await wait_until(lambda: _true(daemon.http_address), 10, what="the server")
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://{daemon.http_address}/metrics") as resp:
                assert resp.status == 405
            async with http.get(f"http://{daemon.http_address}/admin") as resp:
                assert resp.status == 404


async def _true(value: Any) -> bool:
    return bool(value)


# ── systemd ─────────────────────────────────────────────────────────────────────────────────

def test_the_notify_protocol_over_a_real_datagram_socket(start_partner, daemon_process, tmp_path: Path) -> None:
    partner = start_partner(scenario(returns=50))
    notify_path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(notify_path)
        sock.settimeout(15)
        daemon = daemon_process(config_toml(partner.url, tmp_path / "tracker.db"),
                                env={"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "200000"}).start()
        messages = [sock.recv(256).decode() for _ in range(4)]
        assert messages[0] == "READY=1"
        assert messages[1:] == ["WATCHDOG=1"] * 3  # every 0.1 s: half of WatchdogSec
        daemon.signal(signal.SIGTERM)
        rest = []
        while "STOPPING=1" not in rest:
            rest.append(sock.recv(256).decode())
        assert daemon.wait(10) == 0


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    found = shutil.which("systemd-analyze")
    if not found:
        pytest.fail("systemd-analyze not found: run ./install")
    return run(found, *args)


def test_the_unit_is_rated_exposure_2_or_lower_by_systemd_analyze_security() -> None:
    result = systemd_analyze("security", "--offline=true", str(ROOT / "tracker.service"))
    match = re.search(r"Overall exposure level for tracker.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point the unit at this checkout instead of /opt/tracker.
    unit = (ROOT / "tracker.service").read_text()
    unit = unit.replace("/opt/tracker/.venv/bin/python", sys.executable).replace("/opt/tracker", str(ROOT))
    (tmp_path / "tracker.service").write_text(unit)
    result = systemd_analyze("verify", str(tmp_path / "tracker.service"))
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_the_units_stop_timeout_covers_the_shutdown_deadline() -> None:
    unit = (ROOT / "tracker.service").read_text()
    stop_timeout = int(re.search(r"^TimeoutStopSec=(\d+)", unit, re.M).group(1))
    grace = tracker.ScheduleConfig().shutdown_grace_s
    assert stop_timeout >= grace + tracker.ALERT_FLUSH_S + 2
    assert re.search(r"^Type=notify$", unit, re.M) and re.search(r"^WatchdogSec=\d+", unit, re.M)
