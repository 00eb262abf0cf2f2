"""How far the experts' input and output spaces coincide: a data-free sign of how they were trained.

For task vectors t_i (out x in) with top-k right singular vectors V_i (the input space the
update reads) and left singular vectors U_i (what it writes), k = min(8, the smallest
numerical rank of the t_i) (so a rank-4 adapter is compared on its 4 directions, not on 4
set by rounding):

    input overlap_i  = max_{j != i} ||V_i^T V_j||_F^2 / k  /  (k / in)
    output overlap_i = max_{j != i} ||U_i^T U_j||_F^2 / k  /  (k / out)

The mean squared cosine of the principal angles between the two subspaces, divided by its
value for independent random subspaces (k / dim), so 1 is chance and dim / k the most.

Why it tells the kind of expert (docs/research/lora-inputs.md, section 5):
a full fine-tune's rows are built from its task's inputs, which different tasks share, so
full fine-tunes' input spaces overlap well beyond chance. A LoRA update B A reads A's row
space, and A stays near its random initialisation: adapters with a seed each overlap at
chance on the input side while their B's still share output directions; adapters trained
from one seed share one A and overlap far beyond their output side. Medians over a model's
tensors on this package's benchmarks (SmolLM2-135M, MiniLM; float32 and bf16 alike):

    full fine-tunes              input 9-23x, input / output 0.8-2.5
    LoRA, a seed per adapter     input 1.4-2.9x, input / output 0.27-0.56
    LoRA, one seed for all       input 38-59x, input / output 7.4-18

The subspaces come from a randomised range finder (Halko, Martinsson and Tropp 2011, Alg. 4.4:
16 columns, two power iterations, a fixed seed), O(out in) per task vector rather than an SVD's
O(out in min(out, in)), so that a merge can afford it on its first tensors; exact where the
rank is at most 16, and deterministic.

Single tensors are noisy (a tenth of full fine-tunes' tensors exceed a ratio of 3.4); the
median over many tensors separates the kinds, so `expert_kind` takes medians. Over a model's
first 12 tensors (what a merge samples) the medians were: full 10-23x and ratio 0.9-3.3, LoRA
with a seed each 1.4-2.4x, one seed 35-58x and ratio 7.1-14.6; the ratio's cut, 5, lies
between 3.3 and 7.1.
"""

from __future__ import annotations

import math
import statistics
from typing import Iterable, Optional, Sequence, Tuple

import torch

from mergekit_wudi.solvers.numerics import numerical_rank

TOP = 8
LORA_INPUT_OVERLAP = 5.0  # median input overlap below this: adapters with a seed each
ONE_SEED_RATIO = 5.0  # median input / output overlap above this: adapters sharing one initialisation


def subspace_overlap(task_vectors: torch.Tensor) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(input overlaps, output overlaps), one per task vector of (N, out, in), as multiples of
    chance (see the module docstring). nan for a task vector that is zero or not finite, and for
    all of them where fewer than two remain. float64 for float64 input, else float32."""
    return overlaps([task_subspaces(vector) for vector in task_vectors], task_vectors.shape[1:])


Subspaces = Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def task_subspaces(vector: torch.Tensor) -> Subspaces:
    """One task vector's top TOP triplets (top_subspaces), in float64 for float64 input, else
    float32; None where it is zero or not finite. What `overlaps` compares, so that a caller can
    measure one task vector at a time and keep only these."""
    if not (bool(torch.isfinite(vector).all()) and bool(vector.any())):
        return None
    return top_subspaces(vector.to(torch.float64 if vector.dtype == torch.float64 else torch.float32), TOP)


def overlaps(subspaces: Sequence[Subspaces], shape: Sequence[int]) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """subspace_overlap from each task vector's task_subspaces (None: not usable) and the (out, in) shape."""
    out_features, in_features = shape
    usable = [i for i, found in enumerate(subspaces) if found is not None]
    rows = [math.nan] * len(subspaces)
    columns = [math.nan] * len(subspaces)
    if len(usable) < 2:
        return tuple(rows), tuple(columns)
    k = common_rank(subspaces, shape)
    for i in usable:
        left, _, right = subspaces[i]
        others = [subspaces[j] for j in usable if j != i]
        rows[i] = max(float((right[:, :k].T @ v[:, :k]).pow(2).sum()) for _, _, v in others) / k / (k / in_features)
        columns[i] = max(float((left[:, :k].T @ u[:, :k]).pow(2).sum()) for u, _, _ in others) / k / (k / out_features)
    return tuple(rows), tuple(columns)


def common_rank(subspaces: Sequence[Subspaces], shape: Sequence[int]) -> int:
    """k of the module docstring: min(TOP, the smallest numerical rank among the usable task
    vectors' task_subspaces); 0 where none is usable."""
    ranks = [numerical_rank(found[1], max(shape)) for found in subspaces if found is not None]
    return min(TOP, *ranks) if ranks else 0


def top_subspaces(matrix: torch.Tensor, count: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (out, c), singular values (c,), V (in, c)) of matrix's top c = min(count, out, in)
    singular triplets, by the range finder of the module docstring (8 extra columns, two power
    iterations, seed 0, re-orthonormalised at each step)."""
    out_features, in_features = matrix.shape
    width = min(count + 8, out_features, in_features)
    generator = torch.Generator(device=matrix.device).manual_seed(0)
    probe = torch.randn(in_features, width, generator=generator, device=matrix.device, dtype=matrix.dtype)
    basis = torch.linalg.qr(matrix @ probe).Q
    for _ in range(2):
        basis = torch.linalg.qr(matrix.mT @ basis).Q
        basis = torch.linalg.qr(matrix @ basis).Q
    u, values, vh = torch.linalg.svd(basis.mT @ matrix, full_matrices=False)
    count = min(count, width)
    return (basis @ u)[:, :count], values[:count], vh[:count].mT


def expert_kind(input_overlap: float, output_overlap: float) -> str:
    """"full", "lora" (a seed per adapter) or "lora, one seed", from one model's median overlaps
    over many tensors; "" where they are not finite."""
    if not (math.isfinite(input_overlap) and math.isfinite(output_overlap)) or output_overlap <= 0:
        return ""
    if input_overlap < LORA_INPUT_OVERLAP:
        return "lora"
    if input_overlap / output_overlap > ONE_SEED_RATIO:
        return "lora, one seed"
    return "full"


def model_kind(pairs: Iterable[Tuple[float, float]]) -> Tuple[float, float, str]:
    """(median input overlap, median output overlap, expert_kind of them) over one model's
    (input, output) overlaps, one pair per tensor."""
    inputs, outputs = zip(*pairs)
    medians = statistics.median(inputs), statistics.median(outputs)
    return (*medians, expert_kind(*medians))
