"""Corrections: the partner lists a return again when it corrects it, and the latest listing is the
truth (../shared/partner-api.md, the returns feed). A relisting whose fields differ is applied in
the transaction of its page — the return, its box and its report follow it — and recorded; an
unchanged one changes nothing. These are the store's rules, one by one, on a real SQLite file and a
real PostgreSQL database; tests/test_corrections_end_to_end.py plays them through the daemon
against the stand-in."""

import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import tracker
from conftest import in_dialect, open_backend

DELIVERED_AT = "2026-11-24T15:42:00Z"


def item(rid: str = "R1", order: str = "O1", line: str = "1", shipment: str = "S1",
         requested: str | None = None) -> tracker.ReturnItem:
    return tracker.ReturnItem(id=rid, order_number=order, order_item_number=line, shipment_number=shipment,
                              requested_at=requested)


def page(*items: tracker.ReturnItem, quarantined: tuple[tracker.QuarantinedItem, ...] = ()) -> tracker.FeedPage:
    """A feed page as the collect stage builds it: every listed box gets a first check."""
    shipments = dict.fromkeys(i.shipment_number for i in items)
    return tracker.FeedPage(items=items, quarantined=quarantined, next_cursor="cursor", has_more=False,
                            first_checks=tuple((s, 100.0) for s in shipments))


@contextlib.asynccontextmanager
async def opened(where: str | Path) -> AsyncIterator[tracker.StateStore]:
    store = await open_backend(where)
    try:
        yield store
    finally:
        await store.close()


async def one(store: tracker.StateStore, sql: str, *params: Any) -> Any:
    rows = await store.db.query(in_dialect(store, sql), params)
    return rows[0] if rows else None


async def box_state(store: tracker.StateStore, shipment: str) -> str:
    return (await one(store, "SELECT state FROM boxes WHERE shipment_number = ?", shipment))[0]


async def report(store: tracker.StateStore, rid: str) -> dict[str, Any] | None:
    row = await one(store, "SELECT state, order_number, order_item_number, shipment_number, collected_at, revision,"
                           " accepted_revision FROM reports WHERE return_id = ?", rid)
    keys = ("state", "order_number", "order_item_number", "shipment_number", "collected_at", "revision", "accepted")
    return None if row is None else dict(zip(keys, row))


def delivered(shipment: str, at: str = DELIVERED_AT) -> tracker.BoxUpdate:
    return tracker.BoxUpdate(shipment_number=shipment, state=tracker.BoxState.DELIVERED, next_check_at=None,
                             not_found=0, errors=0, registered=True, last_status="delivered", delivered_at=at)


def answered(rid: str, state: tracker.ReportState, outcome: str | None, revision: int = 0) -> tracker.ReportUpdate:
    return tracker.ReportUpdate(return_id=rid, state=state,
                                next_attempt_at=None if state is not tracker.ReportState.PENDING else 1e12,
                                outcome=outcome,
                                last_error=None, revision=revision)


# ── what counts as a correction ─────────────────────────────────────────────────────────────


async def test_an_unchanged_relisting_is_no_correction(backend: str) -> None:
    async with opened(backend) as store:
        await store.commit([page(item())], 1.0)
        result = await store.commit([page(item())], 2.0)
        assert result.corrections == () and result.returns_added == 0
        assert (await store.counts()).get("corrections", 0) == 0


async def test_a_changed_field_is_applied_and_recorded_with_both_versions(backend: str) -> None:
    async with opened(backend) as store:
        await store.commit([page(item(line="1", requested="2026-11-24T09:00:00Z"))], 1.0)
        result = await store.commit([page(item(line="2", requested="2026-11-24T09:05:00Z"))], 2.0)
        assert [c.fields for c in result.corrections] == [("order_item_number", "requested_at")]
        assert await one(store, "SELECT order_item_number, requested_at FROM returns WHERE id = 'R1'") == (
            "2", "2026-11-24T09:05:00Z")
        assert await store.latest_corrections(10) == [
            ("R1", json.dumps({"order_item_number": "1", "requested_at": "2026-11-24T09:00:00Z"}),
             json.dumps({"order_item_number": "2", "requested_at": "2026-11-24T09:05:00Z"}), None, 2.0)]
        assert (await store.counts())["corrections"] == 1


