"""The stand-in does what the contract allows the partner to do, corrections included: it must, or
the daemon's handling of them is never exercised (a stand-in that relisted only identical copies is
how dropped corrections went unnoticed)."""

import asyncio
import hashlib
import json

import aiohttp
import pytest

import standin
from conftest import TOKEN, scenario


def world(**overrides: object) -> tuple[list[standin.Box], dict[str, list[tuple[float, dict]]]]:
    boxes, feed = standin.build_world(scenario(returns=2000, **overrides))
    return boxes, standin.versions_by_return(feed)


def test_a_reissued_waybill_ends_cancelled_and_its_items_are_relisted_with_the_new_one() -> None:
    boxes, versions = world(reissue_share=0.2)
    by_shipment = {b.shipment_number: b for b in boxes}
    reissued = [b for b in boxes if b.shipment_number + "R" in by_shipment]
    assert len(reissued) > 50
    for old in reissued:
        new = by_shipment[old.shipment_number + "R"]
        assert old.final_status == "cancelled" and old.items == []
        assert old.timeline[-1][0] == new.timeline[0][0]  # the new waybill starts as the old one ends
        for item in new.items:
            first, *later = versions[item["id"]]
            assert first[1]["shipment_number"] == old.shipment_number
            assert later and later[-1][1]["shipment_number"] == new.shipment_number
            assert later[-1][0] > old.timeline[-1][0]  # relisted after the old box closed


def test_a_typo_fix_can_arrive_before_or_after_the_box_is_collected() -> None:
    boxes, versions = world(fix_share=0.2, correction_delay_s=(0.05, 3.0))
    box_end = {b.shipment_number: b.ends_at for b in boxes}
    fixed = [v for v in versions.values() if len(v) > 1]
    assert len(fixed) > 200
    assert all(v[0][1]["order_number"] + v[0][1]["order_item_number"] !=
               v[-1][1]["order_number"] + v[-1][1]["order_item_number"] for v in fixed)
    after_close = [v for v in fixed if v[-1][0] > box_end[v[-1][1]["shipment_number"]]]
    assert 0 < len(after_close) < len(fixed)


def test_a_broken_correction_is_listed_but_corrects_nothing() -> None:
    _, feed = standin.build_world(scenario(returns=2000, fix_share=0.2, broken_correction_share=1.0))
    versions = standin.versions_by_return(feed)
    broken = [item for _, item in feed if item.get("id") in versions and not standin.usable(item)]
    assert len(broken) > 200
    assert all(all(standin.usable(v) for _, v in versions[item["id"]]) for item in broken)


def test_scenarios_without_corrections_play_the_same_world_as_before_they_existed() -> None:
    """Benchmarks compare runs across versions: a scenario that asks for no corrections must draw
    the same world from its seed as the stand-in did before corrections existed."""
    _, feed = standin.build_world(standin.Scenario(seed=1, returns=3000))
    assert hashlib.sha256(json.dumps(feed).encode()).hexdigest()[:16] == "0c70cf4aa7421cf3"


async def test_the_ledger_refuses_a_report_carrying_fields_a_correction_has_replaced() -> None:
    partner = standin.StandIn(scenario(returns=200, fix_share=1.0, correction_delay_s=(0.0, 0.001),
                                       step_s=(0.01, 0.02)))
    await partner.start()
    try:
        while not partner.finished:
            await asyncio.sleep(0.05)
        return_id, versions = next(iter(partner.versions.items()))
        old, new = versions[0][1], versions[-1][1]
        box = partner.by_shipment[new["shipment_number"]]
        delivered_at = next(standin.iso(at) for at, status in box.timeline if status == "delivered")

        async def post(item: dict) -> int:
            body = {k: item[k] for k in ("order_number", "order_item_number", "shipment_number")}
            async with aiohttp.ClientSession() as http, http.post(
                    partner.url + "/results", json={**body, "result": "collected", "collected_at": delivered_at},
                    headers={"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": return_id}) as resp:
                return resp.status

        assert box.final_status == "delivered"
        assert await post(old) == 422
        assert partner.ledger.stale == [return_id]
        assert await post(new) == 200
        assert partner.superseded() == []
    finally:
        await partner.stop()


# ── the rate limit's shapes ─────────────────────────────────────────────────────────────────

def admitted(limiter: standin.RateLimiter, calls: list[tuple[float, str]]) -> list[bool]:
    """Each (time, endpoint) call judged on a clock that is the given times."""
    return [limiter.admit(endpoint, at, clock=at) for at, endpoint in calls]


