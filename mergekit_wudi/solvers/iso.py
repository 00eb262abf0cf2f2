"""Iso-C and Iso-CTS: Marczak et al., ICML 2025, arXiv:2502.04959, as the official code computes them."""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Tuple

import torch

from mergekit_wudi.solvers._spectral import (
    SOLVE_TENSORS,
    SingularStacks,
    polar_,
    top_singular_triplets,
    top_singular_triplets_and_complement,
)
from mergekit_wudi.solvers.base import Solver, warn_once
from mergekit_wudi.solvers.calibrate import Calibration
from mergekit_wudi.solvers.checks import check_config, check_fraction, config_field
from mergekit_wudi.solvers.numerics import TaskVectors, gram_singular_values, numerical_rank

logger = logging.getLogger(__name__)


RANK_SAMPLE = 12  # tensors per method and process whose ranks the mixed-rank check counts where calibrate did not
_RANKS_READ: Counter = Counter()


def warn_mixed_ranks(method: str, calibration: Calibration, vectors: torch.Tensor) -> None:
    """Once per method and process: low-rank (LoRA-like) and full-rank task vectors in one solve
    (adapter_guard off, or its sample did not tell the kinds apart: else each kind is solved on
    its own), where a flat spectrum gives the low-rank ones almost nothing. The ranks are those
    `calibrate: input_space` counted; under another rule, those of the first RANK_SAMPLE
    tensors solved (as adapter_guard samples 12), counted here."""
    ranks, width = calibration.ranks, min(vectors.shape[1:])
    if not ranks:
        if _RANKS_READ[method] >= RANK_SAMPLE:
            return
        _RANKS_READ[method] += 1
        ranks = tuple(numerical_rank(gram_singular_values(task), max(task.shape)) for task in vectors)
    if not (8 * min(ranks) <= width <= 2 * max(ranks)):
        return
    _RANKS_READ[method] = RANK_SAMPLE  # said: stop counting
    warn_once(
        logger, "mixed ranks", method,
        "%s: the task vectors mix low and full rank (ranks %s of %d): LoRA-derived and fully fine-tuned "
        "models together, in one flat spectrum, which gives the low-rank ones little (SmolLM2 benchmark, 2 full + 2 "
        "LoRA experts, test: iso_c 58.8 in one spectrum, 75.1 with each kind merged on its own, as adapter_guard does where its "
        "sample tells the kinds apart; wudi_cfs 80.2, docs/benchmarks.md); prefer wudi_cfs or doge here.",
        method, ", ".join(map(str, ranks)), width,
    )


@dataclass(frozen=True)
class IsoCConfig:
    """None: the paper's alpha is the adapter's `lambda` times `calibrate`'s c (the official
    code tunes alpha on validation data; the YAML default `calibrate: first_order` picks it per
    tensor from the task vectors: the tasks' summed first-order gain sum_i <t_i, c t_m> equals
    the experts' sum_i ||t_i||^2; sum_norm, the sum's energy, where the fine-tunes look like
    LoRA adapters; full fine-tunes beside adapters are merged apart from them, each kind by its
    own rule, and the two merges added: docs/methods.md)."""

    def __post_init__(self):
        check_config(self)


class IsoCSolver(
    Solver, name="iso_c", pretty_name="Iso-C", paper="https://arxiv.org/abs/2502.04959", config=IsoCConfig, one_thread=True,
    calibration="first_order", sums_disjoint=False, by_kind=True,
):
    """Iso-C per tensor: the flattened spectrum of the sum,

        T = sum_i t_i = U diag(s) V^T,  t_m = mean(s) U V^T = mean(s) polar(T)

    over the singular values above the rank cutoff (the code averages all r, which
    shrinks LoRA merges by rank / r: docs/methods-2025.md).
    """

    def _calibrated(self, calibration, vectors) -> None:
        warn_mixed_ranks(self.name, calibration, vectors)

    def _solve(self, prepared: TaskVectors) -> torch.Tensor:
        summed = prepared.vectors.sum(dim=0)  # T, (out, in)
        values = polar_(summed, (SOLVE_TENSORS - 1) * summed.numel())  # T := polar(T); s kept
        if values.numel() == 0:  # T = 0
            return summed.zero_()
        return summed.mul_(float(values.mean()))  # s_bar U V^T


@dataclass(frozen=True)
class IsoCtsConfig:
    """common_space_fraction: the share of r = min(out, in) given to the common subspace
    (official default 0.8; 1 gives Iso-C)."""

    common_space_fraction: float = config_field(
        0.8, check_fraction, "share of min(out, in) given to the common subspace (1: Iso-C)"
    )

    def __post_init__(self):
        check_config(self)


