"""TSV-Merge: Gargiulo et al., CVPR 2025, arXiv:2412.00081, as its official code computes it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from mergekit_wudi.solvers._spectral import SingularStacks, top_singular_triplets
from mergekit_wudi.solvers.base import Solver
from mergekit_wudi.solvers.checks import check_config
from mergekit_wudi.solvers.numerics import TaskVectors

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TsvConfig:
    """None: each task keeps floor(r / N) components, the share the official code fixes;
    the paper's alpha is the adapter's `lambda`."""

    def __post_init__(self):
        check_config(self)


class TsvSolver(
    Solver, name="tsv", pretty_name="TSV-Merge", paper="https://arxiv.org/abs/2412.00081", config=TsvConfig, one_thread=True
):
    """TSV-M per tensor, r = min(out, in), k = floor(r / N):

        t_i = U_i diag(s_i) V_i^T, each task's top k kept (those above the rank cutoff)
        U_hat = [U_1,k ... U_N,k] (out, Nk),  V_hat likewise (in, Nk),  S_hat their values
        t_m = polar(U_hat) S_hat polar(V_hat)^T

    The polar factors whiten the stacks: they decorrelate the tasks' singular vectors.
    Deviations from the code (rank cutoff, polar factor on the range, N = 1) and the memory
    plan: docs/methods-2025.md.
    """

    def _solve(self, prepared: TaskVectors) -> torch.Tensor:
        vectors = prepared.vectors  # (n, out, in)
        count, out_features, in_features = vectors.shape
        if count == 1:  # k = r: U_perp = U_1, V_perp = V_1, t_m = t_1
            return vectors[0].clone()
        per_task = min(out_features, in_features) // count  # k
        if per_task == 0:
            logger.debug("TSV: %d task vectors for rank %d: no component kept", count, min(out_features, in_features))
            return vectors.new_zeros(out_features, in_features)

        stacks = SingularStacks(vectors, count * per_task)  # U_hat (out, Nk), S_hat, V_hat^T
        for triplets in stacks.side_by_side(count, lambda index: top_singular_triplets(vectors[index], per_task), per_task):
            stacks.add(*triplets)  # task by task, its top j <= k
        if stacks.count == 0:  # not reached: a usable task vector keeps its largest component
            return vectors.new_zeros(out_features, in_features)
        logger.debug("TSV: %d of %d components kept (k = %d)", stacks.count, count * per_task, per_task)
        left, right, values = stacks.polar_factors()  # U_perp, V_perp^T, diag(S_hat)
        return left.mul_(values) @ right  # U_perp S_hat V_perp^T
