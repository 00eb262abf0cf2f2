"""A cost model of a merge (issue 25): fitted to measured solves, checked, projected to 8B and 70B.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/scale/cost.py measure FILE [--quick] [--max-elements 16777216]
    python benchmarks/scale/cost.py project FILE --e2e RUN.json [--e2e RUN2.json ...]
    OMP_WAIT_POLICY=PASSIVE python benchmarks/scale/cost.py floor [--quick]

`measure` times each closed-form solver of ours at its defaults, calibration included (N = 4 float32 task vectors; the best of two
solves on the shapes fitted, one on those checked) at the linear shapes of Llama-3.2-1B and of Llama-3.1-8B, and torch.mm's rate on this
machine, into FILE. `project` fits, per method, a solve time per tensor

    time = a * N*out*in*k  +  b * k^3          (non-negative least squares)

with k the order of the system solved: in for ace; in or N out for wudi_cfs, whichever
route it takes (wudi_cfs.output_space); min(out, in) for the spectral solvers,

on the 1B shapes only, says how well it predicts the 8B shapes it has not seen, and how well
io + the sum over a model's tensors predicts each measured end-to-end row of run.py (--e2e:
its JSON), where io is task_arithmetic's wall time per byte of checkpoint, measured in the same
run, and the built-ins' own work (ties, dare_ties, della, karcher) is a cost per parameter fitted
to their row. Then it projects Llama-3.1-8B and -70B (base + 4, bf16) on:
  - 2 CPU cores: as measured;
  - 16 CPU cores: the product term a over 16 / the threads measured (every method's products
    use every thread; tsv, iso_c and iso_cts through fixed panels, numerics.for_each_panel),
    the factorisation term b: LAPACK on one thread per decomposition, for thread-independent
    bits, with the independent ones side by side as far as the memory bound allows (`rounds`:
    numerics.side_by_side): the feature k^3 is scaled by the decompositions left in a row on
    the threads measured (in the fit) and on 16 (in the projection);
    wudi_cfs and ace's Cholesky runs by blocks on every thread (numerics.cholesky_): b over 16 / threads.
    The split between a and b is the fit's: where it puts everything into b (tsv), the
    16-core figure is an upper bound;
  - one H100-class GPU: a at the GPU's FP32 rate against this machine's measured torch.mm rate
    (the spec sheet's 67 TFLOP/s FP32, non-tensor-core, as no GPU was measured), b at 10x this CPU's
    one-thread rate (a guess for cuSOLVER's syevd at these sizes: say so where it is used);
io scales with the checkpoint bytes at the measured rate in every case (the disk does not change).

`floor` asks whether the spectral methods can ever take ties's time on this machine under the
project's rules (float64 eigendecompositions, each on one thread for thread-independent bits,
side by side within the memory bound). Per 1B shape, in one run: ties's merge (mergekit's own,
`merge_tensors`, bf16 base + 4, density 0.5), each spectral method's merge the same way, and
the one-thread LAPACK tridiagonal reduction (dsytrd) of order min(out, in), the least any
eigendecomposition of a Gram matrix of that order costs: a method's floor is that times its
decompositions in a row (`rounds`), as if its Gram products, eigenvectors and everything else
were free. Summed over the model's linear tensors, and with the embedding (ties merges it; the
spectral methods send it to task_arithmetic) measured the same way.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from family import LLAMA_1B, MODULES, shapes  # noqa: E402

from mergekit_wudi.solvers._spectral import stacks_spare, triplet_elements  # noqa: E402
from mergekit_wudi.solvers.calibrate import CALIBRATION_SPARE, _own_space_elements  # noqa: E402
from mergekit_wudi.solvers.iso import IsoCtsConfig, iso_cts_sizes  # noqa: E402
from mergekit_wudi.solvers.numerics import side_by_side_workers  # noqa: E402
from mergekit_wudi.solvers.wudi_cfs import output_space  # noqa: E402

METHODS = ("wudi_cfs", "tsv", "iso_c", "iso_cts", "ace")
COUNT = 4
MODELS = {  # family.shapes' sizes; "tied": the output head is the embedding (no lm_head)
    "Llama-3.2-1B": {**LLAMA_1B, "tied": True},
    "Llama-3.1-8B": {"hidden": 4096, "intermediate": 14336, "layers": 32, "heads": 32, "kv_heads": 8, "vocab": 128256, "tied": False},
    "Llama-3.1-70B": {"hidden": 8192, "intermediate": 28672, "layers": 80, "heads": 64, "kv_heads": 8, "vocab": 128256, "tied": False},
}
GPU_FP32 = 67e12  # H100 SXM, FP32 without tensor cores (spec sheet)
GPU_FACTORISATION_SPEEDUP = 10.0  # assumed; replaced by gpu_check.py's measurement when one is run


def linear_shapes(model: str, layers: Optional[int] = None) -> list:
    """The shapes of the model's linear tensors (its first `layers` layers), as family.shapes lists them."""
    dims = MODELS[model]
    return [shape for name, shape in shapes(dims["layers"] if layers is None else layers, dims) if name.split(".")[-2] in MODULES]


