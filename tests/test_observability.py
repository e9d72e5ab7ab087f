"""What operators see: JSON logs without secrets, /healthz and /metrics, and `status`."""

import asyncio
import io
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

import tracker
from conftest import (ROOT, TOKEN, config_toml, db_count_reaches, everything_reported, make_config, run_daemon_until,
                      running_daemon, scenario, wait_until, wait_until_sync)

WEBHOOK = "https://hooks.slack.example/services/T000/B000/s3cr3tw3bh00k"


def test_logs_are_json_lines_with_event_names_and_never_the_secrets(start_partner, daemon_process,
                                                                    tmp_path: Path) -> None:
    partner = start_partner(scenario(returns=100, broken_share=0.05))
    daemon = daemon_process(config_toml(partner.url, tmp_path / "tracker.db"),
                            env={tracker.ENV_WEBHOOK: WEBHOOK}).start()
    wait_until_sync(lambda: (ledger := partner.ledger())["finished"] and ledger["missing"] == 0, 30,
                    what="all reported")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(10) == 0
    lines = daemon.log().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    events = {r["event"] for r in records}
    assert {"daemon.started", "collect.page", "track.checked", "report.sent", "collect.quarantined",
            "alert.raised", "shutdown.complete"} <= events
    assert all({"level", "timestamp"} <= r.keys() for r in records)
    sent = next(r for r in records if r["event"] == "report.sent")
    assert {"return_id", "shipment_number", "outcome", "latency_s"} <= sent.keys()
    log = daemon.log()
    assert TOKEN not in log and WEBHOOK not in log and "s3cr3t" not in log


def test_a_refused_token_is_alerted_and_not_logged(start_partner, daemon_process, tmp_path: Path) -> None:
    partner = start_partner(scenario(returns=10, token="the-partner-expects-another-token"))
    daemon = daemon_process(config_toml(partner.url, tmp_path / "tracker.db")).start()
    wait_until_sync(lambda: '"unauthorized:returns"' in daemon.log(), 15, what="the 401 alert")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(10) == 0
    assert TOKEN not in daemon.log()
    assert partner.ledger()["calls"]["returns"]["401"] <= 3  # backs off instead of hammering


def test_the_redactor_hides_secrets_in_any_field_and_the_authorization_header() -> None:
    out = io.StringIO()
    tracker.REDACT.set_secrets([TOKEN])
    tracker.configure_logging("info", out)
    tracker.structlog.get_logger().info("probe", error=f"Bearer {TOKEN} refused", Authorization="Bearer x")
    record = json.loads(out.getvalue())
    assert record["error"] == "Bearer [redacted] refused" and record["Authorization"] == "[redacted]"
    tracker.structlog.reset_defaults()


async def test_healthz_and_metrics_are_served_while_running(start_partner, db_path: Path) -> None:
    partner = start_partner(scenario(returns=200))
    async with running_daemon(make_config(db_path, partner.url)) as daemon:
        await wait_until(everything_reported(partner), 30, what="all reported")
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://{daemon.http_address}/healthz") as resp:
                assert resp.status == 200 and (await resp.json())["status"] == "ok"
            async with http.get(f"http://{daemon.http_address}/metrics") as resp:
                assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
                text = await resp.text()
    assert 'tracker_partner_calls_total{endpoint="results",outcome="ok"}' in text
    assert "tracker_returns_collected_total 200.0" in text
    assert 'tracker_partner_calls_in_flight{endpoint="results"} 0.0' in text  # every call answered
    assert TOKEN not in text


async def test_the_in_flight_and_rate_gauges_read_the_client_when_scraped(db_path: Path) -> None:
    metrics = tracker.Metrics()
    async with aiohttp.ClientSession() as session:
        client = tracker.PartnerClient(make_config(db_path, "http://127.0.0.1:9"), session, metrics,
                                       lambda breaker, previous, why: None)
        client.in_flight[tracker.Endpoint.TRACKING] = 3
        client.rates[tracker.Endpoint.RESULTS].rate = 42.0
        client.rates[tracker.Endpoint.RESULTS].measured = 45.0
    sample = metrics.registry.get_sample_value
    assert sample("tracker_partner_calls_in_flight", {"endpoint": "tracking"}) == 3
    assert sample("tracker_partner_calls_in_flight", {"endpoint": "results"}) == 0
    assert sample("tracker_partner_rate_limit_per_second", {"endpoint": "results"}) == 42.0
    assert sample("tracker_partner_limit_measured_per_second", {"endpoint": "results"}) == 45.0
    assert math.isnan(sample("tracker_partner_limit_measured_per_second", {"endpoint": "tracking"}))


async def test_status_shows_counts_and_the_problem_lists(start_partner, db_path: Path) -> None:
    partner = start_partner(scenario(returns=200, broken_share=0.02, never_registered_share=0.05))
    await run_daemon_until(make_config(db_path, partner.url), db_count_reaches(db_path, "boxes.stale", 1))
    config_path = db_path.with_name("config.toml")
    config_path.write_text(config_toml(partner.url, db_path))
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, str(ROOT / "tracker.py"), "status", "--config", str(config_path)],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "returns   200 collected · 0 corrections applied · 4 quarantined" in out
    for title in ("Oldest pending reports:", "Quarantined returns (open):", "Dead reports", "Stale boxes",
                  "Unknown statuses seen:"):
        assert title in out
    assert "BAD_" in out and "SHP_" in out
