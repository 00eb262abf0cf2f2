"""Per-tensor solver cost, as ratios measured in one run.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_solvers.py [--full] [--device cuda]

For each shape and N: the time of one wudi Adam step (ours, no autograd) against one
step of the paper's formulation with autograd and torch.optim.Adam, against mergekit's
task_arithmetic on the same tensors, and wudi's achieved GFLOP/s against torch.mm on
the same shapes; plus the whole wudi_cfs and doge solves. Absolute times depend on the
machine and its load; the ratios are what to compare.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads

import argparse  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from mergekit_wudi.solvers import (  # noqa: E402
    DogeConfig,
    DogeSolver,
    WudiCfsSolver,
    WudiConfig,
    WudiSolver,
)


def timed(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def task_vectors(count, out_features, in_features, device, rank=64):
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(count, out_features, rank, generator=generator)
    right = torch.randn(count, rank, in_features, generator=generator)
    noise = torch.randn(count, out_features, in_features, generator=generator) * 0.1
    return ((left @ right) / rank + noise).mul_(1e-3).to(device)


def autograd_reference_step_time(tv, steps):
    """The paper's loop: (t_m - t_i) @ t_i^T per task, autograd, torch.optim.Adam."""
    t_m = tv.sum(0).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([t_m], lr=1e-5)
    norms = [t.pow(2).sum() for t in tv]

    def run():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = sum(((t_m - t) @ t.T).pow(2).sum() / n for t, n in zip(tv, norms))
            loss.backward()
            optimizer.step()

    return timed(run) / steps


def task_arithmetic_time(tv):
    from mergekit.merge_methods import merge_tensors

    base = torch.zeros_like(tv[0])
    tensors = [base] + [base + t for t in tv]
    return timed(lambda: merge_tensors(tensors, "task_arithmetic", base_index=0, parameters={"weight": 1.0}), 3)


def mm_gflops(out_features, in_features, device):
    a = torch.randn(out_features, in_features, device=device)
    b = torch.randn(in_features, in_features, device=device)
    seconds = timed(lambda: a @ b, 5)
    return 2 * out_features * in_features * in_features / seconds / 1e9


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true", help="bigger shapes and N = 2, 4, 8")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20, help="Adam steps timed per solve")
    args = parser.parse_args()
    shapes = [(1024, 1024), (2816, 1024), (1024, 2816)] if args.full else [(512, 512), (1024, 1024), (512, 1408)]
    counts = [2, 4, 8] if args.full else [3]
    if args.full:
        shapes.append((4096, 4096))

    print(f"device={args.device} threads={torch.get_num_threads()} steps={args.steps} torch={torch.__version__}")
    print("| shape | N | wudi step vs autograd step | wudi 300 steps / task_arithmetic | wudi GFLOP/s / torch.mm | wudi_cfs solve / task_arithmetic | doge 400 steps / task_arithmetic | max rel. diff vs autograd |")
    print("|---|---|---|---|---|---|---|---|")
    for out_features, in_features in shapes:
        for count in counts:
            tv = task_vectors(count, out_features, in_features, args.device)
            config = WudiConfig(steps=args.steps)
            setup = timed(lambda: WudiSolver(WudiConfig(steps=0)).solve(tv))
            ours_total = timed(lambda: WudiSolver(config).solve(tv))
            ours_step = max(ours_total - setup, 1e-9) / args.steps
            reference_steps = 3 if out_features * in_features > 2**21 else 5
            reference_step = autograd_reference_step_time(tv, reference_steps)
            ta = task_arithmetic_time(tv)
            in_space = WudiSolver.uses_in_space(count, out_features, in_features)
            flops = 2 * out_features * in_features**2 if in_space else 4 * count * out_features**2 * in_features
            achieved = flops / ours_step / 1e9
            peak = mm_gflops(out_features, in_features, args.device)
            cfs = timed(lambda: WudiCfsSolver().solve(tv))
            doge_steps = min(args.steps, 400)
            doge_setup = timed(lambda: DogeSolver(DogeConfig(steps=0)).solve(tv))
            doge_run = timed(lambda: DogeSolver(DogeConfig(steps=doge_steps)).solve(tv))
            doge_full = doge_setup + (doge_run - doge_setup) * 400 / doge_steps
            wudi_full = setup + ours_step * 300
            # Same answer: 5 steps of both, float32, relative to the merged vector.
            ours5 = WudiSolver(WudiConfig(steps=5)).solve(tv)
            ref = tv.sum(0).clone().requires_grad_(True)
            optimizer = torch.optim.Adam([ref], lr=1e-5)
            for _ in range(5):
                optimizer.zero_grad()
                sum(((ref - t) @ t.T).pow(2).sum() / t.pow(2).sum() for t in tv).backward()
                optimizer.step()
            diff = ((ours5 - ref.detach()).norm() / ref.detach().norm()).item()
            print(
                f"| {out_features}x{in_features} | {count} | {reference_step / ours_step:.1f}x faster "
                f"| {wudi_full / ta:.0f}x | {achieved / peak:.0%} ({'in' if in_space else 'out'}-space) "
                f"| {cfs / ta:.0f}x | {doge_full / ta:.0f}x | {diff:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
