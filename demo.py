"""`python tracker.py demo`: a sales-event burst against the partner stand-in, end to end.

Starts the stand-in (standin.py) in its own process on loopback, writes a config into a fresh
temporary directory, runs the real daemon (`tracker.py run`) as a second process, shows live
progress read from the daemon's database and the stand-in's ledger, then stops the daemon with
SIGTERM and prints a summary. Exit 0 only when nothing is missing and nothing was reported early.

With --database-url the state lives in that (empty) PostgreSQL database, and --instances N runs
N daemons on it; --kill-one-at S kills one of them with SIGKILL S seconds in: the others take its
work over once its leases run out (lease_s 5 here).

With --feed-down the partner's returns feed answers 503 throughout, and the returns reach the
tracker as the shop's order system would hand them over: pushed through the shop's API
(POST /v1/returns/batch, 500 at a time, each batch with an Idempotency-Key) as they are created.

The shop's refund service is played by a webhook receiver in this process, on loopback: it
verifies every delivery with the `standardwebhooks` library, as a receiver should, and counts the
distinct event ids; the summary compares them with the reports the partner recorded.
"""

import asyncio
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import standardwebhooks
from aiohttp import web

import standin
import tracker

HERE = Path(__file__).resolve().parent
POLL_S = 0.5
WEBHOOK_WAIT_S = 60.0  # after the last report, for the last deliveries


class Receiver:
    """The shop's refund service: each delivery verified with the library, kept by webhook-id."""

    def __init__(self) -> None:
        self.secret = tracker.new_webhook_secret()
        self._verifier = standardwebhooks.Webhook(self.secret)
        self.subjects: dict[str, set[str]] = {}  # event type → return ids (or shipments) announced
        self.ids: set[str] = set()
        self.deliveries = self.bad_signatures = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/hooks"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            event = self._verifier.verify(body, dict(request.headers))
        except standardwebhooks.webhooks.WebhookVerificationError:
            self.bad_signatures += 1
            return web.Response(status=400)
        self.deliveries += 1
        self.ids.add(request.headers["webhook-id"])
        subject = event["data"].get("id") or event["data"].get("shipment_number")
        self.subjects.setdefault(event["type"], set()).add(subject)
        return web.Response(status=204)


