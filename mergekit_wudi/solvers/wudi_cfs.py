"""WUDI-Merging's closed-form solution (WUDI-Merging-CFS).

WUDI-Merging: Cheng et al., "Whoever Started the Interference Should End It: Guiding
Data-Free Model Merging via Task Vectors", ICML 2025, arXiv:2503.08099.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from mergekit_wudi.solvers._common import (
    check_config,
    check_non_negative,
    config_field,
    prepare_task_vectors,
)

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
    is solved by Cholesky (M X = B^T, t_m = X^T); where that fails, or at omega = 0, by
    an eigendecomposition that gives the pseudo-inverse (minimum-norm) solution, with
    eigenvalues below in * eps(dtype) * max eigenvalue treated as zero, as
    torch.linalg.pinv does for Hermitian input.

    Input (N, out, in), any float dtype; solved in float32 (float64 if given float64);
    returns (out, in) in the compute dtype on the input device. Zero or non-finite task
    vectors are excluded; with none left the result is zero.
    """

    def __init__(self, config: Optional[WudiCfsConfig] = None):
        self.config = config or WudiCfsConfig()

    def solve(self, task_vectors: torch.Tensor) -> torch.Tensor:
        prepared = prepare_task_vectors(task_vectors)
        vectors = prepared.vectors  # (n, out, in)
        count, out_features, in_features = vectors.shape
        if count == 0:
            return vectors.new_zeros(task_vectors.shape[1:])
        inv_norms = [1.0 / sq for sq in prepared.sq_norms]  # a_i
        ridge = self.config.omega * (sum(prepared.sq_norms) / count) / in_features  # r

        # M = sum_i a_i (t_i^T t_i + r I), B = sum_i a_i t_i (t_i^T t_i + r I)
        matrix = vectors.new_zeros(in_features, in_features)  # (in, in)
        rhs = vectors.new_zeros(out_features, in_features)  # (out, in)
        task_gram = torch.empty_like(matrix)
        for task, weight in zip(vectors, inv_norms):
            torch.mm(task.T, task, out=task_gram)
            matrix.add_(task_gram, alpha=weight)
            rhs.addmm_(task, task_gram, alpha=weight)
            if ridge > 0:
                rhs.add_(task, alpha=weight * ridge)
        del task_gram
        if ridge > 0:
            matrix.diagonal().add_(ridge * sum(inv_norms))
            factor, info = torch.linalg.cholesky_ex(matrix)
            if int(info) == 0:
                # t_m M = B  <=>  M t_m^T = B^T  (M symmetric)
                return torch.cholesky_solve(rhs.T, factor).T
            logger.debug("Cholesky failed (info=%d); using the eigendecomposition", int(info))
            del factor
        return _pinv_solve(matrix, rhs)


def _pinv_solve(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """rhs @ pinv(matrix) for a symmetric PSD matrix, through its eigendecomposition."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)  # (in,), (in, in)
    cutoff = matrix.shape[0] * torch.finfo(matrix.dtype).eps * eigenvalues.abs().max()
    keep = eigenvalues > cutoff
    basis = eigenvectors[:, keep]  # (in, k)
    coords = (rhs @ basis).div_(eigenvalues[keep])  # (out, k)
    return coords @ basis.T