async def test_the_last_listing_of_a_return_in_one_page_wins(backend: str) -> None:
    async with opened(backend) as store:
        await store.commit([page(item(line="1"))], 1.0)
        result = await store.commit([page(item(line="2"), item(line="3"))], 2.0)
        assert [(c.before.order_item_number, c.after.order_item_number) for c in result.corrections] == [("1", "3")]
        assert await one(store, "SELECT order_item_number FROM returns WHERE id = 'R1'") == ("3",)


async def test_a_correction_is_committed_with_its_page_or_not_at_all(db_path: Path) -> None:
    async with opened(db_path) as store:
        await store.commit([page(item(line="1"))], 1.0)
        with sqlite3.connect(db_path) as conn:  # the corrections table refuses writes: the page fails
            conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON corrections BEGIN SELECT RAISE(ABORT, 'full'); END")
        corrected = tracker.FeedPage(items=(item(line="2"),), quarantined=(), next_cursor="after-correction",
                                     has_more=False, first_checks=(("S1", 100.0),))
        try:
            await store.commit([corrected], 2.0)
        except sqlite3.DatabaseError:
            pass
        else:
            raise AssertionError("the commit should have failed")
        assert await one(store, "SELECT order_item_number FROM returns WHERE id = 'R1'") == ("1",)
        assert await store.feed_cursor() == "cursor"  # the page is read again, correction and all


# ── the report follows the latest fields ────────────────────────────────────────────────────


async def test_a_report_not_yet_sent_goes_out_with_the_corrected_fields(backend: str) -> None:
    async with opened(backend) as store:
        await store.commit([page(item(line="1"))], 1.0)
        await store.commit([delivered("S1")], 2.0)
        await store.commit([page(item(line="2"))], 3.0)
        [due] = await store.due_reports(1e12, 10)
        assert (due.order_item_number, due.revision) == ("2", 1)
        assert due.body()["order_item_number"] == "2"
        assert not due.sent_before_correction


async def test_a_report_corrected_before_its_box_is_delivered_is_queued_with_the_corrected_fields(
        backend: str) -> None:
    async with opened(backend) as store:
        await store.commit([page(item(order="O-typo"))], 1.0)
        await store.commit([page(item(order="O1"))], 2.0)
        await store.commit([delivered("S1")], 3.0)
        assert (await report(store, "R1"))["order_number"] == "O1"


async def test_a_dead_report_is_sent_again_once_its_fields_are_corrected(backend: str) -> None:
    async with opened(backend) as store:
        await store.commit([page(item(line="9"))], 1.0)
        await store.commit([delivered("S1")], 2.0)
        await store.commit([answered("R1", tracker.ReportState.DEAD, "refused")], 3.0)
        await store.commit([page(item(line="1"))], 4.0)
        assert (await report(store, "R1"))["state"] == "pending"
        [due] = await store.due_reports(4.0, 10)
        assert (due.order_item_number, due.attempts) == ("1", 0)


async def test_a_report_the_partner_accepted_is_not_resent_and_is_listed_as_outdated(backend: str) -> None:
    async with opened(backend) as store:
        await store.commit([page(item(line="9"))], 1.0)
        await store.commit([delivered("S1")], 2.0)
        await store.commit([answered("R1", tracker.ReportState.DONE, "recorded")], 3.0)
        result = await store.commit([page(item(line="1"))], 4.0)
        assert [c.report_state for c in result.corrections] == [tracker.ReportState.DONE]
        row = await report(store, "R1")
        assert (row["state"], row["order_item_number"]) == ("done", "9")  # the body the partner holds
        assert await store.due_reports(1e12, 10) == []
        assert await store.outdated_reports(10) == [
            ("R1", json.dumps({"order_item_number": "9"}), json.dumps({"order_item_number": "1"}), 3.0)]


async def test_a_requested_at_correction_leaves_an_accepted_report_up_to_date(backend: str) -> None:
    async with opened(backend) as store:
        await store.commit([page(item(requested="2026-11-24T09:00:00Z"))], 1.0)
        await store.commit([delivered("S1")], 2.0)
        await store.commit([answered("R1", tracker.ReportState.DONE, "recorded")], 3.0)
        await store.commit([page(item(requested="2026-11-24T08:59:00Z"))], 4.0)
        assert await store.outdated_reports(10) == []


# ── a reissued waybill: the return moves to another box ─────────────────────────────────────


