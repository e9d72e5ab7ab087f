#!/usr/bin/env python3
"""Benchmark: this version of the tracker against an earlier git revision, interleaved in one run.

Builds REV from git (`git archive` into a temporary directory, its own venv from its own
requirements.txt, cached in /tmp/tracker-compare-venvs/<full sha>) and runs the same workloads
with it and with HEAD — by default the working tree this file sits in, with its .venv; with
--head REV2, another revision built the same way — taking turns: REV, HEAD, then HEAD, REV in
the next round, and so on, so that whatever else the machine is doing falls on both sides alike.

  burst          30,000 returns arriving over 10 s against the partner stand-in (latency 20–80 ms,
                 1% 5xx), `tracker.py run` with bench/burst.py's daemon config (its `tracker` run)
  rate-limited   5,000 returns against a partner limiting each endpoint to 250 calls/s
                 (bench/burst.py's `rate-limited` run)
  replay         `tracker.py replay` of 15,000 pickups of ../shared/timelines.py's default model
                 (seed 1), generated once with HEAD's python; skipped for a revision without replay

The stand-in, the workload and the measurements are bench/burst.py's — HEAD's copy of it, imported
— so both sides meet the same partner (HEAD's standin.py). Each side's daemon gets only the config
keys its own config.toml has (the others are named and left out), checked with its own
`tracker.py check-config` before anything is measured. For the daemon: wall from the partner's
first call to the last report it recorded (the stand-in's ledger), CPU time and peak RSS from
/proc the moment every collected return has been reported. For replay: the process's wall time,
and CPU (user + system) and peak RSS from its rusage.

    .venv/bin/python bench/compare.py 4cfd641                    three rounds (about 8 minutes)
    .venv/bin/python bench/compare.py 4cfd641 --head 5e8f276     two commits; the working tree unused
    .venv/bin/python bench/compare.py HEAD~3 --runs 1 --returns 3000 --workloads burst   a quick try
    .venv/bin/python bench/compare.py 4cfd641 --fresh             rebuild the cached venvs first

Prints each side's median (min–max) per workload and HEAD/REV ratios: the median of the rounds'
ratios, with their min–max. A round takes about 2.5 minutes on a 2-CPU VM (a burst 20–35 s and a
rate-limited run ~22 s per side, a replay ~45 s); building a venv the first time, ~15 s each.
Exit status 0 when every run completed, 1 when a run failed, 2 when a revision cannot be built.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENVS = Path(tempfile.gettempdir()) / "tracker-compare-venvs"
TIMELINES = ROOT.parent / "shared" / "timelines.py"
WORKLOADS = ("burst", "rate-limited", "replay")
BURST_NEEDS = ("measure", "daemon_config", "free_port", "standin", "RATE_LIMIT")


class BuildError(Exception):
    """A revision could not be built or its tracker refuses the benchmark's config."""


# ── the two sides ────────────────────────────────────────────────────────────────────────────


@dataclasses.dataclass
class Side:
    label: str  # "REV" or "HEAD"
    sha: str
    subject: str
    root: Path  # where its tracker.py, standin.py, bench/ and config.toml are
    python: Path
    note: str = ""  # e.g. "the working tree, with uncommitted changes"
    template: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # its config.toml
    commands: set[str] = dataclasses.field(default_factory=set)  # of WORKLOADS' commands, those it has

    @property
    def name(self) -> str:
        return f"{self.label} {self.sha[:7]}"


def git(*args: str, stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=False, stdout=stdout,
                          stderr=subprocess.PIPE, text=True)


