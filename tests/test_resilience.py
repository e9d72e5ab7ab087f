"""The partner-protection primitives on their own: adaptive rate, circuit breaker, retry budget,
priority slots."""

import asyncio
import dataclasses
import heapq
import math
import random
import time
from typing import Any

import pytest

import standin
import tracker
from tracker import AdaptiveRate, CircuitBreaker, CircuitState, Endpoint, Outcome, Reply


def reply(outcome: Outcome, retry_after: float | None = None) -> Reply:
    return Reply(endpoint=Endpoint.TRACKING, outcome=outcome, status=None, body=None, retry_after=retry_after,
                 latency_s=0.01)


# ── adaptive rate: a simulated partner ──────────────────────────────────────────────────────
# The controller on a simulated clock against the stand-in's own limiters: callers release tick by
# tick as acquire() releases them, the limiter judges each call, a 429 comes back in a millisecond
# and an accepted call after the partner's latency.

LIMIT = 300.0


@dataclasses.dataclass
class Drive:
    calls: list[tuple[float, str, bool]]  # (sent at, endpoint, let through)
    phases: list[tuple[float, str, tracker.RatePhase]]  # (when, endpoint, phase entered)
    held: list[tuple[float, str, float]]  # (when, endpoint, the rate a hold held until its probe)
    seconds: int

    def per_second(self, endpoint: str = "results") -> list[tuple[int, int]]:
        """(let through, refused) in each whole second."""
        seconds = [[0, 0] for _ in range(self.seconds)]
        for at, e, through in self.calls:
            if e == endpoint and at < self.seconds:
                seconds[int(at)][0 if through else 1] += 1
        return [(through, refused) for through, refused in seconds]

    def holds(self, after_s: float = 0.0) -> list[float]:
        """The rates held until a probe, for the holds that ended after `after_s`."""
        return [rate for at, _, rate in self.held if at >= after_s]

    def refused_share(self) -> float:
        return sum(1 for _, _, through in self.calls if not through) / len(self.calls)


def drive(rates: dict[str, AdaptiveRate], faults: standin.Faults, seconds: float, *,
          demand_until: dict[str, float] | None = None, seed: int = 1) -> Drive:
    """Every endpoint's callers queue for the whole run (or until demand_until[endpoint])."""
    rng, limiter = random.Random(seed), standin.RateLimiter(faults)
    events: list[tuple[float, int, str, float, bool]] = [(0.0, 0, e, 0.0, True) for e in rates]
    calls: list[tuple[float, str, bool]] = []
    phases: list[tuple[float, str, tracker.RatePhase]] = []
    held: list[tuple[float, str, float]] = []
    holding = {e: r.rate for e, r in rates.items()}
    seen = {e: r.phase for e, r in rates.items()}
    while events:
        now, kind, endpoint, sent_at, through = heapq.heappop(events)
        if now > seconds:
            break
        rate = rates[endpoint]
        if kind == 0:  # a tick: release every caller whose slot has come
            if now > (demand_until or {}).get(endpoint, math.inf):
                continue
            while rate._due(now) <= 0:
                rate._take(now, queued=True)
                rate.sent(now)
                through = limiter.admit(endpoint, now, clock=now)
                calls.append((now, endpoint, through))
                answer_in = rng.uniform(0.02, 0.08) if through else 0.001
                heapq.heappush(events, (now + answer_in, 1, endpoint, now, through))
            heapq.heappush(events, (now + min(max(rate._due(now), 1e-4), AdaptiveRate.TICK_S), 0, endpoint, 0.0, True))
        else:
            rate.observe(Outcome.OK if through else Outcome.RATE_LIMITED, sent_at, now)
        if rate.phase is not seen[endpoint]:
            if seen[endpoint] is tracker.RatePhase.HOLD and rate.phase is tracker.RatePhase.PROBE:
                held.append((now, endpoint, holding[endpoint]))
            seen[endpoint] = rate.phase
            phases.append((now, endpoint, rate.phase))
        holding[endpoint] = rate.rate
    return Drive(calls, phases, held, int(seconds))


