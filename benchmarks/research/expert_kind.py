"""Issue 23: can the kind of expert (full fine-tune, LoRA with a seed each, LoRA from one seed) be
told from the weights, bf16 included? (docs/research/lora-inputs.md, section 5)

    python benchmarks/research/expert_kind.py overlap llm|minilm SET_DIR... [mixed]
    python benchmarks/research/expert_kind.py alignment llm|minilm SET_DIR...
    python benchmarks/research/expert_kind.py size llm|minilm SET_DIR... [mixed] [--layers K]
    python benchmarks/research/expert_kind.py calibrate llm|minilm SET_DIR... [mixed] [--layers K]
    python benchmarks/research/expert_kind.py first_order llm|minilm SET_DIR... [mixed] [--layers K]

SET_DIR: a folder name under the benchmark's expert cache (~/.cache/mergekit-wudi-bench/BENCH/);
`mixed` combines the `full-*` and `lora-*` folders as benchmarks/bench/plan.mixed_members does.
For each task, medians (and per-tensor p10/p90 of the ratio) over the linear tensors every expert
changed, with float32 task vectors and with base and fine-tune rounded to bf16 first:

  overlap:   input and output subspace overlap against the most overlapping other expert, as
             multiples of chance (exact SVD; mergekit_wudi.solvers.overlap uses a range finder),
             and their ratio;
  alignment: in ||t W0^T||^2 / (||t||^2 ||W0||^2), how far t's rows follow W0's input energy
             (1: random rows). Dropped: it does not separate the kinds.
  size:      the merged update's size at lambda 1 against one task vector's, ||t_m|| / rms_i ||t_i||,
             per method at its solver's defaults (wudi_cfs, tsv, ace, iso_c, doge; float32; no
             adapter_guard) and for the plain sum (task_arithmetic at lambda 1), against sqrt(N),
             the size of a sum of N mutually orthogonal task vectors of equal norm: what
             adapter_guard's 1/sqrt(N) cap assumes for adapters with a seed each (guard.py); and
             each method's against the plain sum's, ||t_m|| / ||sum_i t_i|| (times N: against
             the mean's, what doge's one-seed rule caps; guard.py).
             --layers K: only tensors of blocks 0..K-1 (SmolLM2 has 30).
  calibrate: for iso_c and iso_cts at lambda 1 (uncalibrated merge M), the two bounds of
             `calibrate: input_space` (1 / max_i rho_i and ||sum_i t_i|| / ||M||), how often each
             binds, and the c it picks (solvers/calibrate.py). --layers as for size.
  first_order: for iso_c and iso_cts at lambda 1 (uncalibrated merge M; `mixed` with its full
             members trimmed at 0.3, as the default does), `calibrate: first_order`'s c (its
             target min(sum_i ||t_i||^2, ||T||^2), T = sum_i t_i), sum_norm's c and their ratio,
             and sum_i ||t_i||^2 / ||T||^2 (above 1: the tasks cancel and the sum's gain binds);
             on `mixed`, also the full fine-tunes' share of sum_i ||t_i||^2 and first_order's c
             with its target and delivery over the full fine-tunes alone, against sum_norm's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lora_inputs import task_vectors  # noqa: E402

TOP = 8
ROOT = Path.home() / ".cache" / "mergekit-wudi-bench"


def median(values):
    return sorted(values)[len(values) // 2]


def quantile(values, q):
    return sorted(values)[int(q * len(values))]


def mixed_folders(root: Path, task_names) -> dict:
    """{"full": folder, "lora": folder}: the first cache folder of each kind under root holding
    the tasks' experts (what benchmarks/bench/plan.mixed_members combines)."""
    return {kind: next(d for d in sorted(os.listdir(root)) if d.startswith(kind + "-") and (root / d / task_names[0]).exists())
            for kind in ("full", "lora")}


def load_set(bench: str, base: dict, set_name: str):
    """({task: {tensor: t}}, {task: kind}) for a cache folder, or `mixed`."""
    root = ROOT / bench
    if bench == "llm":
        from llm.tasks import TASK_NAMES
    else:
        from real_model.tasks import TASK_NAMES
    if set_name != "mixed":
        return task_vectors(base, str(root / set_name), TASK_NAMES), {t: set_name.split("-")[0] for t in TASK_NAMES}
    from bench.plan import mixed_members

    kinds = mixed_members(TASK_NAMES)
    folders = mixed_folders(root, TASK_NAMES)
    vectors = {}
    for kind, folder in folders.items():
        vectors.update(task_vectors(base, str(root / folder), [t for t in TASK_NAMES if kinds[t] == kind]))
    return vectors, kinds


