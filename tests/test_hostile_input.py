"""Whatever the partner sends, the daemon keeps running, keeps what it had, sets aside what it
cannot use and never stores what SQLite cannot hold. Property-based: hypothesis generates the
answers; a real loopback server sends the bodies no mock can (endless, slow, wrong bytes)."""

import json
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aioresponses import aioresponses
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tracker
from conftest import counts_in, make_config

BASE = "http://partner.test/api/external/data"
FEED = re.compile(r"^http://partner\.test/api/external/data/returns.*$")
SCHEDULE = tracker.ScheduleConfig()

# Any JSON value, strings included that UTF-8 cannot encode (JSON's \ud800 escapes decode to them).
texts = st.text(alphabet=st.characters(codec=None), max_size=300) | st.sampled_from(["\ud800", "x" * 5000, "", " "])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(texts, children, max_size=5),
    max_leaves=30,
)
item_like = st.fixed_dictionaries(
    {}, optional={k: json_values | texts for k in ("id", "order_number", "order_item_number", "shipment_number",
                                                   "requested_at")})
pages = st.fixed_dictionaries(
    {}, optional={"data": st.lists(item_like | json_values, max_size=8) | json_values,
                  "next_cursor": texts | json_values, "has_more": st.booleans() | json_values})
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def storable(value: Any) -> bool:
    """SQLite takes it as TEXT: no lone surrogates."""
    return value is None or isinstance(value, (int, float)) or (isinstance(value, str) and _encodes(value))


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@FAST
@given(body=pages | json_values)
def test_any_feed_page_is_either_refused_whole_or_split_into_storable_items_and_quarantine(body: Any) -> None:
    try:
        page = tracker.parse_returns_page(body, "c0", 0.0, 1.0)
    except tracker.GarbledAnswer:
        return  # the cursor does not move; the page is asked for again
    assert isinstance(body, dict) and isinstance(body["data"], list)
    assert len(page.items) + len(page.quarantined) == len(body["data"])
    for item in page.items:
        assert all(storable(v) for v in dataclasses_values(item))
    for q in page.quarantined:
        assert storable(q.return_id) and storable(q.raw) and len(q.raw) <= tracker.QUARANTINE_RAW_CHARS
    assert storable(page.next_cursor)


def dataclasses_values(item: tracker.ReturnItem) -> list[Any]:
    return [item.id, item.order_number, item.order_item_number, item.shipment_number, item.requested_at]


@FAST
@given(body=json_values | st.fixed_dictionaries({"data": st.lists(
    st.fixed_dictionaries({}, optional={"return_status": texts | json_values, "updated_at": texts | json_values,
                                        "shipment_number": st.just("S1") | texts}), max_size=4)}))
def test_any_tracking_answer_is_a_known_decision_and_delivered_only_with_a_valid_time(body: Any) -> None:
    box = tracker.DueBox(shipment_number="S1", first_seen_at=0.0, not_found=0, errors=0)
    reply = tracker.Reply(endpoint=tracker.Endpoint.TRACKING, outcome=tracker.Outcome.OK, status=200, body=body,
                          retry_after=None, latency_s=0.01)
    update = tracker.decide_box_update(box, reply, 100.0, SCHEDULE)
    if update.state is tracker.BoxState.DELIVERED:
        last = body["data"][-1]
        assert last["return_status"] == "delivered" and update.delivered_at == last["updated_at"]
    assert all(storable(v) for v in (update.last_status, update.delivered_at, update.last_error,
                                     update.unknown_status))


@FAST
@given(body=json_values, status=st.sampled_from([200, 400, 401, 404, 409, 422, 429, 500, 503]),
       outcome=st.sampled_from(list(tracker.Outcome)))
def test_any_results_answer_settles_a_report_only_on_the_contracts_exact_words(body: Any, status: int,
                                                                               outcome: tracker.Outcome) -> None:
    report = tracker.DueReport(return_id="R1", order_number="O1", order_item_number="1", shipment_number="S1",
                               collected_at="2026-11-24T10:00:00Z", attempts=0)
    reply = tracker.Reply(endpoint=tracker.Endpoint.RESULTS, outcome=outcome, status=status, body=body,
                          retry_after=None, latency_s=0.01, detail="detail")
    update = tracker.decide_report_update(report, reply, 100.0, SCHEDULE)
    if update.state is tracker.ReportState.DONE:
        assert outcome is tracker.Outcome.CONFLICT or body == {"data": {"result": True}}


