#!/usr/bin/env python3
"""What one sleep-and-wake costs this machine in CPU time, doing nothing else.

On bare metal a thread that sleeps and wakes is charged a few microseconds. On some VMs it is
charged tens to hundreds, and then every event-loop pass, thread hand-off and blocking read is
expensive: a daemon whose calls trickle in one at a time pays it per call, and CPU figures from
such a VM carry that cost (see docs/performance.md).

    .venv/bin/python bench/wakeup_cost.py
"""

import asyncio
import functools
import resource
import select
import time
from collections.abc import Awaitable, Callable


class Charge:
    """CPU time and its user/system split over a block, per wake-up."""

    def __init__(self, label: str, wakeups: int) -> None:
        self.label, self.wakeups = label, wakeups

    def __enter__(self) -> "Charge":
        self.usage, self.cpu = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
        return self

    def __exit__(self, *_: object) -> None:
        cpu, usage = time.process_time() - self.cpu, resource.getrusage(resource.RUSAGE_SELF)
        per = 1e6 / self.wakeups
        user, system = usage.ru_utime - self.usage.ru_utime, usage.ru_stime - self.usage.ru_stime
        print(f"  {self.label:<24}{cpu * per:7.1f} µs CPU per wake-up"
              f"   (user {user * per:.1f}, system {system * per:.1f})")


def blocking(label: str, wait: Callable[[], object], count: int) -> None:
    with Charge(label, count):
        for _ in range(count):
            wait()


async def in_event_loop(label: str, wait: Callable[[], Awaitable[object]], count: int) -> None:
    with Charge(label, count):
        for _ in range(count):
            await wait()


def main() -> None:
    print("CPU time charged for one sleep and wake-up, with nothing else to do:")
    poller = select.epoll()
    for period in (0.001, 0.01):
        count, ms = int(1 / period), f"{period * 1000:g} ms"
        blocking(f"time.sleep({ms})", functools.partial(time.sleep, period), count)
        blocking(f"epoll.poll({ms})", functools.partial(poller.poll, period), count)
        asyncio.run(in_event_loop(f"asyncio.sleep({ms})", functools.partial(asyncio.sleep, period), count))


if __name__ == "__main__":
    main()