async def test_a_reissued_waybill_moves_the_return_to_a_new_box_and_empties_the_old_one(backend: str) -> None:
    async with opened(backend) as store:
        await store.commit([page(item(shipment="OLD"))], 1.0)
        result = await store.commit([page(item(shipment="NEW"))], 2.0)
        assert [c.moved for c in result.corrections] == [True]
        assert await box_state(store, "OLD") == "emptied"
        assert await box_state(store, "NEW") == "tracking"
        assert [b.shipment_number for b in await store.due_boxes(1e12, 10)] == ["NEW"]  # the old one is not polled


async def test_a_box_keeps_tracking_while_items_remain_in_it(backend: str) -> None:
    async with opened(backend) as store:
        await store.commit([page(item("R1", shipment="OLD"), item("R2", line="2", shipment="OLD"))], 1.0)
        await store.commit([page(item("R1", shipment="NEW"))], 2.0)
        assert await box_state(store, "OLD") == "tracking"
        await store.commit([page(item("R2", line="2", shipment="NEW"))], 3.0)
        assert await box_state(store, "OLD") == "emptied"


async def test_a_return_moved_to_a_delivered_box_is_reported_at_once_with_that_boxs_collection(
        backend: str) -> None:
    async with opened(backend) as store:
        await store.commit([page(item("R1", shipment="OLD"), item("R2", line="2", shipment="NEW"))], 1.0)
        await store.commit([tracker.BoxUpdate(shipment_number="OLD", state=tracker.BoxState.CANCELLED,
                                              next_check_at=None, not_found=0, errors=0, registered=True,
                                              last_status="cancelled"),
                            delivered("NEW")], 2.0)
        assert await report(store, "R1") is None  # a cancelled box reports nothing
        result = await store.commit([page(item("R1", shipment="NEW"))], 3.0)
        assert result.reports_queued == 1
        row = await report(store, "R1")
        assert (row["state"], row["shipment_number"], row["collected_at"]) == ("pending", "NEW", DELIVERED_AT)
        assert await box_state(store, "OLD") == "cancelled"  # it closed for its own reason


async def test_a_pending_report_moved_to_a_box_not_yet_delivered_waits_for_that_box(backend: str) -> None:
    async with opened(backend) as store:
        await store.commit([page(item(shipment="OLD"))], 1.0)
        await store.commit([delivered("OLD", "2026-11-24T10:00:00Z")], 2.0)
        await store.commit([page(item(shipment="NEW"))], 3.0)
        assert (await report(store, "R1"))["state"] == "withdrawn"
        assert await store.due_reports(1e12, 10) == []  # never early: the new box is not collected yet
        assert await box_state(store, "OLD") == "delivered"
        await store.commit([delivered("NEW")], 4.0)
        row = await report(store, "R1")
        assert (row["state"], row["shipment_number"], row["collected_at"]) == ("pending", "NEW", DELIVERED_AT)


async def test_a_stale_box_whose_items_moved_leaves_the_stale_list(backend: str) -> None:
    async with opened(backend) as store:
        await store.commit([page(item(shipment="OLD"))], 1.0)
        await store.commit([tracker.BoxUpdate(shipment_number="OLD", state=tracker.BoxState.STALE, next_check_at=None,
                                              not_found=9, errors=0, registered=False)], 2.0)
        await store.commit([page(item(shipment="NEW"))], 3.0)
        assert await box_state(store, "OLD") == "emptied"
        assert await store.stale_boxes(10) == []


async def test_an_emptied_box_listed_again_is_tracked_again(backend: str) -> None:
    async with opened(backend) as store:
        await store.commit([page(item(shipment="OLD"))], 1.0)
        await store.commit([page(item(shipment="NEW"))], 2.0)
        await store.commit([page(item(shipment="OLD"))], 3.0)  # the reissue itself was a mistake
        assert (await box_state(store, "OLD"), await box_state(store, "NEW")) == ("tracking", "emptied")
        assert [b.shipment_number for b in await store.due_boxes(1e12, 10)] == ["OLD"]


# ── a correction that breaks a valid return ─────────────────────────────────────────────────


async def test_a_correction_that_breaks_a_return_is_quarantined_and_the_stored_version_kept(
        backend: str) -> None:
    raw = {"id": "R1", "order_number": "O1", "order_item_number": "1", "shipment_number": None}
    broken = tracker.validate_return(raw)
    assert isinstance(broken, tracker.QuarantinedItem)
    async with opened(backend) as store:
        await store.commit([page(item())], 1.0)
        result = await store.commit([page(quarantined=(broken,))], 2.0)
        assert result.broken_corrections == {"R1"} and result.corrections == ()
        assert await one(store, "SELECT shipment_number FROM returns WHERE id = 'R1'") == ("S1",)
        [(rid, reason, stored_raw, _)] = await store.open_quarantine(10)
        assert (rid, reason, json.loads(stored_raw)) == ("R1", "shipment_number is null", raw)


