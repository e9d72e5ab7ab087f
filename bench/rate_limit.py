#!/usr/bin/env python3
"""Benchmark (issue 17): how fast and how fully the adaptive rate finds an unpublished rate limit,
for each shape real partners' limiters take, over a short and a long burst.

Each run starts the partner stand-in in a process of its own and the daemon in another. The
partner answers in 20–80 ms and limits each endpoint to LIMIT calls/s (or all endpoints together
to LIMIT), kept as one of the shapes below; the daemon's limits.rate_per_s is four times LIMIT, so
it must find the limit. The burst's returns are all listed within two seconds and their pickups
collected at once, so tracking and reporting are backlogged from the first call. Printed per shape
and burst, from the stand-in's count of calls per tenth of a second (standin.limit_use):

  time          first call → last report recorded, against the floor (the results endpoint's — or,
                when the limit is shared, all endpoints' — minimum calls ÷ the limit over its schedule)
  share         calls let through ÷ the limit, from reaching 90% until a second before the end
  429s          calls answered 429, of all calls
  to 90%        first call → the first second letting through ≥ 90% of the limit
  follow        for a changing limit: change → the first second letting through ≥ 90% of the new
                limit with ≤ 5% of calls refused

    .venv/bin/python bench/rate_limit.py                       every shape, 5,000 and 30,000 returns (~14 min)
    .venv/bin/python bench/rate_limit.py --sizes 5000          the short bursts only (~2 min)
    .venv/bin/python bench/rate_limit.py --shapes window,shared --repeat 3

Targets (issue 17): every short burst ≤ 1.1× its floor, every long one ≤ 1.05×; ≤ 2% 429s; 90% of
the limit within 5 s of the first call; ≥ 95% of it held; a changing limit followed within 5 s each
way. Exit status 0 only when all are met.
"""

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import standin  # noqa: E402

LIMIT = 300.0
PAGE_SIZE = 500
SHORT, LONG = 5000, 30000


def shapes(returns: int) -> dict[str, dict[str, Any]]:
    """Each limiter shape as stand-in fault settings. The changing limit drops to a third a third of
    the way into the burst and comes back a quarter later."""
    floor = returns / LIMIT
    drop, back = round(floor / 3), round(floor / 3 + floor / 4)
    return {
        "bucket 0.1 s": {"limiter": "bucket", "bucket_depth_s": 0.1},
        "bucket 1 s": {"limiter": "bucket", "bucket_depth_s": 1.0},
        "bucket 2 s": {"limiter": "bucket", "bucket_depth_s": 2.0},
        "window 1 s": {"limiter": "window"},
        "shared": {"limiter": "bucket", "bucket_depth_s": 1.0, "limit_shared": True},
        "changing": {"limiter": "bucket", "bucket_depth_s": 1.0,
                     "limit_schedule": [[drop, LIMIT / 3], [back, LIMIT]]},
    }


def scenario(returns: int, limiter: dict[str, Any]) -> dict[str, Any]:
    return {"returns": returns, "arrive_over_s": 2.0, "step_s": [0.01, 0.02], "unregistered_share": 0.0,
            "never_registered_share": 0.0, "relist_share": 0.0, "broken_share": 0.0, "unknown_status_share": 0.0,
            "reissue_share": 0.0, "fix_share": 0.0, "broken_correction_share": 0.0,
            "faults": {"latency_ms": [20, 80], "error_share": 0.0, "garbled_share": 0.0, "slow_share": 0.0,
                       "hang_share": 0.0, "reset_share": 0.0, "rate_limit_per_s": LIMIT, **limiter}}


def daemon_config(partner_url: str) -> dict[str, dict[str, Any]]:
    return {
        "partner": {"base_url": partner_url, "timeout_s": 5.0, "page_size": PAGE_SIZE},
        "storage": {"path": "tracker.db"},
        "http": {"listen": "127.0.0.1:0"},
        # Boxes are checked promptly (the pickups are collected already): the burst's calls are
        # all queued from the start, and the rate alone sets the pace.
        "schedule": {"returns_every_s": 0.5, "track_every_s": 0.2, "detect_within_s": 0.2, "stale_after_s": 600,
                     "retry_base_s": 0.5, "retry_max_s": 5.0},
        "limits": {"concurrency": 256, "rate_per_s": LIMIT * 4},
        "log": {"level": "warning"},
    }


