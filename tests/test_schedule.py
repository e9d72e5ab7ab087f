"""The tracking schedule on the real time scale: every status a box passes through is recorded;
what the histories show decides when a box is asked again; `replay` runs those decisions on a
virtual clock. Synthetic histories here stand for days of real pickups."""

import asyncio
import datetime as dt
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
import zoneinfo
from pathlib import Path

import prometheus_client
import pytest

import tracker
from conftest import (ROOT, counts_in, everything_reported, make_config, run_daemon_until, running_daemon, scenario,
                      wait_until)

D = 900.0
ANY = tracker.ANY_STATUS
CONFIG = tracker.ScheduleConfig(detect_within_s=D, track_every_s=D, timezone="Asia/Seoul")
MONDAY = dt.datetime(2026, 11, 9, tzinfo=zoneinfo.ZoneInfo("Asia/Seoul")).timestamp()  # a Monday, 00:00


def at(day: int, hour: float) -> float:
    """Seconds of the week of MONDAY: day 0 is Monday, local time."""
    return MONDAY + day * 86400 + hour * 3600


def history(*steps: tuple[str, float]) -> tuple[tracker.StatusChange, ...]:
    return tuple(tracker.StatusChange(status=status, at=when) for status, when in steps)


def taught(histories: Sequence[Sequence[tracker.StatusChange]]) -> tracker.TrackingSchedule:
    schedule = tracker.TrackingSchedule(CONFIG)
    for each in histories:
        schedule.learn(each, each[-1].at)
    return schedule


def interval(schedule: tracker.TrackingSchedule, status: str, entered: float, now: float,
             shipment: str = "SHP_1") -> float:
    return schedule.next_check(shipment, status, entered, now) - now


def a_fleet(histories: Sequence[Sequence[tracker.StatusChange]] = ()) -> tracker.TrackingSchedule:
    """A schedule tracking 10,000 boxes: one in SENTINEL_EVERY keeps the cadence while quiet."""
    schedule = taught(histories)
    schedule.tracked = 10_000
    return schedule


def quiet_night(schedule: tracker.TrackingSchedule, day: int) -> None:
    """QUIET_MIN_CHECKS answers from 20:00 on `day` in which nobody leaves `requested`."""
    for k in range(tracker.QUIET_MIN_CHECKS):
        schedule.learn(history(("requested", at(day, 20))), at(day, 20) + k)


def a_sentinel(schedule: tracker.TrackingSchedule, sentinel: bool = True) -> str:
    return next(n for n in (f"SHP_{k}" for k in range(10_000)) if schedule.is_sentinel(n) == sentinel)


def pickups(n: int, assigned_h: float, picked_h: float, collect_min: float, day: int = 0) -> list[tuple]:
    """n boxes requested at 08:00, assigned, picked up and collected at these local hours."""
    return [history(("requested", at(day, 8)), ("assigned", at(day, assigned_h)),
                    ("picking_up", at(day, picked_h) + 60 * k),
                    ("delivered", at(day, picked_h) + 60 * (k + collect_min)))
            for k in range(n)]


# ── what it decides ─────────────────────────────────────────────────────────────────────────


def test_with_no_history_it_asks_at_the_fixed_cadence() -> None:
    schedule = tracker.TrackingSchedule(CONFIG)
    for status in ("requested", "assigned", "picking_up", "held_at_depot"):
        assert 0.9 * D <= interval(schedule, status, at(0, 9), at(0, 10)) <= 1.1 * D


def test_a_box_just_assigned_waits_while_one_picking_up_is_asked_at_the_cadence() -> None:
    schedule = taught(pickups(60, assigned_h=9, picked_h=10, collect_min=90))
    assigned = interval(schedule, "assigned", at(0, 9), at(0, 9.1))
    picking_up = interval(schedule, "picking_up", at(0, 10), at(0, 10.1))
    assert assigned >= 0.9 * (D + 80 * 60)  # at least the shortest collection seen, then the cadence
    assert 0.9 * D <= picking_up <= 1.1 * (D + 90 * 60)


def test_a_learned_night_shift_is_waited_for_in_the_afternoon_and_watched_at_night() -> None:
    night = taught(pickups(60, assigned_h=12, picked_h=22, collect_min=60))
    afternoon = interval(night, "assigned", at(0, 12), at(0, 14.2))
    assert afternoon >= 7 * 3600  # nobody has ever been picked up before 22:00
    assert interval(night, "picking_up", at(0, 22.5), at(0, 22.6)) <= 1.1 * D + 3600


def test_a_burst_is_first_asked_no_sooner_than_anything_can_have_come_near_delivery() -> None:
    assert tracker.TrackingSchedule(CONFIG).first_check_in() == CONFIG.track_every_s  # no history: as always
    schedule = taught(pickups(60, assigned_h=9, picked_h=10, collect_min=90))
    assert schedule.first_check_in() >= D + 89 * 60  # requested → … → picking_up took 90 minutes at least