# ── answers to a body a correction has since changed ────────────────────────────────────────


async def test_a_refusal_of_fields_since_corrected_leaves_the_corrected_report_to_be_sent(backend: str) -> None:
    async with opened(backend) as store:
        await store.commit([page(item(line="9"))], 1.0)
        await store.commit([delivered("S1")], 2.0)
        [in_flight] = await store.due_reports(1e12, 10)
        await store.commit([page(item(line="1"))], 3.0)  # arrives while the old body is on its way
        result = await store.commit([answered("R1", tracker.ReportState.DEAD, "refused", in_flight.revision)], 4.0)
        assert result.superseded == {"R1"}
        [due] = await store.due_reports(4.0, 10)  # due at once, with the corrected fields
        assert due.order_item_number == "1" and due.attempts == 1


async def test_a_recording_of_fields_since_corrected_settles_the_report_and_marks_it_outdated(
        backend: str) -> None:
    async with opened(backend) as store:
        await store.commit([page(item(shipment="OLD"))], 1.0)
        await store.commit([delivered("OLD")], 2.0)
        [in_flight] = await store.due_reports(1e12, 10)
        await store.commit([page(item(shipment="NEW"))], 3.0)
        result = await store.commit([answered("R1", tracker.ReportState.DONE, "recorded", in_flight.revision)], 4.0)
        assert result.superseded == {"R1"}
        assert (await report(store, "R1"))["state"] == "done"
        assert [row[0] for row in await store.outdated_reports(10)] == ["R1"]


async def test_a_409_to_a_report_sent_before_its_correction_marks_it_outdated(backend: str) -> None:
    async with opened(backend) as store:
        await store.commit([page(item(line="9"))], 1.0)
        await store.commit([delivered("S1")], 2.0)
        [first] = await store.due_reports(1e12, 10)
        await store.commit([answered("R1", tracker.ReportState.PENDING, None, first.revision)], 3.0)  # a reset
        await store.commit([page(item(line="1"))], 4.0)
        [second] = await store.due_reports(1e12, 10)
        assert second.sent_before_correction
        result = await store.commit([answered("R1", tracker.ReportState.DONE, "duplicate", second.revision)], 5.0)
        assert result.superseded == frozenset()  # the answer was to the corrected body …
        assert [row[0] for row in await store.outdated_reports(10)] == ["R1"]  # … but the partner may hold the old


async def test_an_accepted_report_is_up_to_date_when_no_correction_came(backend: str) -> None:
    async with opened(backend) as store:
        await store.commit([page(item())], 1.0)
        await store.commit([delivered("S1")], 2.0)
        await store.commit([answered("R1", tracker.ReportState.DONE, "recorded")], 3.0)
        assert (await report(store, "R1"))["accepted"] == 0
        assert await store.outdated_reports(10) == []


# ── upgrade and status ──────────────────────────────────────────────────────────────────────


async def test_a_version_3_database_gains_report_revisions_and_keeps_its_reports(db_path: Path) -> None:
    async with opened(db_path) as store:
        await store.commit([page(item())], 1.0)
        await store.commit([delivered("S1")], 2.0)
    with sqlite3.connect(db_path) as conn:  # as version 3 left it
        conn.execute("DROP INDEX reports_outdated")
        conn.execute("DROP TABLE corrections")
        for column in ("revision", "first_sent_revision", "accepted_revision"):
            conn.execute(f"ALTER TABLE reports DROP COLUMN {column}")
        conn.execute("PRAGMA user_version = 3")
    readonly = await tracker.Store.open(str(db_path), readonly=True)  # `status` before any upgrade
    try:
        assert await readonly.latest_corrections(10) == [] and await readonly.outdated_reports(10) == []
    finally:
        await readonly.close()
    async with opened(db_path) as store:
        assert (await store.db.query("PRAGMA user_version", ()))[0][0] == tracker.SCHEMA_VERSION
        await store.commit([page(item(line="2"))], 3.0)
        assert (await report(store, "R1"))["order_item_number"] == "2"


