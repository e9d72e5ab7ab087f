#!/usr/bin/env python3
"""Benchmark (issue 25): webhooks during a 30,000-return burst, on SQLite.

  on/off   the usual burst (bench/burst.py's partner) with one [[webhook]] endpoint taking every
           event, and without one, interleaved over --rounds rounds: the median of the rounds'
           wall ratios (daemon start to every report recorded; min–max); p99 over all rounds from
           the tracker noticing a box `delivered` (its status history's seen_at) to the receiver
           accepting the return's return.collected; the CPU per delivery (the daemon's and its
           webhooks' process's with the endpoint, less the daemon's without, per delivery
           accepted) against the CPU per partner call (CPU without / the partner's calls).
  down     the same burst with the receiver down (connections refused) for --down-s seconds from
           its first delivery, retry_schedule_s = [0, 5, 10, 10, …]: once it is back, every event
           announced meanwhile accepted within one retry interval (10 s); none under two ids.

The receiver runs in this process on loopback: a minimal HTTP/1.1 server answering 204, keeping
each webhook-id's first acceptance time, and verifying one delivery in VERIFY_EVERY with the
`standardwebhooks` library (the tests verify every one; here the receiver's CPU would be taken
from the daemon it measures, on the same two cores).

    .venv/bin/python bench/webhooks.py                  both (about 6 minutes)
    .venv/bin/python bench/webhooks.py --runs down

Targets (issue 25): p99 ≤ 2 s; the burst's wall within 10% of the same burst without webhooks;
CPU per delivery no more than per partner call; down: every event within one retry interval of
the receiver's return, none under two ids. Exit status 0 only when all are met.
"""

import argparse
import asyncio
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import standardwebhooks

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import burst  # noqa: E402
import standin  # noqa: E402
import tracker  # noqa: E402

RETURNS = 30_000
VERIFY_EVERY = 50
RETRY_INTERVAL_S = 10.0
DOWN_SCHEDULE = [0.0, 5.0] + [RETRY_INTERVAL_S] * 40


