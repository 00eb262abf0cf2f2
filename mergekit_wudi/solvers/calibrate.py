"""Data-free merge strengths (issue 23; docs/methods.md, "calibrate"): one scale c per merged
tensor M of the task vectors t_i, and the merge becomes c M.

`input_space`: no task receives more than its own update inside its own input space,

    rank_i = #{sigma_j(t_i) > rank_cutoff(max(out, in), float32, sigma_1(t_i))}
    k_i    = max(1, floor(rank_i / N))                 (the fair share, as doge and tsv size it)
    V_i    = the top k_i right singular vectors of t_i  (its input, row, space)
    rho_i  = ||M V_i||_F / ||t_i V_i||_F               (what the merge gives task i there)
    c      = min(1 / max_i rho_i,  ||sum_i t_i||_F / ||M||_F)

The second term keeps the result no larger than task arithmetic's sum.

`sum_norm`: that second term alone, c = ||sum_i t_i||_F / ||M||_F: the merge keeps the energy
of the plain sum (for Iso-C, its flat spectrum at the root mean square of the sum's singular
values instead of their mean).

`sum_cap`: c = min(1, ||sum_i t_i||_F / ||M||_F): the merge no larger than the plain sum, never
enlarged (what adapter_guard's one-seed cap sets where `calibrate` is none, guard.py).

`mean_cap`: c = min(1, ||sum_i t_i||_F / (N ||M||_F)): the merge no larger than the task vectors'
mean, never enlarged; N counts the task vectors given, zero ones too (a fine-tune that left the
tensor alone is still one of the N models averaged). What adapter_guard's one-seed rule sets for
doge, whose merge is about one task vector's size whatever N, where `calibrate` is none (guard.py).

`first_order`: c = min(sum_i ||t_i||_F^2, ||T||_F^2) / <M, T>_F, T = sum_i t_i: the tasks' summed
first-order gain along their own updates, sum_i <t_i, c M> = <T, c M>, equals what the experts
got, sum_i ||t_i||_F^2, or, where the tasks cancel (||T|| below that), what the plain sum gets,
||T||_F^2 (binding "gain" or "sum"). For Iso-C, M = s_bar polar(T) and c M = (that target /
||T||_*) polar(T): the flat spectrum at the tasks' energy over the sum's nuclear norm. Where
<M, T> <= 0 no positive c gives any gain, and sum_norm's c is taken (binding "norm").
adapter_guard turns it into sum_norm where any fine-tune looks like a LoRA adapter (guard.py), or,
for a method that merges by kind (Iso), into sum_norm for the adapters' part only.

All are one scalar per tensor: they never change a method's direction or spectrum. N = 1
gives c = 1 for any method that returns t_1; input_space, sum_norm and first_order are homogeneous
(c(a M) a M = c(M) M) and do not depend on a strength the method used inside. Pure torch
(scipy's LAPACK through numerics), float64 accumulation, one CPU thread: bits do not depend
on the thread count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from mergekit_wudi.solvers.numerics import (
    SOLVE_EXTRA_TENSORS,
    SymmetricSpectrum,
    gram64,
    numerical_rank,
    one_cpu_thread,
    panel_matmul,
    row_blocks,
    side_by_side,
)

CALIBRATIONS = ("none", "input_space", "sum_norm", "sum_cap", "mean_cap", "first_order")
# What the calibration may hold at once beside the task vectors and the merge, in tensors of
# the (out, in) size: the memory bound's SOLVE_EXTRA_TENSORS less the merge and fixed buffers.
CALIBRATION_SPARE = SOLVE_EXTRA_TENSORS - 2


@dataclass(frozen=True)
class Calibration:
    """What calibrate() chose for one tensor: the scale c, the largest rho_i and the task
    (index among the task vectors given) it belongs to; binding is "task", "norm", "gain" or
    "sum" (first_order's two targets), "none", or "parts" (below)."""

    scale: float
    rho: float
    task: int
    binding: str
    ranks: Tuple[int, ...] = ()  # each task vector's numerical rank
    # binding "parts" (Solver(parts=...)): each part's label and its own Calibration (None: "none");
    # the merge is the sum of the parts' calibrated merges, and scale is 1
    parts: Tuple[Tuple[str, Optional[Calibration]], ...] = ()


def calibrate(vectors: torch.Tensor, merged: torch.Tensor, rule: str = "input_space",
              count: Optional[int] = None) -> Calibration:
    """c for the merge `merged` (out, in) of the task vectors `vectors` (N, out, in), none zero,
    by `rule`: "input_space" (above), "sum_norm" (c = ||sum_i t_i||_F / ||M||_F alone),
    "sum_cap" (c = min(1, ||sum_i t_i||_F / ||M||_F)), "mean_cap" (c = min(1, ||sum_i t_i||_F /
    (count ||M||_F)), count the task vectors given before the zero ones were dropped, N by
    default) or "first_order"
    (c = min(sum_i ||t_i||_F^2, ||sum_i t_i||_F^2) / <M, sum_i t_i>_F)."""
    if rule not in CALIBRATIONS[1:]:
        raise ValueError(f"calibrate: no rule {rule!r} to apply (one of {', '.join(CALIBRATIONS[1:])})")
    with one_cpu_thread(merged.device):
        merged_norm = float(torch.linalg.vector_norm(merged, dtype=torch.float64))
        if merged_norm == 0.0 or vectors.shape[0] == 0:
            return Calibration(1.0, 0.0, -1, "none")
        if rule == "first_order":
            own, summed, delivered = _first_order_terms(vectors, merged)
            if delivered > 0.0:
                return Calibration(min(own, summed) / delivered, 0.0, -1, "gain" if own <= summed else "sum")
            return Calibration(math.sqrt(summed) / merged_norm, 0.0, -1, "norm")  # no positive c: sum_norm's
        if rule in ("sum_norm", "sum_cap", "mean_cap"):
            scale = _sum_norm(vectors) / merged_norm / ((count or vectors.shape[0]) if rule == "mean_cap" else 1)
            binds = rule == "sum_norm" or scale < 1.0
            return Calibration(scale if rule == "sum_norm" else min(1.0, scale), 0.0, -1, "norm" if binds else "none")
        count = vectors.shape[0]
        rhos, ranks = zip(*side_by_side(
            count, lambda index: own_space_ratio(vectors[index], merged, count),
            _own_space_elements(merged.shape, count), CALIBRATION_SPARE * merged.numel(),
        ))
        total = _sum_norm(vectors)  # ||sum_i t_i||_F
    task = max(range(len(rhos)), key=rhos.__getitem__)
    by_task = 1.0 / rhos[task] if rhos[task] > 0 else math.inf
    by_norm = total / merged_norm
    if by_task <= by_norm:
        return Calibration(by_task, rhos[task], task, "task", ranks)
    return Calibration(by_norm, rhos[task], task, "norm", ranks)


def own_space_ratio(task: torch.Tensor, merged: torch.Tensor, count: int) -> Tuple[float, int]:
    """(rho = ||M V||_F / ||t V||_F, V the top max(1, floor(rank / count)) right singular vectors of t; rank)."""
    out_features, in_features = task.shape
    rows = task if in_features <= out_features else task.mT  # its Gram is the smaller one
    spectrum = SymmetricSpectrum(gram64(rows))  # every sigma^2, then the top k pairs: one reduction
    rank = numerical_rank(spectrum.values.flip(0).clamp(min=0).sqrt(), max(out_features, in_features))
    if rank == 0:
        return 0.0, 0
    k = max(1, rank // count)
    squares, vectors = spectrum.top(k)  # sigma^2, (smaller, k)
    del spectrum  # the reduced Gram
    own = float(squares.clamp(min=0).sum())
    if in_features > out_features:  # vectors are left singular vectors u_j: v_j = t^T u_j / sigma_j
        right = vectors.new_zeros(in_features, k)
        for block in row_blocks(out_features):
            right.addmm_(task[block].double().mT, vectors[block])
        right.div_(squares.clamp(min=torch.finfo(torch.float64).tiny).sqrt())
        vectors = right
    delivered = 0.0
    for block in row_blocks(out_features):
        part = merged[block].double()
        delivered += float(panel_matmul(part, vectors, part.new_empty(part.shape[0], k)).square_().sum())
    return (math.sqrt(delivered / own) if own > 0 else 0.0), rank


def _own_space_elements(shape: Tuple[int, int], count: int) -> int:
    """An upper bound on what own_space_ratio holds, in float32 elements: the float64 Gram of
    the smaller side, its top eigenvectors, the right singular vectors where they are the
    larger side, and a float64 row block of a task vector and of the merge."""
    out_features, in_features = shape
    smaller, top = min(shape), max(1, min(shape) // max(1, count))
    right = in_features * top if in_features > out_features else 0
    return 2 * (smaller * smaller + smaller * top + right) + 4 * out_features * in_features // 16


def _first_order_terms(vectors: torch.Tensor, merged: torch.Tensor) -> Tuple[float, float, float]:
    """(sum_i ||t_i||_F^2, ||T||_F^2, <M, T>_F), T = sum_i t_i, in float64, a row block at a time."""
    own = summed = delivered = 0.0
    for block in row_blocks(vectors.shape[1]):
        rows = vectors[:, block].double()
        total = rows.sum(dim=0)
        own += float(rows.square().sum())
        summed += float(total.square().sum())
        delivered += float((total * merged[block].double()).sum())
    return own, summed, delivered


def _sum_norm(vectors: torch.Tensor) -> float:
    """||sum_i t_i||_F in float64, a row block at a time."""
    total = 0.0
    for block in row_blocks(vectors.shape[1]):
        total += float(vectors[:, block].double().sum(dim=0).square_().sum())
    return math.sqrt(total)
