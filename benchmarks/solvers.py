"""Solver cost and memory, as ratios measured in one run.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/solvers.py tensors [--large] [--quick] [--target]
    OMP_WAIT_POLICY=PASSIVE python benchmarks/solvers.py memory [--size 8192] [--count 8]
    OMP_WAIT_POLICY=PASSIVE python benchmarks/solvers.py spectral [--counts 2 4 8] [--quick] [--methods ...]
    OMP_WAIT_POLICY=PASSIVE python benchmarks/solvers.py e2e
    OMP_WAIT_POLICY=PASSIVE python benchmarks/solvers.py trim [--quick]

`tensors`: per tensor (float32, Llama-like shapes, N = 2, 4, 8 and N = 3 on 1024x1024),
on the CPU and, when torch.cuda.is_available(), on CUDA too:
  - wudi's time per Adam step against (a) one step of the paper's loop written plainly
    (autograd through `(t_m - t_i) @ t_i^T` per task, torch.optim.Adam), and its useful
    GFLOP/s, min(2*out*in^2, 4*N*out^2*in) flops a step, against torch.mm's on the
    GEMMs that step is made of (the machine's limit);
  - whole solves (wudi 300 steps, wudi_cfs, doge 400 steps) against (b) mergekit's
    task_arithmetic on the same tensors (`merge_tensors`);
  - wudi_cfs's useful GFLOP/s against torch.mm's, and the peak extra memory of each
    method through the mergekit adapter (below), in units of the tensor's float32 size,
    against the bound N + 6.
  On 1024x1024 with N = 3 the whole 300-step solve also runs against the whole autograd
  loop, with the relative difference of the two results.
`memory`: peak extra memory of one large solve (default 8192x8192, N = 8: wudi and
  wudi_cfs), through the adapter, with a few Adam steps: every buffer is allocated
  before or at the first step, so the peak does not depend on the step count.
`spectral`: tsv, iso_c and iso_cts, or --methods (N = 2, 4, 8; square and Llama-like
  shapes): peak extra memory through the adapter against N + 6, and the merge's time
  against task_arithmetic's (`--methods wudi_cfs ace --counts 4`: ace against wudi_cfs).
`trim`: the magnitude trim before a solve (`density` 0.3, N = 4 task vectors, float32 and
  float64) against wudi_cfs's own solve of the same tensors and against the same trim
  selected with torch.kthvalue (which copies |t| and allocates int64 indices).
`e2e`: `mergekit-yaml` wall time and peak RSS of each method against task_arithmetic on
  one Llama-like family (bf16 checkpoints, 3 fine-tunes).

Memory is measured in a fresh subprocess per case (Linux): with the inputs allocated and
written, the resident-set high-water mark is reset (`5 > /proc/self/clear_refs`); the
peak extra memory is VmHWM after the merge minus VmRSS before it, so it counts every
page the merge touches (torch's tensors, MKL's work buffers, LAPACK workspaces, and
mergekit's own wrapper around the method). The child runs with MALLOC_MMAP_THRESHOLD_=
65536 and MKL_DISABLE_FAST_MM=1, so that freed tensors and MKL's freed work buffers
return to the OS at once and the figure is the live peak, not glibc's heap retention or
MKL's buffer cache (on an Intel Xeon that cache alone took doge and wudi up to 0.7 tensor
past N + 6 at 1024x1024, where an AMD EPYC stayed within). On CUDA: torch.cuda.max_memory_allocated.
Absolute times depend on the machine and its load; the ratios are what to compare.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import torch  # noqa: E402

from mergekit_wudi.solvers import (  # noqa: E402
    DogeConfig,
    DogeSolver,
    WudiCfsSolver,
    WudiConfig,
    WudiSolver,
)
from mergekit_wudi.solvers.wudi_cfs import solve_cost  # noqa: E402

LINEAR_NAME = "model.layers.0.mlp.up_proj.weight"  # what the adapter solves
# The memory children's environment (module docstring): freed buffers go back to the OS at once.
MEMORY_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(1 << 16), "MKL_DISABLE_FAST_MM": "1"}
MEMORY_STEPS = 3  # Adam steps in the memory cases (the peak does not depend on it)


# --- helpers ----------------------------------------------------------------------------


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    text = f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        text += f"; CUDA: {torch.cuda.get_device_name()}"
    return text


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_time(fn, device: str, repeat: int = 2) -> float:
    """Fastest of `repeat` runs, in seconds (the least disturbed by other load)."""
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def task_vectors(count: int, out_features: int, in_features: int, device: str, seed: int = 0) -> torch.Tensor:
    """(N, out, in) float32: rank-64 structure plus dense noise, entries of about 1e-3,
    a stand-in for fine-tuning deltas (full rank, decaying spectrum)."""
    generator = torch.Generator().manual_seed(seed)
    result = torch.empty(count, out_features, in_features)
    for index in range(count):
        left = torch.randn(out_features, 64, generator=generator)
        right = torch.randn(64, in_features, generator=generator)
        torch.randn(out_features, in_features, generator=generator, out=result[index]).mul_(0.1)
        result[index].addmm_(left, right, alpha=1 / 64).mul_(1e-3)
    return result.to(device)


def autograd_wudi(tv: torch.Tensor, steps: int, lr: float = 1e-5):
    """The paper's loop, plainly: autograd through (t_m - t_i) @ t_i^T, torch.optim.Adam."""
    merged = tv.sum(0).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([merged], lr=lr)
    sq_norms = [t.pow(2).sum() for t in tv]

    def run(count):
        for _ in range(count):
            optimizer.zero_grad()
            loss = sum(((merged - t) @ t.T).pow(2).sum() / n for t, n in zip(tv, sq_norms))
            loss.backward()
            optimizer.step()

    return merged, run


