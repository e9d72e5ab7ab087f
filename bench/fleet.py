#!/usr/bin/env python3
"""Benchmark (issue 16): a rate-limited burst with one instance on SQLite, one on PostgreSQL and
three on PostgreSQL; then the takeover time after a kill -9.

Each run starts the partner stand-in in a process of its own (latency 20–80 ms, 1% 5xx, each
endpoint limited to RATE_LIMIT calls/s) and the daemons in others, and polls the stand-in's ledger
until every collected return is reported. PostgreSQL is a throwaway cluster on loopback
(pgcluster.py), a fresh database a run. Printed per run: wall time, CPU per 1,000 returns (all
instances together), partner calls per return, 429 share. The takeover run kills one of three
instances mid-burst (lease_s 30, the default) and measures how long its claims stay unclaimed.

    .venv/bin/python bench/fleet.py                     10,000 returns (about 4 minutes)
    .venv/bin/python bench/fleet.py --returns 30000
    .venv/bin/python bench/fleet.py --no-takeover        the three bursts only (about 3 minutes)

Targets: three instances on PostgreSQL finish within 1.1× one SQLite instance's wall time and
call the partner no more per return than one does; a killed instance's claims are taken over
within lease_s + 5 s. Exit status 0 only when all are met.
"""

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import psycopg  # noqa: E402

import burst  # noqa: E402  (the workload, the stand-in process and /proc measurements)
import standin  # noqa: E402
from pgcluster import throwaway_cluster  # noqa: E402

RATE_LIMIT = 250.0
LEASE_S = 30.0


def fleet_config(partner_url: str, listen: str, url: str | None) -> dict[str, dict[str, Any]]:
    config = burst.daemon_config(partner_url, listen, RATE_LIMIT)
    config["limits"]["rate_per_s"] = RATE_LIMIT * 4  # the fleet's; the adaptive rate finds the limit
    if url:
        config["storage"]["url"] = url
        config["storage"]["lease_s"] = LEASE_S
    return config


def start_daemons(workdir: Path, n: int, partner: dict[str, str], url: str | None) -> list[subprocess.Popen[bytes]]:
    daemons = []
    for k in range(n):
        listen = f"127.0.0.1:{burst.free_port()}"
        config = workdir / f"config-{k}.toml"
        config.write_text(standin.daemon_config_toml(fleet_config(partner["url"], listen, url),
                                                     "written by bench/fleet.py"))
        with open(workdir / f"tracker-{k}.log", "wb") as log:
            daemons.append(subprocess.Popen([sys.executable, str(ROOT / "tracker.py"), "run", "--config", str(config)],
                                            stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                                            env={**os.environ, "TRACKER_PARTNER_TOKEN": partner["token"]}))
        burst.wait_until_listening(daemons[-1], listen)
    return daemons


def stop(daemons: list[subprocess.Popen[bytes]]) -> None:
    for daemon in daemons:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
    for daemon in daemons:
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()


def run_burst(name: str, workdir: Path, returns: int, instances: int, url: str | None) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    partner_process, partner = burst.start_standin(returns, RATE_LIMIT)
    daemons: list[subprocess.Popen[bytes]] = []
    try:
        started = time.monotonic()
        daemons = start_daemons(workdir, instances, partner, url)
        while True:
            time.sleep(0.5)  # a benchmark's sampling period, not synchronisation
            state = standin.read_ledger(partner["root"])
            if state["finished"] and state["missing"] == 0:
                break
            if any(d.poll() is not None for d in daemons):
                raise SystemExit(f"{name}: a daemon exited; see {workdir}")
        wall = time.monotonic() - started
        cpu = sum(burst.cpu_and_peak_rss(d.pid)[0] for d in daemons)
    finally:
        stop(daemons)
        partner_process.terminate()
        partner_process.wait(10)
    calls = sum(sum(c.values()) for c in state["calls"].values())
    limited = sum(c.get("429", 0) for c in state["calls"].values())
    return {"name": name, "wall_s": wall, "cpu_per_1000": cpu / returns * 1000, "calls_per_return": calls / returns,
            "share_429": limited / calls, "duplicates": state["duplicates"], "premature": state["premature"],
            "overlapping": state["overlapping_checks"]}