def stored(w0: torch.Tensor, t: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "f32":
        return t
    b = w0.bfloat16().float()
    return (b + t).bfloat16().float() - b


def overlap(bench: str, base: dict, set_name: str) -> None:
    vectors, kinds = load_set(bench, base, set_name)
    tasks = list(vectors)
    names = sorted(set.intersection(*(set(v) for v in vectors.values())))
    for mode in ("f32", "bf16"):
        per = {t: ([], []) for t in tasks}
        for name in names:
            w0 = base[name].float()
            rows, cols = {}, {}
            for t in tasks:
                u, _, vh = torch.linalg.svd(stored(w0, vectors[t][name], mode).double(), full_matrices=False)
                cols[t], rows[t] = u[:, :TOP], vh[:TOP].T
            out_features, in_features = w0.shape
            for t in tasks:
                others = [o for o in tasks if o != t]
                per[t][0].append(max(float((rows[t].T @ rows[o]).pow(2).sum()) for o in others) / TOP / (TOP / in_features))
                per[t][1].append(max(float((cols[t].T @ cols[o]).pow(2).sum()) for o in others) / TOP / (TOP / out_features))
        for t in tasks:
            r, c = per[t]
            ratio = [a / b for a, b in zip(r, c)]
            print(f"{bench} {set_name:28s} {mode:4s} {t:12s} {kinds[t]:16s} input {median(r):6.1f} output {median(c):6.1f} "
                  f"input/output {median(ratio):5.2f} (p10 {quantile(ratio, 0.1):5.2f}, p90 {quantile(ratio, 0.9):5.2f})", flush=True)


def alignment(bench: str, base: dict, set_name: str) -> None:
    vectors, _ = load_set(bench, base, set_name)
    names = sorted(set.intersection(*(set(v) for v in vectors.values())))
    for mode in ("f32", "bf16"):
        values = []
        for name in names:
            w0 = base[name].float()
            w = w0 if mode == "f32" else w0.bfloat16().float()
            for t in vectors.values():
                t = stored(w0, t[name], mode).double()
                if float(t.norm()) == 0:
                    continue
                values.append(w.shape[1] * float((t @ w.double().T).pow(2).sum()) / (float(t.pow(2).sum()) * float(w.double().pow(2).sum())))
        print(f"{bench} {set_name:28s} {mode:4s} alignment median {median(values):5.2f} (p10 {quantile(values, 0.1):5.2f}, "
              f"p90 {quantile(values, 0.9):5.2f}) over {len(values)}", flush=True)


def shared_tensors(vectors: dict, layers=None):
    """(name, (N, out, in) stack) for the tensors every task changed, blocks 0..layers-1 only if given."""
    tasks = list(vectors)
    for name in sorted(set.intersection(*(set(v) for v in vectors.values()))):
        numbers = [int(part) for part in name.split(".") if part.isdigit()]
        if layers is not None and (not numbers or numbers[0] >= layers):
            continue
        ts = torch.stack([vectors[task][name] for task in tasks])
        if float(ts.flatten(1).norm(dim=1).min()) > 0:
            yield name, ts


def size(bench: str, base: dict, set_name: str, layers=None) -> None:
    from mergekit_wudi.solvers import SOLVERS

    vectors, _ = load_set(bench, base, set_name)
    tasks = list(vectors)
    methods = [s for s in SOLVERS if s.name in ("wudi_cfs", "tsv", "ace", "iso_c", "doge")]
    solvers = {cls.name: cls(calibration=cls.calibration) for cls in methods}
    ratios = {name: [] for name in ("sum", *solvers)}
    to_sum = {name: [] for name in solvers}  # ||t_m|| / ||sum_i t_i||, per tensor
    norms = []  # rms_i ||t_i||, per tensor
    for _, ts in shared_tensors(vectors, layers):
        rms = float(ts.flatten(1).norm(dim=1).pow(2).mean().sqrt())
        norms.append(rms)
        total = float(ts.sum(0).norm())
        ratios["sum"].append(total / rms)  # task_arithmetic at lambda 1
        for method, solver in solvers.items():
            merged = float(solver.solve(ts).norm())
            ratios[method].append(merged / rms)
            to_sum[method].append(merged / total)
    count = len(next(iter(ratios.values())))
    print(f"{bench} {set_name}: N {len(tasks)}, sqrt(N) {len(tasks) ** 0.5:.2f}, {count} tensors, "
          f"rms ||t_i|| median {median(norms):.3g} (p10 {quantile(norms, 0.1):.3g}, p90 {quantile(norms, 0.9):.3g})")
    for method, values in ratios.items():
        against = "" if method == "sum" else (f"   / ||sum t_i||  median {median(to_sum[method]):5.2f}  "
                                               f"p10 {quantile(to_sum[method], 0.1):5.2f}  p90 {quantile(to_sum[method], 0.9):5.2f}")
        print(f"  {method:9s} ||t_m|| / rms ||t_i||  median {median(values):5.2f}  p10 {quantile(values, 0.1):5.2f}  "
              f"p90 {quantile(values, 0.9):5.2f}{against}")


def calibration(bench: str, base: dict, set_name: str, layers=None) -> None:
    from mergekit_wudi.solvers import SOLVERS
    from mergekit_wudi.solvers.calibrate import calibrate

    vectors, _ = load_set(bench, base, set_name)
    solvers = {cls.name: cls() for cls in SOLVERS if cls.name in ("iso_c", "iso_cts")}  # calibrate: none
    rows = {name: ([], [], [], 0) for name in solvers}
    for _, ts in shared_tensors(vectors, layers):
        for method, solver in solvers.items():
            merged = solver.solve(ts)
            chosen = calibrate(ts, merged)
            by_task, by_norm, scales, tasks_bind = rows[method]
            by_task.append(1.0 / chosen.rho)
            by_norm.append(float(ts.sum(0).norm()) / float(merged.norm()))
            scales.append(chosen.scale)
            rows[method] = (by_task, by_norm, scales, tasks_bind + (chosen.binding == "task"))
    for method, (by_task, by_norm, scales, tasks_bind) in rows.items():
        print(f"{bench} {set_name} {method:8s} {len(scales)} tensors: 1/max rho median {median(by_task):5.2f} "
              f"(p10 {quantile(by_task, 0.1):5.2f}, p90 {quantile(by_task, 0.9):5.2f}); ||sum||/||M|| median "
              f"{median(by_norm):5.2f} (p10 {quantile(by_norm, 0.1):5.2f}, p90 {quantile(by_norm, 0.9):5.2f}); "
              f"c median {median(scales):5.2f}; the task bound binds in {tasks_bind}", flush=True)


def first_order(bench: str, base: dict, set_name: str, layers=None) -> None:
    from mergekit_wudi.solvers import SOLVERS
    from mergekit_wudi.solvers.calibrate import calibrate
    from mergekit_wudi.solvers.trim import trim_mask

    vectors, kinds = load_set(bench, base, set_name)
    if set_name == "mixed":
        vectors = {task: {name: t * trim_mask(t, 0.3) for name, t in tensors.items()} if kinds[task] == "full" else tensors
                   for task, tensors in vectors.items()}
    solvers = {cls.name: cls() for cls in SOLVERS if cls.name in ("iso_c", "iso_cts")}  # calibrate: none
    full = [i for i, task in enumerate(vectors) if kinds[task] == "full"]
    rows = {name: ([], [], []) for name in solvers}
    cancel, shares = [], []
    for _, ts in shared_tensors(vectors, layers):
        tasks = ts.double()
        total = tasks.sum(0)
        cancel.append(float(tasks.square().sum()) / float(total.square().sum()))
        shares.append(float(tasks[full].square().sum()) / float(tasks.square().sum()))
        for method, solver in solvers.items():
            merged = solver.solve(ts)
            rows[method][0].append(calibrate(ts, merged, "first_order").scale)
            rows[method][1].append(float(total.norm()) / float(merged.double().norm()))
            if set_name == "mixed":  # first_order over the full fine-tunes alone
                rows[method][2].append(float(tasks[full].square().sum()) / float((merged.double() * tasks[full].sum(0)).sum()))
    print(f"{bench} {set_name}: {len(cancel)} tensors; sum_i ||t_i||^2 / ||T||^2 median {median(cancel):.3f}, max "
          f"{max(cancel):.3f}, above 1 in {sum(value > 1 for value in cancel)}", flush=True)
    if set_name == "mixed":
        print(f"  the full fine-tunes' share of sum_i ||t_i||^2: median {median(shares):.2f} (p10 {quantile(shares, 0.1):.2f}, "
              f"p90 {quantile(shares, 0.9):.2f})", flush=True)
    for method, (orders, norms, fulls) in rows.items():
        ratios = [o / n for o, n in zip(orders, norms)]
        line = (f"  {method:8s} first_order c median {median(orders):5.2f} (p10 {quantile(orders, 0.1):5.2f}, p90 "
                f"{quantile(orders, 0.9):5.2f}); sum_norm c median {median(norms):5.2f}; first_order / sum_norm median "
                f"{median(ratios):5.2f} (p10 {quantile(ratios, 0.1):5.2f}, p90 {quantile(ratios, 0.9):5.2f})")
        if fulls:
            only = [f / n for f, n in zip(fulls, norms)]
            line += (f"; over the full fine-tunes alone / sum_norm median {median(only):5.2f} (p10 {quantile(only, 0.1):5.2f}, "
                     f"p90 {quantile(only, 0.9):5.2f})")
        print(line, flush=True)


def main() -> None:
    command, bench, *sets = sys.argv[1:]
    layers = None
    if "--layers" in sets:
        at = sets.index("--layers")
        layers = int(sets[at + 1])
        del sets[at:at + 2]
    torch.set_num_threads(1)
    base = load_file(str(ROOT / bench / "base" / "model.safetensors"))
    for set_name in sets:
        if command == "size":
            size(bench, base, set_name, layers)
        elif command == "calibrate":
            calibration(bench, base, set_name, layers)
        elif command == "first_order":
            first_order(bench, base, set_name, layers)
        else:
            {"overlap": overlap, "alignment": alignment}[command](bench, base, set_name)


if __name__ == "__main__":
    main()
