"""tsv, iso_c and iso_cts solves: these solvers against the gesdd ones of an earlier commit.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/spectral_vs_gesdd.py [--commit 3fbf8dc] [--count 4]

The earlier solvers (default: 3fbf8dc, the last commit whose tsv, iso_c and iso_cts ran
LAPACK gesdd on full-size matrices) are taken from git into a temporary package; each
side runs in its own process on the same task vectors (seed 0, entries ~1e-3, float32),
best of 2 solves after a small warm-up. Prints seconds and the ratio now / before, and
each float32 result's relative distance to the float64 solve of the same inputs (float64
keeps gesdd in both). Absolute times depend on the machine and its load; compare the
ratios.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, here and in the children

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

METHODS = ("tsv", "iso_c", "iso_cts")
SHAPES = [(1024, 1024), (2048, 2048), (2816, 1024), (1024, 2816)]

CHILD = r"""
import json, sys, time, torch
package, out_features, in_features, count, save = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5]
if package == "now":
    from mergekit_wudi.solvers import IsoCSolver, IsoCtsSolver, TsvSolver
else:
    sys.path.insert(0, package)
    from before_solvers import IsoCSolver, IsoCtsSolver, TsvSolver
task_vectors = torch.randn(count, out_features, in_features, generator=torch.Generator().manual_seed(0)) * 1e-3
seconds, results = {}, {}
for name, solver in (("tsv", TsvSolver()), ("iso_c", IsoCSolver()), ("iso_cts", IsoCtsSolver())):
    solver.solve(task_vectors[:, :64, :64])
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        results[name] = solver.solve(task_vectors)
        best = min(best, time.perf_counter() - start)
    seconds[name] = best
if package == "now":  # the float64 solve of the same inputs (gesdd in float64), the yardstick
    for name, solver in (("tsv", TsvSolver()), ("iso_c", IsoCSolver()), ("iso_cts", IsoCtsSolver())):
        results[name + "64"] = solver.solve(task_vectors.double())
torch.save(results, save)
print(json.dumps(seconds))
"""


def earlier_solvers(commit: str, root: Path) -> Path:
    """mergekit_wudi/solvers at `commit`, as the package `before_solvers` under root."""
    repository = Path(__file__).resolve().parents[1]
    archive = subprocess.run(
        ["git", "archive", commit, "mergekit_wudi/solvers"], cwd=repository, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    package = root / "before_solvers"
    (root / "mergekit_wudi" / "solvers").rename(package)
    for source in package.glob("*.py"):
        source.write_text(source.read_text().replace("mergekit_wudi.solvers", "before_solvers"))
    return root


def run(package: str, shape, count: int, save: Path) -> dict:
    command = [sys.executable, "-c", CHILD, package, str(shape[0]), str(shape[1]), str(count), str(save)]
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", default="3fbf8dc")
    parser.add_argument("--count", type=int, default=4)
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as directory:
        root = earlier_solvers(args.commit, Path(directory))
        header = " | ".join(f"{m}: before / now (ratio); distance to float64, before / now" for m in METHODS)
        print(f"| shape | N | {header} |")
        print("|---|---|" + "---|" * len(METHODS))
        for shape in SHAPES:
            before = run(str(root), shape, args.count, root / "before.pt")
            now = run("now", shape, args.count, root / "now.pt")
            old, new = torch.load(root / "before.pt"), torch.load(root / "now.pt")
            cells = []
            for method in METHODS:
                exact = new[method + "64"]
                before_error, now_error = (float((r[method].double() - exact).norm() / exact.norm()) for r in (old, new))
                ratio = now[method] / before[method]
                cells.append(
                    f"{before[method]:.2f} s / {now[method]:.2f} s ({ratio:.1f}x); {before_error:.0e} / {now_error:.0e}"
                )
            print(f"| {shape[0]}x{shape[1]} | {args.count} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
