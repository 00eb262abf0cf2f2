"""WUDI-Merging's closed-form solution (WUDI-Merging-CFS).

WUDI-Merging: Cheng et al., "Whoever Started the Interference Should End It: Guiding
Data-Free Model Merging via Task Vectors", ICML 2025, arXiv:2503.08099.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

from mergekit_wudi.solvers.checks import check_config, check_non_negative, config_field, per_model_values
from mergekit_wudi.solvers.numerics import gram_terms, one_cpu_thread, one_thread_if_small, prepare_task_vectors

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WudiCfsConfig:
    """Hyperparameters of WUDI-Merging-CFS.

    Args:
        omega (float, default 0.1): scale-free ridge. The ridge added to the (in, in)
            matrix is r * sum_i a_i with r = omega * mean_i ||t_i||^2 / in; since
            trace(C) = N, omega is the ridge as a fraction of C's mean eigenvalue when
            the task vectors have similar norms. 0 gives the minimum-norm
            (pseudo-inverse) minimiser of the unregularised loss; large omega tends to
            the norm-weighted mean sum_i a_i t_i / sum_i a_i. The paper (Sec. 5.4,
            Fig. 5a) finds the closed form sensitive to this choice; 0.1 damps only
            directions that carry under a tenth of an isotropic task vector's energy.
    """

    omega: float = config_field(0.1, check_non_negative, "scale-free ridge (0: pseudo-inverse)")

    def __post_init__(self):
        check_config(self)


class WudiCfsSolver:
    """Closed-form minimiser of the ridge-regularised WUDI loss.

    WUDI-Merging, Cheng et al., ICML 2025 (arXiv:2503.08099), Eq. 20 of the ICML text
    (derivation in A.1.4, Eq. 71-82), the minimiser of
        sum_i a_i (||(t_m - t_i) t_i^T||_F^2 + r ||t_m - t_i||_F^2),  a_i = 1/||t_i||_F^2:
        t_m = (sum_i a_i t_i (t_i^T t_i + r I)) (sum_i a_i (t_i^T t_i + r I))^-1
            = (D + r sum_i a_i t_i) (C + r A I)^-1,   A = sum_i a_i
    with C = sum_i a_i t_i^T t_i (in, in) and D = sum_i a_i t_i t_i^T t_i (out, in), and
    r = omega * mean_i(||t_i||^2) / in. (A.1.4 writes t_i t_i^T where the shapes need
    t_i^T t_i; Eq. 20 and this code use the latter.)

    The (in, in) matrix M = C + r A I is symmetric positive semi-definite: with r > 0 it
    is solved by Cholesky, M = L L^T, t_m = B L^-T L^-1 (factor and triangular solves
    in place: peak memory N + 2 tensors plus one (in, in) matrix); where that fails
    (the matrix is rebuilt), or at omega = 0, by
    an eigendecomposition that gives the pseudo-inverse (minimum-norm) solution, with
    eigenvalues below in * eps(dtype) * max eigenvalue treated as zero, as
    torch.linalg.pinv does for Hermitian input.

    Input (N, out, in), any float dtype; solved in float32 (float64 if given float64);
    returns (out, in) in the compute dtype on the input device. Zero or non-finite task
    vectors are excluded; with none left the result is zero, with one left (N = 1, or
    N effective = 1) it is that task vector, exactly.
    """

    def __init__(self, config: Optional[WudiCfsConfig] = None):
        self.config = config or WudiCfsConfig()

    @one_thread_if_small
    def solve(self, task_vectors: torch.Tensor, **per_model: Any) -> torch.Tensor:
        """task_vectors: (N, out, in). No per-model parameter (any keyword: TypeError)."""
        per_model_values(self.config, per_model, 0)
        prepared = prepare_task_vectors(task_vectors)
        vectors = prepared.vectors  # (n, out, in)
        count, out_features, in_features = vectors.shape
        if count == 0:
            return vectors.new_zeros(task_vectors.shape[1:])
        if count == 1:
            # The exact minimiser for any omega: t_1 (t_1^T t_1 + r I)(t_1^T t_1 + r I)^-1 = t_1;
            # a float32 solve would only approximate it.
            return vectors[0].clone()
        inv_norms = [1.0 / sq for sq in prepared.sq_norms]  # a_i
        ridge = self.config.omega * (sum(prepared.sq_norms) / count) / in_features  # r

        matrix, rhs = _normal_equations(vectors, inv_norms, ridge)
        if ridge > 0:
            # M = L L^T, L lower, factored in place: M is symmetric, so its row-major storage
            # is the column-major (LAPACK) storage of M.mT, which torch then factors
            # without a copy (a row-major `out` would cost one).
            factor = matrix.mT  # (in, in)
            with one_cpu_thread(factor.device):
                _, info = torch.linalg.cholesky_ex(factor, out=(factor, torch.empty((), dtype=torch.int32)))
            if int(info) == 0:
                # t_m M = B  <=>  t_m = B L^-T L^-1: two triangular solves, in place in B
                # (the same arithmetic as cholesky_solve, without its two copies).
                torch.linalg.solve_triangular(factor.mT, rhs, upper=True, left=False, out=rhs)
                torch.linalg.solve_triangular(factor, rhs, upper=False, left=False, out=rhs)
                return rhs
            logger.debug("Cholesky failed (info=%d); using the eigendecomposition", int(info))
            del factor, matrix
            matrix, _ = _normal_equations(vectors, inv_norms, ridge, rhs=False)
        return _pinv_solve(matrix, rhs)


def _normal_equations(vectors: torch.Tensor, inv_norms, ridge: float, rhs: bool = True):
    """M = sum_i a_i (t_i^T t_i + r I) (in, in) and B = sum_i a_i t_i (t_i^T t_i + r I) (out, in)."""
    matrix, result = gram_terms(vectors, inv_norms, ridge=ridge, with_d=rhs)
    if ridge > 0:
        matrix.diagonal().add_(ridge * sum(inv_norms))
    return matrix, result


def _pinv_solve(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """rhs @ pinv(matrix) for a symmetric PSD matrix, through its eigendecomposition."""
    with one_cpu_thread(matrix.device):
        eigenvalues, eigenvectors = torch.linalg.eigh(matrix)  # (in,), (in, in)
    cutoff = matrix.shape[0] * torch.finfo(matrix.dtype).eps * eigenvalues.abs().max()
    keep = eigenvalues > cutoff
    basis = eigenvectors[:, keep]  # (in, k)
    coords = (rhs @ basis).div_(eigenvalues[keep])  # (out, k)
    return coords @ basis.T