def resolve(rev: str) -> tuple[str, str]:
    """The full sha and the subject line of a revision."""
    found = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if found.returncode != 0:
        raise BuildError(f"{rev!r} is not a commit in {ROOT}")
    sha = found.stdout.strip()
    return sha, git("log", "-1", "--format=%s", sha).stdout.strip()


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """One build of a venv at a time, should two comparisons start together."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def run_quietly(command: list[str], what: str, **kwargs: Any) -> None:
    done = subprocess.run(command, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
    if done.returncode != 0:
        tail = "\n".join(done.stdout.strip().splitlines()[-20:])
        raise BuildError(f"{what} failed (exit {done.returncode}):\n{tail}")


def build(label: str, rev: str, into: Path, fresh: bool) -> Side:
    """REV's files from git into `into`/<sha>, and its venv (cached by sha)."""
    sha, subject = resolve(rev)
    source = into / f"{label.lower()}-{sha[:12]}"
    source.mkdir(parents=True)
    with open(source / ".archive.tar", "wb") as archive:
        made = git("archive", "--format=tar", sha, stdout=archive)
    if made.returncode != 0:
        raise BuildError(f"git archive {sha[:12]} failed: {made.stderr.strip()}")
    run_quietly(["tar", "-x", "-C", str(source), "-f", str(source / ".archive.tar")], f"unpacking {sha[:12]}")
    (source / ".archive.tar").unlink()
    venv = VENVS / sha
    with locked(VENVS / f"{sha}.lock"):
        if fresh or not (venv / ".complete").exists():
            print(f"  building the venv of {label} {sha[:7]} in {venv} …", flush=True)
            started = time.monotonic()
            shutil.rmtree(venv, ignore_errors=True)
            run_quietly(["python3", "-m", "venv", str(venv)], f"python3 -m venv {venv}")
            run_quietly([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                         "-r", str(source / "requirements.txt")], f"pip install -r {sha[:7]}'s requirements.txt")
            (venv / ".complete").write_text(f"{sha}\n")
            print(f"  ({time.monotonic() - started:.0f} s)", flush=True)
    return Side(label, sha, subject, source, venv / "bin" / "python")


def working_tree() -> Side:
    python = ROOT / ".venv" / "bin" / "python"
    if not python.exists():
        raise BuildError(f"{python} is missing: run {ROOT / 'install'} first")
    sha, subject = resolve("HEAD")
    changed = git("status", "--porcelain", "--untracked-files=no", "--", "tracker.py", "standin.py",
                  "requirements.txt", "config.toml", "bench/burst.py").stdout.split("\n")
    files = sorted({line[3:] for line in changed if line.strip()})
    note = "the working tree" + (f", uncommitted changes to {', '.join(files)}" if files else "")
    return Side("HEAD", sha, subject, ROOT, python, note)


