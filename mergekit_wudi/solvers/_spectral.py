"""SVD pieces shared by the TSV and Iso solvers: a cutoff rule, truncation, polar
factors, and their common `solve` (SpectralSolver).

Pure torch. Every factorisation runs under one_cpu_thread (one-thread LAPACK on the
CPU), so results do not depend on the thread count.

The cutoff. A singular value s of an (out, in) matrix with s <= max(out, in) * eps *
scale, eps the machine epsilon of the compute dtype, is treated as zero and its singular
vectors are dropped: below it, s and its vectors are set by rounding (the rule of
torch.linalg.matrix_rank and pinv, with `scale` the largest singular value unless a
caller says otherwise). Without it, a rank-deficient input would bring in directions
chosen by LAPACK's rounding, at full weight, after a whitening or a spectrum flattening.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from mergekit_wudi.solvers.checks import per_model_values
from mergekit_wudi.solvers.numerics import TaskVectors, one_cpu_thread, one_thread_if_small, prepare_task_vectors


def cutoff(matrix: torch.Tensor, scale: float) -> float:
    """max(out, in) * eps(dtype) * scale: singular values at or below it count as zero."""
    return max(matrix.shape) * torch.finfo(matrix.dtype).eps * scale


def svd(matrix: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD, matrix = U diag(S) Vh, S descending: U (out, r), S (r,), Vh (r, in)."""
    with one_cpu_thread(matrix.device):
        return torch.linalg.svd(matrix, full_matrices=False)


def kept(values: torch.Tensor, limit: int, threshold: float) -> int:
    """How many of the first `limit` (descending) singular values exceed `threshold`."""
    return int(torch.count_nonzero(values[:limit] > threshold))


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Q^T of matrix = P D Q^T (same shape as matrix).

    The nearest matrix with orthonormal columns (rows, for a wide matrix) in the
    Frobenius norm (orthogonal Procrustes), equal to the whitening
    X (X^T X)^(-1/2). Where the matrix is rank-deficient, the factor on its range:
    singular values at or below cutoff(matrix, largest) are dropped with their vectors,
    so X (X^T X)^(+1/2) with the pseudo-inverse square root; a zero matrix gives zero.
    """
    left, values, right = svd(matrix)  # (a, r), (r,), (r, b)
    count = kept(values, values.shape[0], cutoff(matrix, float(values[0]) if values.numel() else 0.0))
    if count == values.shape[0]:
        return left @ right
    return left[:, :count] @ right[:count]  # (a, count) @ (count, b)


class SpectralSolver:
    """`Solver(config).solve(task_vectors)` for the methods without per-model parameters:
    a subclass sets `config_cls` and writes `_solve` for the usable task vectors.

    Input (N, out, in), any float dtype; solved in float32 (float64 if given float64);
    returns (out, in) in the compute dtype on the input device.
    """

    config_cls: type

    def __init__(self, config: Optional[Any] = None):
        self.config = config or self.config_cls()

    @one_thread_if_small
    def solve(self, task_vectors: torch.Tensor, **per_model: Any) -> torch.Tensor:
        """task_vectors: (N, out, in) -> t_m (out, in). No per-model parameter (any keyword:
        TypeError). Zero or non-finite task vectors are excluded; none left gives zero."""
        per_model_values(self.config, per_model, 0)
        prepared = prepare_task_vectors(task_vectors)
        if prepared.count == 0:
            return prepared.vectors.new_zeros(task_vectors.shape[1:])
        return self._solve(prepared)

    def _solve(self, prepared: TaskVectors) -> torch.Tensor:
        raise NotImplementedError