def alone(faults: standin.Faults, seconds: float, cap: float = 4 * LIMIT) -> tuple[AdaptiveRate, Drive]:
    rate = AdaptiveRate(cap)
    return rate, drive({"results": rate}, faults, seconds)


def limited(**shape: Any) -> standin.Faults:
    return standin.Faults(rate_limit_per_s=LIMIT, **shape)


def reserve(rate: AdaptiveRate, now: float) -> float:
    """Take the next slot as a caller arriving at `now` would; how long it waits (≤ 0: it goes)."""
    wait = rate._due(now)
    rate._take(now, queued=wait > 0)
    return wait


# ── adaptive rate: growing ──────────────────────────────────────────────────────────────────

def test_the_rate_starts_at_a_tenth_of_its_cap_and_doubles_every_doubling_period_while_callers_queue() -> None:
    rate, _ = alone(standin.Faults(), AdaptiveRate.DOUBLING_S * 2)
    assert rate.phase is tracker.RatePhase.STARTUP
    assert rate.rate == pytest.approx(4 * LIMIT / 10 * 4, rel=0.05)


def test_the_rate_never_exceeds_its_cap() -> None:
    rate, run = alone(standin.Faults(), 6.0, cap=500.0)
    assert rate.rate == 500.0
    assert all(through <= 500 * (1 + AdaptiveRate.TICK_S) + 1 for through, _ in run.per_second()[1:])


def test_the_rate_does_not_grow_while_no_caller_waits_for_it() -> None:
    rate = AdaptiveRate(1000.0)
    for k in range(500):  # one call every 20 ms: each finds its slot free
        assert reserve(rate, k * 0.02) <= 0
    assert rate.rate == 100.0 and rate.phase is tracker.RatePhase.STARTUP


# ── adaptive rate: measuring the limit, by the limiter's shape ─────────────────────────────

def test_a_fixed_windows_429s_hold_the_rate_just_under_its_n() -> None:
    rate, run = alone(limited(limiter="window"), 20.0)
    assert all(0.95 * LIMIT <= held <= LIMIT for held in run.holds(after_s=5.0)), run.holds(after_s=5.0)
    held = run.per_second()[3:]
    assert all(through >= 0.95 * LIMIT for through, _ in held), held
    assert sum(refused for _, refused in held) <= 0.02 * sum(through for through, _ in held)


def test_a_window_spent_early_is_waited_out_with_a_trickle_not_a_stream_of_refused_calls() -> None:
    rate, run = alone(limited(limiter="window"), 4.0)
    waited = [at for at, _, phase in run.phases if phase is tracker.RatePhase.WAIT]
    assert waited  # the start-up overshot and spent a window
    spent = next(refused for _, refused in run.per_second() if refused)
    assert spent <= AdaptiveRate.REFUSED_RUN + AdaptiveRate.TRICKLE * LIMIT + 5
    after_reset = run.holds(after_s=waited[0])[0]
    assert 0.93 * LIMIT <= after_reset <= LIMIT  # the reset's count, not the overshoot's


def test_a_long_windows_wait_is_trickled_ever_slower_not_at_a_steady_rate() -> None:
    _, run = alone(limited(limiter="window", window_s=10.0), 40.0)
    seconds = run.per_second()
    waiting = [refused for through, refused in seconds if not through]  # the seconds of a spent window
    waits = sum(1 for k, (through, _) in enumerate(seconds) if not through and (k == 0 or seconds[k - 1][0]))
    assert waits >= 3 and len(waiting) >= 3 * waits  # windows spent, each waited out for seconds
    # a steady trickle (a twentieth of the second before, ~50 calls/s) refused some 250 a wait
    assert sum(waiting) <= 35 * waits, waiting
    assert run.refused_share() <= 0.025


def test_a_window_longer_than_a_second_is_measured_over_its_whole_length() -> None:
    _, run = alone(limited(limiter="window", window_s=10.0), 40.0)
    holds = run.holds(after_s=10.0)
    assert holds and all(0.93 * LIMIT <= held <= LIMIT for held in holds), holds
    _, run = alone(limited(limiter="window", window_s=3.0), 40.0)  # nor a length seen before
    assert sum(through for through, _ in run.per_second()[5:]) >= 0.85 * LIMIT * 35