def test_a_status_nobody_leaves_is_asked_less_and_less_while_a_sentinel_keeps_the_cadence() -> None:
    schedule = a_fleet()
    quiet_night(schedule, 0)
    later = at(0, 23)
    other, sentinel = a_sentinel(schedule, False), a_sentinel(schedule)
    assert interval(schedule, "requested", at(0, 20), later, other) >= 0.9 * 3 * 3600
    assert interval(schedule, "requested", at(0, 20), later, sentinel) <= 1.1 * D


def test_one_box_in_sentinel_every_is_a_sentinel_and_a_small_fleet_has_more() -> None:
    schedule = tracker.TrackingSchedule(CONFIG)
    names = [f"SHP_{k}" for k in range(20_000)]
    for tracked, share in ((100_000, 1 / tracker.SENTINEL_EVERY), (200, tracker.SENTINELS_AT_LEAST / 200)):
        schedule.tracked = tracked
        sentinels = sum(schedule.is_sentinel(n) for n in names)
        assert share * 0.8 <= sentinels / len(names) <= share * 1.2
    schedule.tracked = tracker.SENTINELS_AT_LEAST
    assert all(schedule.is_sentinel(n) for n in names[:100])  # a fleet this small keeps the cadence


def test_a_status_never_seen_before_does_not_end_the_fleets_quiet_but_a_delivery_does() -> None:
    schedule = a_fleet()
    quiet_night(schedule, 0)
    # sentinels are there to see the first delivery; a new status alone says nothing about haste
    assert ANY not in schedule.learn(history(("requested", at(0, 20)), ("assigned", at(1, 7))), at(1, 7.1))
    woken = schedule.learn(history(("requested", at(0, 20)), ("assigned", at(1, 7)), ("picking_up", at(1, 9)),
                                   ("delivered", at(1, 10))), at(1, 10.1))
    assert ANY in woken


def test_a_box_on_its_last_mile_is_watched_even_while_the_fleet_is_quiet() -> None:
    schedule = a_fleet(pickups(60, assigned_h=9, picked_h=10, collect_min=90))  # picking_up: the last mile
    quiet_night(schedule, 1)  # then a long night in which nobody comes near delivery
    other = a_sentinel(schedule, False)
    later = at(2, 6)
    assert interval(schedule, "requested", at(1, 20), later, other) >= 3 * 3600  # the quiet holds these back
    assert interval(schedule, "picking_up", at(2, 5.9), later, other) <= 1.1 * (D + 90 * 60)  # not this one


def test_the_first_box_seen_leaving_a_quiet_status_wakes_every_box_in_it() -> None:
    schedule = a_fleet()
    quiet_night(schedule, 0)
    woken = schedule.learn(history(("requested", at(0, 20)), ("assigned", at(1, 7))), at(1, 7.1))
    assert "requested" in woken
    assert schedule.learn(history(("requested", at(0, 20)), ("assigned", at(1, 7.05))), at(1, 7.2)) == []  # once


def test_a_withdrawal_wakes_nobody() -> None:
    schedule = a_fleet()
    quiet_night(schedule, 0)
    assert schedule.learn(history(("requested", at(0, 20)), ("cancelled", at(1, 2))), at(1, 2.1)) == []


def test_slow_deliveries_learned_last_do_not_crowd_the_quick_ones_of_the_same_hour_out() -> None:
    # boxes assigned in the same minutes; the quick ones are delivered (and learned) that day, the
    # slow ones two days later: what a box assigned then can expect is the quick ones' lead
    quick = [history(("assigned", at(0, 9) + 20 * k), ("picking_up", at(0, 10)), ("delivered", at(0, 11)))
             for k in range(tracker.LEAD_CELL_SAMPLES)]
    slow = [history(("assigned", at(0, 9) + 20 * k + 10), ("picking_up", at(2, 10)), ("delivered", at(2, 11)))
            for k in range(tracker.LEAD_CELL_SAMPLES)]
    schedule = taught(quick + slow)
    assert interval(schedule, "assigned", at(7, 9), at(7, 9.01)) <= 1.1 * (D + 2 * 3600)


def test_no_box_waits_longer_than_the_quiet_cap_whatever_was_learned() -> None:
    night = taught(pickups(60, assigned_h=9, picked_h=22, collect_min=60))  # assigned: 13 hours before delivery
    assert interval(night, "assigned", at(0, 9), at(0, 9.1)) <= 1.1 * (D + tracker.QUIET_CAP_S)


