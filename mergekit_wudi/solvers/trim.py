"""The magnitude trim: keep the largest entries of each task vector (doge's, and every method's
`density` before its solve).

A pre-step, not a method: `Solver.solve` trims each task vector at its density before the
method sees it (docs/methods.md, "density"); doge trims inside its own solve.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from mergekit_wudi.solvers.numerics import TaskVectors

__all__ = ["kth_smallest_bits", "trim_mask", "trim_mask_of_magnitudes", "trimmed"]


def trimmed(prepared: TaskVectors, density: Sequence[float], overwrite: bool) -> TaskVectors:
    """Each task vector with only |t_i| >= its (d - floor(d * density_i))-th smallest |t_i| kept.

    density: one value in (0, 1] per task vector of `prepared`. overwrite: trim
    prepared.vectors in place (the caller gives them up); else into a new stack.
    Memory: one (out, in) magnitude buffer and its mask besides the stack.
    """
    vectors = prepared.vectors if overwrite else torch.empty_like(prepared.vectors)
    magnitude = torch.empty_like(prepared.vectors[0])
    sq_norms = []
    for index, (task, task_density) in enumerate(zip(prepared.vectors, density)):
        mask = trim_mask_of_magnitudes(torch.abs(task, out=magnitude), task_density)
        torch.mul(task, mask, out=vectors[index])
        norm = float(torch.linalg.vector_norm(vectors[index]))  # as prepare_task_vectors computes it
        sq_norms.append(norm * norm)
    return TaskVectors(vectors=vectors, sq_norms=tuple(sq_norms), indices=prepared.indices)


def trim_mask(task: torch.Tensor, density: float) -> torch.Tensor:
    """M (bool): keep |t| >= the (d - floor(d * density))-th smallest |t|, d = t.numel().

    This keeps floor(d * density) + 1 entries when magnitudes are distinct (the
    threshold entry itself is kept), and every entry at density 1.
    """
    return trim_mask_of_magnitudes(task.abs(), density)


def trim_mask_of_magnitudes(magnitude: torch.Tensor, density: float) -> torch.Tensor:
    """trim_mask for |t| already computed (finite, >= 0)."""
    numel = magnitude.numel()
    kth = numel - math.floor(numel * density)
    if kth <= 0:
        return torch.ones_like(magnitude, dtype=torch.bool)
    bits = _magnitude_bits(magnitude)
    return bits >= kth_smallest_bits(bits, kth)


def _magnitude_bits(magnitude: torch.Tensor) -> torch.Tensor:
    """The bit patterns of finite magnitudes (>= 0) as signed integers of the same width,
    a view: for such floats the integer order is the float order."""
    return magnitude.view(torch.int64 if magnitude.dtype == torch.float64 else torch.int32)


def kth_smallest_bits(bits: torch.Tensor, kth: int) -> int:
    """The k-th smallest of non-negative integers (1-based), by bisection on the value.

    Equal to torch.kthvalue(bits.view(-1), kth), which copies its input and allocates
    int64 indices (3 tensors of float32 size on top of |t|); this allocates one bool
    tensor per pass and makes at most bit-width passes (31 for float32 magnitudes).
    """
    low, high = 0, int(bits.max())  # the answer lies in [low, high]
    while low < high:
        middle = (low + high) // 2
        if int(torch.count_nonzero(bits <= middle)) >= kth:
            high = middle
        else:
            low = middle + 1
    return low