def test_a_sliding_log_is_held_at_its_count_not_at_the_echo_of_the_ramp_before_it() -> None:
    _, run = alone(limited(limiter="sliding"), 20.0)
    held = run.per_second()[3:]
    assert sum(through for through, _ in held) >= 0.93 * LIMIT * len(held), held
    assert run.refused_share() <= 0.02


def test_a_deep_bucket_is_measured_by_its_refill_rate_not_by_its_burst() -> None:
    rate, run = alone(limited(limiter="bucket", bucket_depth_s=2.0), 20.0)
    assert max(through for through, _ in run.per_second()) > 1.5 * LIMIT  # the burst was taken
    assert all(0.93 * LIMIT <= held <= LIMIT for held in run.holds(after_s=4.0)), run.holds(after_s=4.0)
    held = run.per_second()[4:]
    assert sum(through for through, _ in held) >= 0.95 * LIMIT * len(held), held
    assert run.refused_share() <= 0.02


@pytest.mark.parametrize("depth_s", [0.1, 0.5, 1.0, 2.0])
def test_any_bucket_depth_is_reached_within_five_seconds_and_held_at_95_percent_with_2_percent_429s(
        depth_s: float) -> None:
    _, run = alone(limited(limiter="bucket", bucket_depth_s=depth_s), 20.0)
    seconds = run.per_second()
    assert next(k for k, (through, _) in enumerate(seconds) if through >= 0.9 * LIMIT) < 5
    assert sum(through for through, _ in seconds[5:]) >= 0.95 * LIMIT * len(seconds[5:]), seconds
    assert run.refused_share() <= 0.02


def test_a_limit_cut_to_a_third_is_followed_within_five_seconds_and_so_is_its_return() -> None:
    schedule = ((8.0, LIMIT / 3), (16.0, LIMIT))
    _, run = alone(limited(limiter="bucket", bucket_depth_s=1.0, limit_schedule=schedule), 24.0)
    seconds = run.per_second()

    def followed_by(change_at: float, limit: float) -> int:
        return next(k for k in range(int(change_at), len(seconds))
                    if seconds[k][0] >= 0.9 * limit and seconds[k][1] <= 0.05 * sum(seconds[k]))

    assert followed_by(8.0, LIMIT / 3) - 8 <= 4  # the whole second after the change counts: < 5 s
    assert followed_by(16.0, LIMIT) - 16 <= 4
    assert all(through <= LIMIT / 3 * 1.1 for through, _ in seconds[10:16])  # no creeping above it


def test_a_limit_shared_by_the_endpoints_is_shared_and_the_room_one_leaves_is_taken() -> None:
    rates = {"tracking": AdaptiveRate(4 * LIMIT), "results": AdaptiveRate(4 * LIMIT)}
    faults = limited(limiter="bucket", bucket_depth_s=1.0, limit_shared=True)
    run = drive(rates, faults, 14.0, demand_until={"tracking": 6.0})
    both = [t + r for (t, _), (r, _) in zip(run.per_second("tracking"), run.per_second("results"), strict=False)]
    assert all(total >= 0.9 * LIMIT for total in both[2:6])
    results = run.per_second("results")
    assert next(k for k in range(6, len(results)) if results[k][0] >= 0.9 * LIMIT) - 6 <= 3
    assert run.refused_share() <= 0.03


def test_a_probe_that_draws_no_429_for_a_whole_window_means_the_limit_rose() -> None:
    rate, run = alone(limited(limiter="window", limit_schedule=((6.0, 2 * LIMIT),)), 12.0, cap=8 * LIMIT)
    assert all(0.95 * 2 * LIMIT <= held <= 2 * LIMIT for held in run.holds(after_s=9.0)), run.holds(after_s=9.0)
    rose = [at for at, _, phase in run.phases if phase is tracker.RatePhase.STARTUP and at > 6.0]
    assert rose and rose[0] - 6.0 <= AdaptiveRate.HOLD_S + AdaptiveRate.PROBE_S + 0.5


