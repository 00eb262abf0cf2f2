"""ACE-Merging: Xu et al., CVPR 2026, arXiv:2603.02945, as its official code computes it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

import torch

from mergekit_wudi.solvers._spectral import top_singular_triplets
from mergekit_wudi.solvers.base import Solver
from mergekit_wudi.solvers.checks import (
    check_bool,
    check_choice,
    check_config,
    check_positive,
    check_unit_interval,
    config_field,
)
from mergekit_wudi.solvers.numerics import (
    TaskVectors,
    cholesky_,
    for_each_panel,
    one_cpu_thread,
    rank_cutoff,
    row_blocks,
    symmetric_product_,
)

HETEROGENEITY = 0.3  # the code's switch: gamma > 0.3 turns on normalisation and refinement
GUARD = 1e-12  # the code's guards on logs, traces and divisions


@dataclass(frozen=True)
class AceConfig:
    """The official defaults (`ace_merging(eps=1e-2, k_frac=0.3)`); the last three switch
    on the corrections of docs/ace.md, off by default."""

    eps: float = config_field(1e-2, check_positive, "ridge added to each task's covariance (absolute)")
    k_frac: float = config_field(0.3, check_unit_interval, "refined rank floor(min(out, in) k_frac); 0: none")
    prior: str = config_field("row", check_choice("row", "mean"), "collective prior: row (the code's) or mean")
    centre_update: bool = config_field(True, check_bool, "closed form on centred task vectors (the code's)")
    residual_ridge: bool = config_field(True, check_bool, "refinement's mean covariance with the ridges (the code's)")

    def __post_init__(self):
        check_config(self)


class AceSolver(
    Solver, name="ace", pretty_name="ACE-Merging", paper="https://arxiv.org/abs/2603.02945", config=AceConfig
):
    """ACE per tensor, c_i = t_i - 1 m_i^T (column-centred), G_i = c_i^T c_i (in, in):

        h = var(log tau) / mean(log tau)^2 > 0.3,  tau_i = ||t_i||^2
        a_i = 1 / (tr G_i + 1e-12) if h else 1;  S_i = a_i G_i;  R_i = S_i + eps a_i I
        W_0 = (sum_i c_i R_i) (sum_i R_i + 1 p^T)^-1,  p = column means of sum_i S_i
              (divided by mean(tau) + 1e-12 if h)
        h:  Delta = sum_i t_i (S_i - sum_j R_j / N) + W_0,  its top k = floor(r k_frac)
            singular triplets U, s, V;  t_m = W_0 + mean(s) U V^T;  else t_m = W_0

    Sherman-Morrison and a Cholesky of the symmetric sum_i R_i stand for the code's
    inverse. Tasks with no centred part are left out; N = 1 never refines (docs/ace.md).
    """

    def _solve(self, prepared: TaskVectors) -> torch.Tensor:
        vectors = prepared.vectors  # (n, out, in)
        _, out_features, in_features = vectors.shape
        means = vectors.mean(dim=1)  # m_i (n, in)
        work = torch.empty_like(vectors[0])  # c_i, then sum_i t_i
        kept: List[int] = []
        weights: List[float] = []  # a_i
        for index, sq_norm in enumerate(prepared.sq_norms):
            centred_sq = float(torch.linalg.vector_norm(torch.sub(vectors[index], means[index], out=work))) ** 2
            if math.sqrt(centred_sq) > rank_cutoff(max(out_features, in_features), vectors.dtype, math.sqrt(sq_norm)):
                kept.append(index)
                weights.append(centred_sq + GUARD)  # trace(G_i) + 1e-12, inverted below if h
        if not kept:
            return work.zero_()
        traces = [prepared.sq_norms[index] for index in kept]
        refine = _heterogeneous(traces)
        weights = [1.0 / trace for trace in weights] if refine else [1.0] * len(kept)
        config = self.config

        covariance = vectors.new_zeros(in_features, in_features)  # sum_i S_i
        merged = torch.zeros_like(work)  # sum_i a_i u_i G_i, then B, then W_0, then t_m
        row = vectors.new_zeros(in_features) if refine else None  # u = sum_i a_i G_i m_i
        # G_i as an (in, in) temporary where in <= out; else (out, out) overlaps, as gram_terms does
        tall = in_features <= out_features
        scratch = vectors.new_empty((in_features, in_features) if tall else (out_features, out_features))
        for index, weight in zip(kept, weights):
            task = vectors[index]
            centred = torch.sub(task, means[index], out=work)
            update = centred if config.centre_update else task
            if tall:
                gram = symmetric_product_(scratch, centred)  # G_i
                covariance.add_(gram, alpha=weight)
                merged.addmm_(update, gram, alpha=weight)
                if row is not None:
                    with one_cpu_thread(row.device):  # addmv_, as addr_, rounds differently with the thread count
                        row.addmv_(gram, means[index], alpha=weight)
            else:
                symmetric_product_(covariance, centred, alpha=weight, accumulate=True)
                if update is centred:  # c_i c_i^T, symmetric
                    symmetric_product_(scratch, centred.mT)
                else:
                    torch.mm(update, centred.T, out=scratch)
                merged.addmm_(scratch, centred, alpha=weight)  # a_i (u_i c_i^T) c_i
                if row is not None:
                    with one_cpu_thread(row.device):  # addmv_, as addr_, rounds differently with the thread count
                        row.addmv_(centred.T, centred @ means[index], alpha=weight)
        del scratch, work, centred, update, task
        gram = None  # the loop's names held scratch and work alive
        ridge = config.eps * sum(weights)  # sum_i e_i
        count = len(kept)
        residual = None
        if refine:  # sum_i t_i (S_i - Sbar) = sum_i a_i c_i G_i + 1 u^T - T Sbar, before the ridge terms join B
            residual = merged.clone()
            if config.centre_update:
                residual.add_(row)
            _subtract_sum_times(residual, vectors, kept, covariance, 1.0 / count, ridge / count if config.residual_ridge else 0.0)
        for index, weight in zip(kept, weights):  # B = sum_i u_i (a_i G_i + e_i I)
            merged.add_(vectors[index], alpha=config.eps * weight)
        if config.centre_update:
            merged.sub_(sum(config.eps * weight * means[index] for index, weight in zip(kept, weights)))
        del means
        scale = 1.0 / (sum(traces) / count + GUARD) if refine else 1.0
        _solve_closed_form(merged, covariance, ridge, config.prior, scale / count if config.prior == "mean" else scale)
        del covariance
        if residual is None:
            return merged
        residual.add_(merged)  # Delta
        rank = int(min(out_features, in_features) * config.k_frac)
        if rank == 0:
            return merged
        with one_cpu_thread(residual.device):
            left, values, right = top_singular_triplets(residual, rank)
        if values.numel():
            merged.addmm_(left, right, alpha=float(values.mean()))
        return merged


def _subtract_sum_times(target: torch.Tensor, vectors: torch.Tensor, kept, matrix: torch.Tensor, scale: float,
                        ridge: float) -> None:
    """target -= T (scale matrix + ridge I), T = sum of the kept vectors, formed 1/16 of its rows at a time.

    Each block's product on one thread, the blocks side by side (for_each_panel): a product
    with few rows (the last block's) rounds differently with the thread count (an AMD EPYC
    did, at 5 x 300 times 300 x 300), so the bits depend on the shape only."""

    def job(rows: slice) -> None:
        block = vectors[kept[0], rows].clone()
        for index in kept[1:]:
            block.add_(vectors[index, rows])
        target[rows].addmm_(block, matrix, alpha=-scale)
        if ridge:
            target[rows].add_(block, alpha=-ridge)

    with one_cpu_thread(target.device):
        for_each_panel(list(row_blocks(target.shape[0])), job)


def _heterogeneous(traces: List[float]) -> bool:
    """gamma > 0.3, gamma = var(l) / (mean(l)^2 + 1e-12), l = log(tau + 1e-12) (var: N - 1); never for N < 2."""
    if len(traces) < 2:
        return False
    logs = [math.log(trace + GUARD) for trace in traces]
    mean = sum(logs) / len(logs)
    variance = sum((value - mean) ** 2 for value in logs) / (len(logs) - 1)
    return variance / (mean * mean + GUARD) > HETEROGENEITY


def _solve_closed_form(rhs: torch.Tensor, covariance: torch.Tensor, ridge: float, prior: str, scale: float) -> None:
    """rhs <- rhs A^-1 in place, A = covariance + ridge I + the prior, overwriting covariance.

    prior "row": A = S + 1 p^T, S = covariance + ridge I, p = scale * column means of
    covariance, through S's Cholesky factor and Sherman-Morrison. prior "mean":
    A = (1 + scale) covariance + ridge I, scale = 1 / N (/ mean(tau) with h), symmetric.
    """
    size = covariance.shape[0]
    prior_row = covariance.sum(dim=0).mul_(scale / size) if prior == "row" else None  # p
    if prior_row is None:
        covariance.mul_(1.0 + scale)
    covariance.diagonal().add_(ridge)
    factor, info = cholesky_(covariance)  # S = L L^T in place
    if info != 0:
        raise torch.linalg.LinAlgError(f"ACE: the ridged covariance is not positive definite (info={info})")
    torch.linalg.solve_triangular(factor.mT, rhs, upper=True, left=False, out=rhs)  # X = B S^-1
    torch.linalg.solve_triangular(factor, rhs, upper=False, left=False, out=rhs)
    if prior_row is None:
        return
    rows = torch.stack([torch.ones_like(prior_row), prior_row])  # (2, in): 1^T, p^T
    torch.linalg.solve_triangular(factor.mT, rows, upper=True, left=False, out=rows)  # y^T, q^T (S symmetric)
    torch.linalg.solve_triangular(factor, rows, upper=False, left=False, out=rows)
    denominator = 1.0 + float(prior_row @ rows[0])
    with one_cpu_thread(rhs.device):  # addr_ rounds differently with another thread count
        rhs.addr_(rhs.sum(dim=1), rows[1], alpha=-1.0 / denominator)  # X - (X 1) q^T / (1 + p^T y)
