"""WUDI-Merging-CFS: Cheng et al., ICML 2025, arXiv:2503.08099, Eq. 20."""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Tuple

import torch

from mergekit_wudi.solvers.base import Solver
from mergekit_wudi.solvers.checks import check_config, check_non_negative, config_field
from mergekit_wudi.solvers.numerics import (
    TaskVectors,
    cholesky_,
    gram_terms,
    rank_cutoff,
    symmetric_eigh,
    symmetric_product_,
)

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
    eigendecomposition. Where it is cheaper (out_space: n out well below in, as a down
    projection's), the same solution from the stacked (n out, n out) system instead
    (_stacked_equations). One usable task vector is returned exactly (docs/methods.md).
    """

    def _solve(self, prepared: TaskVectors) -> torch.Tensor:
        vectors = prepared.vectors  # (n, out, in)
        count, out_features, in_features = vectors.shape
        if count == 1:  # the exact minimiser for any omega; a float32 solve would approximate it
            return vectors[0].clone()
        inv_norms = [1.0 / sq for sq in prepared.sq_norms]  # a_i
        ridge = self.config.omega * (sum(prepared.sq_norms) / count) / in_features  # r

        if output_space(count, out_features, in_features):
            build = functools.partial(_stacked_equations, vectors, inv_norms, ridge)
            weights = _right_solve(build, ridge > 0, in_features)  # Y = K H^-1, (out, n out)
            result = vectors.new_zeros(out_features, in_features)
            for task, (start, stop), scale in zip(vectors, _blocks(count, out_features), inv_norms):
                result.addmm_(weights[:, start:stop], task, alpha=math.sqrt(scale))  # t_m = Y T
            return result
        return _right_solve(functools.partial(_normal_equations, vectors, inv_norms, ridge), ridge > 0, in_features)


def output_space(count: int, out_features: int, in_features: int) -> bool:
    """Whether t_m comes from the stacked (n out, n out) system rather than the (in, in)
    one: where it takes fewer multiply-adds (solve_cost). The choice depends on the shape
    only, never on the machine, so neither do the bits."""
    in_space, out_space = solve_cost(count, out_features, in_features)
    return out_space < in_space


def solve_cost(count: int, out_features: int, in_features: int) -> Tuple[int, int]:
    """Multiply-adds of the (in, in) route and of the stacked (n out, n out) one: their
    Gram products, the Cholesky factorisation, the two triangular solves and, stacked, the
    blocks of K and the product Y T (symmetric products counted whole)."""
    stacked = count * out_features
    d_term = count * out_features * in_features * (in_features if in_features <= out_features else 2 * out_features)
    in_space = count * out_features * in_features**2 + d_term + in_features**3 // 3 + out_features * in_features**2
    out_space = (count * (count + 1) // 2 + count) * out_features**2 * in_features
    out_space += stacked**3 // 3 + out_features * stacked**2
    return in_space, out_space


def _right_solve(build, factor_first: bool, size: int) -> torch.Tensor:
    """rhs M^-1 for (M, rhs) = build(): Cholesky in place where factor_first and it
    succeeds, else the pseudo-inverse with the rank cutoff at `size`; rhs is overwritten.
    build(rhs=, whole=): whole=False may leave M's lower triangle unwritten."""
    matrix, rhs = build(whole=not factor_first)
    if factor_first:
        factor, info = cholesky_(matrix)  # M = L L^T in place, from M's upper triangle
        if info == 0:
            # X M = B  <=>  X = B L^-T L^-1: two triangular solves, in place in B
            # (the same arithmetic as cholesky_solve, without its two copies).
            torch.linalg.solve_triangular(factor.mT, rhs, upper=True, left=False, out=rhs)
            torch.linalg.solve_triangular(factor, rhs, upper=False, left=False, out=rhs)
            return rhs
        logger.debug("Cholesky failed (info=%d); using the eigendecomposition", info)
        del factor, matrix
        matrix, _ = build(rhs=False, whole=True)
    return _pinv_solve(matrix, rhs, size)


def _normal_equations(vectors: torch.Tensor, inv_norms, ridge: float, rhs: bool = True, whole: bool = True):
    """M = sum_i a_i (t_i^T t_i + r I) (in, in) and B = sum_i a_i t_i (t_i^T t_i + r I) (out, in);
    M whole whatever `whole` (gram_terms mirrors its symmetric products)."""
    matrix, result = gram_terms(vectors, inv_norms, ridge=ridge, with_d=rhs)
    if ridge > 0:
        matrix.diagonal().add_(ridge * sum(inv_norms))
    return matrix, result


def _blocks(count: int, size: int):
    return [(index * size, (index + 1) * size) for index in range(count)]


def _stacked_equations(vectors: torch.Tensor, inv_norms, ridge: float, rhs: bool = True, whole: bool = True):
    """The same solve in the stacked output space (push-through: T (T^T T + r A I)^-1 =
    (T T^T + r A I)^-1 T), with s_i = sqrt(a_i) t_i and T = [s_1; ...; s_n] (n out, in):

        H = T T^T + r A I (n out, n out), blocks s_i s_j^T;  K = [K_1 ... K_n] (out, n out),
        K_i = sqrt(a_i) (t_i t_i^T + r I) = H_ii / sqrt(a_i) + r sqrt(a_i) I (before H's ridge)

    so that B = K T and t_m = K H^-1 T. Unless whole, only H's upper block triangle is
    written (Cholesky reads no more); K only where rhs."""
    count, out_features, _ = vectors.shape
    spans = _blocks(count, out_features)
    matrix = vectors.new_zeros(count * out_features, count * out_features)
    for row, ((start, stop), scale) in enumerate(zip(spans, inv_norms)):
        symmetric_product_(matrix[start:stop, start:stop], vectors[row].mT, alpha=scale)  # a_i t_i t_i^T
        for column in range(0 if whole else row + 1, count):
            if column != row:
                begin, end = spans[column]
                alpha = math.sqrt(scale * inv_norms[column])
                matrix[start:stop, begin:end].addmm_(vectors[row], vectors[column].T, beta=0, alpha=alpha)
    weights = None
    if rhs:
        weights = vectors.new_zeros(out_features, count * out_features)  # K
        for (start, stop), scale in zip(spans, inv_norms):
            torch.mul(matrix[start:stop, start:stop], 1.0 / math.sqrt(scale), out=weights[:, start:stop])
            weights[:, start:stop].diagonal().add_(ridge * math.sqrt(scale))
    if ridge > 0:
        matrix.diagonal().add_(ridge * sum(inv_norms))
    return matrix, weights


def _pinv_solve(matrix: torch.Tensor, rhs: torch.Tensor, size: int) -> torch.Tensor:
    """rhs @ pinv(matrix) for a symmetric PSD matrix, through its eigendecomposition, with
    the rank cutoff at `size` (in: the same cutoff in either space)."""
    eigenvalues, eigenvectors = symmetric_eigh(matrix)  # (m,), (m, m)
    cutoff = rank_cutoff(size, matrix.dtype, eigenvalues.abs().max())
    keep = eigenvalues > cutoff
    basis = eigenvectors[:, keep]  # (m, k)
    coords = (rhs @ basis).div_(eigenvalues[keep])  # (out, k)
    return coords @ basis.T