def held_by(url: str, pid: int) -> int:
    """Boxes and reports still claimed by the instance with this process id."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT (SELECT COUNT(*) FROM boxes WHERE claimed_by LIKE %(id)s)"
            " + (SELECT COUNT(*) FROM reports WHERE claimed_by LIKE %(id)s)", {"id": f"%:{pid}:%"}).fetchone()
    return row[0] if row else 0


def run_takeover(workdir: Path, returns: int, url: str) -> dict[str, Any]:
    """Three instances; once the victim holds claims mid-burst, kill -9 it and time how long its
    claims stay unclaimed by the others."""
    workdir.mkdir(parents=True, exist_ok=True)
    partner_process, partner = burst.start_standin(returns, RATE_LIMIT)
    daemons: list[subprocess.Popen[bytes]] = []
    try:
        daemons = start_daemons(workdir, 3, partner, url)
        victim = daemons[0]
        deadline = time.monotonic() + 120
        while held_by(url, victim.pid) == 0:
            if time.monotonic() > deadline:
                raise SystemExit("takeover: the victim never held a claim")
            time.sleep(0.05)
        held = held_by(url, victim.pid)
        victim.kill()
        killed_at = time.monotonic()
        victim.wait(10)
        while held_by(url, victim.pid):
            time.sleep(0.1)  # sampling the database, not synchronisation
        takeover = time.monotonic() - killed_at
        while not ((state := standin.read_ledger(partner["root"]))["finished"] and state["missing"] == 0):
            time.sleep(0.5)
            if time.monotonic() - killed_at > 600:
                raise SystemExit("takeover: the burst did not finish")
    finally:
        stop(daemons)
        partner_process.terminate()
        partner_process.wait(10)
    return {"held": held, "takeover_s": takeover, "missing": state["missing"], "premature": state["premature"],
            "duplicates": state["duplicates"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--returns", type=int, default=10000)
    parser.add_argument("--no-takeover", action="store_true", help="skip the kill -9 run")
    args = parser.parse_args()
    floor = sum(burst.minimum_calls(args.returns).values())
    print(f"{args.returns:,} returns, partner limit {RATE_LIMIT:g} calls/s per endpoint, lease_s {LEASE_S:g}")
    with throwaway_cluster() as cluster:
        root = Path(cluster.directory) / "runs"
        results = [run_burst("1 × SQLite", root / "sqlite", args.returns, 1, None),
                   run_burst("1 × PostgreSQL", root / "pg1", args.returns, 1, cluster.new_database()),
                   run_burst("3 × PostgreSQL", root / "pg3", args.returns, 3, cluster.new_database())]
        for r in results:
            print(f"  {r['name']:<16} wall {r['wall_s']:6.1f} s   CPU {r['cpu_per_1000']:5.2f} s/1,000 returns   "
                  f"calls/return {r['calls_per_return']:.3f} (floor {floor / args.returns:.3f})   "
                  f"429s {r['share_429']:.1%}   duplicates {r['duplicates']}   premature {r['premature']}   "
                  f"overlapping checks {r['overlapping']}")
        takeover = None if args.no_takeover else run_takeover(root / "takeover", args.returns,
                                                              cluster.new_database())
    if takeover:
        print(f"  kill -9 of one of three: its {takeover['held']} claims taken over in {takeover['takeover_s']:.1f} s "
              f"(lease_s {LEASE_S:g}); missing {takeover['missing']}, premature {takeover['premature']}, "
              f"duplicates {takeover['duplicates']}")
    sqlite, pg3 = results[0], results[2]
    checks = [
        (f"3 × PostgreSQL wall ≤ 1.1 × 1 × SQLite ({pg3['wall_s'] / sqlite['wall_s']:.2f}×)",
         pg3["wall_s"] <= 1.1 * sqlite["wall_s"]),
        (f"3 × PostgreSQL calls/return ≤ 1 × SQLite's ({pg3['calls_per_return']:.3f} vs "
         f"{sqlite['calls_per_return']:.3f}, 1% slack for resent reports)",
         pg3["calls_per_return"] <= sqlite["calls_per_return"] * 1.01),
        ("nothing premature or missing, no box checked by two instances at once",
         all(r["premature"] == 0 and r["overlapping"] == 0 for r in results)
         and (takeover is None or takeover["missing"] == takeover["premature"] == 0)),
    ]
    if takeover:
        checks.append((f"takeover ≤ lease_s + 5 s ({takeover['takeover_s']:.1f} s)",
                       takeover["takeover_s"] <= LEASE_S + 5))
    for text, met in checks:
        print(f"  {'met' if met else 'NOT met'}: {text}")
    return 0 if all(met for _, met in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