def run(name: str, returns: int, workdir: Path) -> standin.LimitUse:
    overrides = scenario(returns, shapes(returns)[name])
    faults = standin.Faults(**standin._tuples(overrides["faults"]))
    partner = subprocess.Popen(
        [sys.executable, str(ROOT / "standin.py"), "--returns", str(returns), "--scenario", json.dumps(overrides)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert partner.stdout is not None  # stdout=PIPE
    daemon = None
    try:
        info = json.loads(partner.stdout.readline())
        workdir.mkdir(parents=True)
        config = workdir / "config.toml"
        config.write_text(standin.daemon_config_toml(daemon_config(info["url"]), "written by bench/rate_limit.py"))
        with open(workdir / "tracker.log", "wb") as log:
            daemon = subprocess.Popen([sys.executable, str(ROOT / "tracker.py"), "run", "--config", str(config)],
                                      cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                      env={**os.environ, "TRACKER_PARTNER_TOKEN": info["token"]})
        deadline = time.monotonic() + 60 + 3 * returns / LIMIT
        while True:
            time.sleep(0.5)  # a benchmark's sampling period, not synchronisation
            state = standin.read_ledger(info["root"])
            if state["finished"] and state["missing"] == 0:
                break
            if daemon.poll() is not None:
                raise SystemExit(f"{name}: the daemon exited with {daemon.returncode}; see {workdir}/tracker.log")
            if time.monotonic() > deadline:
                raise SystemExit(f"{name}: {state['missing']} returns still missing; see {workdir}/tracker.log")
        if state["duplicates"] or state["premature"]:
            print(f"  ! {name}: duplicates {state['duplicates']}, premature {state['premature']}")
        (workdir / "ledger.json").write_text(json.dumps(state))
        return standin.limit_use(state, faults, PAGE_SIZE)
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
        partner.terminate()
        partner.wait(10)


@dataclasses.dataclass(frozen=True)
class Verdict:
    line: str
    met: bool


def judge(name: str, returns: int, use: standin.LimitUse) -> Verdict:
    target = 1.1 if returns <= SHORT else 1.05
    follows = [f for _, f in use.follow_s]
    met = (use.against_floor <= target and use.refused_share <= 0.02 and use.share >= 0.95
           and use.to_90_s is not None and use.to_90_s <= 5.0 and all(f is not None and f <= 5.0 for f in follows))
    follow = ("   follow " + " / ".join("never" if f is None else f"{f:.1f} s" for f in follows)) if follows else ""
    to_90 = "never" if use.to_90_s is None else f"{use.to_90_s:.1f} s"
    line = (f"  {name:<14}{returns:>7,}   time {use.busy_s:6.1f} s / floor {use.floor_s:6.1f} s = "
            f"{use.against_floor:.2f}× (≤ {target:.2f})   share {use.share:6.1%}   429s {use.refused_share:5.2%}"
            f"   to 90% {to_90:>6}{follow}   {'met' if met else 'NOT met'}")
    return Verdict(line, met)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(shapes(SHORT)),
                        help="comma-separated, from: " + ", ".join(shapes(SHORT)))
    parser.add_argument("--sizes", default=f"{SHORT},{LONG}", help="burst sizes (returns), comma-separated")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    names = [n.strip() for n in args.shapes.split(",")]
    unknown = [n for n in names if n not in shapes(SHORT)]
    if unknown:
        parser.error(f"unknown shape(s): {', '.join(unknown)}")
    sizes = [int(n) for n in args.sizes.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="tracker-bench-rate-"))
    print(f"rate-limit benchmark: partner limit {LIMIT:g} calls/s per endpoint (shared: for all together), "
          f"daemon cap {LIMIT * 4:g}, latency 20–80 ms; {os.cpu_count()} CPUs")
    verdicts = []
    for repetition in range(args.repeat):
        for returns in sizes:
            for name in names:
                use = run(name, returns, workdir / f"{name.replace(' ', '-')}-{returns}-{repetition + 1}")
                verdicts.append(judge(name, returns, use))
                print(verdicts[-1].line, flush=True)
    met = all(v.met for v in verdicts)
    print("every target met" if met else f"{sum(not v.met for v in verdicts)} of {len(verdicts)} runs NOT met")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
