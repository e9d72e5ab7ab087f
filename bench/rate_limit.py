#!/usr/bin/env python3
"""Benchmark: how well the adaptive rate finds and uses an unpublished partner rate limit.

The stand-in runs in its own process and limits every endpoint to LIMIT calls/s (token bucket,
429 + Retry-After beyond it). The daemon runs in its own process with limits.rate_per_s four
times higher, so it must discover the limit. A burst keeps tracking and reporting backlogged;
over a measuring window in the middle of the run this prints, per endpoint, the calls/s the
partner accepted as a share of the limit, and the share of calls answered 429.

    .venv/bin/python bench/rate_limit.py [--limit 250] [--window 30]

Target (issue 3): at least 85% of the limit sustained, at most 10% of calls answered 429.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import standin  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=float, default=250.0, help="the partner's limit per endpoint, calls/s")
    parser.add_argument("--window", type=float, default=30.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=8.0, help="seconds before measuring")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="tracker-bench-rate-"))
    # Boxes deliver within seconds of registering, so tracking and reports are both backlogged.
    scenario = {"step_s": [0.5, 1.5], "unregistered_share": 0.0, "never_registered_share": 0.0, "relist_share": 0.0,
                "broken_share": 0.0, "unknown_status_share": 0.0, "reissue_share": 0.0, "fix_share": 0.0,
                "broken_correction_share": 0.0,
                "faults": {"latency_ms": [20, 80], "error_share": 0.0, "garbled_share": 0.0, "slow_share": 0.0,
                           "hang_share": 0.0, "reset_share": 0.0, "rate_limit_per_s": args.limit}}
    partner = subprocess.Popen(
        [sys.executable, str(ROOT / "standin.py"), "--returns", "40000", "--seconds", "3", "--scenario",
         json.dumps(scenario)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert partner.stdout is not None  # stdout=PIPE
    daemon = None
    try:
        info = json.loads(partner.stdout.readline())
        config = workdir / "config.toml"
        config.write_text(standin.daemon_config_toml({
            "partner": {"base_url": info["url"], "timeout_s": 2.0, "page_size": 500},
            "storage": {"path": "tracker.db"},
            "http": {"listen": "127.0.0.1:0"},
            "schedule": {"returns_every_s": 0.5, "track_every_s": 1.0, "detect_within_s": 1.0, "stale_after_s": 600,
                         "retry_base_s": 0.5,
                         "retry_max_s": 5.0},
            "limits": {"concurrency": 64, "rate_per_s": args.limit * 4},
            "log": {"level": "warning"},
        }))
        with open(workdir / "tracker.log", "wb") as log:
            daemon = subprocess.Popen([sys.executable, str(ROOT / "tracker.py"), "run", "--config", str(config)],
                                      stdout=log, stderr=subprocess.STDOUT,
                                      env={**os.environ, "TRACKER_PARTNER_TOKEN": info["token"]})
        time.sleep(args.warmup)  # a benchmark's fixed warm-up, not synchronisation
        first, t0 = standin.read_ledger(info["root"]), time.monotonic()
        time.sleep(args.window)
        last, t1 = standin.read_ledger(info["root"]), time.monotonic()
        elapsed = t1 - t0
        print(f"rate-limit benchmark: partner limit {args.limit:g} calls/s per endpoint, daemon cap "
              f"{args.limit * 4:g}, measured over {elapsed:.1f} s after {args.warmup:g} s warm-up")
        print(f"{'endpoint':<10} {'accepted/s':>10} {'of limit':>9} {'calls/s':>8} {'429 share':>9}")
        ok = True
        for endpoint in ("tracking", "results"):
            before, after = first["calls"].get(endpoint, {}), last["calls"].get(endpoint, {})
            calls = sum(after.values()) - sum(before.values())
            limited = after.get("429", 0) - before.get("429", 0)
            accepted = (calls - limited) / elapsed
            share, limited_share = accepted / args.limit, limited / max(calls, 1)
            ok &= share >= 0.85 and limited_share <= 0.10
            print(f"{endpoint:<10} {accepted:>10.1f} {share:>9.1%} {calls / elapsed:>8.1f} {limited_share:>9.1%}")
        print("target (>= 85% of the limit, <= 10% 429s):", "met" if ok else "NOT met")
        return 0 if ok else 1
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(20)
        partner.terminate()
        partner.wait(10)


if __name__ == "__main__":
    sys.exit(main())
