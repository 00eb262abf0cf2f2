"""Issue 23: what the task vectors of LoRA and full experts say about their inputs, and two
input models for WUDI's closed form that LoRA experts would call for (docs/research/lora-inputs.md).

    python benchmarks/research/lora_inputs.py overlap BASE.safetensors TASK,TASK,... SET_DIR...

prints, per expert set (a benchmark cache folder: <task>/model.safetensors or peft's
<task>/adapter_model.safetensors), medians over the linear tensors every expert has:
|t_i| / |W0|, the row-space overlap of the experts' top-8 right singular subspaces (mean
squared cosine of the principal angles over task pairs) divided by what random subspaces
give (8 / in), and the spread of the experts' norms.

`solve` is the experiment's solver: WUDI's closed form (docs/methods.md, omega 0.1) where
each task's input covariance is one of
  "gram":      t_i^T t_i / ||t_i||^2, WUDI's proxy;
  "isotropic": I / in, the same input energy spread evenly (a LoRA adapter's row space is its
               random initialisation A, so its inputs are not where its rows are);
  "flat":      P_i / rank_i, P_i the projector on t_i's row space (used where rank_i * 8 <=
               min(out, in), else "gram"): LoRA's row space with B's weighting taken out.
For the benchmark runs it was wrapped as a Solver subclass with a per-task choice in a module
under mergekit_wudi/solvers/ (discovered by name) and removed after the runs.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from measure_real_lora import load as load_adapter  # noqa: E402

from mergekit_wudi.solvers.numerics import numerical_rank  # noqa: E402

TOP = 8


def task_vectors(base: dict, set_dir: str, tasks) -> dict:
    """{task: {tensor name: t_i (float32)}} for the 2-D non-embedding tensors."""
    out = {}
    for task in tasks:
        folder = os.path.join(set_dir, task)
        if os.path.exists(os.path.join(folder, "model.safetensors")):
            tuned = load_file(os.path.join(folder, "model.safetensors"))
            out[task] = {k: tuned[k].float() - v.float() for k, v in base.items() if k in tuned and v.dim() == 2 and "embed" not in k}
        else:
            deltas, _ = load_adapter(folder)
            out[task] = {next(k for k in base if k.endswith(m.split("base_model.model.")[-1] + ".weight")): t for m, t in deltas.items()}
    return out


def overlap(base_path: str, tasks, set_dirs) -> None:
    base = load_file(base_path)
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    for set_dir in set_dirs:
        vectors = task_vectors(base, set_dir, tasks)
        ratios, overlaps, spreads = [], [], []
        for name in sorted(set.intersection(*(set(v) for v in vectors.values()))):
            ts = [vectors[task][name].double() for task in tasks]
            norms = [float(t.norm()) for t in ts]
            if min(norms) == 0:
                continue
            rows = [torch.linalg.svd(t, full_matrices=False)[2][:TOP].T for t in ts]
            in_features = ts[0].shape[1]
            pairs = [float((rows[i].T @ rows[j]).pow(2).sum()) / TOP for i in range(len(ts)) for j in range(i + 1, len(ts))]
            overlaps.append(sum(pairs) / len(pairs) / (TOP / in_features))
            ratios.append(sum(norms) / len(norms) / float(base[name].double().norm()))
            spreads.append(max(norms) / min(norms))
        print(f"{os.path.basename(set_dir.rstrip('/')):30s} tensors {len(ratios)}  |t|/|W0| {median(ratios):.4f}  "
              f"row overlap / random {median(overlaps):.1f} (min {min(overlaps):.1f}, max {max(overlaps):.1f})  "
              f"norm max/min {median(spreads):.2f}")


def solve(vectors: torch.Tensor, models, omega: float = 0.1) -> torch.Tensor:
    """argmin_M sum_i a_i tr((M - t_i) C_i (M - t_i)^T) + r a_i ||M - t_i||^2 (a_i = 1/||t_i||^2,
    r = omega mean ||t_i||^2 / in), C_i by models[i] as in the module docstring; float64."""
    vectors = vectors.double()
    count, out_features, in_features = vectors.shape
    sq_norms = [float(t.pow(2).sum()) for t in vectors]
    ridge = omega * sum(sq_norms) / count / in_features
    matrix = torch.zeros(in_features, in_features, dtype=torch.float64)
    rhs = torch.zeros(out_features, in_features, dtype=torch.float64)
    for t, sq_norm, model in zip(vectors, sq_norms, models):
        rank = numerical_rank(torch.linalg.svdvals(t), max(out_features, in_features)) if model == "flat" else 0
        if model == "flat" and rank * 8 <= min(out_features, in_features):
            rows = torch.linalg.svd(t, full_matrices=False)[2][:rank]
            matrix.add_(rows.T @ rows, alpha=1.0 / rank)
            rhs.add_(t, alpha=1.0 / rank)  # t P = t
        elif model == "isotropic":
            matrix.diagonal().add_(1.0 / in_features)
            rhs.add_(t, alpha=1.0 / in_features)
        else:
            gram = t.T @ t
            matrix.add_(gram, alpha=1.0 / sq_norm)
            rhs.add_(t @ gram, alpha=1.0 / sq_norm)
        matrix.diagonal().add_(ridge / sq_norm)
        rhs.add_(t, alpha=ridge / sq_norm)
    return torch.linalg.solve(matrix, rhs.T).T


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1:2] != ["overlap"]:
        sys.exit(__doc__)
    overlap(sys.argv[2], sys.argv[3].split(","), sys.argv[4:])
