"""Cost of running the solvers' LAPACK factorisations on one thread (for -j independence).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/lapack_threads.py

wudi_cfs (Cholesky) and doge (eigh and SVD) run their factorisations on one CPU thread so that
the output does not depend on torch's thread count (`-j`); see
`mergekit_wudi.solvers.one_cpu_thread`. This times both ways, interleaved in
rounds (best of 3 each), and prints the ratios measured in this one run.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads

import time  # noqa: E402

import torch  # noqa: E402

from mergekit_wudi.solvers import (  # noqa: E402
    THREADED_LAPACK_ENV,  # noqa: E402
    DogeConfig,
    DogeSolver,
    WudiCfsSolver,
)

CASES = [((1024, 1024), 3), ((2048, 2048), 3)]
ROUNDS = 3


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| shape | N | doge subspace phase (shared_basis): one thread / all | wudi_cfs: one thread / all | doge, 400 steps: one thread / all |")
    print("|---|---|---|---|---|")
    for shape, count in CASES:
        task_vectors = torch.randn(count, *shape, generator=generator) * 1e-3
        jobs = {
            "svd": lambda: DogeSolver().shared_basis(task_vectors),
            "cfs": lambda: WudiCfsSolver().solve(task_vectors),
            "doge": lambda: DogeSolver(DogeConfig(steps=400)).solve(task_vectors),
        }
        best = {(mode, job): float("inf") for mode in ("one", "all") for job in jobs}
        for _ in range(ROUNDS):
            for mode, value in (("one", ""), ("all", "1")):
                os.environ[THREADED_LAPACK_ENV] = value
                for job, function in jobs.items():
                    best[mode, job] = min(best[mode, job], timed(function))
        os.environ.pop(THREADED_LAPACK_ENV, None)
        cells = [
            f"{best['one', job]:.2f} s / {best['all', job]:.2f} s = {best['one', job] / best['all', job]:.2f}x"
            for job in jobs
        ]
        print(f"| {shape[0]}x{shape[1]} | {count} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