def test_restart_keeps_what_was_learned(db_path: Path) -> None:
    learned = pickups(60, assigned_h=12, picked_h=22, collect_min=60)
    original = taught(learned)

    async def record_and_restore() -> tracker.TrackingSchedule:
        store = await tracker.Store.open(str(db_path))
        try:
            items = tuple(tracker.ReturnItem(id=f"R{k}", order_number="O", order_item_number="1",
                                             shipment_number=f"S{k}", requested_at=None) for k in range(len(learned)))
            first_checks = tuple((f"S{k}", 0.0) for k in range(len(learned)))
            await store.commit([tracker.FeedPage(items=items, quarantined=(), next_cursor="c", has_more=False,
                                                 first_checks=first_checks)], time.time())
            await store.commit([tracker.BoxUpdate(shipment_number=f"S{k}", state=tracker.BoxState.DELIVERED,
                                                  next_check_at=None, not_found=0, errors=0, registered=True,
                                                  last_status="delivered",
                                                  delivered_at="2026-11-09T00:00:00Z", history=tuple(h))
                                for k, h in enumerate(learned)], time.time())
            restarted = tracker.TrackingSchedule(CONFIG)
            restarted.restore(await store.closed_histories(time.time() - 86400))
            return restarted
        finally:
            await store.close()

    restarted = asyncio.run(record_and_restore())
    for now in (at(0, 14.2), at(0, 21)):
        assert abs(interval(restarted, "assigned", at(0, 12), now) - interval(original, "assigned", at(0, 12), now)) \
            <= 0.25 * interval(original, "assigned", at(0, 12), now)
    assert interval(restarted, "assigned", at(0, 12), at(0, 14.2)) >= 7 * 3600


async def test_the_daemon_tells_the_schedule_how_many_boxes_it_tracks(start_partner, db_path: Path) -> None:
    # sentinels are a share of the boxes tracked: the count is what keeps a small fleet watched
    partner = start_partner(scenario(returns=40, cancel_share=0.0, step_s=(60.0, 90.0)))

    async def schedule_counts_the_tracked_boxes() -> bool:
        schedule = daemon.tracking_schedule
        if schedule is None:  # not started yet
            return False
        tracking = (await counts_in(db_path)).get("boxes.tracking", 0)
        return tracking > 0 and schedule.tracked == tracking

    async with running_daemon(make_config(db_path, partner.url)) as daemon:
        await wait_until(schedule_counts_the_tracked_boxes, 20.0, what="the schedule's count of tracked boxes")


# ── what it records ─────────────────────────────────────────────────────────────────────────


async def test_every_status_a_box_passes_through_is_recorded_with_the_partners_time(start_partner,
                                                                                      db_path: Path) -> None:
    partner = start_partner(scenario(returns=60, cancel_share=0.0, step_s=(0.3, 0.5)))
    daemon = await run_daemon_until(make_config(db_path, partner.url), everything_reported(partner, db_path))
    box = partner.call(lambda: partner.standin.boxes[0])
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute("SELECT status, changed_at, seen_at FROM box_history WHERE shipment_number = ?"
                            " ORDER BY changed_at", (box.shipment_number,)).fetchall()
        since = conn.execute("SELECT status_since FROM boxes WHERE shipment_number = ?",
                             (box.shipment_number,)).fetchone()[0]
    expected = [(status, tracker.unix_seconds(tracker_iso(t))) for t, status in box.timeline]
    assert [(status, changed) for status, changed, _ in rows] == expected
    assert all(seen >= changed for _, changed, seen in rows)  # seen no earlier than it happened
    assert since == rows[-1][1]
    exposition = prometheus_client.generate_latest(daemon.metrics.registry).decode()
    assert "tracker_delivery_detect_delay_seconds_count" in exposition
    count = next(float(line.split()[-1]) for line in exposition.splitlines()
                 if line.startswith("tracker_delivery_detect_delay_seconds_count"))
    assert count == partner.ledger()["boxes"]


def tracker_iso(t: float) -> str:
    import standin
    return standin.iso(t)


async def test_a_box_keeps_at_most_history_per_box_entries(db_path: Path) -> None:
    store = await tracker.Store.open(str(db_path))
    try:
        await store.commit([tracker.FeedPage(items=(tracker.ReturnItem(id="R1", order_number="O",
                                                                       order_item_number="1", shipment_number="S1",
                                                                       requested_at=None),), quarantined=(),
                                                                       next_cursor="c", has_more=False,
                                             first_checks=(("S1", 0.0),))], 1.0)
        entries = history(*[("assigned" if k % 2 else "picking_up", 1000.0 + k) for k in range(40)])
        for first in range(0, 40, 10):
            await store.commit([tracker.BoxUpdate(shipment_number="S1", state=tracker.BoxState.TRACKING,
                                                  next_check_at=5.0, not_found=0, errors=0, registered=True,
                                                  last_status="assigned",
                                                  history=entries[first:first + 10])], 2.0)
        rows = await store.db.query(
            "SELECT changed_at FROM box_history WHERE shipment_number = 'S1' ORDER BY changed_at", ())
    finally:
        await store.close()
    assert [r[0] for r in rows] == [e.at for e in entries[-tracker.HISTORY_PER_BOX:]]