def task_arithmetic_merge(tv: torch.Tensor):
    """mergekit's task_arithmetic on W0 = 0, W_i = t_i, as a function to time."""
    from mergekit.merge_methods import merge_tensors

    base = torch.zeros_like(tv[0])
    tensors = [base] + [base + t for t in tv]
    return lambda: merge_tensors(tensors, "task_arithmetic", base_index=0, parameters={"weight": 1.0})


# --- memory, in a fresh subprocess per case ------------------------------------------------


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset the resident-set high-water mark (VmHWM) to the current RSS; return that."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # Linux >= 4.0: reset the peak RSS
    return status_bytes("VmRSS")


# Per-model weights of --spread: the task vectors' squared norms spread over a factor 256.
SPREAD = (1.0, 0.25, 4.0)


def memory_child(method: str, count: int, out_features: int, in_features: int, device: str, spread: bool = False,
                 calibrate: bool = False, density: Optional[float] = None, by_kind: bool = False) -> dict:
    """Runs in the child: merge one tensor through the adapter, return peak extra bytes. by_kind:
    as the guard merges a mixed set for a by-kind method (guard.kind_parts), the even-numbered
    task vectors as the full part (first_order), the others as the adapters' (sum_norm)."""
    from mergekit.merge_methods import merge_tensors, registry

    if by_kind:  # merge_tensors has no models for the guard to read: its verdict, given
        import mergekit_wudi.adapter
        from mergekit_wudi.solvers.base import Part

        parts = (Part(tuple(range(0, count, 2)), "first_order", "full"), Part(tuple(range(1, count, 2)), "sum_norm", "adapters"))
        mergekit_wudi.adapter.kind_parts = lambda method, group, parameters: parts

    config_cls = getattr(registry.get(method), "config_cls", None)  # ours: an iterative one has `steps`
    names = {field.name for field in dataclasses.fields(config_cls)} if config_cls else set()
    parameters = {"steps": MEMORY_STEPS} if "steps" in names else {}
    if method == "task_arithmetic":
        parameters = {"weight": 1.0}
    if spread:
        parameters["weight"] = [SPREAD[index % len(SPREAD)] for index in range(count)]
    if calibrate:
        parameters["calibrate"] = "input_space"
    if density is not None:
        parameters["density"] = density
    # Load every library and kernel first, on a tiny case and on one of half the sides (the
    # same routes, a quarter of the memory), so the measurement starts warm: threaded GEMM
    # and LAPACK paths, their thread pools and kernels. Spread weights too, so that a
    # data-dependent path (ace's refinement) and the libraries it loads (scipy's OpenBLAS
    # and its 32 MiB buffers) are warm as well.
    warm_spread = {**parameters, "weight": [SPREAD[index % len(SPREAD)] * 1e-2 for index in range(count)]}
    for shape in ((16, 16), (max(16, out_features // 2), max(16, in_features // 2))):
        warm = [torch.randn(*shape, device=device) for _ in range(count + 1)]
        merge_tensors(warm, method, base_index=0, name=LINEAR_NAME, parameters=parameters)
        merge_tensors(warm, method, base_index=0, name=LINEAR_NAME, parameters=warm_spread)
        del warm
    # Inputs written in place, one (out, in) tensor at a time: no temporary above them.
    generator = torch.Generator().manual_seed(0)
    tensors = []
    for _ in range(count + 1):
        tensor = torch.empty(out_features, in_features)
        torch.randn(out_features, in_features, generator=generator, out=tensor).mul_(1e-3)
        tensors.append(tensor.to(device))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = reset_peak_rss()
    start = time.perf_counter()
    result = merge_tensors(tensors, method, base_index=0, name=LINEAR_NAME, parameters=parameters)
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else status_bytes("VmHWM")
    assert result.shape == (out_features, in_features) and bool(torch.isfinite(result).all())
    return {"extra": peak - before, "seconds": seconds}


def measure_memory(method: str, count: int, out_features: int, in_features: int, device: str, spread: bool = False) -> float:
    """Peak extra memory of one adapter merge, in units of the tensor's float32 size."""
    command = [sys.executable, __file__, "child", method, str(count), str(out_features), str(in_features), device]
    command += ["--spread"] if spread else []
    # Freed tensors go back to the OS at once (glibc's dynamic mmap threshold would keep
    # them in the heap, where the peak then depends on the order of earlier frees).
    environment = dict(os.environ, **MEMORY_ENVIRONMENT)
    completed = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=environment)
    if completed.returncode != 0:
        raise RuntimeError(f"memory child failed:\n{completed.stderr[-3000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["ratio"] = result["extra"] / (out_features * in_features * 4)
    return result


# --- the per-tensor table ----------------------------------------------------------------------


def interleaved(functions: dict, device: str, rounds: int) -> dict:
    """Fastest time of each function over `rounds` rounds that run them in turn, so that
    load from other processes falls alike on everything a ratio compares."""
    times = {name: float("inf") for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            times[name] = min(times[name], best_time(function, device, 1))
    return times


class LoopTimer:
    """Seconds spent inside a solver method (wudi's `_adam`: every Adam step of every row
    chunk; doge's `shared_basis`), measured by wrapping it: a solve's own step loop,
    timed directly rather than as a difference of two noisy whole-solve times."""

    def __init__(self, cls, name: str, device: str):
        self.cls, self.name, self.device, self.seconds = cls, name, device, 0.0

    def __enter__(self):
        original = getattr(self.cls, self.name)
        self.original = original

        def timed(*args, **kwargs):
            sync(self.device)
            start = time.perf_counter()
            result = original(*args, **kwargs)
            sync(self.device)
            self.seconds += time.perf_counter() - start
            return result

        setattr(self.cls, self.name, timed)
        return self

    def __exit__(self, *exc):
        setattr(self.cls, self.name, self.original)


def tensor_row(out_features: int, in_features: int, count: int, device: str, compare_full: bool) -> str:
    tv = task_vectors(count, out_features, in_features, device)
    big = out_features * in_features >= 2**24
    steps = 3 if big else 8
    reference_steps = 2 if big else 3
    _, run_reference = autograd_wudi(tv, 1)
    run_reference(1)  # Adam state allocated, autograd warm

    in_space = WudiSolver.uses_in_space(count, out_features, in_features)
    if in_space:
        flops = 2 * out_features * in_features**2
        gemms = [((out_features, in_features), (in_features, in_features))]
    else:
        flops = 4 * count * out_features**2 * in_features
        gemms = [
            ((out_features, in_features), (in_features, count * out_features)),
            ((out_features, count * out_features), (count * out_features, in_features)),
        ]
    mm_operands = [(torch.randn(*a, device=device), torch.randn(*b, device=device)) for a, b in gemms]
    square = [(torch.randn(out_features, in_features, device=device), torch.randn(in_features, in_features, device=device))]
    loops = {"wudi": float("inf"), "wudi_setup": float("inf"), "doge": float("inf"), "doge_setup": float("inf")}

    def wudi():
        with LoopTimer(WudiSolver, "_adam", device) as loop:
            start = time.perf_counter()
            WudiSolver(WudiConfig(steps=steps)).solve(tv)
            sync(device)
            total = time.perf_counter() - start
        loops["wudi"] = min(loops["wudi"], loop.seconds / steps)
        loops["wudi_setup"] = min(loops["wudi_setup"], total - loop.seconds)

    def doge():
        with LoopTimer(DogeSolver, "_solve_delta", device) as whole, LoopTimer(DogeSolver, "shared_basis", device) as basis:
            start = time.perf_counter()
            DogeSolver(DogeConfig(steps=steps)).solve(tv)
            sync(device)
            total = time.perf_counter() - start
        loops["doge"] = min(loops["doge"], (whole.seconds - basis.seconds) / steps)
        loops["doge_setup"] = min(loops["doge_setup"], total - (whole.seconds - basis.seconds))

    functions = {
        "wudi": wudi,
        "reference": lambda: run_reference(reference_steps),
        "mm": lambda: [torch.mm(a, b) for a, b in mm_operands],
        "square_mm": lambda: [torch.mm(a, b) for a, b in square],
        "cfs": lambda: WudiCfsSolver().solve(tv),
        "task_arithmetic": task_arithmetic_merge(tv),
    }
    if not big:  # doge: N + 1 SVDs per solve, not on the large row
        functions["doge"] = doge
    times = interleaved(functions, device, 1 if big else 2)

    # wudi: per step against the autograd loop and against torch.mm on the same GEMMs
    wudi_step, wudi_setup = loops["wudi"], loops["wudi_setup"]
    reference_step = times["reference"] / reference_steps
    wudi_vs_mm = times["mm"] / wudi_step

    # wudi_cfs: whole solve; its flops on the route it takes (Grams, factorisation, solves)
    cfs = times["cfs"]
    cfs_flops = 2 * min(solve_cost(count, out_features, in_features))
    cfs_vs_mm = (cfs_flops / cfs) / (2 * out_features * in_features**2 / times["square_mm"])

    task_arithmetic = times["task_arithmetic"]
    wudi_full = wudi_setup + 300 * wudi_step
    doge = "not run" if big else f"{(loops['doge_setup'] + 400 * loops['doge']) / task_arithmetic:.0f}x"

    full = "—"
    if compare_full:
        # Same answer: the default 300-step solve against 300 autograd steps, float32.
        ours = WudiSolver().solve(tv)
        merged, run_reference = autograd_wudi(tv, 300)
        run_reference(300)
        difference = ((ours - merged.detach()).norm() / merged.detach().norm()).item()
        full = f"{difference:.1e}"

    methods = ("task_arithmetic", "wudi", "wudi_cfs") + (() if big else ("doge",))
    memory = [f"{measure_memory(m, count, out_features, in_features, device)['ratio']:.1f}" for m in methods]
    memory += ["—"] * (4 - len(memory))
    return (
        f"| {out_features}x{in_features} | {count} | {wudi_step * 1e3:.1f} ms "
        f"| {reference_step / wudi_step:.1f}x | {wudi_vs_mm:.0%} ({flops / wudi_step / 1e9:.0f} GFLOP/s, "
        f"{'in' if in_space else 'out'}-space) "
        f"| {full} | {task_arithmetic * 1e3:.1f} ms | {wudi_full / task_arithmetic:.0f}x "
        f"| {cfs / task_arithmetic:.0f}x ({cfs:.2f} s) | {cfs_vs_mm:.0%} | {doge} "
        f"| {' / '.join(memory)} (bound {count + 6}) |"
    )


def tensors_table(args) -> None:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.quick:
        cases = [(512, 512, 3, True), (512, 1408, 2, False)]
    elif args.target:
        cases = [(1024, 1024, 3, True)]
    elif args.llama_1b:  # every linear shape of Llama-3.2-1B, base + 4 (issue 25)
        cases = [(o, i, 4, False) for o, i in [(512, 2048), (2048, 2048), (8192, 2048), (2048, 8192)]]
    else:
        cases = [(1024, 1024, 3, True)]
        cases += [(o, i, n, False) for o, i in [(1024, 1024), (2816, 1024), (1024, 2816)] for n in (2, 4, 8)]
        if args.large:
            cases.append((4096, 4096, 8, False))
    print(f"machine: {machine()}")
    print(
        "| shape | N | wudi step | autograd step / wudi step | wudi GFLOP/s / torch.mm | rel. diff to autograd, 300 steps "
        "| task_arithmetic | wudi (300 steps) / TA | wudi_cfs / TA | wudi_cfs GFLOP/s / torch.mm | doge (400 steps) / TA "
        "| peak extra memory, x float32 tensor: task_arithmetic / wudi / wudi_cfs / doge |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for device in devices:
        if device != "cpu":
            print(f"| **{device}** |||||||||||| ")
        for out_features, in_features, count, compare_full in cases:
            print(tensor_row(out_features, in_features, count, device, compare_full), flush=True)


def memory_table(args) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"machine: {machine()}")
    print(f"| shape | N | method | peak extra memory (x float32 tensor) | bound N + 6 | time (whole merge; wudi, doge: {MEMORY_STEPS} Adam steps) |")
    print("|---|---|---|---|---|---|")
    for method in args.methods:
        result = measure_memory(method, args.count, args.size, args.size, device)
        print(
            f"| {args.size}x{args.size} | {args.count} | {method} | {result['ratio']:.2f} "
            f"({result['extra'] / 2**30:.2f} GiB) | {args.count + 6} | {result['seconds']:.0f} s |",
            flush=True,
        )


def spectral_table(args) -> None:
    """tsv, iso_c and iso_cts: peak extra memory through the adapter against N + 6, and
    the whole merge's time against task_arithmetic's, each case in a fresh process."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [(1024, 1024), (2048, 2048), (2816, 1024), (1024, 2816)] if not args.quick else [(512, 512)]
    methods = args.methods
    print(f"machine: {machine()}")
    print("| shape | N | peak extra memory, x tensor: " + " / ".join(methods) + " | bound N + 6 | time / task_arithmetic: " + " / ".join(methods) + " |")
    print("|---|---|---|---|---|")
    for out_features, in_features in shapes:
        for count in args.counts:
            baseline = measure_memory("task_arithmetic", count, out_features, in_features, device, args.spread)
            results = [measure_memory(method, count, out_features, in_features, device, args.spread) for method in methods]
            memory = " / ".join(f"{result['ratio']:.2f}" for result in results)
            times = " / ".join(f"{result['seconds'] / baseline['seconds']:.0f}x" for result in results)
            print(f"| {out_features}x{in_features} | {count} | {memory} | {count + 6} | {times} |", flush=True)


def trim_table(args) -> None:
    """The trim's time against wudi_cfs's solve it precedes and against torch.kthvalue's selection."""
    from mergekit_wudi.solvers.numerics import prepare_task_vectors
    from mergekit_wudi.solvers.trim import trimmed

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [(576, 1536)] if args.quick else [(576, 1536), (1024, 2816), (2048, 2048), (2048, 8192)]
    density = 0.3
    print(f"machine: {machine()}")
    print("| shape | N | dtype | trim | trim / wudi_cfs solve | kthvalue trim / trim |")
    print("|---|---|---|---|---|---|")
    for out_features, in_features in shapes:
        for dtype in (torch.float32, torch.float64):
            tv = task_vectors(4, out_features, in_features, device).to(dtype)
            prepared = prepare_task_vectors(tv)

            def by_kthvalue():
                for task in tv:
                    magnitude = task.abs().reshape(-1)
                    kth = magnitude.numel() - int(magnitude.numel() * density)
                    task * (task.abs() >= torch.kthvalue(magnitude, kth).values)

            times = interleaved({
                "trim": lambda: trimmed(prepared, [density] * 4, overwrite=False),
                "cfs": lambda: WudiCfsSolver().solve(tv),
                "kthvalue": by_kthvalue,
            }, device, 1 if args.quick else 3)
            print(f"| {out_features}x{in_features} | 4 | {str(dtype).removeprefix('torch.')} | {times['trim'] * 1e3:.0f} ms "
                  f"| {times['trim'] / times['cfs']:.2f}x | {times['kthvalue'] / times['trim']:.1f}x |", flush=True)


# --- end to end ------------------------------------------------------------------------------------


def llama_family(root: Path, hidden: int, intermediate: int, layers: int, vocab: int, fine_tunes: int) -> list:
    from safetensors.torch import save_file

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    generator = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    base = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}
    paths = []
    for index in range(fine_tunes + 1):
        state = {}
        for name, tensor in base.items():
            if index and name.endswith("_proj.weight"):
                left = torch.randn(tensor.shape[0], 64, generator=generator)
                right = torch.randn(64, tensor.shape[1], generator=generator)
                delta = (left @ right / 64 + 0.1 * torch.randn(tensor.shape, generator=generator)) * 1e-3
            elif index:
                delta = torch.randn(tensor.shape, generator=generator) * 1e-4
            else:
                delta = 0
            state[name] = (tensor + delta).to(torch.bfloat16).contiguous()
        path = root / ("base" if index == 0 else f"ft{index}")
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps(config))
        save_file(state, str(path / "model.safetensors"))
        paths.append(path)
    return paths


def run_merge(config: Path, out: Path) -> tuple:
    """(wall seconds, peak RSS bytes) of one `mergekit-yaml` process."""
    command = [sys.executable, "-m", "mergekit.scripts.run_yaml", str(config), str(out), "--no-copy-tokenizer"]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    stderr = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"mergekit-yaml failed:\n{stderr[-3000:]}")
    return seconds, usage.ru_maxrss * 1024


def e2e_table(args) -> None:
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        base, *models = llama_family(root, args.hidden, args.intermediate, args.layers, args.vocab, args.fine_tunes)
        size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        print(
            f"Llama-like family: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
            f"vocab {args.vocab}, bf16, {size / 2**20:.0f} MiB per model, base + {args.fine_tunes} fine-tunes"
        )
        print("| method | wall time | / task_arithmetic | peak RSS | / task_arithmetic |")
        print("|---|---|---|---|---|")
        reference = None
        for method in ("task_arithmetic", "wudi", "wudi_cfs", "doge"):
            config = root / f"{method}.yml"
            config.write_text(
                json.dumps(
                    {
                        "merge_method": method,
                        "base_model": str(base),
                        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
                        "dtype": "bfloat16",
                    }
                )
            )
            seconds, rss = run_merge(config, root / f"out-{method}")
            reference = reference or (seconds, rss)
            print(
                f"| {method} | {seconds:.1f} s | {seconds / reference[0]:.1f}x | {rss / 2**20:.0f} MiB "
                f"| {rss / reference[1]:.2f}x |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    tensors = commands.add_parser("tensors", help="per-tensor table")
    tensors.add_argument("--large", action="store_true", help="add 4096x4096 with N = 8")
    tensors.add_argument("--quick", action="store_true", help="two small cases (a smoke test)")
    tensors.add_argument("--target", action="store_true", help="only the target row: 1024x1024, N = 3")
    tensors.add_argument("--llama-1b", action="store_true", help="the Llama-3.2-1B shapes, N = 4")
    memory = commands.add_parser("memory", help="peak memory of one large solve")
    memory.add_argument("--size", type=int, default=8192)
    memory.add_argument("--count", type=int, default=8)
    memory.add_argument("--methods", nargs="+", default=["wudi", "wudi_cfs"])
    spectral = commands.add_parser("spectral", help="tsv, iso_c, iso_cts: memory and time")
    spectral.add_argument("--counts", type=int, nargs="+", default=[2, 4, 8])
    spectral.add_argument("--quick", action="store_true", help="one small shape (a smoke test)")
    spectral.add_argument("--methods", nargs="+", default=["tsv", "iso_c", "iso_cts"])
    spectral.add_argument("--spread", action="store_true", help=f"per-model weights {SPREAD}, repeated")
    trim = commands.add_parser("trim", help="the density trim against the solve and torch.kthvalue")
    trim.add_argument("--quick", action="store_true", help="one small shape (a smoke test)")
    e2e = commands.add_parser("e2e", help="mergekit-yaml wall time and peak RSS")
    e2e.add_argument("--hidden", type=int, default=512)
    e2e.add_argument("--intermediate", type=int, default=1408)
    e2e.add_argument("--layers", type=int, default=4)
    e2e.add_argument("--vocab", type=int, default=4096)
    e2e.add_argument("--fine-tunes", type=int, default=3)
    child = commands.add_parser("child", help=argparse.SUPPRESS)
    child.add_argument("method")
    child.add_argument("count", type=int)
    child.add_argument("out_features", type=int)
    child.add_argument("in_features", type=int)
    child.add_argument("device")
    child.add_argument("--spread", action="store_true")
    child.add_argument("--calibrate", action="store_true", help="calibrate: input_space")
    child.add_argument("--density", type=float, help="the trim before the solve")
    child.add_argument("--by-kind", action="store_true", help="two parts, as the guard gives a mixed set (by-kind methods)")
    args = parser.parse_args()
    if args.command == "child":
        import mergekit_wudi

        mergekit_wudi.register()
        print(json.dumps(memory_child(args.method, args.count, args.out_features, args.in_features, args.device, args.spread,
                                      args.calibrate, args.density, args.by_kind)))
    elif args.command == "tensors":
        tensors_table(args)
    elif args.command == "memory":
        memory_table(args)
    elif args.command == "spectral":
        spectral_table(args)
    elif args.command == "trim":
        trim_table(args)
    else:
        e2e_table(args)


if __name__ == "__main__":
    main()
