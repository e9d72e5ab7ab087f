"""The tracking schedule on the real time scale: partner calls and detection delay, learned schedule
against fixed polling, on pickup timelines from ../shared/timelines.py — its default model and
variations of it — and a curve of calls against detect_within_s.

Each line replays one sales event through `tracker.replay_timelines` (the track stage's own
decisions on a virtual clock, starting with no history):

    .venv/bin/python bench/schedule.py [--boxes 15000] [--seed 1] [--quick]

Targets (issue 27): on the default model, calls per box <= 0.17x fixed 15-minute polling's with a
p95 detection delay no worse than fixed polling's and nothing undetected; on each variation
<= 0.30x fixed polling's calls with p95 <= 1.1x fixed polling's. About 8 minutes (--quick: the
default model only; --boxes 3000: about 2).
"""

import argparse
import dataclasses
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tracker  # noqa: E402

TIMELINES = ROOT.parent / "shared" / "timelines.py"
VARIATIONS: dict[str, dict[str, Any]] = {
    "evening couriers": {"assign_hours": [17.0, 19.0], "pickup_hours": [18.0, 22.0], "last_collect_hour": 23.5},
    "weekday-only couriers": {"working_days": [0, 1, 2, 3, 4]},
    "slow pickups": {"collect_median_min": 240, "collect_sigma": 0.8},
    "many failed attempts": {"failed_attempt": 0.3},
    "more cancellations": {"cancelled": 0.2},
    "night couriers": {"assign_hours": [0.5, 2.0], "pickup_hours": [2.0, 6.0], "last_collect_hour": 7.0},
    "weekends only": {"working_days": [5, 6]},
    "many never registered": {"never_registered": 0.2},
    "long holiday": {},  # the default model, every courier's step a week later (holiday())
}
HOLIDAY_S = 7 * 86400.0  # timelines.py knows working days, not dates: a break is a shift of the couriers' steps
CURVE_S = (300.0, 900.0, 1800.0, 3600.0)


def load_model() -> Any:
    spec = importlib.util.spec_from_file_location("timelines", TIMELINES)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {TIMELINES}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timelines(model: Any, boxes: int, seed: int, params: dict[str, Any],
              holiday_s: float = 0.0) -> list[tracker.PickupTimeline]:
    def shifted(e: dict[str, Any]) -> tracker.StatusChange:
        return tracker.StatusChange(status=e["status"], at=e["at"] + (holiday_s if e["status"] != "requested" else 0))
    return [tracker.PickupTimeline(shipment_number=b["shipment_number"], requested_at=b["requested_at"],
                                   registered_at=b["registered_at"], events=tuple(shifted(e) for e in b["events"]))
            for b in model.generate(boxes, seed, params)]


def line(name: str, learned: dict[str, Any], fixed: dict[str, Any], *, ratio: float, delay_ratio: float) -> bool:
    share = learned["calls_per_box"] / fixed["calls_per_box"]
    p95, fixed_p95 = learned["detect_delay_s"]["p95"], fixed["detect_delay_s"]["p95"]
    met = share <= ratio and p95 <= delay_ratio * fixed_p95 and learned["undetected"] == 0
    print(f"  {name:<24} calls/box {learned['calls_per_box']:6.1f} vs {fixed['calls_per_box']:6.1f} ({share:.2f}x, "
          f"target <= {ratio:.2f}x)  p95 {p95:7.0f} s vs {fixed_p95:5.0f} s ({p95 / fixed_p95:.2f}x, target <= "
          f"{delay_ratio:.2f}x)  p99 {learned['detect_delay_s']['p99']:7.0f} s  undetected "
          f"{learned['undetected']}   {'met' if met else 'NOT met'}")
    return met


def replay(events: list[tracker.PickupTimeline], config: tracker.ScheduleConfig) -> tuple[dict, dict]:
    return (tracker.replay_timelines(events, config, learn=True).summary(),
            tracker.replay_timelines(events, config, learn=False).summary())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boxes", type=int, default=15000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="the default model only")
    args = parser.parse_args()
    model = load_model()
    config = tracker.ScheduleConfig()
    started = time.monotonic()
    print(f"{args.boxes:,} boxes, seed {args.seed}, detect_within_s {config.detect_within_s:g}, "
          f"fixed polling every {config.track_every_s:g} s")
    default = timelines(model, args.boxes, args.seed, {})
    all_met = line("default model", *replay(default, config), ratio=0.17, delay_ratio=1.0)
    if not args.quick:
        for name, params in VARIATIONS.items():
            holiday_s = HOLIDAY_S if name == "long holiday" else 0.0
            all_met &= line(name, *replay(timelines(model, args.boxes, args.seed, params, holiday_s), config),
                            ratio=0.30, delay_ratio=1.1)
        print("curve on the default model (fixed polling at track_every_s = detect_within_s):")
        for within in CURVE_S:
            curve = dataclasses.replace(config, detect_within_s=within, track_every_s=within)
            learned, fixed = replay(default, curve)
            print(f"  detect_within_s {within:6.0f}  calls/box {learned['calls_per_box']:6.1f} (fixed "
                  f"{fixed['calls_per_box']:6.1f})  p95 {learned['detect_delay_s']['p95']:7.0f} s (fixed "
                  f"{fixed['detect_delay_s']['p95']:5.0f} s)")
    print(f"{'every target met' if all_met else 'NOT every target met'} ({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
