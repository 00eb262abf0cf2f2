"""Every solver on an accelerator against the CPU, on the same inputs: results and times.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/gpu_check.py            # cuda when available
    OMP_WAIT_POLICY=PASSIVE python benchmarks/gpu_check.py --device cpu --quick   # the harness itself

For each method of the registry (`mergekit_wudi.solvers.SOLVERS`) and each shape, the same
float32 task vectors (N = 4, Llama-like shapes) are solved on the CPU and on `--device`,
with TF32 matmuls off and then on (`torch.backends.cuda.matmul.allow_tf32`, cuDNN's too).
Prints, per row: the relative Frobenius difference to the CPU result, whether the output
is finite, the best time of two runs on each side (after a warm-up), and the speed-up.
Iterative methods run `--steps` steps (the time scales with it). Exits non-zero when an
output is not finite or differs from the CPU's by more than `--tolerance` with TF32 off.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from mergekit_wudi.solvers import SOLVERS  # noqa: E402

SHAPES = [(2048, 2048), (8192, 2048), (2048, 8192)]
QUICK_SHAPES = [(96, 64)]
SPREAD = (1.0, 0.25, 4.0, 1.0)  # per-task scales: ace's refinement on


def task_vectors(shape, count: int = 4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scales = torch.tensor([SPREAD[i % len(SPREAD)] for i in range(count)])[:, None, None]
    return torch.randn(count, *shape, generator=generator) * 1e-3 * scales


def solver_for(solver_cls, steps: int):
    fields = {field.name for field in dataclasses.fields(solver_cls.config_cls)}
    return solver_cls(solver_cls.config_cls(steps=steps) if "steps" in fields else None)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(solver, inputs: torch.Tensor, device: str):
    solver.solve(inputs)  # warm-up: kernels, libraries
    sync(device)
    best, result = float("inf"), None
    for _ in range(2):
        start = time.perf_counter()
        result = solver.solve(inputs)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return result, best


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="one small shape (checks the harness)")
    parser.add_argument("--steps", type=int, default=20, help="steps of the iterative methods")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest relative difference, TF32 off")
    args = parser.parse_args()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"device: {args.device} ({name}), torch {torch.__version__}, CPU threads {torch.get_num_threads()}")
    print("| method | shape | TF32 | rel. diff to CPU | finite | CPU s | device s | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    failures = 0
    for solver_cls in SOLVERS:
        solver = solver_for(solver_cls, args.steps)
        for shape in shapes:
            inputs = task_vectors(shape)
            reference, cpu_seconds = timed(solver, inputs, "cpu")
            for tf32 in (False, True):
                set_tf32(tf32)
                result, seconds = timed(solver, inputs.to(args.device), args.device)
                result = result.cpu()
                finite = bool(torch.isfinite(result).all())
                difference = float((result.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-30))
                failures += (not finite) or (not tf32 and difference > args.tolerance)
                print(f"| {solver_cls.name} | {shape[0]}x{shape[1]} | {'on' if tf32 else 'off'} | {difference:.2e} | "
                      f"{finite} | {cpu_seconds:.3f} | {seconds:.3f} | {cpu_seconds / seconds:.1f}x |", flush=True)
            set_tf32(False)
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
