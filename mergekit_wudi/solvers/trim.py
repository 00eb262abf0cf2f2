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

_RADIX_BITS = 16  # kth_smallest_bits reads the value this many bits at a time
_CHUNK = 1 << 18  # entries per histogram step: a 1 MB buffer for float32 magnitudes


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
    """The k-th smallest of non-negative integers (1-based), by radix selection.

    Equal to torch.kthvalue(bits.view(-1), kth), which copies its input and allocates int64
    indices (3 tensors of float32 size on top of |t|). This reads the value 16 bits at a time
    from the top: a histogram of the next 16 bits among the entries that share the bits
    already found picks the bucket that holds the k-th, and k becomes its rank in that bucket.
    Two passes over float32 magnitudes (31 bits), four over float64 ones, each in chunks of
    2^18 entries through two buffers of one chunk (its shifted bits and a bool mask; 1.25 MB
    for float32), so the trim needs no more memory than its mask.
    """
    flat = bits.reshape(-1)
    size = min(flat.numel(), _CHUNK)
    shifted = torch.empty(size, dtype=bits.dtype, device=bits.device)
    selected = torch.empty(size, dtype=torch.bool, device=bits.device)
    top = shift = 8 * bits.element_size() - 1  # the sign bit is 0: the value lies below 2^top
    prefix = 0  # the value's bits above `shift`, found so far
    while shift > 0:
        low = max(shift - _RADIX_BITS, 0)
        buckets = 1 << (shift - low)
        histogram = torch.zeros(buckets, dtype=torch.int64, device=bits.device)
        for start in range(0, flat.numel(), _CHUNK):
            chunk = flat[start:start + _CHUNK]
            if shift < top:  # only the entries whose higher bits are the prefix found
                mask = torch.eq(torch.bitwise_right_shift(chunk, shift, out=shifted[:chunk.numel()]), prefix,
                                out=selected[:chunk.numel()])
                chunk = chunk[mask]
            digits = torch.bitwise_right_shift(chunk, low, out=shifted[:chunk.numel()])
            if shift < top:
                digits.bitwise_and_(buckets - 1)
            histogram += torch.bincount(digits, minlength=buckets)
        cumulative = torch.cumsum(histogram, 0)
        digit = int(torch.searchsorted(cumulative, kth))  # the first bucket whose count reaches kth
        kth -= int(cumulative[digit - 1]) if digit else 0
        prefix = (prefix << (shift - low)) | digit
        shift = low
    return prefix
