"""The full plan's wall time, estimated from the per-merge times measured in a results.json.

    python benchmarks/bench/estimate.py OUT/results.json [--times METHOD=SECONDS ...]

OUT/results.json: one written by run_all.py (a --quick run's will do) or research/probe.py, whose
"evaluations" carry each merge's wall and scoring time; the committed benchmarks/*/results.json
are the 0.1.0 tables and carry none.

For every method: (mean measured merge s + mean validation-scoring s) x merges in the full plan
per expert set, plus test scoring of the defaults and tuned rows; x the primary expert sets,
plus the replicate set's two rows per method. A method not measured in the file takes its
time from --times (merge + scoring s per merge), else the slowest measured method.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import mean

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import plan  # noqa: E402


def merges_per_set(method: str) -> int:
    """Merges of one method on one expert set: stage one, then the lambda grid without lambda 1."""
    return len(plan.stage_one(method)) + len(plan.stage_two({}))


def estimate(report: dict, extra: dict) -> dict:
    measured = {}
    for e in report["evaluations"]:
        measured.setdefault(e["method"], []).append(e["wall_s"] + e.get("score_s", 0.0))
    per_merge = {m: mean(v) for m, v in measured.items()}
    fallback = max(per_merge.values()) if per_merge else 60.0
    validation = sum(t["validation"] for t in report["tasks"].values())
    test = sum(t["test"] for t in report["tasks"].values())
    scale = (validation + test) / validation  # scoring the test split too, per item, as validation
    seconds = {}
    for method in plan.methods():
        one = extra.get(method, per_merge.get(method, fallback))
        per_set = merges_per_set(method) * one + 2 * one * (scale - 1)
        seconds[method] = per_set * len(plan.EXPERT_SETS) + 2 * one * scale * len(plan.REPLICATES)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--times", nargs="*", default=[], help="METHOD=SECONDS per merge (merge + validation scoring)")
    args = parser.parse_args()
    extra = {k: float(v) for k, v in (item.split("=") for item in args.times)}
    report = json.loads(args.results.read_text())
    if "evaluations" not in report:
        parser.error(f"{args.results} has no per-merge times ('evaluations'): give a results.json written by "
                     "run_all.py or research/probe.py")
    seconds = estimate(report, extra)
    for method, s in seconds.items():
        print(f"{method:18s} {merges_per_set(method):3d} merges/set  {s / 3600:6.2f} h")
    print(f"total {sum(seconds.values()) / 3600:.1f} h (without expert training)")


if __name__ == "__main__":
    main()
