"""What each partner answer means — the pure functions the stages act on. No I/O."""

import email.utils
import time

import pytest

import tracker
from tracker import BoxState, DueBox, Endpoint, Outcome, Reply

SCHEDULE = tracker.ScheduleConfig(track_every_s=100.0, stale_after_s=1000.0, retry_base_s=1.0, retry_max_s=60.0)
GOOD = {"id": "RET_1", "order_number": "20261124-0001", "order_item_number": "1", "shipment_number": "SHP_1",
        "requested_at": "2026-11-24T09:00:01Z"}


def reply(outcome: Outcome, body=None, retry_after=None) -> Reply:
    return Reply(endpoint=Endpoint.TRACKING, outcome=outcome, status=200 if outcome is Outcome.OK else None, body=body,
                 retry_after=retry_after, latency_s=0.01)


def history(*statuses: str, shipment: str = "SHP_1") -> dict:
    return {"data": [{"shipment_number": shipment, "return_status": s, "updated_at": "2026-11-24T15:42:00Z"}
                     for s in statuses]}


# ── the feed ────────────────────────────────────────────────────────────────────────────────

def test_a_valid_item_becomes_a_return_and_schedules_its_box_once() -> None:
    page = tracker.parse_returns_page({"data": [GOOD, {**GOOD, "id": "RET_2", "order_item_number": "2"}],
                                       "next_cursor": "c2", "has_more": True}, "c1", 0.0, 100.0)
    assert [i.id for i in page.items] == ["RET_1", "RET_2"]
    assert [s for s, _ in page.first_checks] == ["SHP_1"]  # two items, one box, one schedule
    assert 50.0 <= page.first_checks[0][1] <= 150.0
    assert (page.next_cursor, page.has_more) == ("c2", True)


@pytest.mark.parametrize(("broken", "reason"), [
    ({k: v for k, v in GOOD.items() if k != "shipment_number"}, "shipment_number is missing"),
    ({**GOOD, "order_number": None}, "order_number is null"),
    ({**GOOD, "order_item_number": 1}, "order_item_number is int"),
    ({**GOOD, "id": ""}, "id is empty"),
    ({**GOOD, "shipment_number": "X" * 500}, "shipment_number is too long or unprintable"),
    ("RET_1", "item is str, not an object"),
])
def test_a_broken_item_is_quarantined_with_the_reason(broken, reason: str) -> None:
    page = tracker.parse_returns_page({"data": [broken, GOOD], "next_cursor": "c2", "has_more": False}, None, 0, 1)
    assert [i.id for i in page.items] == ["RET_1"]  # the rest of the page still flows
    [quarantined] = page.quarantined
    assert quarantined.reason == reason
    assert len(quarantined.raw) <= tracker.QUARANTINE_RAW_CHARS


def test_quarantined_raw_payload_is_truncated() -> None:
    huge = {**GOOD, "id": None, "note": "x" * 100_000}
    [q] = tracker.parse_returns_page({"data": [huge], "next_cursor": "c", "has_more": False}, None, 0, 1).quarantined
    assert len(q.raw) == tracker.QUARANTINE_RAW_CHARS


@pytest.mark.parametrize("body", [
    None, [], "<html>", {"data": None}, {"data": 42, "next_cursor": "c"}, {"data": [], "has_more": "yes"},
    {"data": [GOOD], "has_more": False}, {"data": [GOOD], "next_cursor": 7},
])
def test_an_unusable_page_is_garbled_and_must_not_move_the_cursor(body) -> None:
    with pytest.raises(tracker.GarbledAnswer):
        tracker.parse_returns_page(body, "c1", 0, 1)


def test_an_empty_page_that_does_not_move_has_nothing_more() -> None:
    page = tracker.parse_returns_page({"data": [], "next_cursor": "c1", "has_more": True}, "c1", 0, 1)
    assert page.has_more is False and page.next_cursor == "c1"


# ── tracking ────────────────────────────────────────────────────────────────────────────────

