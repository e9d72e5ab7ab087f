"""The daemon against each shape of rate limit real partners keep: a short burst over real HTTP
against the stand-in, the limit unpublished (limits.rate_per_s four times above it). Each run must
lose nothing, report nothing early, keep 429s rare and find the limit. How fast and how fully is
bench/rate_limit.py's to measure (speed is not checked by timed tests)."""

import math
from pathlib import Path

import pytest

import standin
import tracker
from conftest import (assert_nothing_lost_nothing_early, everything_reported, ledger_of, make_config,
                      run_daemon_until, scenario)

LIMIT = 100.0

SHAPES = {
    "bucket 0.1 s": {"limiter": "bucket", "bucket_depth_s": 0.1},
    "bucket 1 s": {"limiter": "bucket", "bucket_depth_s": 1.0},
    "window 1 s": {"limiter": "window"},
    "shared": {"limiter": "bucket", "bucket_depth_s": 1.0, "limit_shared": True},
    "changing": {"limiter": "bucket", "bucket_depth_s": 1.0, "limit_schedule": ((3.0, LIMIT / 3), (6.0, LIMIT))},
}


@pytest.mark.parametrize("shape", SHAPES)
async def test_a_burst_against_each_limiter_shape_finds_the_limit_and_loses_nothing(
        shape: str, start_partner, db_path: Path) -> None:
    faults = standin.Faults(latency_ms=(5, 20), rate_limit_per_s=LIMIT, **SHAPES[shape])
    partner = start_partner(scenario(returns=600, arrive_over_s=0.5, step_s=(0.01, 0.02), cancel_share=0.0,
                                     faults=faults))
    config = make_config(db_path, partner.url,
                         limits=tracker.LimitsConfig(concurrency=32, rate_per_s=4 * LIMIT))
    daemon = await run_daemon_until(config, everything_reported(partner, db_path), timeout_s=60)
    ledger = await ledger_of(partner)
    assert_nothing_lost_nothing_early(ledger)
    use = standin.limit_use(ledger, faults, page_size=config.partner.page_size)
    # A six-second burst: start-up's refused calls weigh more than over the benchmark's bursts.
    assert use.refused_share <= 0.08, use
    assert use.to_90_s is not None, use  # the limit was reached, not just approached
    measured = daemon.metrics.registry.get_sample_value("tracker_partner_limit_measured_per_second",
                                                        {"endpoint": "results"})
    if shape == "shared":  # the reports' share of one limit: what tracking left them
        assert 0 < measured <= LIMIT * 1.1
    elif shape == "changing":  # down to a third and back within the burst: the drop was followed
        assert use.follow_s[0][1] is not None and use.follow_s[0][1] <= 5.0, use
    else:
        assert measured == pytest.approx(LIMIT, rel=0.15), (shape, measured)


def test_limit_use_reads_a_callers_burst_from_the_ledger() -> None:
    """The yardstick itself: a caller at exactly the limit from its first call is at the floor, holds
    100% of the limit and reached 90% in its first second."""
    faults = standin.Faults(rate_limit_per_s=10.0)
    tenths = {str(t): [1, 0] for t in range(10, 110)}  # 1.0 s → 11.0 s, 10 calls a second
    summary = {"first_call_s": 1.0, "last_recorded_s": 11.0, "feed_entries": 0, "boxes": 0, "expected": 100,
               "by_tenth": {"results": tenths}}
    use = standin.limit_use(summary, faults)
    assert use.floor_s == pytest.approx(10.0, abs=0.02)
    assert use.against_floor == pytest.approx(1.0, abs=0.01)
    assert use.refused_share == 0.0
    assert use.to_90_s == pytest.approx(1.0)
    assert math.isclose(use.share, 1.0, rel_tol=0.01)