# ── adaptive rate: other signals ────────────────────────────────────────────────────────────

def held_at(measured: float) -> AdaptiveRate:
    """A rate holding just under a limit it measured, callers queued."""
    rate = AdaptiveRate(1000.0)
    rate.measured = measured
    rate._settle(AdaptiveRate.MARGIN * measured, now=0.0)
    return rate


def test_rising_latency_without_any_429_cuts_the_rate_by_a_tenth() -> None:
    rate = held_at(300.0)
    before = rate.rate
    for k in range(AdaptiveRate.LATENCY_WINDOW):
        rate.observe(Outcome.OK, 1.0 + k * 0.01, 1.0 + k * 0.01 + 0.03)
    assert rate.rate == before
    for k in range(AdaptiveRate.LATENCY_WINDOW):
        rate.observe(Outcome.OK, 2.0 + k * 0.01, 2.0 + k * 0.01 + 0.3)
    assert rate.rate == pytest.approx(before * AdaptiveRate.DECREASE_ON_LATENCY)


def test_a_lone_timeout_does_not_cut_the_rate_but_a_second_one_soon_after_does() -> None:
    rate = held_at(300.0)
    before = rate.rate
    rate.observe(Outcome.TIMEOUT, 1.0, 3.0)  # one hanging call: that call's fault, not congestion
    assert rate.rate == before
    for k in range(AdaptiveRate.TIMEOUT_WINDOW - 2):
        rate.observe(Outcome.SERVER_ERROR, 3.0 + k * 0.01, 3.01 + k * 0.01)  # neither grows nor cuts
    rate.observe(Outcome.TIMEOUT, 3.5, 5.5)
    assert rate.rate == pytest.approx(before * AdaptiveRate.DECREASE_ON_TIMEOUT)


def test_timeouts_far_apart_never_cut_the_rate() -> None:
    rate = held_at(300.0)
    before = rate.rate
    for k in range(5):
        rate.observe(Outcome.TIMEOUT, k * 10.0, k * 10.0 + 2.0)
        for j in range(AdaptiveRate.TIMEOUT_WINDOW):
            rate.observe(Outcome.SERVER_ERROR, k * 10.0 + 3.0 + j * 0.01, k * 10.0 + 3.01 + j * 0.01)
    assert rate.rate == before


def test_answers_to_calls_sent_before_a_cut_do_not_cut_again() -> None:
    rate = held_at(300.0)
    rate._settle(rate.rate * AdaptiveRate.DECREASE_ON_TIMEOUT, now=5.0)
    cut = rate.rate
    for k in range(AdaptiveRate.LATENCY_WINDOW * 2):  # slow answers, but to calls sent before the cut
        rate.observe(Outcome.OK, 4.9, 5.0 + k * 0.01)
    rate.observe(Outcome.TIMEOUT, 4.9, 6.0)
    rate.observe(Outcome.TIMEOUT, 4.9, 6.1)
    assert rate.rate == cut


# ── adaptive rate: pacing ───────────────────────────────────────────────────────────────────

def fixed(calls_per_s: float) -> AdaptiveRate:
    """A rate held where it is (no caller queues long enough to end the hold)."""
    rate = AdaptiveRate(calls_per_s)
    rate._enter(tracker.RatePhase.HOLD, calls_per_s)
    return rate


def test_calls_whose_slots_share_a_tick_go_out_together() -> None:
    rate = fixed(1000.0)  # a slot every millisecond
    now = 100.0045  # mid-tick
    waits = [reserve(rate, now) for _ in range(3000)]
    assert waits == sorted(waits)
    assert sum(1 for w in waits if w <= 0) <= 1000 * AdaptiveRate.TICK_S + 1  # only this tick's slots now
    # one wake-up time per tick, not one per caller
    assert len({round(w, 6) for w in waits}) <= 3000 * (0.001 / AdaptiveRate.TICK_S) + 2


