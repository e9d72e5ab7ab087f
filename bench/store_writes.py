"""The SQLite side of a burst alone: what the writer thread spends on the burst's transitions.

30,000 returns (two items a box) go into a fresh database through `Store.commit` the way the daemon
writes them — feed pages of 500, then every box delivered and every report done, in batches of 50
transitions, boxes and reports in shuffled order — and the writer thread's CPU time is printed.
No partner, no event-loop work to speak of: a schema or statement change shows here without the
burst's noise.

    .venv/bin/python bench/store_writes.py [--returns 30000] [--repeat 3] [--webhooks]

--webhooks: one endpoint taking every event, as a [[webhook]] does: each box delivered announces
its returns (the outbox), and each delivery's accepted answer is written, in batches of 50.
"""

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tracker  # noqa: E402
from burst import cpu_seconds  # noqa: E402  (bench/ is this script's directory, first on sys.path)

BATCH = 50
PAGE_SIZE = 500


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds of each of this process's threads, by thread id."""
    return {task.name: cpu_seconds(task / "stat") for task in Path(f"/proc/{os.getpid()}/task").iterdir()}


async def write_burst(db_path: str, returns: int, webhooks: bool) -> tuple[float, int]:
    """The writer thread's CPU seconds for the burst's transitions, and the transactions committed."""
    store = await tracker.Store.open(db_path)
    if webhooks:
        await store.commit([tracker.WebhookEndpoints(endpoints=(("refunds", tracker.WEBHOOK_EVENTS, 0.0),))],
                           time.time())
        store.announces = True
    before = thread_cpu_seconds()
    shuffle = random.Random(1).shuffle
    now = time.time()
    items = [tracker.ReturnItem(id=f"RET_{i:08d}", order_number=f"O-{i // 2:08d}", order_item_number=str(i % 2 + 1),
                                shipment_number=f"SHP_{i // 2:08d}",
                                requested_at="2026-11-24T09:00:00Z") for i in range(returns)]
    transactions: list[Sequence[tracker.Transition]] = []
    for start in range(0, returns, PAGE_SIZE):
        page = items[start:start + PAGE_SIZE]
        first_checks = tuple({item.shipment_number: now for item in page}.items())
        transactions.append([tracker.FeedPage(items=tuple(page), quarantined=(), next_cursor=f"cursor-{start}",
                                              has_more=True, first_checks=first_checks)])
    boxes = sorted({item.shipment_number for item in items})
    shuffle(boxes)
    delivered = [tracker.BoxUpdate(shipment_number=box, state=tracker.BoxState.DELIVERED, next_check_at=None,
                                   not_found=0, errors=0, registered=True, last_status="delivered",
                                   delivered_at="2026-11-24T10:00:00Z") for box in boxes]
    reports = [item.id for item in items]
    shuffle(reports)
    done = [tracker.ReportUpdate(return_id=rid, state=tracker.ReportState.DONE, next_attempt_at=None,
                                 outcome="recorded", last_error=None) for rid in reports]
    accepted = [tracker.DeliveryUpdate(id=f"refunds return.collected:{rid}", endpoint="refunds",
                                       state=tracker.DeliveryState.DELIVERED, next_attempt_at=None, http_status=204)
                for rid in reports] if webhooks else []
    for updates in (delivered, done, accepted):
        transactions += [updates[start:start + BATCH] for start in range(0, len(updates), BATCH)]
    try:
        for n, transitions in enumerate(transactions):
            await store.commit(transitions, now + n * 0.01)  # each its own time, as the daemon's commits
        after = thread_cpu_seconds()  # before close: the threads end with their connections
    finally:
        await store.close()
    spent = sorted((after[tid] - before.get(tid, 0.0) for tid in after if tid != str(os.getpid())), reverse=True)
    return spent[0], len(transactions)  # the writer; the reader thread is idle here


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--returns", type=int, default=30_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--webhooks", action="store_true")
    args = parser.parse_args()
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="tracker-bench-writes-") as work:
            cpu, transactions = asyncio.run(write_burst(os.path.join(work, "tracker.db"), args.returns, args.webhooks))
        print(f"{args.returns:,} returns{' with webhooks' if args.webhooks else ''}, {transactions:,} transactions: "
              f"SQLite writer thread {cpu:.2f} CPU-s",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
