"""The report outbox against each answer the results endpoint can give. aioresponses stands in
for the partner here: these are exact answers a real server would give only by chance."""

import json
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses
from structlog.testing import capture_logs

import tracker
from conftest import TOKEN, make_config

BASE = "http://partner.test/api/external/data"
FEED = re.compile(r"^http://partner\.test/api/external/data/returns.*$")
TRACKING = re.compile(r"^http://partner\.test/api/external/data/tracking.*$")
RESULTS = f"{BASE}/results"
DELIVERED_AT = "2026-11-24T15:42:00Z"


async def seed(db: Path, *, delivered: bool = True) -> None:
    """One return in one box; the box delivered (report queued) or still in transit."""
    store = await tracker.Store.open(str(db))
    try:
        item = tracker.ReturnItem(id="RET_1", order_number="20261124-0001", order_item_number="1",
                                  shipment_number="SHP_1", requested_at=None)
        await store.commit([tracker.FeedPage(items=(item,), quarantined=(), next_cursor="c1", has_more=False,
                                             first_checks=(("SHP_1", 0.0),))], time.time())
        state = tracker.BoxState.DELIVERED if delivered else tracker.BoxState.TRACKING
        await store.commit([tracker.BoxUpdate(shipment_number="SHP_1", state=state,
                                              next_check_at=None if delivered else 0.0, not_found=0, errors=0,
                                              registered=True,
                                              last_status="delivered" if delivered else "picking_up",
                                              delivered_at=DELIVERED_AT if delivered else None)], time.time())
    finally:
        await store.close()


def report_row(db: Path) -> dict[str, Any]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return dict(conn.execute("SELECT * FROM reports WHERE return_id = 'RET_1'").fetchone())


async def one_pass(db: Path, mock: aioresponses, **results: Any) -> list[dict[str, Any]]:
    mock.get(FEED, payload={"data": [], "next_cursor": "c1", "has_more": False}, repeat=True)
    if results:
        mock.post(RESULTS, **results)
    with capture_logs() as logs:
        await tracker.Daemon(make_config(db, BASE)).run(once=True)
    return logs


async def report_after(db: Path, **answer: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One queued report, one pass in which the results endpoint gives `answer`: the report's row
    afterwards and what was logged."""
    await seed(db)
    with aioresponses() as mock:
        logs = await one_pass(db, mock, **answer)
    return report_row(db), logs


def posts(mock: aioresponses) -> list[Any]:
    return [call for (method, url), calls in mock.requests.items() if method == "POST" for call in calls]


async def test_200_marks_the_report_done_with_body_and_idempotency_key(db_path: Path) -> None:
    await seed(db_path)
    with aioresponses() as mock:
        await one_pass(db_path, mock, payload={"data": {"result": True}})
        [call] = posts(mock)
    assert call.kwargs["headers"]["Idempotency-Key"] == "RET_1"
    assert call.kwargs["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert call.kwargs["json"] == {"order_number": "20261124-0001", "order_item_number": "1",
                                   "shipment_number": "SHP_1", "result": "collected", "collected_at": DELIVERED_AT}
    row = report_row(db_path)
    assert (row["state"], row["outcome"]) == ("done", "recorded")


async def test_409_means_recorded_earlier_and_is_done(db_path: Path) -> None:
    row, _ = await report_after(db_path, status=409, payload={"error": "duplicate"})
    assert (row["state"], row["outcome"]) == ("done", "duplicate")


async def test_422_is_dead_kept_with_the_partners_answer_and_alerted(db_path: Path) -> None:
    row, logs = await report_after(db_path, status=422, payload={"error": "unknown order item"})
    assert row["state"] == "dead"
    assert "unknown order item" in row["last_error"]
    alerts = [e for e in logs if e["event"] == "alert.raised"]
    assert [a["key"] for a in alerts] == ["dead"] and "RET_1" in alerts[0]["text"]


@pytest.mark.parametrize(("answer", "error"), [
    ({"status": 500, "payload": {"error": "boom"}}, "server_error"),
    ({"status": 200, "body": "<html>bad gateway</html>"}, "garbled"),
    ({"status": 200, "payload": {"data": None}}, "200 without"),
    ({"exception": TimeoutError()}, "timeout"),
    ({"exception": aiohttp.ServerDisconnectedError()}, "connection"),
])
async def test_unknown_or_failed_outcome_stays_pending_for_a_later_retry(db_path: Path, answer: dict[str, Any],
                                                                        error: str) -> None:
    before = time.time()
    row, _ = await report_after(db_path, **answer)
    assert row["state"] == "pending" and row["attempts"] == 1
    assert error in row["last_error"]
    assert row["next_attempt_at"] > before


async def test_retry_after_is_honoured(db_path: Path) -> None:
    before = time.time()
    row, _ = await report_after(db_path, status=503, headers={"Retry-After": "120"}, payload={"error": "maintenance"})
    assert row["next_attempt_at"] >= before + 120


async def test_a_refused_token_keeps_the_report_and_alerts(db_path: Path) -> None:
    row, logs = await report_after(db_path, status=401, payload={"error": "unauthorized"})
    assert row["state"] == "pending" and row["next_attempt_at"] > row["queued_at"]
    assert row["last_error"].startswith("unauthorized")
    assert any(e["event"] == "alert.raised" and e["key"] == "unauthorized:results" for e in logs)


async def test_nothing_is_reported_while_the_box_is_in_transit(db_path: Path) -> None:
    await seed(db_path, delivered=False)
    with aioresponses() as mock:
        mock.get(TRACKING, payload={"data": [
            {"shipment_number": "SHP_1", "return_status": "picking_up", "updated_at": "2026-11-24T13:10:00Z"}]})
        await one_pass(db_path, mock)
        assert posts(mock) == []
        assert [url for method, url in mock.requests if method == "GET" and "tracking" in str(url)]
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM reports").fetchone()[0] == 0
        assert conn.execute("SELECT last_status FROM boxes").fetchone()[0] == "picking_up"


async def test_a_delivered_box_queues_a_report_for_every_item_in_it(db_path: Path) -> None:
    store = await tracker.Store.open(str(db_path))
    items = tuple(tracker.ReturnItem(id=f"RET_{i}", order_number="20261124-0009", order_item_number=str(i),
                                     shipment_number="SHP_9", requested_at=None) for i in (1, 2, 3))
    await store.commit([tracker.FeedPage(items=items, quarantined=(), next_cursor="c1", has_more=False,
                                         first_checks=(("SHP_9", 0.0),))], time.time())
    await store.close()
    history = {"data": [{"shipment_number": "SHP_9", "return_status": "delivered", "updated_at": DELIVERED_AT}]}
    with aioresponses() as mock:
        mock.get(TRACKING, payload=history)
        await one_pass(db_path, mock, payload={"data": {"result": True}}, repeat=True)
        sent = posts(mock)
    assert sorted(c.kwargs["headers"]["Idempotency-Key"] for c in sent) == ["RET_1", "RET_2", "RET_3"]
    assert all(json.dumps(c.kwargs["json"]).count(DELIVERED_AT) == 1 for c in sent)