def test_ticks_never_let_more_than_the_rate_through_in_a_second() -> None:
    rate = fixed(1000.0)
    waits = [reserve(rate, 100.0045) for _ in range(5000)]
    for start in (0.0, 0.5, 1.0, 2.5):  # any one-second window, as a partner's limiter counts
        assert sum(1 for w in waits if start <= w < start + 1.0) <= 1000 * (1 + AdaptiveRate.TICK_S) + 1


async def test_callers_queue_in_order_and_a_higher_rate_releases_the_queue_sooner() -> None:
    rate = fixed(1.0)  # a slot a second
    rate.max_rate = 1000.0
    order: list[int] = []

    async def call(k: int) -> None:
        await rate.acquire()
        order.append(k)

    started = time.monotonic()
    callers = [asyncio.create_task(call(k)) for k in range(5)]
    await asyncio.sleep(0)  # all five in the queue; the first went at once
    rate._settle(1000.0, time.monotonic())
    await asyncio.wait_for(asyncio.gather(*callers), timeout=2.0)
    assert order == [0, 1, 2, 3, 4]
    assert time.monotonic() - started < 1.0  # not the four seconds the old rate had spaced them


async def test_a_cancelled_caller_leaves_the_queue() -> None:
    rate = fixed(20.0)
    first = asyncio.create_task(rate.acquire())
    cancelled = asyncio.create_task(rate.acquire())
    last = asyncio.create_task(rate.acquire())
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.wait_for(asyncio.gather(first, last), timeout=2.0)
    assert cancelled.cancelled()


# ── circuit breaker ─────────────────────────────────────────────────────────────────────────

class Recorder:
    def __init__(self) -> None:
        self.changes: list[tuple[CircuitState, CircuitState]] = []

    def __call__(self, breaker: CircuitBreaker, previous: CircuitState, _why: str) -> None:
        self.changes.append((previous, breaker.state))


def fast_breaker(changes: Recorder) -> CircuitBreaker:
    breaker = CircuitBreaker(Endpoint.TRACKING, changes)
    breaker.OPEN_BASE_S, breaker.OPEN_MAX_S = 0.05, 0.4
    breaker._open_s = breaker.OPEN_BASE_S
    return breaker


async def test_consecutive_failures_open_the_circuit() -> None:
    changes = Recorder()
    breaker = fast_breaker(changes)
    for _ in range(CircuitBreaker.CONSECUTIVE_FAILURES):
        breaker.record(reply(Outcome.SERVER_ERROR), probe=False)
    assert breaker.state is CircuitState.OPEN
    assert changes.changes == [(CircuitState.CLOSED, CircuitState.OPEN)]


async def test_a_failure_rate_over_the_window_opens_the_circuit() -> None:
    breaker = fast_breaker(Recorder())
    for i in range(CircuitBreaker.MIN_CALLS):
        breaker.record(reply(Outcome.TIMEOUT if i % 2 else Outcome.OK), probe=False)
    assert breaker.state is CircuitState.OPEN


async def test_429s_and_answered_errors_do_not_open_the_circuit() -> None:
    breaker = fast_breaker(Recorder())
    for outcome in [Outcome.RATE_LIMITED, Outcome.NOT_FOUND, Outcome.REFUSED, Outcome.CONFLICT] * 10:
        breaker.record(reply(outcome), probe=False)
    assert breaker.state is CircuitState.CLOSED