async def test_status_lists_corrections_and_reports_the_partner_holds_under_older_fields(backend: str) -> None:
    async with opened(backend) as store:
        await store.commit([page(item(line="9"))], 1.0)
        await store.commit([delivered("S1")], 2.0)
        await store.commit([answered("R1", tracker.ReportState.DONE, "recorded")], 3.0)
        await store.commit([page(item(line="1"))], 4.0)
        text = "\n".join(await tracker.status_lines(store))
    assert "1 corrections applied" in text
    assert "R1  order_item_number '9' → '1'  report done" in text
    assert "Reports the partner recorded before a correction of their fields (not resent: decide with the partner):\n" \
           "  R1  order_item_number '9' → '1'  recorded" in text


# ── one return under two names: pushed without an id, listed under the partner's ──────────


def pushed(*items: tracker.ReturnItem) -> tracker.FeedPage:
    """What the API commits for pushed returns: a page without a cursor, from a key."""
    shipments = dict.fromkeys(i.shipment_number for i in items)
    return tracker.FeedPage(items=items, quarantined=(), next_cursor=None, has_more=False,
                            first_checks=tuple((s, 100.0) for s in shipments), source="order-system")


def without_id(order: str = "O1", line: str = "1", shipment: str = "S1") -> tracker.ReturnItem:
    return item(rid=f"order:{order}:{line}", order=order, line=line, shipment=shipment)


async def names(store: tracker.StateStore) -> list[tuple[str, str]]:
    return sorted(await store.db.query("SELECT name, return_id FROM return_names", ()))


async def test_a_feed_listing_of_a_pushed_order_item_is_a_second_name_of_it(backend: str) -> None:
    async with opened(backend) as store:
        await store.commit([pushed(without_id())], 1.0)
        result = await store.commit([page(item(rid="R1"))], 2.0)
        assert result.returns_added == 0 and await names(store) == [("R1", "order:O1:1")]
        assert [r["id"] for r in (await store.story("R1"))["returns"]] == ["order:O1:1"]


async def test_two_partner_returns_of_one_order_item_take_the_pushed_one_once(backend: str) -> None:
    async with opened(backend) as store:
        await store.commit([pushed(without_id())], 1.0)
        await store.commit([page(item(rid="R1"))], 2.0)
        result = await store.commit([page(item(rid="R2", shipment="S2"))], 3.0)
        assert result.returns_added == 1 and result.corrections == ()  # R2 is a return of its own
        assert await names(store) == [("R1", "order:O1:1")]


async def test_a_push_without_id_matching_two_partner_returns_is_a_return_of_its_own(backend: str) -> None:
    async with opened(backend) as store:
        await store.commit([page(item(rid="R1"), item(rid="R2", shipment="S2"))], 1.0)
        result = await store.commit([pushed(without_id())], 2.0)
        assert result.returns_added == 1 and await names(store) == []  # which one it is cannot be told


async def test_both_names_of_one_order_item_in_one_push_are_one_return(backend: str) -> None:
    async with opened(backend) as store:
        result = await store.commit([pushed(without_id(), item(rid="R1"))], 1.0)
        assert result.returns_added == 1 and await names(store) == [("order:O1:1", "R1")]
        assert (await store.counts())["returns"] == 1


async def test_a_corrected_order_item_loses_the_name_it_was_matched_by(backend: str) -> None:
    async with opened(backend) as store:
        await store.commit([page(item(rid="R1"))], 1.0)
        await store.commit([pushed(without_id())], 2.0)  # a second name of R1
        await store.commit([page(item(rid="R1", line="2"))], 3.0)  # the partner corrects R1's order item
        assert await names(store) == []
        result = await store.commit([pushed(without_id())], 4.0)  # order item 1 again: not R1 any more
        assert result.returns_added == 1 and result.corrections == ()


async def test_a_broken_relisting_under_a_second_name_stays_in_quarantine(backend: str) -> None:
    broken = tracker.QuarantinedItem(return_id="R1", reason="order_number is null", raw='{"id": "R1"}')
    async with opened(backend) as store:
        await store.commit([pushed(without_id())], 1.0)
        await store.commit([page(item(rid="R1"))], 2.0)
        for at in (3.0, 4.0):  # listed broken twice
            await store.commit([page(quarantined=(broken,))], at)
        assert (await store.counts())["quarantine.open"] == 1
        story = await store.story("order:O1:1")
        assert [q["reason"] for q in story["quarantine"]] == ["order_number is null"]
