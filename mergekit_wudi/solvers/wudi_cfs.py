"""WUDI-Merging-CFS: Cheng et al., ICML 2025, arXiv:2503.08099, Eq. 20."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from mergekit_wudi.solvers.base import Solver
from mergekit_wudi.solvers.checks import check_config, check_non_negative, config_field
from mergekit_wudi.solvers.numerics import TaskVectors, gram_terms, one_cpu_thread, rank_cutoff, symmetric_eigh

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WudiCfsConfig:
    """omega: the ridge r = omega * mean_i ||t_i||^2 / in, a fraction of C's mean
    eigenvalue for task vectors of similar norms; 0 gives the pseudo-inverse solution."""

    omega: float = config_field(0.1, check_non_negative, "scale-free ridge (0: pseudo-inverse)")

    def __post_init__(self):
        check_config(self)


class WudiCfsSolver(
    Solver, name="wudi_cfs", pretty_name="WUDI-Merging (closed form)", paper="https://arxiv.org/abs/2503.08099", config=WudiCfsConfig
):
    """WUDI-Merging's closed form (Eq. 20), the minimiser of
    sum_i a_i (||(t_m - t_i) t_i^T||_F^2 + r ||t_m - t_i||_F^2),  a_i = 1/||t_i||_F^2:

        t_m = (D + r sum_i a_i t_i) (C + r A I)^-1,   A = sum_i a_i
        C = sum_i a_i t_i^T t_i (in, in),  D = sum_i a_i t_i t_i^T t_i (out, in)

    Cholesky in place where r > 0 and it succeeds, else the pseudo-inverse through an
    eigendecomposition. One usable task vector is returned exactly (docs/methods.md).
    """

    def _solve(self, prepared: TaskVectors) -> torch.Tensor:
        vectors = prepared.vectors  # (n, out, in)
        count, out_features, in_features = vectors.shape
        if count == 1:  # the exact minimiser for any omega; a float32 solve would approximate it
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
    eigenvalues, eigenvectors = symmetric_eigh(matrix)  # (in,), (in, in)
    cutoff = rank_cutoff(matrix.shape[0], matrix.dtype, eigenvalues.abs().max())
    keep = eigenvalues > cutoff
    basis = eigenvectors[:, keep]  # (in, k)
    coords = (rhs @ basis).div_(eigenvalues[keep])  # (out, k)
    return coords @ basis.T