def inspect(side: Side) -> None:
    """What the side's config.toml has, and which of the workloads' commands its tracker.py has."""
    try:
        side.template = tomllib.loads((side.root / "config.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BuildError(f"{side.name}: cannot read its config.toml: {exc}") from None
    for command in ("run", "replay"):
        asked = subprocess.run([str(side.python), str(side.root / "tracker.py"), command, "--help"],
                               check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if asked.returncode == 0:
            side.commands.add(command)
    if "run" not in side.commands:
        raise BuildError(f"{side.name}: `tracker.py run --help` fails with its own python ({side.python})")


def fit(side: Side, sections: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The sections and keys of `sections` that the side's config.toml has, and those it lacks."""
    kept: dict[str, dict[str, Any]] = {}
    dropped = []
    for section, values in sections.items():
        known = side.template.get(section)
        if not isinstance(known, dict):
            dropped.append(f"[{section}]")
            continue
        kept[section] = {k: v for k, v in values.items() if k in known}
        dropped += [f"{section}.{k}" for k in values if k not in known]
    return kept, dropped


def check_config(side: Side, burst: ModuleType, workdir: Path) -> list[str]:
    """The daemon config of the burst workloads, as this side gets it, through its check-config."""
    where = workdir / f"check-{side.label.lower()}"
    where.mkdir()
    kept, dropped = fit(side, burst.daemon_config("http://127.0.0.1:9/", "127.0.0.1:0", burst.RATE_LIMIT))
    (where / "config.toml").write_text(burst.standin.daemon_config_toml(kept, "written by bench/compare.py"))
    checked = subprocess.run([str(side.python), str(side.root / "tracker.py"), "check-config", "--config",
                              str(where / "config.toml")], check=False, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "TRACKER_PARTNER_TOKEN": "compare-check"})
    if checked.returncode != 0:
        raise BuildError(f"{side.name} refuses the benchmark's config ({where / 'config.toml'}):\n"
                         f"{checked.stdout.strip()}")
    return dropped


def load_burst(head: Side) -> tuple[ModuleType, str]:
    """HEAD's bench/burst.py (it imports HEAD's standin.py); this file's own copy if that fails."""
    for candidate in (head.root / "bench" / "burst.py", ROOT / "bench" / "burst.py"):
        spec = importlib.util.spec_from_file_location("burst", candidate)
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 (an older burst.py may not import here: try the next)
            print(f"  ({candidate} does not import here: {exc})")
            sys.modules.pop("standin", None)
            continue
        if all(hasattr(module, name) for name in BURST_NEEDS):
            sys.modules["burst"] = module
            return module, str(candidate)
        sys.modules.pop("standin", None)
    raise BuildError("no usable bench/burst.py (HEAD's or this one's)")


# ── running and measuring ────────────────────────────────────────────────────────────────────


@dataclasses.dataclass
class Sample:
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    detail: str = ""


class LedgerTap:
    """Keeps the last ledger burst.measure read, for its first-call and last-recorded times."""

    def __init__(self, standin: ModuleType) -> None:
        self.last: dict[str, Any] | None = None
        self._read: Callable[[str], dict[str, Any]] = getattr(standin, "read_ledger")  # noqa: B009
        setattr(standin, "read_ledger", self.read)  # noqa: B010 (burst.measure reads it from there)

    def read(self, root: str) -> dict[str, Any]:
        self.last = self._read(root)
        return self.last


def run_daemon(side: Side, burst: ModuleType, tap: LedgerTap, workdir: Path, returns: int,
               rate_limit: float) -> Sample:
    workdir.mkdir(parents=True)
    listen = f"127.0.0.1:{burst.free_port()}"
    config = workdir / "config.toml"

    def command_for(partner_url: str) -> list[str]:
        kept, _ = fit(side, burst.daemon_config(partner_url, listen, rate_limit))
        config.write_text(burst.standin.daemon_config_toml(kept, "written by bench/compare.py"))
        return [str(side.python), str(side.root / "tracker.py"), "run", "--config", str(config)]

    tap.last = None
    result = burst.measure(f"{side.name} {workdir.name}", returns, rate_limit, command_for, workdir / "tracker.log",
                           {}, listen)
    ledger: dict[str, Any] = tap.last or {}
    first, last = ledger.get("first_call_s"), ledger.get("last_recorded_s")
    wall = last - first if first is not None and last is not None else result.wall_s
    return Sample(wall, result.cpu_s, result.peak_rss_mb,
                  f"{result.total_calls:,} calls, {result.wall_s:.1f} s from the daemon's start")


def run_replay(side: Side, timelines: Path, workdir: Path) -> Sample:
    workdir.mkdir(parents=True)
    output = workdir / "replay.txt"
    started = time.monotonic()
    with open(output, "wb") as out:
        process = subprocess.Popen([str(side.python), str(side.root / "tracker.py"), "replay", str(timelines),
                                    "--config", str(side.root / "config.toml")],
                                   stdout=out, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{side.name} replay: exited with {process.returncode}; see {output}")
    lines = output.read_text().strip().splitlines()
    detail = ""
    with contextlib.suppress(IndexError, ValueError, KeyError):
        summary = json.loads(lines[-1])
        detail = (f"calls/box {summary['calls_per_box']:.1f} (fixed {summary['fixed']['calls_per_box']:.1f}), "
                  f"p95 {summary['detect_delay_s']['p95']} s")
    return Sample(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, detail)


def generate_timelines(head: Side, boxes: int, seed: int, path: Path) -> None:
    with open(path, "wb") as out:
        made = subprocess.run([str(head.python), str(TIMELINES), "--boxes", str(boxes), "--seed", str(seed)],
                              check=False, stdout=out, stderr=subprocess.PIPE)
    if made.returncode != 0:
        raise SystemExit(f"{TIMELINES} failed: {made.stderr.decode(errors='replace').strip()}")


# ── report ───────────────────────────────────────────────────────────────────────────────────

METRICS = (("wall", "wall s", "{:.1f}"), ("cpu", "CPU s", "{:.1f}"), ("rss", "peak RSS MB", "{:.0f}"))
COLUMN = 22


def values(samples: list[Sample], metric: str) -> list[float]:
    return [{"wall": s.wall_s, "cpu": s.cpu_s, "rss": s.peak_rss_mb}[metric] for s in samples]


def spread(numbers: list[float], fmt: str, suffix: str = "") -> str:
    low, high = min(numbers), max(numbers)
    text = fmt.format(statistics.median(numbers)) + suffix
    if len(numbers) > 1:
        text += f" ({fmt.format(low)}–{fmt.format(high)})"
    return text


def row(label: str, cells: list[str], indent: str = "  ") -> None:
    print((f"{indent}{label:<{26 - len(indent)}}" + "".join(f"{c:<{COLUMN}}" for c in cells)).rstrip())


def print_results(workloads: list[str], sizes: dict[str, str], sides: tuple[Side, Side],
                  done: dict[tuple[str, str], list[Sample]], runs: int) -> None:
    rev, head = sides
    print()
    print(f"results: median (min–max) of {runs} run{'s' if runs > 1 else ''} per side; HEAD/REV is the median "
          f"of the rounds' ratios (min–max)")
    row("", [label for _, label, _ in METRICS], indent="")
    for workload in workloads:
        print(f"{workload} — {sizes[workload]}")
        for side in sides:
            samples = done.get((workload, side.label))
            if samples is None:
                print(f"  {side.name:<24}skipped (its tracker.py has no `{workload}` command)")
                continue
            row(side.name, [spread(values(samples, m), fmt) for m, _, fmt in METRICS])
        rev_samples, head_samples = done.get((workload, rev.label)), done.get((workload, head.label))
        if rev_samples and head_samples:
            cells = []
            for metric, _, _ in METRICS:
                ratios = [h / r for h, r in zip(values(head_samples, metric), values(rev_samples, metric),
                                                strict=True)]
                cells.append(spread(ratios, "{:.2f}", "×"))
            row("HEAD/REV", cells)


def header(sides: tuple[Side, Side], args: argparse.Namespace, burst_from: str) -> None:
    print("compare — the tracker at two revisions, on this machine, interleaved")
    for side in sides:
        note = f"  [{side.note}]" if side.note else ""
        subject = side.subject if len(side.subject) <= 100 else side.subject[:99] + "…"
        print(f"  {side.label:<5}{side.sha[:7]}  {subject}{note}")
    pythons = {subprocess.run([str(s.python), "-c", "import platform; print(platform.python_version())"],
                              check=False, stdout=subprocess.PIPE, text=True).stdout.strip() for s in sides}
    print(f"machine: {platform.node() or '?'}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()},"
          f" Linux {platform.release()}, Python {', '.join(sorted(pythons))} (the sides' venvs); load average "
          + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"workload, stand-in and measurements: {burst_from}; {args.runs} round{'s' if args.runs > 1 else ''},"
          f" REV first in odd rounds, HEAD first in even ones")
    print("wall: the daemon from the partner's first call to the last report recorded (the stand-in's ledger), "
          "replay from start to exit; CPU (user + system) and peak RSS of that process")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", metavar="REV", help="the earlier revision (anything git rev-parse takes)")
    parser.add_argument("--head", metavar="REV2", default=None,
                        help="build this revision as the HEAD side instead of using the working tree")
    parser.add_argument("--runs", type=int, default=3, help="runs of each workload per side (default 3)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"default {','.join(WORKLOADS)}")
    parser.add_argument("--returns", type=int, default=30000, help="returns in the burst (default 30000)")
    parser.add_argument("--limited-returns", type=int, default=5000,
                        help="returns in the rate-limited run (default 5000)")
    parser.add_argument("--boxes", type=int, default=15000, help="pickup timelines replayed (default 15000)")
    parser.add_argument("--fresh", action="store_true", help="rebuild the cached venvs of the built revisions")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, databases, sources)")
    args = parser.parse_args()
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = set(workloads) - set(WORKLOADS)
    if unknown or not workloads:
        parser.error(f"unknown workload(s): {', '.join(sorted(unknown))} (known: {', '.join(WORKLOADS)})")
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="tracker-compare-"))
    try:
        try:
            print(f"building (sources in {workdir}) …", flush=True)
            rev = build("REV", args.rev, workdir, args.fresh)
            head = build("HEAD", args.head, workdir, args.fresh) if args.head else working_tree()
            sides = (rev, head)
            for side in sides:
                inspect(side)
            burst, burst_from = load_burst(head)
            dropped = {side.label: check_config(side, burst, workdir) for side in sides}
        except BuildError as exc:
            print(f"compare: cannot build: {exc}", file=sys.stderr)
            return 2
        tap = LedgerTap(burst.standin)
        header(sides, args, burst_from)
        sizes = {"burst": f"{args.returns:,} returns over 10 s, partner latency 20–80 ms, 1% 5xx",
                 "rate-limited": f"{args.limited_returns:,} returns, partner limit {burst.RATE_LIMIT:g} calls/s per "
                                 f"endpoint, daemon cap {burst.RATE_LIMIT * 4:g}",
                 "replay": f"{args.boxes:,} pickups of ../shared/timelines.py's default model, seed 1"}
        for side in sides:
            if dropped[side.label]:
                print(f"  {side.name}: config keys its config.toml lacks, not written: "
                      f"{', '.join(dropped[side.label])}")
            for workload in workloads:
                if workload == "replay" and "replay" not in side.commands:
                    print(f"  {side.name}: replay skipped — its tracker.py has no `replay` command")
        timelines = workdir / "timelines.jsonl"
        if "replay" in workloads and any("replay" in s.commands for s in sides):
            if not TIMELINES.exists():
                print(f"  replay skipped for both: {TIMELINES} is missing")
                workloads.remove("replay")
            else:
                generate_timelines(head, args.boxes, 1, timelines)
        for workload in workloads:
            print(f"  {workload}: {sizes[workload]}")
        print(flush=True)

        done: dict[tuple[str, str], list[Sample]] = {}
        try:
            for round_number in range(1, args.runs + 1):
                order = sides if round_number % 2 else (head, rev)
                print(f"round {round_number} of {args.runs} ({order[0].label} first)", flush=True)
                for workload in workloads:
                    for side in order:
                        where = workdir / f"{workload}-{side.label.lower()}-{round_number}"
                        if workload == "replay":
                            if "replay" not in side.commands:
                                continue
                            sample = run_replay(side, timelines, where)
                        else:
                            returns = args.returns if workload == "burst" else args.limited_returns
                            rate_limit = 0.0 if workload == "burst" else burst.RATE_LIMIT
                            sample = run_daemon(side, burst, tap, where, returns, rate_limit)
                        done.setdefault((workload, side.label), []).append(sample)
                        print(f"  {workload:<13}{side.name:<13}wall {sample.wall_s:6.1f} s  CPU {sample.cpu_s:6.1f} s  "
                              f"peak RSS {sample.peak_rss_mb:4.0f} MB   {sample.detail}", flush=True)
        except SystemExit as exc:  # a run failed: keep its log
            args.keep = True
            print(f"compare: {exc}\n(work directory kept: {workdir})", file=sys.stderr)
            return 1
        print_results(workloads, sizes, sides, done, args.runs)
        print(f"\n({(time.monotonic() - started) / 60:.1f} minutes in all"
              + (f"; work directory kept: {workdir})" if args.keep else ")"))
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