def as_typed(path: str | Path) -> str:
    """A path as the user would type it here: relative when it lies below the current directory
    (`.venv/bin/python`, not the bare `python` that may lack the dependencies)."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def main(*, returns: int, seconds: float, seed: int, deadline_s: float, instances: int = 1,
         database_url: str = "", kill_one_at: float | None = None, feed_down: bool = False) -> int:
    if instances > 1 and not database_url:
        print("tracker demo: several instances share a PostgreSQL database: give --database-url", file=sys.stderr)
        return 2
    demo = Demo(returns, seconds, seed, deadline_s, instances, database_url, kill_one_at)
    demo.feed_down = feed_down
    return asyncio.run(demo.run())


class Demo:
    def __init__(self, returns: int, seconds: float, seed: int, deadline_s: float, instances: int = 1,
                 database_url: str = "", kill_one_at: float | None = None) -> None:
        self.returns, self.seconds, self.seed, self.deadline_s = returns, seconds, seed, deadline_s
        self.instances, self.database_url, self.kill_one_at = instances, database_url, kill_one_at
        self.workdir = Path(tempfile.mkdtemp(prefix="tracker-demo-"))
        self.tty = sys.stdout.isatty()
        self.metrics_url = ""
        self.killed: str | None = None
        self.feed_down = False
        self.pushed = self.batches = self.rejected = 0
        self.receiver = Receiver()

    @property
    def storage(self) -> tracker.StorageConfig:
        return tracker.StorageConfig(path=str(self.workdir / "tracker.db"), url=self.database_url)

    def _log(self, k: int) -> Path:
        return self.workdir / ("tracker.log" if k == 0 else f"tracker-{k + 1}.log")

    async def run(self) -> int:
        where = f"{self.instances} instance(s) on {self.storage.where}" if self.database_url else "SQLite"
        print(f"tracker demo: {self.returns:,} returns arriving over {self.seconds:g} s "
              f"(a sales event, time compressed), mild partner faults, {where}. Work dir: {self.workdir}")
        standin = await self._start_standin()
        daemons: list[asyncio.subprocess.Process] = []
        await self.receiver.start()
        try:
            info = json.loads((await standin.stdout.readline()).decode())  # type: ignore[union-attr]
            config_path = self._write_config(info)
            key = await self._api_key(config_path) if self.feed_down else ""
            for k in range(self.instances):
                with open(self._log(k), "wb") as log:  # the child keeps its own handle
                    daemons.append(await asyncio.create_subprocess_exec(
                        sys.executable, str(HERE / "tracker.py"), "run", "--config", str(config_path),
                        stdout=log, stderr=subprocess.STDOUT, env={
                            **os.environ, tracker.ENV_TOKEN: info["token"],
                            tracker.ENV_WEBHOOK_SECRET + "REFUNDS": self.receiver.secret},
                    ))
            async with aiohttp.ClientSession() as http:
                self.metrics_url = await self._metrics_url()
                pusher = asyncio.create_task(self._push(http, info["root"], key)) if self.feed_down else None
                try:
                    ok, elapsed, counts, ledger = await self._follow(http, info["root"], daemons)
                finally:
                    if pusher is not None:
                        pusher.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await pusher
                reported = counts.get("reports.done", 0)
                await self._wait_for_webhooks(reported)
                metrics_text = await self._scrape(http)
                (self.workdir / "metrics.txt").write_text(metrics_text)
                running = [d for d in daemons if d.returncode is None]
                for daemon in running:
                    daemon.send_signal(signal.SIGTERM)
                stop_started = time.monotonic()
                codes = [await asyncio.wait_for(daemon.wait(), 30) for daemon in running]
                stop_s = time.monotonic() - stop_started
                ledger = await _get_json(http, info["root"] + "/_ledger")
            store = await tracker.open_store(self.storage, readonly=True)
            try:
                counts = await store.counts()
            finally:
                await store.close()
            return self._summary(ok, elapsed, counts, ledger, max(codes, default=None), stop_s)
        finally:
            for daemon in daemons:
                if daemon.returncode is None:
                    daemon.kill()
                    await daemon.wait()
            standin.terminate()
            await standin.wait()
            await self.receiver.stop()

    async def _wait_for_webhooks(self, reported: int) -> None:
        """Until the refund service has heard of every reported return, within WEBHOOK_WAIT_S."""
        deadline = time.monotonic() + WEBHOOK_WAIT_S
        while len(self.receiver.subjects.get("return.collected", ())) < reported and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)

    async def _start_standin(self) -> asyncio.subprocess.Process:
        with open(self.workdir / "standin.log", "wb") as log:
            return await asyncio.create_subprocess_exec(
                sys.executable, str(HERE / "standin.py"), "--returns", str(self.returns),
                "--seconds", str(self.seconds), "--seed", str(self.seed),
                *(["--scenario", json.dumps({"faults": {"feed_down": True}})] if self.feed_down else []),
                stdout=asyncio.subprocess.PIPE, stderr=log,
            )

    def _write_config(self, info: dict[str, str]) -> Path:
        path = self.workdir / "config.toml"
        path.touch(mode=0o600)  # it holds a webhook URL: a secret, which `status` would warn of
        path.write_text(standin.daemon_config_toml({
            "partner": {"base_url": info["url"], "timeout_s": 2.0, "page_size": 500},
            "storage": {"path": "tracker.db", "url": self.database_url, "lease_s": 5.0},
            "http": {"listen": "127.0.0.1:0"},
            "slack": {"webhook_url": info["slack"]},
            "schedule": {"returns_every_s": 0.5, "track_every_s": 2.0, "detect_within_s": 2.0, "stale_after_s": 15.0,
                         "retry_base_s": 0.5, "retry_max_s": 5.0, "shutdown_grace_s": 3.0},
            "limits": {"concurrency": 64, "rate_per_s": 1500},
            **({"api": {"listen": "127.0.0.1:0"}} if self.feed_down else {}),
            "webhook": [{"name": "refunds", "url": self.receiver.url,
                         "retry_schedule_s": [0, 1, 2, 5, 10, 20, 30],  # its secret: TRACKER_WEBHOOK_SECRET_REFUNDS
                         "cancel_hold_s": 20}],  # the stand-in's reissues are corrected within 20 s
        }, comment=f"written by `tracker.py demo`; the token comes from {tracker.ENV_TOKEN}"))
        return path

    async def _metrics_url(self) -> str:
        address = await self._listening("http.listening")
        return f"http://{address}/metrics" if address else "(the daemon did not report its address; see tracker.log)"

    async def _listening(self, event: str) -> str:
        """The daemon listens on free ports and logs which: read one from its log."""
        log = self.workdir / "tracker.log"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
                if f'"{event}"' in line:
                    return str(json.loads(line)["address"])
            await asyncio.sleep(0.1)
        return ""

    async def _api_key(self, config_path: Path) -> str:
        """A key for the shop's order system, made as an operator would (`tracker.py api-key create`)."""
        made = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "tracker.py"), "api-key", "create", "order-system", "--scope", "returns:write",
            "--rate", "1000", "--config", str(config_path), stdout=asyncio.subprocess.PIPE)
        out, _ = await made.communicate()
        return out.decode().split()[-1]

    async def _push(self, http: aiohttp.ClientSession, root: str, key: str) -> None:
        """The shop's order system: every return as it is created, 500 a batch, through the API."""
        api = f"http://{await self._listening('api.listening')}/v1/returns/batch"
        cursor = 0
        while True:
            shop = await _get_json(http, f"{root}/_shop/returns?cursor={cursor}")
            for start in range(0, len(shop["data"]), tracker.API_BATCH_MAX):
                batch = shop["data"][start:start + tracker.API_BATCH_MAX]
                headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": f"demo-{cursor + start}"}
                while True:  # an unanswered batch is sent again with its key: never pushed twice
                    try:
                        async with http.post(api, json={"returns": batch}, headers=headers,
                                             timeout=aiohttp.ClientTimeout(total=30)) as resp:
                            if resp.status == 200:
                                answer = await resp.json()
                                break
                    except (aiohttp.ClientError, TimeoutError):
                        pass
                    await asyncio.sleep(POLL_S)
                self.pushed += answer["accepted"]
                self.rejected += answer["rejected"]
                self.batches += 1
            cursor = shop["next_cursor"]
            if shop["finished"]:
                return
            await asyncio.sleep(POLL_S)

    async def _follow(self, http: aiohttp.ClientSession, root: str, daemons: list[asyncio.subprocess.Process]
                      ) -> tuple[bool, float, dict[str, int], dict[str, Any]]:
        started = time.monotonic()
        last_line = 0.0
        store: tracker.StateStore | None = None
        counts: dict[str, int] = {}
        ledger: dict[str, Any] = {}
        try:
            while True:
                elapsed = time.monotonic() - started
                if self.kill_one_at is not None and self.killed is None and elapsed >= self.kill_one_at:
                    victim = len(daemons) - 1
                    daemons[victim].kill()  # SIGKILL: no goodbye, its claims held until their leases end
                    self.killed = f"instance {victim + 1} (pid {daemons[victim].pid}) at {elapsed:.1f} s"
                    print(("\n" if self.tty else "") + f"kill -9 of {self.killed}")
                if store is None and (self.database_url or (self.workdir / "tracker.db").exists()):
                    with contextlib.suppress(*tracker.storage_errors_and()):  # not created yet
                        store = await tracker.open_store(self.storage, readonly=True)
                if store is not None:
                    with contextlib.suppress(*tracker.storage_errors_and()):  # the schema may still be being created
                        counts = await store.counts()
                ledger = await _get_json(http, root + "/_ledger")
                whole_feed = self.feed_down or ledger["feed_acknowledged"] == ledger["feed_entries"]
                done = (ledger["finished"] and ledger["missing"] == 0 and "returns" in counts and whole_feed
                        and counts.get("boxes.tracking", 0) == 0 and counts.get("reports.pending", 0) == 0)
                if self.tty or elapsed - last_line >= 5 or done:
                    self._progress(elapsed, counts, ledger)
                    last_line = elapsed
                if done:
                    return True, elapsed, counts, ledger
                if any(d.returncode is not None for d in daemons if d.returncode != -signal.SIGKILL):
                    print(f"\na daemon exited; see {self.workdir}/tracker*.log")
                    return False, elapsed, counts, ledger
                if elapsed > self.deadline_s:
                    print(f"\ngave up after {self.deadline_s:g} s")
                    return False, elapsed, counts, ledger
                await asyncio.sleep(POLL_S)
        finally:
            if store is not None:
                await store.close()
            if self.tty:
                print()

    def _progress(self, elapsed: float, c: dict[str, int], ledger: dict[str, Any]) -> None:
        expected = max(ledger.get("expected", 0), 1)
        done = c.get("reports.done", 0)
        share = min(done / expected, 1.0)
        bar = "█" * int(share * 24) + "░" * (24 - int(share * 24))
        problems = (f"{c.get('quarantine.open', 0)} quarantined · {c.get('boxes.stale', 0)} stale · "
                    f"{c.get('reports.dead', 0)} dead")
        line = (f"[{bar}] {share:4.0%}  collected {c.get('returns', 0):,}/{self.returns:,}  "
                f"tracking {c.get('boxes.tracking', 0):,} boxes  reported {done:,}/{expected:,}  "
                f"problems: {problems}  {elapsed:4.0f}s")
        print(("\r" + line + "\x1b[K") if self.tty else line, end="" if self.tty else "\n", flush=True)

    async def _scrape(self, http: aiohttp.ClientSession) -> str:
        try:
            async with http.get(self.metrics_url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                return await resp.text()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return f"# could not scrape {self.metrics_url}: {exc}\n"

    def _summary(self, ok: bool, elapsed: float, c: dict[str, int], ledger: dict[str, Any],
                 code: int | None, stop_s: float) -> int:
        calls = ledger["calls"]
        by_answer: dict[str, int] = {}
        for answers in calls.values():
            for answer, n in answers.items():
                by_answer[answer] = by_answer.get(answer, 0) + n
        total_calls = sum(by_answer.values())
        collected = len(self.receiver.subjects.get("return.collected", ()))
        unheard = max(0, c.get("reports.done", 0) - collected)
        passed = (ok and ledger["missing"] == 0 and ledger["premature"] == 0 and ledger["unknown"] == 0
                  and ledger["changed_duplicates"] == 0 and code == 0 and unheard == 0
                  and self.receiver.bad_signatures == 0)
        w = self.workdir

        def calls_to(endpoint: str) -> int:
            return sum(calls.get(endpoint, {}).values())

        answers = " · ".join(f"{k} {v:,}" for k, v in sorted(by_answer.items(), key=lambda kv: -kv[1]))
        rows = [
            ("returns", f"{ledger['returns']:,} in the burst, {ledger['feed_entries']:,} feed entries "
                        "(relisted, corrected and broken included)"),
            ("corrections", f"{ledger['corrections']:,} in the feed ({ledger['reissued']:,} waybills reissued, the "
                            f"old ones cancelled) · {c.get('corrections', 0):,} applied · "
                            f"{ledger['superseded']:,} recorded before their correction arrived (left to a person) "
                            f"· {ledger['stale']:,} refused as outdated, then resent corrected"),
            ("collected", f"{c.get('returns', 0):,} returns stored · {c.get('quarantine.open', 0):,} broken items "
                          "quarantined"),
            *([("by the API", f"{self.pushed:,} returns pushed in {self.batches:,} batches through POST "
                              f"/v1/returns/batch · {self.rejected:,} rejected as broken · the feed answered 503 "
                              f"{calls.get('returns', {}).get('503', 0):,} times")] if self.feed_down else []),
            ("boxes", f"{ledger['boxes']:,}: {c.get('boxes.delivered', 0):,} delivered · "
                      f"{c.get('boxes.cancelled', 0):,} cancelled · {c.get('boxes.stale', 0):,} stale (never "
                      f"registered) · {c.get('boxes.emptied', 0):,} emptied by corrections · "
                      f"{c.get('boxes.tracking', 0):,} still tracking"),
            ("reports", f"{ledger['recorded']:,} recorded of {ledger['expected']:,} expected · duplicates "
                        f"{ledger['duplicates']:,} (409s settling resent reports) · premature {ledger['premature']} "
                        f"· missing {ledger['missing']}"),
            ("webhooks", f"{collected:,} return.collected · {unheard:,} missing · "
                         f"{self.receiver.bad_signatures:,} bad signatures · " + " · ".join(
                             f"{len(subjects):,} {kind}" for kind, subjects in sorted(self.receiver.subjects.items())
                             if kind != "return.collected") + f" · {self.receiver.deliveries:,} deliveries, "
                         f"{len(self.receiver.ids):,} distinct ids (verified with standardwebhooks)"),
            ("partner calls", f"{total_calls:,} = returns {calls_to('returns'):,} · tracking "
                              f"{calls_to('tracking'):,} · results {calls_to('results'):,}"),
            ("by answer", answers),
            ("slack alerts", f"{ledger['slack_messages']} messages posted to the stand-in's webhook"),
            ("elapsed", f"{elapsed:.1f} s from start until every reportable item was reported; "
                        f"SIGTERM → exit {code} in {stop_s:.1f} s"),
            ("metrics", f"were at {self.metrics_url} (last scrape saved: {w / 'metrics.txt'})"),
            *([("instances", f"{self.instances} on {self.storage.where}; killed with SIGKILL: {self.killed or 'none'}")]
              if self.database_url else []),
            ("files", f"{w / 'tracker.log'} · {self.storage.where} · {w / 'config.toml'}"),
            ("try", shlex.join([as_typed(sys.executable), as_typed(HERE / "tracker.py"), "status", "--config",
                                str(w / "config.toml")])),
        ]
        print("\nDemo summary")
        for name, text in rows:
            print(f"  {name:<15} {text}")
        print()
        print("RESULT: OK — every delivered item reported, none missing, none early." if passed else
              "RESULT: FAILED — see the numbers above and the daemon's log.")
        return 0 if passed else 1


async def _get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
        return await resp.json()