# ── bodies over the wire ────────────────────────────────────────────────────────────────────


class Misbehaving:
    """A real HTTP server on loopback that answers the feed with whatever `answer` says."""

    def __init__(self) -> None:
        self.answer = "endless"
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/api/external/data/returns", self.returns)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/api/external/data"
        return self.url

    async def returns(self, request: web.Request) -> web.StreamResponse:
        if self.answer == "endless":  # no Content-Length; it would never end on its own
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            await response.write(b'{"data": [')
            while True:
                await response.write(b'{"id": "' + b"x" * 65000 + b'"},')
        if self.answer == "declared-huge":
            return web.Response(body=b"{}", headers={"Content-Length": str(10 * 2 ** 30)}, status=200)
        raise AssertionError(self.answer)


@pytest.mark.parametrize("answer", ["endless", "declared-huge"])
async def test_a_body_over_the_size_cap_is_refused_without_being_read_whole(answer: str, tmp_path: Path) -> None:
    server = Misbehaving()
    server.answer = answer
    url = await server.start()
    try:
        config = make_config(tmp_path / "t.db", url)
        async with aiohttp.ClientSession() as session:
            client = tracker.PartnerClient(config, session, tracker.Metrics(), lambda *a: None)
            started = time.monotonic()
            reply = await client.returns_page(None, 100)
        assert reply.outcome is tracker.Outcome.GARBLED and "larger than" in reply.detail
        assert time.monotonic() - started < 5  # an endless body would never end if read whole
    finally:
        assert server.runner is not None
        await server.runner.cleanup()


NASTY_FEED_ANSWERS: list[dict[str, Any]] = [
    {"body": b"<html>502 Bad Gateway</html>", "content_type": "text/html"},
    {"body": b'{"data": [{"id": "RET_1", "order_number": "O\xff\xfe"', "content_type": "application/json"},
    {"body": b"[" * 5000 + b"]" * 5000, "content_type": "application/json"},  # past the parser's recursion limit
    {"body": b'{"data": [{"id": "\\ud800", "order_number": "O", "order_item_number": "1",'
             b' "shipment_number": "S"}], "next_cursor": "c1", "has_more": true}', "content_type": "application/json"},
    {"body": json.dumps({"data": [{"id": "RET_2", "order_number": "O2", "order_item_number": "1",
                                   "shipment_number": "S2", "requested_at": "\ud800"}],
                         "next_cursor": "c2", "has_more": True}).encode(), "content_type": "application/json"},
    {"body": json.dumps({"data": [{"id": "RET_3", "order_number": "x" * 3000, "order_item_number": "1",
                                   "shipment_number": "S3"}], "next_cursor": "c3", "has_more": True}).encode(),
     "content_type": "application/json"},
    {"body": json.dumps({"data": [], "next_cursor": "\ud800", "has_more": True}).encode(),
     "content_type": "application/json"},
    {"body": json.dumps({"data": [{"id": "RET_4", "order_number": "O4", "order_item_number": "1",
                                   "shipment_number": "S4"}], "next_cursor": "c4", "has_more": False}).encode(),
     "content_type": "application/json"},
]


async def test_a_run_of_hostile_feed_answers_keeps_the_good_items_and_quarantines_the_rest(db_path: Path) -> None:
    with aioresponses() as mock:
        for answer in NASTY_FEED_ANSWERS:
            mock.get(FEED, status=200, **answer)
        mock.get(FEED, payload={"data": [], "next_cursor": "c4", "has_more": False}, repeat=True)
        config = make_config(db_path, BASE)
        for _ in NASTY_FEED_ANSWERS:  # a garbled page ends the pass; the next pass asks again
            await tracker.Daemon(config).run(once=True)
    with sqlite3.connect(db_path) as conn:
        ids = sorted(row[0] for row in conn.execute("SELECT id FROM returns"))
        quarantined = conn.execute("SELECT return_id, reason, raw FROM quarantine").fetchall()
    assert ids == ["RET_2", "RET_4"]  # RET_2's unstorable requested_at is dropped, the return kept
    reasons = " ".join(reason for _, reason, _ in quarantined)
    assert "too long or unprintable" in reasons and len(quarantined) == 2
    assert all(_encodes(raw) and len(raw) <= tracker.QUARANTINE_RAW_CHARS for _, _, raw in quarantined)
    assert (await counts_in(db_path))["returns"] == 2
