"""What each `calibrate` rule costs, as ratios measured in one run.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/calibrate_cost.py [--quick] [--methods iso_c iso_cts]

Per Llama-3.2-1B linear shape (float32, N = 4 full-rank task vectors, as full fine-tunes have),
each method's solve under every `calibrate` rule (the best of two solves,
the rules taken in turn), and the time of a whole Llama-3.2-1B layer (q, k, v, o, gate, up, down)
summed from them. The ratios against `none` are what to compare: absolute times depend on the
machine and its load. (The mergekit-yaml merge adds reading and writing, which no rule changes.)
Under a rule other than input_space iso_c and iso_cts also count the task vectors' ranks on the first 12 tensors of
a run, for their mixed-rank warning (solvers/iso.py, RANK_SAMPLE); the times here are those of
every later tensor, with that sample used up first, and the sample's cost is printed apart.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from solvers import machine  # noqa: E402

from mergekit_wudi.solvers import SOLVERS, iso  # noqa: E402
from mergekit_wudi.solvers.calibrate import CALIBRATIONS  # noqa: E402

COUNT = 4
LAYER = {(2048, 2048): 2, (512, 2048): 2, (8192, 2048): 2, (2048, 8192): 1}  # Llama-3.2-1B: q, o; k, v; gate, up; down
QUICK = {(256, 256): 2, (64, 256): 2, (1024, 256): 2, (256, 1024): 1}


def best_time(solver, vectors: torch.Tensor, repeats: int = 2) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        solver.solve(vectors)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke test)")
    parser.add_argument("--methods", nargs="+", default=["iso_c", "iso_cts"])
    args = parser.parse_args()
    classes = {cls.name: cls for cls in SOLVERS}
    shapes = QUICK if args.quick else LAYER
    generator = torch.Generator().manual_seed(0)
    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}; N = {COUNT}, float32")
    print("| method | shape | " + " | ".join(f"{rule} (s)" for rule in CALIBRATIONS) + " | "
          + " | ".join(f"{rule} / none" for rule in CALIBRATIONS[1:]) + " |")
    print("|---|---|" + "---|" * (2 * len(CALIBRATIONS) - 1))
    sampled = {}
    for method in args.methods:
        layer = dict.fromkeys(CALIBRATIONS, 0.0)
        for shape, per_layer in shapes.items():
            vectors = torch.randn(COUNT, *shape, generator=generator) * 1e-3
            iso._RANKS_READ[method] = iso.RANK_SAMPLE  # the sample used up
            seconds = {rule: best_time(classes[method](calibration=rule), vectors) for rule in CALIBRATIONS}
            iso._RANKS_READ[method] = 0  # then one solve that counts ranks
            default = classes[method].calibration  # their YAML default
            sampled[(method, shape)] = best_time(classes[method](calibration=default), vectors, repeats=1) / seconds[default]
            for rule, value in seconds.items():
                layer[rule] += per_layer * value
            print(f"| {method} | {shape[0]}x{shape[1]} | " + " | ".join(f"{seconds[r]:.2f}" for r in CALIBRATIONS) + " | "
                  + " | ".join(f"{seconds[r] / seconds['none']:.2f}x" for r in CALIBRATIONS[1:]) + " |", flush=True)
        print(f"| {method} | one layer | " + " | ".join(f"{layer[r]:.2f}" for r in CALIBRATIONS) + " | "
              + " | ".join(f"{layer[r] / layer['none']:.2f}x" for r in CALIBRATIONS[1:]) + " |", flush=True)
    print("\nthe default rule with the rank sample (the first 12 tensors of a run) / without: "
          + ", ".join(f"{method} {shape[0]}x{shape[1]} {ratio:.2f}x" for (method, shape), ratio in sampled.items()))


if __name__ == "__main__":
    main()