class Receiver:
    """The shop's receiver: webhook-id → when first accepted (time.time(), the tracker's clock too)."""

    def __init__(self, secret: str) -> None:
        self.verifier = standardwebhooks.Webhook(secret)
        self.accepted: dict[str, float] = {}
        self.requests = self.bad_signatures = 0
        self.first_at: float | None = None
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Down: the listener closed and every connection cut, so the tracker's next try is refused."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await asyncio.gather(*self._handlers)
            await self._server.wait_closed()
            self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (line.partition(":") for line in head.decode("latin-1").split("\r\n")[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                self.requests += 1
                if self.requests % VERIFY_EVERY == 0:
                    try:
                        self.verifier.verify(body, headers)
                    except standardwebhooks.webhooks.WebhookVerificationError:
                        self.bad_signatures += 1
                now = time.time()
                self.first_at = self.first_at or now
                self.accepted.setdefault(headers["webhook-id"], now)
                writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            self._handlers.discard(handler)
            writer.close()

    def of_type(self, kind: str) -> dict[str, float]:
        """subject → first accepted at, for the events of this type."""
        found = {}
        for msg_id, at in self.accepted.items():
            event_type, _, subject = urllib.parse.unquote(msg_id.removeprefix("evt_")).partition(":")
            if event_type == kind:
                found[subject] = at
        return found


class Run:
    """One burst: the stand-in, the daemon (with the receiver's endpoint or without), the wall to
    every report recorded, the daemon's CPU then and once every collection was accepted."""

    def __init__(self, workdir: Path, receiver: Receiver | None, schedule: list[float] | None = None) -> None:
        self.workdir, self.receiver = workdir, receiver
        self.listen = f"127.0.0.1:{burst.free_port()}"
        self.partner, self.info = burst.start_standin(RETURNS, 0.0)
        config: dict[str, Any] = burst.daemon_config(self.info["url"], self.listen, 0.0)
        # The stand-in's clock starts days before ours, so every pickup of its burst would be
        # overdue at once: 15,000 pickup.overdue no real sales event announces.
        config["schedule"]["overdue_after_s"] = 30 * 86400.0
        self.env = {**os.environ, tracker.ENV_TOKEN: self.info["token"]}
        if receiver is not None:
            # cancels announced at once: the hold (15 min by default) waits for reissues the
            # stand-in's burst has none of
            webhook: dict[str, Any] = {"name": "refunds", "url": receiver.url, "timeout_s": 5.0,
                                       "cancel_hold_s": 0.0}
            if schedule:
                webhook["retry_schedule_s"] = schedule
            config["webhook"] = [webhook]
            self.env[tracker.ENV_WEBHOOK_SECRET + "REFUNDS"] = SECRET
        (workdir / "config.toml").write_text(standin.daemon_config_toml(config, "written by bench/webhooks.py"))
        self.process: subprocess.Popen[bytes] | None = None
        self.wall = self.cpu = self.helper_cpu = self.busy = 0.0
        self.commits = (0.0, 0.0)
        self.calls = 0

    async def burst(self, during: Any = None) -> None:
        started, machine = time.monotonic(), burst.machine_cpu()
        with open(self.workdir / "tracker.log", "ab") as log:
            profiler = (["-m", "cProfile", "-o", os.environ["BENCH_PROFILE"] + ("-on" if self.receiver else "-off")]
                        if os.environ.get("BENCH_PROFILE") else [])
            self.process = subprocess.Popen(
                [sys.executable, *profiler, str(ROOT / "tracker.py"), "run", "--config",
                 str(self.workdir / "config.toml")],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir)
        await asyncio.to_thread(burst.wait_until_listening, self.process, self.listen)
        side = asyncio.create_task(during()) if during is not None else None
        while True:
            ledger = await asyncio.to_thread(standin.read_ledger, self.info["root"])
            if ledger["finished"] and ledger["missing"] == 0:
                break
            if self.process.poll() is not None:
                raise SystemExit(f"the daemon exited; see {self.workdir / 'tracker.log'}")
            await asyncio.sleep(0.5)  # a benchmark's sampling period, not synchronisation
        self.wall, self.busy = time.monotonic() - started, burst.busy_share(machine)
        self.commits = await asyncio.to_thread(burst.scrape_commits, self.listen)
        self.calls = sum(sum(c.values()) for c in ledger["calls"].values())
        self.measure_cpu()
        if side is not None:
            await side

    async def every_collection_accepted(self, deadline_s: float = 120.0) -> None:
        """Until the receiver holds a return.collected for every reported return; the CPU then."""
        assert self.receiver is not None and self.process is not None
        reported = len(self.reported())
        deadline = time.monotonic() + deadline_s
        while len(self.receiver.of_type("return.collected")) < reported and time.monotonic() < deadline:
            await asyncio.sleep(0.2)  # a benchmark's sampling period
        self.measure_cpu()
        if os.environ.get("BENCH_THREADS"):
            for task in sorted(Path(f"/proc/{self.process.pid}/task").iterdir()):
                print(f"    thread {task.name} {(task / 'comm').read_text().strip()}: "
                      f"{burst.cpu_seconds(task / 'stat'):.2f} CPU-s")

    def commit_line(self) -> str:
        count, seconds = self.commits
        return f"{count:,.0f} commits of {seconds / max(1.0, count) * 1000:.0f} ms"

    def measure_cpu(self) -> None:
        """The daemon's CPU and its webhooks' process's, which makes the deliveries."""
        assert self.process is not None
        helper = burst.helper_of(self.process.pid, tracker.WEBHOOK_PROCESS_COMMAND)
        self.helper_cpu = burst.cpu_and_peak_rss(helper)[0] if helper is not None else self.helper_cpu
        self.cpu = burst.cpu_and_peak_rss(self.process.pid)[0] + self.helper_cpu

    def reported(self) -> dict[str, float]:
        """return id → when the tracker noticed its box delivered (our clock), for every reported return."""
        with sqlite3.connect(f"file:{self.workdir / 'tracker.db'}?mode=ro", uri=True) as db:
            return dict(db.execute(
                "SELECT p.return_id, MIN(h.seen_at) FROM reports p JOIN box_history h ON h.shipment_number"
                " = p.shipment_number AND h.status = 'delivered' WHERE p.state = 'done' GROUP BY p.return_id"))

    def announced(self) -> dict[str, float]:
        """webhook-id → when the tracker announced the event (our clock)."""
        with sqlite3.connect(f"file:{self.workdir / 'tracker.db'}?mode=ro", uri=True) as db:
            return {tracker.webhook_id(event): at for event, at in db.execute(
                "SELECT id, created_at FROM webhook_events")}

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)
        self.partner.terminate()
        self.partner.wait(10)


SECRET = tracker.new_webhook_secret()


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 1000) - 1] if len(values) >= 1000 else max(values, default=0)