async def test_while_open_calls_wait_then_one_probe_at_a_time_goes_out() -> None:
    breaker = fast_breaker(Recorder())
    for _ in range(5):
        breaker.record(reply(Outcome.CONNECTION), probe=False)
    opened = time.monotonic()
    waiters = {asyncio.create_task(breaker.admit()) for _ in range(3)}
    done, pending = await asyncio.wait(waiters, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    assert time.monotonic() - opened >= 0.04  # nobody went before the open period ended
    assert len(done) == 1 and done.pop().result() is True  # exactly one probe
    assert breaker.state is CircuitState.HALF_OPEN
    done, pending = await asyncio.wait(pending, timeout=0.1)
    assert not done  # the others wait while the probe is out
    breaker.record(reply(Outcome.OK), probe=True)
    done, pending = await asyncio.wait(pending, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1 and done.pop().result() is True  # the next probe, again only one
    for task in pending:
        task.cancel()


async def test_successful_probes_close_the_circuit_and_a_failed_one_reopens_it_for_longer() -> None:
    changes = Recorder()
    breaker = fast_breaker(changes)
    for _ in range(5):
        breaker.record(reply(Outcome.SERVER_ERROR), probe=False)
    assert await asyncio.wait_for(breaker.admit(), 5)
    breaker.record(reply(Outcome.SERVER_ERROR), probe=True)
    assert breaker.state is CircuitState.OPEN and breaker._open_s == pytest.approx(0.1)
    for _ in range(CircuitBreaker.PROBES_TO_CLOSE):
        assert await asyncio.wait_for(breaker.admit(), 5)
        breaker.record(reply(Outcome.OK), probe=True)
    assert breaker.state is CircuitState.CLOSED
    assert await breaker.admit() is False  # closed: calls flow, no probes
    assert changes.changes[0] == (CircuitState.CLOSED, CircuitState.OPEN)
    assert changes.changes[-1] == (CircuitState.HALF_OPEN, CircuitState.CLOSED)


async def test_the_partners_retry_after_keeps_the_circuit_open_at_least_that_long() -> None:
    breaker = fast_breaker(Recorder())
    for _ in range(4):
        breaker.record(reply(Outcome.SERVER_ERROR), probe=False)
    breaker.record(reply(Outcome.SERVER_ERROR, retry_after=30.0), probe=False)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(breaker.admit(), 0.3)


async def test_a_cancelled_probe_lets_another_go() -> None:
    breaker = fast_breaker(Recorder())
    for _ in range(5):
        breaker.record(reply(Outcome.SERVER_ERROR), probe=False)
    assert await asyncio.wait_for(breaker.admit(), 5)
    breaker.abandon_probe()
    assert await asyncio.wait_for(breaker.admit(), 5) is True


# ── retry budget ────────────────────────────────────────────────────────────────────────────

def test_while_failing_retries_are_capped_at_a_fifth_of_recent_calls_plus_an_allowance() -> None:
    budget = tracker.RetryBudget()
    for i in range(100):
        budget.record(retry=False, failed=i % 2 == 0)  # half of the calls fail
    allowed = 0
    while budget.allows_retry():
        budget.record(retry=True, failed=True)
        allowed += 1
    # a retry goes while retries so far < 5 + 0.2 × (100 + retries so far), i.e. for 0..31
    assert allowed == 32


def test_a_quiet_endpoint_may_still_retry() -> None:
    budget = tracker.RetryBudget()
    assert budget.allows_retry()


def test_while_healthy_retries_are_ordinary_calls() -> None:
    budget = tracker.RetryBudget()
    for _ in range(100):
        budget.record(retry=True, failed=False)  # after a storm: everything is a retry, and succeeds
    assert budget.allows_retry()


# ── priority slots ──────────────────────────────────────────────────────────────────────────

async def test_waiting_calls_get_slots_by_priority_then_arrival() -> None:
    slots = tracker.PrioritySemaphore(1)
    order: list[str] = []
    gate = asyncio.Event()

    async def call(name: str, priority: int) -> None:
        await slots.acquire(priority)
        try:
            order.append(name)
            await gate.wait()
        finally:
            slots.release()

    holder = asyncio.create_task(call("holder", 1))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(call(name, p)) for name, p in
               [("feed", 2), ("track-a", 1), ("report", 0), ("track-b", 1)]]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(holder, *waiting)
    assert order == ["holder", "report", "track-a", "track-b", "feed"]


async def test_a_cancelled_waiter_does_not_lose_the_slot() -> None:
    slots = tracker.PrioritySemaphore(1)
    await slots.acquire(0)
    waiter = asyncio.create_task(slots.acquire(1))
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    slots.release()
    async with asyncio.timeout(1):
        await slots.acquire(2)  # the slot came back: a lost one would wait here forever
