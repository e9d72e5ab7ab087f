"""Slack alerts: folded, paced, bounded, redacted — and never in the way of tracking."""

import asyncio
from pathlib import Path

import aiohttp
import structlog

import tracker
from conftest import TOKEN, everything_reported, ledger_of, make_config, run_daemon_until, scenario, wait_until


def slack_messages(partner) -> list[str]:
    return partner.call(lambda: [m["text"] for m in partner.standin.slack_messages])


def make_alerter(url: str, session: aiohttp.ClientSession, redact=str) -> tracker.Alerter:
    return tracker.Alerter(url, session, tracker.Metrics(), structlog.get_logger(), redact)


async def test_repeats_of_an_alert_are_folded_into_one_message_with_a_count(start_partner) -> None:
    partner = start_partner()
    async with aiohttp.ClientSession() as session:
        alerter = make_alerter(partner.root + "/_slack", session)
        for _ in range(5):
            alerter.alert("stale", "Shipment SHP_1 is stale")
        alerter.alert("dead", "Report refused")
        sender = asyncio.create_task(alerter.run())
        await wait_until(lambda: _at_least(partner, 2), 10, what="two Slack messages")
        alerter.close()
        await sender
    first, second = slack_messages(partner)
    assert "Shipment SHP_1 is stale" in first and "×5" in first
    assert "Report refused" in second and "×" not in second


async def test_slack_rate_limit_is_waited_out_not_dropped(start_partner) -> None:
    partner = start_partner()  # its webhook answers 429 + Retry-After when posted to faster than 1/s
    async with aiohttp.ClientSession() as session:
        alerter = make_alerter(partner.root + "/_slack", session)
        alerter.MIN_INTERVAL_S = 0.05  # post too fast on purpose
        for key in ("a", "b", "c"):
            alerter.alert(key, f"alert {key}")
        sender = asyncio.create_task(alerter.run())
        await wait_until(lambda: _at_least(partner, 3), 10, what="all three messages")
        alerter.close()
        await sender
    assert sorted(slack_messages(partner)) == ["[tracker] alert a", "[tracker] alert b", "[tracker] alert c"]


async def test_raising_alerts_never_waits_and_the_backlog_is_bounded(start_partner) -> None:
    partner = start_partner()
    partner.call(lambda: setattr(partner.standin, "slack_hang_s", 30.0))
    async with aiohttp.ClientSession() as session:
        alerter = make_alerter(partner.root + "/_slack", session)
        sender = asyncio.create_task(alerter.run())
        for i in range(10 * tracker.Alerter.MAX_PENDING):
            alerter.alert(f"key-{i}", "something")  # a plain call: nothing here can block
        assert alerter.pending <= tracker.Alerter.MAX_PENDING
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)


async def test_a_hanging_webhook_does_not_slow_the_pipeline(start_partner, db_path: Path) -> None:
    partner = start_partner(scenario(returns=300, broken_share=0.05, unknown_status_share=0.2))
    partner.call(lambda: setattr(partner.standin, "slack_hang_s", 60.0))
    config = make_config(db_path, partner.url, slack=tracker.SlackConfig(webhook_url=partner.root + "/_slack"))
    await run_daemon_until(config, everything_reported(partner))
    assert (await ledger_of(partner))["missing"] == 0
    assert slack_messages(partner) == []  # Slack never answered, and tracking did not care


async def test_secrets_are_redacted_from_alert_texts(start_partner) -> None:
    partner = start_partner()
    redactor = tracker.Redactor()
    redactor.set_secrets([TOKEN])
    async with aiohttp.ClientSession() as session:
        alerter = make_alerter(partner.root + "/_slack", session, redactor.text)
        alerter.alert("leak", f"partner said: bad token {TOKEN}")
        sender = asyncio.create_task(alerter.run())
        await wait_until(lambda: _at_least(partner, 1), 10, what="the message")
        alerter.close()
        await sender
    [text] = slack_messages(partner)
    assert TOKEN not in text and "[redacted]" in text


async def _at_least(partner, n: int) -> bool:
    return len(await asyncio.to_thread(slack_messages, partner)) >= n
