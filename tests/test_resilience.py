"""The partner-protection primitives on their own: adaptive rate, circuit breaker, retry budget,
priority slots."""

import asyncio
import time

import pytest

import tracker
from tracker import AdaptiveRate, CircuitBreaker, CircuitState, Endpoint, Outcome, Reply


def reply(outcome: Outcome, retry_after: float | None = None) -> Reply:
    return Reply(Endpoint.TRACKING, outcome, None, None, retry_after, 0.01)


def busy(rate: AdaptiveRate) -> AdaptiveRate:
    """As if callers were queueing for the rate (they are, under a backlog)."""
    rate._last_wait = time.monotonic()
    return rate


# ── adaptive rate ───────────────────────────────────────────────────────────────────────────

def test_the_rate_starts_well_below_the_cap_and_never_exceeds_it() -> None:
    rate = busy(AdaptiveRate(200.0))
    assert rate.rate == 20.0
    for _ in range(10_000):
        rate.observe(Outcome.OK, 0.01)
    assert rate.rate == 200.0


def test_slow_start_adds_one_call_per_second_for_every_answered_call() -> None:
    rate = busy(AdaptiveRate(1000.0))
    for _ in range(50):
        rate.observe(Outcome.NOT_FOUND, 0.01)  # a 404 is an answer too: the partner keeps up
    assert rate.rate == pytest.approx(150.0)


def test_the_rate_does_not_grow_while_nobody_waits_for_it() -> None:
    rate = AdaptiveRate(1000.0)  # answers arrive, but no caller ever had to wait for a slot
    for _ in range(500):
        rate.observe(Outcome.OK, 0.01)
    assert rate.rate == 100.0


def test_a_429_cuts_the_rate_once_for_one_congestion_event() -> None:
    rate = busy(AdaptiveRate(1000.0))
    for _ in range(100):
        rate.observe(Outcome.OK, 0.01)
    before = rate.rate
    rate.observe(Outcome.RATE_LIMITED, 0.01)
    assert rate.rate == pytest.approx(before * 0.8) and not rate.slow_start
    rate.observe(Outcome.RATE_LIMITED, 0.01)  # an answer to a call sent before the cut
    assert rate.rate == pytest.approx(before * 0.8)


def test_a_lone_timeout_does_not_cut_the_rate_but_a_second_one_soon_after_does() -> None:
    rate = busy(AdaptiveRate(1000.0))
    for _ in range(100):
        rate.observe(Outcome.OK, 0.01)
    before = rate.rate
    rate.observe(Outcome.TIMEOUT, 2.0)  # one hanging call: that call's fault, not congestion
    assert rate.rate == before
    for _ in range(tracker.AdaptiveRate.TIMEOUT_WINDOW - 2):
        rate.observe(Outcome.SERVER_ERROR, 0.01)  # neither grows nor cuts
    rate.observe(Outcome.TIMEOUT, 2.0)
    assert rate.rate == pytest.approx(before * 0.8)


def test_timeouts_far_apart_never_cut_the_rate() -> None:
    rate = busy(AdaptiveRate(1000.0))
    for _ in range(5):
        rate.observe(Outcome.TIMEOUT, 2.0)
        for _ in range(tracker.AdaptiveRate.TIMEOUT_WINDOW):
            rate.observe(Outcome.SERVER_ERROR, 0.01)
    assert rate.rate == 100.0 and rate.slow_start


def test_after_the_first_cut_growth_is_additive() -> None:
    rate = busy(AdaptiveRate(1000.0))
    rate.observe(Outcome.RATE_LIMITED, 0.01)
    cut = rate.rate
    for _ in range(int(cut)):  # about one second of calls at this rate
        rate.observe(Outcome.OK, 0.01)
    assert cut < rate.rate < cut * 1.1


def test_far_below_its_recent_peak_the_rate_doubles_again() -> None:
    rate = busy(AdaptiveRate(1000.0))
    for _ in range(400):
        rate.observe(Outcome.OK, 0.01)  # slow start up to 500
    for _ in range(6):  # a storm: cut after cut
        rate._calm_after = 0.0
        rate.observe(Outcome.RATE_LIMITED, 0.01)
    low = rate.rate
    assert low < 500 / 2
    for _ in range(int(low)):  # about one second of calls once the storm is over
        rate.observe(Outcome.OK, 0.01)
    # doubling took it back to half its peak (500) within that second; additive from there on
    assert 500 / 2 <= rate.rate < 2 * low


def test_server_errors_neither_grow_nor_cut_the_rate() -> None:
    rate = AdaptiveRate(100.0)
    for _ in range(20):
        rate.observe(Outcome.SERVER_ERROR, 0.01)
    assert rate.rate == 10.0


def test_rising_latency_cuts_the_rate() -> None:
    rate = busy(AdaptiveRate(1000.0))
    for _ in range(40):
        rate.observe(Outcome.OK, 0.03)
    peak = rate.rate
    for _ in range(tracker.AdaptiveRate.LATENCY_WINDOW):
        rate.observe(Outcome.OK, 0.3)
    assert rate.rate < peak


def test_calls_whose_slots_share_a_tick_go_out_together() -> None:
    rate = AdaptiveRate(1000.0)
    rate.rate = 1000.0  # a slot every millisecond
    now = 100.0045  # mid-tick
    waits = [rate.reserve(now) for _ in range(3000)]
    assert waits == sorted(waits)
    assert sum(1 for w in waits if w <= 0) <= 1000 * AdaptiveRate.TICK_S + 1  # only this tick's slots now
    # one wake-up time per tick, not one per caller
    assert len({round(w, 6) for w in waits}) <= 3000 * (0.001 / AdaptiveRate.TICK_S) + 2


def test_ticks_never_let_more_than_the_rate_through_in_a_second() -> None:
    rate = AdaptiveRate(1000.0)
    rate.rate = 1000.0
    waits = [rate.reserve(100.0045) for _ in range(5000)]
    for start in (0.0, 0.5, 1.0, 2.5):  # any one-second window, as a partner's limiter counts
        assert sum(1 for w in waits if start <= w < start + 1.0) <= 1000 * (1 + AdaptiveRate.TICK_S) + 1


def test_a_caller_that_finds_no_queue_goes_at_once_and_does_not_count_as_waiting() -> None:
    rate = AdaptiveRate(1000.0)
    assert rate.reserve(time.monotonic()) <= 0
    assert rate._last_wait == float("-inf")


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