async def on_and_off(tmp: Path, rounds: int) -> bool:
    ratios, delays, cpu_per_delivery, cpu_per_call = [], [], [], []
    for round_ in range(rounds):
        measured: dict[bool, Run] = {}
        for with_hooks in ((False, True) if round_ % 2 == 0 else (True, False)):
            workdir = tmp / f"{round_}-{'on' if with_hooks else 'off'}"
            workdir.mkdir()
            receiver = Receiver(SECRET) if with_hooks else None
            if receiver is not None:
                await receiver.start()
            run = Run(workdir, receiver)
            try:
                await run.burst()
                if receiver is not None:
                    await run.every_collection_accepted()
                    accepted = receiver.of_type("return.collected")
                    delays += [accepted[r] - seen for r, seen in run.reported().items() if r in accepted]
                    if receiver.bad_signatures:
                        raise SystemExit(f"{receiver.bad_signatures} bad signatures")
            finally:
                run.stop()
                if receiver is not None:
                    await receiver.stop()
            measured[with_hooks] = run
        off, on = measured[False], measured[True]
        assert on.receiver is not None
        deliveries = on.receiver.requests
        ratios.append(on.wall / off.wall)
        cpu_per_delivery.append((on.cpu - off.cpu) / max(1, deliveries))
        cpu_per_call.append(off.cpu / max(1, off.calls))
        print(f"  round {round_ + 1}: off {off.wall:.1f} s {off.cpu:.1f} CPU-s {off.calls:,} partner calls, "
              f"{off.commit_line()}, the machine {off.busy:.0%} busy; on {on.wall:.1f} s {on.cpu:.1f} CPU-s "
              f"({on.helper_cpu:.1f} the webhooks' process), {on.commit_line()}, the machine {on.busy:.0%} busy, "
              f"{deliveries:,} deliveries "
              f"({len(on.receiver.of_type('return.collected')):,} return.collected)", flush=True)
    ratio, p99 = statistics.median(ratios), quantile(delays, 0.99)
    per_delivery, per_call = statistics.median(cpu_per_delivery), statistics.median(cpu_per_call)
    met = p99 <= 2.0 and ratio <= 1.10 and per_delivery <= per_call
    print(f"webhooks on/off   delivered noticed → return.collected accepted: p50 {quantile(delays, 0.5):.2f} s, "
          f"p99 {p99:.2f} s over {len(delays):,} (target ≤ 2 s); burst {ratio:.2f}× ({min(ratios):.2f}–"
          f"{max(ratios):.2f}) the burst without webhooks over {rounds} rounds (target ≤ 1.10); CPU a delivery "
          f"{per_delivery * 1000:.2f} ms, a partner call {per_call * 1000:.2f} ms (target: no more)   "
          f"{'met' if met else 'MISSED'}", flush=True)
    return met


async def receiver_down(tmp: Path, down_s: float) -> bool:
    workdir = tmp / "down"
    workdir.mkdir()
    receiver = Receiver(SECRET)
    await receiver.start()
    run = Run(workdir, receiver, DOWN_SCHEDULE)
    back_at = 0.0

    async def outage() -> None:
        nonlocal back_at
        while receiver.first_at is None:
            await asyncio.sleep(0.05)  # until the first delivery: the burst is under way
        await asyncio.sleep(1.0)
        await receiver.stop()
        await asyncio.sleep(down_s)  # the outage itself
        await receiver.start()
        back_at = time.time()

    try:
        await run.burst(during=outage)
        if back_at == 0.0:
            raise SystemExit("the burst ended before the receiver was taken down")
        await run.every_collection_accepted(deadline_s=down_s + 120)
        deadline = time.monotonic() + 60
        while len(receiver.accepted) < len(run.announced()) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)  # the last events
        announced = run.announced()
    finally:
        run.stop()
        await receiver.stop()
    # each event's wait past the later of its announcement and the receiver's return
    waits = {msg_id: receiver.accepted[msg_id] - max(at, back_at) for msg_id, at in announced.items()
             if msg_id in receiver.accepted}
    during = sum(1 for at in announced.values() if at < back_at)
    worst = max(waits.values(), default=0.0)
    causes = sum(len(receiver.of_type(kind)) for kind in tracker.WEBHOOK_EVENTS)
    met = (worst <= RETRY_INTERVAL_S and len(waits) == len(announced) == len(receiver.accepted) == causes
           and receiver.bad_signatures == 0)
    print(f"receiver down     {down_s:g} s from its first delivery, retry_schedule_s [0, 5, 10, 10, …]: "
          f"{during:,} events announced while it was down; every event accepted within {worst:.1f} s of the "
          f"later of its announcement and the receiver's return (target ≤ {RETRY_INTERVAL_S:g} s); "
          f"{len(receiver.accepted):,} ids for {len(announced):,} events, {causes:,} causes (target: one id "
          f"each)   {'met' if met else 'MISSED'}", flush=True)
    return met


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="onoff,down")
    parser.add_argument("--rounds", type=int, default=3, help="on/off: rounds of the two runs (default 3)")
    parser.add_argument("--down-s", type=float, default=120.0)
    args = parser.parse_args()
    print(f"bench/webhooks.py — {RETURNS:,} returns, SQLite, {os.cpu_count()} CPUs")
    met = True
    with tempfile.TemporaryDirectory(prefix="tracker-bench-webhooks-") as tmp:
        if "onoff" in args.runs:
            met &= await on_and_off(Path(tmp), args.rounds)
        if "down" in args.runs:
            met &= await receiver_down(Path(tmp), args.down_s)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