class IsoCtsSolver(
    Solver, name="iso_cts", pretty_name="Iso-CTS", paper="https://arxiv.org/abs/2502.04959", config=IsoCtsConfig, one_thread=True,
    calibration="first_order", sums_disjoint=False, by_kind=True,
):
    """Iso-CTS per tensor, r = min(out, in), f = common_space_fraction:

        k0 = floor(r f),  s = round((r - k0) / N),  k = r - N s
        T = sum_i t_i: its top k triplets U_c, sigma_c, V_c (the common subspace)
        R_i = t_i - U_c U_c^T t_i: its top s triplets P_i, rho_i, Q_i
        U_hat = [P_1 ... P_N U_c] (out, r),  V_hat = [Q_1 ... Q_N V_c]
        t_m = mean(rho, sigma_c) polar(U_hat) polar(V_hat)^T

    Cutoffs, the cap s <= floor(r / N) and the memory plan: docs/methods-2025.md.
    """

    def _calibrated(self, calibration, vectors) -> None:
        warn_mixed_ranks(self.name, calibration, vectors)

    def _solve(self, prepared: TaskVectors) -> torch.Tensor:
        vectors = prepared.vectors  # (n, out, in)
        count, out_features, in_features = vectors.shape
        common, per_task = iso_cts_sizes(min(out_features, in_features), count, self.config.common_space_fraction)

        u, s, vh, complement = common_subspace(vectors.sum(dim=0), common)  # U_c, sigma_c, V_c^T; Q
        stacks = SingularStacks(vectors, common + count * per_task)  # r columns
        stacks.add(u, s, vh)
        del u, s, vh
        basis = stacks.left[:, : stacks.count]  # U_c (out, k)

        if per_task > 0:
            residual = torch.empty_like(vectors[0]) if complement is None else None  # R_i
            for task, sq_norm in zip(vectors, prepared.sq_norms):
                if complement is None:
                    coords = basis.T @ task  # U_c^T t_i (k, in), freed before the SVD
                    torch.addmm(task, basis, coords, alpha=-1, out=residual)  # t_i - U_c U_c^T t_i
                    del coords
                    stacks.add(*top_singular_triplets(residual, per_task, scale=math.sqrt(sq_norm)))
                else:  # R_i = Q (Q^T t_i): the SVD of Q^T t_i, (out - k, in), then U = Q U'
                    u, s, vh = top_singular_triplets(complement.T @ task, per_task, scale=math.sqrt(sq_norm))
                    stacks.add(complement @ u, s, vh)
                    del u, s, vh
            del residual, complement
        if stacks.count == 0:  # T = 0 and no task-specific direction
            return vectors.new_zeros(out_features, in_features)
        logger.debug("Iso-CTS: %d common + %d x %d task directions, %d kept", common, count, per_task, stacks.count)
        left, right, values = stacks.polar_factors()  # U_perp, V_perp^T
        return left.mul_(float(values.mean())) @ right  # mean(values) U_perp V_perp^T


def common_subspace(summed: torch.Tensor, common: int):
    """T's top `common` triplets (U_c, sigma_c, V_c^T) and, where it is smaller than the
    residuals, Q: an orthonormal basis of U_c's complement in R^out (else None).

    With Q, each residual R_i = (I - U_c U_c^T) t_i = Q (Q^T t_i) is decomposed through
    Q^T t_i, (out - k) x in, instead of being formed: (out - k) / out of a tensor each
    instead of 1 + 2 (R_i and its float64 Gram matrix). That needs out <= in (the
    eigenvectors of T T^T span R^out) and k >= out / 2, with k the common directions kept.
    """
    out_features, in_features = summed.shape
    if out_features <= in_features and 2 * common >= out_features:
        u, s, vh, complement = top_singular_triplets_and_complement(summed, common)
        if 2 * complement.shape[1] <= out_features:
            return u, s, vh, complement
        return u, s, vh, None  # T of lower rank (LoRA deltas): Q would be the larger
    return (*top_singular_triplets(summed, common), None)


def iso_cts_sizes(rank: int, count: int, fraction: float) -> Tuple[int, int]:
    """(k, s): common directions and directions per task, k + N s = r.

    As the official code (src/utils/iso.py, iso_cts): k0 = int(r f), s = round((r - k0) / N),
    k = r - N s; s capped at floor(r / N) so that k >= 0.
    """
    per_task = min(round((rank - int(rank * fraction)) / count), rank // count)
    return rank - count * per_task, per_task