def test_a_full_token_bucket_lets_its_depth_through_at_once_then_its_rate() -> None:
    limiter = standin.RateLimiter(standin.Faults(rate_limit_per_s=100, limiter="bucket", bucket_depth_s=2.0))
    burst = admitted(limiter, [(10.0, "tracking")] * 250)
    assert sum(burst) == 200  # two seconds' worth at once
    later = admitted(limiter, [(10.0 + k / 1000, "tracking") for k in range(1, 1001)])  # 1,000 calls/s for 1 s
    assert sum(later) == pytest.approx(100, abs=1)


def test_a_fixed_window_lets_n_through_per_clock_second_however_they_bunch() -> None:
    limiter = standin.RateLimiter(standin.Faults(rate_limit_per_s=50, limiter="window"))
    end_of_one = admitted(limiter, [(3.99, "results")] * 60)
    start_of_next = admitted(limiter, [(4.0, "results")] * 60)
    assert sum(end_of_one) == sum(start_of_next) == 50  # 100 within 10 ms, across the boundary


def test_a_ten_second_window_lets_its_calls_through_at_once_then_none_until_the_next() -> None:
    limiter = standin.RateLimiter(standin.Faults(rate_limit_per_s=50, limiter="window", window_s=10.0))
    first = admitted(limiter, [(20.0 + k / 100, "results") for k in range(600)])  # 100 calls/s for 6 s
    rest_of_it = admitted(limiter, [(29.9, "results")] * 10)
    next_window = admitted(limiter, [(30.0, "results")] * 10)
    assert sum(first) == 500 and all(first[:500]) and sum(rest_of_it) == 0 and sum(next_window) == 10


def test_an_anchored_window_starts_at_the_first_call_after_the_last_one_ended() -> None:
    limiter = standin.RateLimiter(standin.Faults(rate_limit_per_s=50, limiter="anchored"))
    first = admitted(limiter, [(3.7, "results")] * 60)
    at_the_clocks_second = admitted(limiter, [(4.0, "results")] * 10)  # a clock's window would reset here
    at_its_own_end = admitted(limiter, [(4.7, "results")] * 60)
    assert sum(first) == 50 and sum(at_the_clocks_second) == 0 and sum(at_its_own_end) == 50


def test_a_sliding_window_lets_n_through_in_any_span_of_its_length() -> None:
    limiter = standin.RateLimiter(standin.Faults(rate_limit_per_s=50, limiter="sliding"))
    late = admitted(limiter, [(3.9, "results")] * 50)
    across = admitted(limiter, [(4.1, "results")] * 50)  # a clock's window would let 50 more through
    after = admitted(limiter, [(4.95, "results")] * 60)
    assert sum(late) == 50 and sum(across) == 0 and sum(after) == 50


def test_a_stepped_bucket_is_refilled_by_a_windows_calls_at_each_windows_start_up_to_its_depth() -> None:
    limiter = standin.RateLimiter(standin.Faults(rate_limit_per_s=50, limiter="stepped", bucket_depth_s=2.0))
    full = admitted(limiter, [(10.5, "results")] * 150)
    within = admitted(limiter, [(10.9, "results")] * 10)  # no refill until the next second begins
    next_second = admitted(limiter, [(11.0, "results")] * 60)
    later = admitted(limiter, [(15.5, "results")] * 150)  # idle seconds refill it to its depth, no more
    assert (sum(full), sum(within), sum(next_second), sum(later)) == (100, 0, 50, 100)


def test_a_shared_limit_counts_every_endpoint_together() -> None:
    limiter = standin.RateLimiter(standin.Faults(rate_limit_per_s=50, limiter="window", limit_shared=True))
    calls = [(1.5, "tracking")] * 30 + [(1.5, "results")] * 30
    assert sum(admitted(limiter, calls)) == 50
    separate = standin.RateLimiter(standin.Faults(rate_limit_per_s=50, limiter="window"))
    assert sum(admitted(separate, calls)) == 60


def test_a_scheduled_limit_changes_when_the_scenario_says() -> None:
    limiter = standin.RateLimiter(standin.Faults(rate_limit_per_s=90, limit_schedule=((5.0, 30), (9.0, 90))))
    assert [limiter.limit_at(t) for t in (0.0, 4.9, 5.0, 8.9, 9.0)] == [90, 90, 30, 30, 90]


def test_an_unknown_limiter_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="limiter"):
        standin.Faults(limiter="leaky")