def test_an_answer_adds_only_the_entries_newer_than_those_recorded() -> None:
    body = {"data": [{"shipment_number": "S", "return_status": s, "updated_at": t} for s, t in (
        ("requested", "2026-11-24T09:00:00Z"), ("assigned", "2026-11-24T10:00:00Z"),
        ("picking_up", "2026-11-24T11:00:00Z"))]}
    since = tracker.unix_seconds("2026-11-24T10:00:00Z")
    assert [c.status for c in tracker.parse_history(body, since)] == ["picking_up"]
    assert [c.status for c in tracker.parse_history(body, None)] == ["requested", "assigned", "picking_up"]


async def test_a_woken_status_makes_its_boxes_due_within_the_spread_and_no_others(db_path: Path) -> None:
    store = await tracker.Store.open(str(db_path))
    try:
        items = tuple(tracker.ReturnItem(id=f"R{k}", order_number="O", order_item_number="1", shipment_number=f"S{k}",
                                         requested_at=None) for k in range(3))
        await store.commit([tracker.FeedPage(items=items, quarantined=(), next_cursor="c", has_more=False,
                                             first_checks=tuple((f"S{k}", 0.0) for k in range(3)))], 1.0)
        await store.commit([tracker.BoxUpdate(shipment_number="S0", state=tracker.BoxState.TRACKING, next_check_at=1e9,
                                              not_found=0, errors=0, registered=True, last_status="requested"),
                            tracker.BoxUpdate(shipment_number="S1", state=tracker.BoxState.TRACKING, next_check_at=1e9,
                                              not_found=0, errors=0, registered=True, last_status="assigned"),
                            tracker.BoxUpdate(shipment_number="S2", state=tracker.BoxState.TRACKING,
                                              next_check_at=1000.5, not_found=0, errors=0, registered=True,
                                              last_status="requested")], 1.0)
        await store.commit([tracker.WakeBoxes(status="requested", spread_s=60.0)], 1000.0)
        due = dict(await store.db.query("SELECT shipment_number, next_check_at FROM boxes", ()))
    finally:
        await store.close()
    assert 1000.0 <= due["S0"] <= 1060.0
    assert due["S1"] == 1e9 and due["S2"] == 1000.5


# ── replay ──────────────────────────────────────────────────────────────────────────────────


def write_timelines(path: Path, boxes: int = 40) -> None:
    """A small event: requested Friday evening, picked up Saturday late morning, one never registered."""
    lines = []
    for k in range(boxes):
        requested = at(4, 20) + 10 * k
        registered = None if k == 0 else requested + 600
        events = [{"status": "requested", "at": requested}]
        if registered is not None:
            events += [{"status": "assigned", "at": at(5, 8) + 60 * k},
                       {"status": "picking_up", "at": at(5, 10) + 60 * k},
                       {"status": "delivered", "at": at(5, 11.5) + 60 * k}]
        lines.append(json.dumps({"shipment_number": f"SHP_{k:07d}", "items": 1, "requested_at": requested,
                                 "registered_at": registered, "events": events}))
    path.write_text("\n".join(lines) + "\n")


def run_replay(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "tracker.py"), "replay", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def test_replay_prints_a_summary_and_one_json_object_as_its_last_line(tmp_path: Path) -> None:
    write_timelines(tmp_path / "t.jsonl")
    result = run_replay("t.jsonl", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    *summary, last = result.stdout.strip().splitlines()
    assert any("learned schedule" in line for line in summary) and any("fixed every" in line for line in summary)
    report = json.loads(last)
    assert report["boxes"] == 40 and report["delivered"] == 39 and report["fixed"]["delivered"] == 39
    assert report["undetected"] == 0 and report["calls"] > 0
    assert set(report["detect_delay_s"]) == {"p50", "p95", "p99", "max"}
    assert report["fixed"]["detect_delay_s"]["max"] <= 1.2 * D + 1  # fixed polling notices within its cadence
    assert report["calls_per_box"] < report["fixed"]["calls_per_box"]


@pytest.mark.parametrize(("content", "message"), [
    ('{"shipment_number": "S"}\n', "events"),
    ("not json\n", "not pickup timelines"),
])
def test_replay_of_a_file_that_is_not_timelines_says_so_and_exits_1(tmp_path: Path, content: str,
                                                                     message: str) -> None:
    (tmp_path / "t.jsonl").write_text(content)
    result = run_replay("t.jsonl", cwd=tmp_path)
    assert result.returncode == 1 and message in result.stderr and result.stdout == ""