def box(not_found: int = 0, errors: int = 0, first_seen_at: float = 0.0) -> DueBox:
    return DueBox(shipment_number="SHP_1", first_seen_at=first_seen_at, not_found=not_found, errors=errors)


def test_the_last_history_entry_is_the_current_status() -> None:
    update = tracker.decide_box_update(box(), reply(Outcome.OK, history("requested", "delivered")), 10, SCHEDULE)
    assert update.state is BoxState.DELIVERED and update.delivered_at == "2026-11-24T15:42:00Z"
    update = tracker.decide_box_update(box(), reply(Outcome.OK, history("delivered", "picking_up")), 10, SCHEDULE)
    assert update.state is BoxState.TRACKING


def test_cancelled_closes_the_box() -> None:
    update = tracker.decide_box_update(box(), reply(Outcome.OK, history("requested", "cancelled")), 10, SCHEDULE)
    assert update.state is BoxState.CANCELLED and update.next_check_at is None


def test_in_transit_is_checked_again_after_the_interval_with_jitter() -> None:
    times = {tracker.decide_box_update(box(), reply(Outcome.OK, history("assigned")), 0, SCHEDULE).next_check_at
             for _ in range(50)}
    assert all(80.0 <= t <= 120.0 for t in times)
    assert len(times) > 1  # jittered, so a burst does not come due all at once


def test_an_unknown_status_keeps_tracking_and_is_named() -> None:
    update = tracker.decide_box_update(box(), reply(Outcome.OK, history("requested", "lost_in_space")), 0, SCHEDULE)
    assert update.state is BoxState.TRACKING and update.unknown_status == "lost_in_space"


@pytest.mark.parametrize("body", [
    {"data": []}, {"data": None}, {"data": ["x"]}, history("delivered", shipment="SHP_OTHER"),
    {"data": [{"return_status": "delivered", "updated_at": "yesterday"}]}, {"data": [{"return_status": 5}]},
])
def test_a_garbled_history_is_retried_not_trusted(body) -> None:
    update = tracker.decide_box_update(box(), reply(Outcome.OK, body), 0, SCHEDULE)
    assert update.state is BoxState.TRACKING and update.errors == 1
    assert update.last_error.startswith("ok: garbled")


def test_404_is_asked_again_later_with_a_growing_delay() -> None:
    delays = [tracker.decide_box_update(box(not_found=n), reply(Outcome.NOT_FOUND), 0, SCHEDULE).next_check_at
              for n in range(0, 6)]
    assert 80 <= delays[0] <= 120 and 160 <= delays[1] <= 240 and 320 <= delays[2] <= 480
    assert max(delays) <= SCHEDULE.stale_after_s  # never scheduled past the moment it turns stale


def test_404_past_stale_after_marks_the_box_stale() -> None:
    update = tracker.decide_box_update(box(not_found=9), reply(Outcome.NOT_FOUND), 1000.0, SCHEDULE)
    assert update.state is BoxState.STALE and update.next_check_at is None


def test_a_failed_call_backs_off_and_honours_retry_after() -> None:
    update = tracker.decide_box_update(box(errors=2), reply(Outcome.RATE_LIMITED, retry_after=30.0), 0, SCHEDULE)
    assert update.state is BoxState.TRACKING and update.errors == 3 and update.next_check_at >= 30.0


# ── retries ─────────────────────────────────────────────────────────────────────────────────

def test_retry_delay_grows_exponentially_and_is_capped() -> None:
    for attempt in range(1, 40):
        delay = tracker.retry_delay(attempt, 1.0, 60.0, None)
        assert 0.5 <= delay <= min(60.0, 2 ** attempt)


@pytest.mark.parametrize(("header", "expected"), [
    ("120", 120.0), ("0.5", 0.5), ("-4", 0.0), ("99999999", tracker.MAX_RETRY_AFTER_S), ("soon", None),
    (None, None), ("nan", None),
])
def test_retry_after_in_seconds(header, expected) -> None:
    assert tracker.parse_retry_after(header) == expected


def test_retry_after_as_an_http_date() -> None:
    header = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= tracker.parse_retry_after(header) <= 61