def parameters(model: str) -> int:
    dims = MODELS[model]
    every = sum(math.prod(shape) for _, shape in shapes(dims["layers"], dims))
    return every + (0 if dims["tied"] else dims["vocab"] * dims["hidden"])  # the untied lm_head


CLOSED_FORMS = ("wudi_cfs", "ace")  # a Cholesky solve, blocked on every thread from order 4096; the others in the smaller space


def features(shape: tuple, method: str, threads: int = 1) -> tuple:
    """(products, factorisation) sizes: N out in k and k^3, k the order of the system solved:
    in for ace; in or N out for wudi_cfs, whichever route it takes (wudi_cfs.output_space);
    min(out, in) for the spectral solvers, whose k^3 is scaled by the share of their
    one-thread decompositions left in a row on `threads` threads (rounds)."""
    out, inp = shape
    if method == "wudi_cfs":
        side = COUNT * out if output_space(COUNT, out, inp) else inp
    else:
        side = inp if method in CLOSED_FORMS else min(out, inp)
    if method in CLOSED_FORMS:
        return COUNT * out * inp * side, side**3
    return COUNT * out * inp * side, side**3 * rounds(method, shape, threads) / rounds(method, shape, 1)


def rounds(method: str, shape: tuple, threads: int) -> float:
    """How many one-thread eigendecompositions of order min(out, in) a spectral solve of
    `shape` runs one after another on `threads` threads: numerics.side_by_side's groups
    (calibration's per-task spectra, tsv's per-task triplets), as many at once as the memory
    bound allows; iso_c's polar factor, the two polar factors of tsv and iso_cts, iso_cts's
    common subspace and residuals in turn. Where iso_cts decomposes a residual through the
    complement Q (iso.common_subspace: out <= in and k >= out / 2, for full-rank task
    vectors), it is of order out - k: it counts ((out - k) / min(out, in))^3 of one."""
    out, inp = shape
    rank, numel = min(shape), out * inp

    def at_once(count: int, per_job: int, spare: int) -> int:
        return math.ceil(count / side_by_side_workers(count, per_job, spare, threads))

    calibration = at_once(COUNT, _own_space_elements(shape, COUNT), CALIBRATION_SPARE * numel)
    if method == "iso_c":
        return calibration + 1
    if method == "tsv":
        capacity = COUNT * (rank // COUNT)
        return at_once(COUNT, triplet_elements(shape, rank // COUNT), stacks_spare(shape, capacity)) + 2
    common, _ = iso_cts_sizes(rank, COUNT, IsoCtsConfig().common_space_fraction)
    residual = ((out - common) / rank) ** 3 if out <= inp and 2 * common >= out else 1.0
    return calibration + 1 + COUNT * residual + 2  # iso_cts


def measure(path: Path, quick: bool, max_elements: int) -> None:
    from mergekit_wudi.solvers import SOLVERS

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    fit_shapes = sorted(set(linear_shapes("Llama-3.2-1B")))
    check_shapes = sorted(s for s in set(linear_shapes("Llama-3.1-8B")) if s[0] * s[1] <= max_elements)
    if quick:
        fit_shapes, check_shapes = [(256, 256), (64, 256), (1024, 256), (256, 1024)], [(512, 512), (2048, 512)]
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    mm = min(_timed(lambda: torch.mm(a, b)) for _ in range(3))
    result = {"threads": torch.get_num_threads(), "mm_flops": 2 * 2048**3 / mm, "solves": [],
              "fit_shapes": fit_shapes, "check_shapes": check_shapes}
    for shape in fit_shapes + check_shapes:
        generator = torch.Generator().manual_seed(0)
        vectors = torch.randn(COUNT, *shape, generator=generator) * 1e-3
        for method in METHODS:
            cls = next(cls for cls in SOLVERS if cls.name == method)
            solver = cls(calibration=cls.calibration)  # the YAML default (iso_c, iso_cts: first_order)
            seconds = min(_timed(lambda: solver.solve(vectors)) for _ in range(2 if shape in fit_shapes else 1))
            result["solves"].append({"method": method, "shape": list(shape), "seconds": seconds})
            print(f"{method} {shape}: {seconds:.2f} s", flush=True)
    path.write_text(json.dumps(result, indent=1))


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def fit(solves: list, method: str, shapes: set, threads: int = 1) -> tuple:
    """(a, b) >= 0 minimising the relative squared error over the given shapes, measured on `threads` threads."""
    rows = [s for s in solves if s["method"] == method and tuple(s["shape"]) in shapes]
    x = torch.tensor([features(tuple(s["shape"]), method, threads) for s in rows], dtype=torch.float64)
    y = torch.tensor([s["seconds"] for s in rows], dtype=torch.float64)
    weighted = x / y[:, None]  # relative error: each row scaled by its own time
    best = None
    for columns in ((0, 1), (0,), (1,)):  # non-negative least squares on two unknowns: try the faces
        coef = torch.linalg.lstsq(weighted[:, columns], torch.ones(len(rows), 1, dtype=torch.float64)).solution[:, 0]
        if (coef < 0).any():
            continue
        full = torch.zeros(2, dtype=torch.float64)
        full[list(columns)] = coef
        error = float(((weighted @ full) - 1).pow(2).sum())
        if best is None or error < best[0]:
            best = (error, full)
    return tuple(float(v) for v in best[1])


def terms(coef: tuple, tensors: list, method: str, threads: int) -> tuple:
    """(product seconds, factorisation seconds) of a method over the given tensor shapes, on
    `threads` threads as far as the decompositions go (the products: the caller scales them)."""
    sizes = [features(shape, method, threads) for shape in tensors]
    return coef[0] * sum(f[0] for f in sizes), coef[1] * sum(f[1] for f in sizes)


def predict(coef: tuple, tensors: list, method: str, threads: int) -> float:
    return sum(terms(coef, tensors, method, threads))


def project(path: Path, e2e_paths: list) -> None:
    data = json.loads(path.read_text())
    solves = data["solves"]
    one_b = set(map(tuple, data["fit_shapes"]))
    eight_b = set(map(tuple, data["check_shapes"]))
    threads = data["threads"]
    coefs = {m: fit(solves, m, one_b, threads) for m in METHODS}
    print("## Fit on the 1B shapes; error on the 8B shapes (not used in the fit)\n")
    print("| method | a (s per N*out*in*k) | b (s per k^3) | 8B shapes: predicted / measured |")
    print("|---|---|---|---|")
    for method, coef in coefs.items():
        ratios = [predict(coef, [tuple(s["shape"])], method, threads) / s["seconds"] for s in solves
                  if s["method"] == method and tuple(s["shape"]) in eight_b - one_b]
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "not measured"
        print(f"| {method} | {coef[0]:.3g} | {coef[1]:.3g} | {spread} |")
    io_rate, builtin_rate = None, {}
    print("\n## The model against measured end-to-end rows (run.py)\n")
    print("| run | method | measured wall | predicted | predicted / measured |")
    print("|---|---|---|---|---|")
    for e2e_path in e2e_paths:
        run = json.loads(Path(e2e_path).read_text())
        rows = {r["method"]: r for r in run["rows"]}
        io = rows["task_arithmetic"]["wall_s"]
        io_rate = io / run["model_bytes"]
        tensors = linear_shapes("Llama-3.2-1B", run["layers"])
        for method, row in rows.items():
            if method == "task_arithmetic" or row.get("subset"):
                continue
            if method not in coefs:  # a built-in: its work per parameter
                builtin_rate[method] = (row["wall_s"] - io) / (run["model_bytes"] / 2)
                continue
            predicted = io + predict(coefs[method], tensors, method, threads)
            print(f"| {run['kind']}, {run['layers']} layers | {method} | {row['wall_s']:.0f} s | {predicted:.0f} s "
                  f"| {predicted / row['wall_s']:.2f} |")
    if io_rate is None:
        return
    gpu_a = data["mm_flops"] / GPU_FP32
    print(f"\n## Projection (base + 4 fine-tunes, bf16): hours; io {io_rate * 1e9:.1f} s per GB of checkpoint\n")
    print("| model | method | 2 cores | 16 cores | H100 (spec-sheet rate) |")
    print("|---|---|---|---|---|")
    for model in MODELS:
        tensors = linear_shapes(model)
        io = io_rate * 2 * parameters(model)
        for method in [*builtin_rate, *METHODS]:
            if method in builtin_rate:
                solve = builtin_rate[method] * parameters(model)
                cells = [io + solve, io + solve * threads / 16, None]
            else:
                gemm, factor = terms(coefs[method], tensors, method, threads)
                if method in CLOSED_FORMS:  # their blocked Cholesky uses every core
                    factor_16 = factor * threads / 16
                else:  # decompositions side by side where the memory bound allows
                    factor_16 = terms(coefs[method], tensors, method, 16)[1]
                cells = [io + gemm + factor, io + gemm * threads / 16 + factor_16,
                         io + gemm * gpu_a + factor / GPU_FACTORISATION_SPEEDUP]
            text = " | ".join("-" if c is None else f"{c / 3600:.2f}" for c in cells)
            print(f"| {model} | {method} | {text} |")


SPECTRAL = ("iso_c", "tsv", "iso_cts")


def tridiagonal_seconds(order: int) -> float:
    """One-thread LAPACK dsytrd of a float64 symmetric positive definite matrix of this order,
    the best of two: the first step of every symmetric eigensolver the spectral methods call."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from mergekit_wudi.solvers import _lapack

    factor = np.random.default_rng(0).standard_normal((order, order))
    gram = factor @ factor.T
    best = math.inf
    with threadpool_limits(limits=1, user_api="blas"):
        for _ in range(2):
            matrix = np.asfortranarray(gram)  # a fresh copy: reduced in place
            best = min(best, _timed(lambda: _lapack.dsytrd(matrix)))
    return best


BUILTIN_PARAMETERS = {"ties": {"density": 0.5, "weight": 1.0}, "task_arithmetic": {"weight": 1.0}}  # ours: their defaults


def bf16_family(shape: tuple) -> list:
    """A bf16 base and COUNT fine-tunes of `shape` (seed 0)."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(*shape, generator=generator) * 0.02
    return [base.bfloat16()] + [(base + torch.randn(*shape, generator=generator) * 1e-3).bfloat16() for _ in range(COUNT)]


def merge_seconds(method: str, tensors: list, repeat: int, name: str) -> float:
    """mergekit's merge_tensors of `tensors` (base first) with `method` at its defaults (the
    built-ins: BUILTIN_PARAMETERS), the best of `repeat`."""
    from mergekit.merge_methods import merge_tensors

    parameters = BUILTIN_PARAMETERS.get(method, {})
    return min(_timed(lambda: merge_tensors(tensors, method, base_index=0, name=name, parameters=parameters))
               for _ in range(repeat))


def floor(quick: bool) -> dict:
    """Print the floor tables (module docstring); return the model totals in seconds, embedding left out."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    threads = torch.get_num_threads()
    model = linear_shapes("Llama-3.2-1B")
    embedding = (MODELS["Llama-3.2-1B"]["vocab"], MODELS["Llama-3.2-1B"]["hidden"])
    if quick:
        model, embedding = [(256, 256), (64, 256), (256, 256)], (1024, 64)
    counts = {shape: model.count(shape) for shape in sorted(set(model))}
    linear = "model.layers.0.mlp.down_proj.weight"
    print(f"{threads} threads; per tensor, seconds (base + {COUNT}, bf16, mergekit's merge_tensors)\n")
    print("| shape | tensors | ties | one-thread dsytrd | " + " | ".join(f"{m}: floor, measured" for m in SPECTRAL) + " |")
    print("|---|---|---|---|" + "---|" * len(SPECTRAL))
    totals = {"ties": 0.0, **{f"{m} floor": 0.0 for m in SPECTRAL}, **{m: 0.0 for m in SPECTRAL}}
    for shape, count in counts.items():
        tensors = bf16_family(shape)
        ties = merge_seconds("ties", tensors, 2, linear)
        reduction = tridiagonal_seconds(min(shape))
        cells = []
        totals["ties"] += count * ties
        for method in SPECTRAL:
            least = rounds(method, shape, threads) * reduction
            measured = merge_seconds(method, tensors, 1, linear)
            totals[f"{method} floor"] += count * least
            totals[method] += count * measured
            cells.append(f"{least:.2f} ({least / ties:.1f}x), {measured:.2f} ({measured / ties:.1f}x)")
        print(f"| {shape[0]}x{shape[1]} | {count} | {ties:.2f} | {reduction:.2f} | " + " | ".join(cells) + " |", flush=True)
    tensors = bf16_family(embedding)
    ties_embedding = merge_seconds("ties", tensors, 1, "model.embed_tokens.weight")
    arithmetic_embedding = merge_seconds("task_arithmetic", tensors, 1, "model.embed_tokens.weight")
    ties = totals["ties"] + ties_embedding
    print(f"\nThe model's linear tensors and embedding ({len(model)} + 1; ties merges the embedding in "
          f"{ties_embedding:.1f} s, task_arithmetic, the spectral methods' fallback, in {arithmetic_embedding:.1f} s), "
          f"reading and writing left out:\n")
    print("| method | floor | / ties | measured | / ties |")
    print("|---|---|---|---|---|")
    print(f"| ties | | | {ties:.0f} s | 1.00x |")
    for method in SPECTRAL:
        least, measured = totals[f"{method} floor"] + arithmetic_embedding, totals[method] + arithmetic_embedding
        print(f"| {method} | {least:.0f} s | {least / ties:.2f}x | {measured:.0f} s | {measured / ties:.2f}x |")
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    m = commands.add_parser("measure")
    m.add_argument("file", type=Path)
    m.add_argument("--quick", action="store_true", help="four small shapes (a smoke test)")
    m.add_argument("--max-elements", type=int, default=1 << 62, help="check only the 8B shapes up to this size")
    p = commands.add_parser("project")
    p.add_argument("file", type=Path)
    p.add_argument("--e2e", type=Path, nargs="+", default=[])
    f = commands.add_parser("floor")
    f.add_argument("--quick", action="store_true", help="small shapes (a smoke test)")
    args = parser.parse_args()
    if args.command == "measure":
        measure(args.file, args.quick, args.max_elements)
    elif args.command == "floor":
        floor(args.quick)
    else:
        project(args.file, args.e2e)


if __name__ == "__main__":
    main()
