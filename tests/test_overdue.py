"""Overdue pickups: a box not collected schedule.overdue_after_s after its first return was
requested is counted, listed by `status`, and summed up on Slack at most once an hour — and the
alarm ends by itself when the boxes close."""

import dataclasses
import datetime as dt
import time
from pathlib import Path

import structlog
from structlog.testing import capture_logs

import tracker
from conftest import FAST_SCHEDULE, make_config

HOUR = 3600.0


def requested(hours_ago: float, now: float) -> str:
    return dt.datetime.fromtimestamp(now - hours_ago * HOUR, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def boxes_requested(store: tracker.Store, now: float, **hours_ago: float) -> None:
    """One return a box, each requested so many hours ago, all first seen by the tracker now."""
    items = tuple(tracker.ReturnItem(id=f"R_{s}", order_number="O", order_item_number="1", shipment_number=s,
                                     requested_at=requested(h, now)) for s, h in hours_ago.items())
    await store.commit([tracker.FeedPage(items=items, quarantined=(), next_cursor="c", has_more=False,
                                         first_checks=tuple((s, now + 60) for s in hours_ago))], now)


async def test_a_box_is_overdue_by_its_request_time_not_when_the_tracker_first_saw_it(db_path: Path) -> None:
    now = time.time()
    store = await tracker.Store.open(str(db_path))
    try:
        await boxes_requested(store, now, SHP_OLD=80, SHP_NEW=10, SHP_DONE=90)
        await store.commit([tracker.BoxUpdate(shipment_number="SHP_DONE", state=tracker.BoxState.DELIVERED,
                                              next_check_at=None, not_found=0, errors=0, registered=True,
                                              last_status="delivered",
                                              delivered_at="2026-11-24T10:00:00Z")], now)
        count, oldest = await store.overdue(now - 72 * HOUR)
        listed = await store.overdue_boxes(now - 72 * HOUR, 10)
    finally:
        await store.close()
    assert count == 1 and abs(oldest - (now - 80 * HOUR)) < 2  # a closed box is never overdue
    assert [row[0] for row in listed] == ["SHP_OLD"]


async def test_status_lists_overdue_pickups_with_age_and_last_status(db_path: Path) -> None:
    now = time.time()
    store = await tracker.Store.open(str(db_path))
    try:
        await boxes_requested(store, now, SHP_OLD=80)
        await store.commit([tracker.BoxUpdate(shipment_number="SHP_OLD", state=tracker.BoxState.TRACKING,
                                              next_check_at=now + 60, not_found=0, errors=0, registered=True,
                                              last_status="assigned",
                                              history=(tracker.StatusChange(status="assigned", at=now - 70 * HOUR),
                                                       ))], now)
        text = "\n".join(await tracker.status_lines(store, overdue_after_s=72 * HOUR))
    finally:
        await store.close()
    assert "overdue 1" in text
    assert "Overdue pickups (not collected 3 days after the request):\n  SHP_OLD  requested " in text
    assert "(3.3 days ago)  status assigned since" in text


async def test_overdue_pickups_are_alerted_at_most_hourly_and_the_all_clear_once(db_path: Path) -> None:
    now = time.time()
    config = make_config(db_path, "http://127.0.0.1:1/api/external/data",
                         schedule=dataclasses.replace(FAST_SCHEDULE, overdue_after_s=72 * HOUR))
    metrics = tracker.Metrics()
    alerts = tracker.Alerter("", None, metrics, structlog.get_logger(), str)  # no Slack: logged only
    store = await tracker.Store.open(str(db_path))
    committer = tracker.Committer(store, lambda result: None, lambda exc: None, structlog.get_logger())  # unused:
    watch = tracker.OverdueWatch(config, store, committer, alerts, metrics, structlog.get_logger())  # no webhooks
    try:
        await boxes_requested(store, now, SHP_A=100, SHP_B=75, SHP_C=1)
        with capture_logs() as logs:
            await watch.check(now)
            await watch.check(now + 600)  # within the hour: nothing new
            gauge = metrics.registry.get_sample_value("tracker_boxes_overdue")
            await watch.check(now + HOUR + 1)  # an hour on, still overdue
            await store.commit([tracker.BoxUpdate(shipment_number=s, state=tracker.BoxState.DELIVERED,
                                                  next_check_at=None, not_found=0, errors=0, registered=True,
                                                  last_status="delivered",
                                                  delivered_at="2026-11-24T10:00:00Z") for s in ("SHP_A", "SHP_B")],
                                                  now)
            await watch.check(now + HOUR + 60)
            await watch.check(now + HOUR + 120)  # the all-clear is said once
    finally:
        await store.close()
    raised = [(e["key"], e["text"]) for e in logs if e["event"] == "alert.raised"]
    assert gauge == 2
    assert [key for key, _ in raised] == ["overdue", "overdue", "overdue_cleared"]
    assert raised[0][1].startswith("2 pickup(s) overdue — not collected 3 days after the return was requested — "
                                   "oldest 4.2 days: SHP_A, SHP_B.")
    assert metrics.registry.get_sample_value("tracker_boxes_overdue") == 0
