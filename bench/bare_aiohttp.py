#!/usr/bin/env python3
"""The floor under the daemon's CPU per call: bare aiohttp, nothing else, on this machine.

A minimal aiohttp server in a process of its own answers like the partner (20–80 ms latency, a
small JSON body); the client sends the burst's mix — one tracking GET to two results POSTs — with
what any careful asyncio client has per call (a task, an `asyncio.timeout`, the body read and
parsed) and nothing the daemon adds (no storage, rate, breaker, metrics or logs). Calls go out in
10 ms ticks like the daemon's, at a given rate, or all at once (256 in flight). Compare the CPU per
call with `bench/burst.py`'s: the daemon's 44k calls at ~2,700/s.

    .venv/bin/python bench/bare_aiohttp.py            # 500/s, 2,700/s, all at once (about 80 s)
    .venv/bin/python bench/bare_aiohttp.py --calls 20000 --rates 2700
"""

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import time

import aiohttp
from aiohttp import web
from burst import free_port  # bench/ is this script's directory, first on sys.path

BODY = {"order_number": "20261124-0001", "order_item_number": "1", "shipment_number": "SHP_00000001",
        "result": "collected", "collected_at": "2026-11-24T15:42:00Z"}
TICK_S = 0.01
IN_FLIGHT = 256


def serve(port: int) -> None:
    async def tracking(request: web.Request) -> web.Response:
        await asyncio.sleep(random.uniform(0.02, 0.08))
        return web.json_response({"data": [{"shipment_number": request.query["shipment_number"],
                                            "return_status": "delivered", "updated_at": "2026-11-24T09:00:05Z"}]})

    async def results(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(random.uniform(0.02, 0.08))
        return web.json_response({"data": {"result": True}})

    app = web.Application()
    app.router.add_get("/tracking", tracking)
    app.router.add_post("/results", results)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


async def call(session: aiohttp.ClientSession, base: str, i: int, slots: asyncio.Semaphore) -> None:
    async with slots, asyncio.timeout(30):
        if i % 3 == 0:
            request = session.get(f"{base}/tracking", params={"shipment_number": f"SHP_{i:08d}"},
                                  headers={"Authorization": "Bearer bench"})
        else:
            request = session.post(f"{base}/results", json=BODY,
                                   headers={"Authorization": "Bearer bench", "Idempotency-Key": f"RET_{i:08d}"})
        async with request as response:
            json.loads(await response.read())


async def run(base: str, calls: int, rate: float | None) -> tuple[float, float]:
    """CPU seconds per call and calls per second; rate None: every call started at once."""
    connector = aiohttp.TCPConnector(limit=IN_FLIGHT)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout()) as session:
        slots = asyncio.Semaphore(IN_FLIGHT)
        await asyncio.gather(*(call(session, base, i, slots) for i in range(IN_FLIGHT)))  # connections up
        cpu, started = time.process_time(), time.monotonic()
        async with asyncio.TaskGroup() as tasks:
            per_tick = max(1, round(rate * TICK_S)) if rate else calls
            for i in range(calls):
                if i and i % per_tick == 0:
                    await asyncio.sleep(max(0.0, started + i / per_tick * TICK_S - time.monotonic()))
                tasks.create_task(call(session, base, i, slots))
        return (time.process_time() - cpu) / calls, calls / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=30_000)
    parser.add_argument("--rates", default="500,2700,all", help="calls/s, comma-separated; 'all' for all at once")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        print(f"bare aiohttp {aiohttp.__version__}, {args.calls:,} calls (1 GET : 2 POST), latency 20–80 ms:")
        for rate_text in args.rates.split(","):
            rate = None if rate_text == "all" else float(rate_text)
            per_call, achieved = asyncio.run(run(f"http://127.0.0.1:{port}", args.calls, rate))
            label = "all at once" if rate is None else f"{rate:,.0f} calls/s"
            print(f"  {label:<16}{per_call * 1e3:.3f} ms CPU per call   ({achieved:,.0f} calls/s achieved)")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
