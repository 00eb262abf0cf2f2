"""Iso-C and Iso-CTS: isotropic merging in the common (and task-specific) subspaces.

Iso: Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces", ICML 2025, arXiv:2502.04959. Official code:
danielm1405/iso-merging, src/utils/iso.py (functions iso_c and iso_cts) and
config/method/iso_cts.yaml (common_space_fraction: 0.8).
"""

from __future__ import annotations

import logging
import math
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
from mergekit_wudi.solvers.base import Solver
from mergekit_wudi.solvers.checks import check_config, check_fraction, config_field
from mergekit_wudi.solvers.numerics import TaskVectors

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IsoCConfig:
    """Hyperparameters of Iso-C: none of its own.

    The paper's scaling coefficient alpha (t_m scaled before it is added to W0) is the
    adapter's `lambda`: in the official code it multiplies the whole merged task vector
    (src/models/task_vectors.py, apply_to: pretrained + scaling_coef * vector), which is
    exactly W0 + lambda * t_m. The code has no default for it: it picks alpha on
    validation data from 0.1, 0.2, ..., 3.0 (src/eval/eval.py, evaluate_task_vector).
    """

    def __post_init__(self):
        check_config(self)


class IsoCSolver(Solver):
    """Merged task vector of Iso-C for one linear weight: the flattened spectrum of the sum.

    Iso-C, Marczak et al., ICML 2025 (arXiv:2502.04959), as the official code computes
    it (src/utils/iso.py, iso_c, l. 5-27; the paper's text was not at hand, so no
    equation number), per tensor:
        T = sum_i t_i = U diag(s) V^T,   s_bar = mean_j s_j
        t_m = s_bar U V^T
    (the code forms sum_i t_i / N and multiplies it by N again: the same T). Every
    non-zero singular value of t_m is s_bar; t_m = s_bar * polar(T).

    Defined where the code leaves rounding to choose: singular values of T at or below
    max(out, in) * eps * s_max are dropped with their vectors, and s_bar is the mean of
    the kept ones. The code averages over all r = min(out, in) values and keeps every
    direction, so for a rank-deficient T (a sum of LoRA deltas, of rank far below r) it
    shrinks s_bar by rank / r and fills the null space with directions chosen by
    rounding, at weight s_bar. Identical to the code where T has full rank r. Zero or
    non-finite task vectors are excluded (they add nothing to T); N = 1 gives
    s_bar U_1 V_1^T (t_1 with its spectrum flattened, not t_1); T = 0 (tasks that
    cancel) gives zero. The code averages non-2-D tensors (and CLIP's text_projection);
    here those go to the adapter's fallback.

    Memory (tensor = out x in in the compute dtype), beside the input (N): T, its float64
    Gram matrix on the smaller side and all of its eigenvectors (dsyevr): at most 5
    tensors, when square; polar(T) is written over T (_spectral.polar_; measured in
    docs/methods-2025.md).

    Input, output and dtypes: SpectralSolver (_spectral.py).
    """

    name = "iso_c"
    pretty_name = "Iso-C"
    paper = "https://arxiv.org/abs/2502.04959"
    config_cls = IsoCConfig
    one_thread = True

    def _solve(self, prepared: TaskVectors) -> torch.Tensor:
        summed = prepared.vectors.sum(dim=0)  # T, (out, in)
        values = polar_(summed, (SOLVE_TENSORS - 1) * summed.numel())  # T := polar(T); s kept
        if values.numel() == 0:  # T = 0
            return summed.zero_()
        return summed.mul_(float(values.mean()))  # s_bar U V^T


@dataclass(frozen=True)
class IsoCtsConfig:
    """Hyperparameters of Iso-CTS.

    Args:
        common_space_fraction (float in (0, 1], default 0.8): share of r = min(out, in)
            given to the common subspace (the top singular vectors of sum_i t_i); the
            rest is split equally among the tasks' own subspaces. Default from the
            official code, config/method/iso_cts.yaml (common_space_fraction: 0.8), also
            the value its README runs. 1 gives Iso-C.

    The scaling coefficient alpha is the adapter's `lambda`, as for Iso-C (IsoCConfig).
    """

    common_space_fraction: float = config_field(
        0.8, check_fraction, "share of min(out, in) given to the common subspace (1: Iso-C)"
    )

    def __post_init__(self):
        check_config(self)


class IsoCtsSolver(Solver):
    """Merged task vector of Iso-CTS for one linear weight.

    Iso-CTS, Marczak et al., ICML 2025 (arXiv:2502.04959), as the official code computes
    it (src/utils/iso.py, iso_cts, l. 30-104; no equation number, as for Iso-C), per
    tensor, with r = min(out, in), f = common_space_fraction and N tasks:
        sizes: k0 = floor(r f);  s = round((r - k0) / N) (Python's round, half to even);
               k = r - N s  (common directions), s per task
        common: T = sum_i t_i = U diag(sigma) V^T; U_c, sigma_c, V_c its top k
        task-specific: R_i = t_i - U_c U_c^T t_i = P_i diag(rho_i) Q_i^T; keep its top s
        stack: U_hat = [P_1,s ... P_N,s U_c] (out, r), V_hat = [Q_1,s ... Q_N,s V_c],
               values = (rho_1,s ... rho_N,s, sigma_c)
        U_perp = polar(U_hat), V_perp = polar(V_hat)  (P Q^T of their SVDs)
        t_m = mean(values) U_perp V_perp^T
    Every non-zero singular value of t_m is mean(values). The order of the stack does not matter
    (polar(U_hat Pi) = polar(U_hat) Pi for a permutation Pi). f = 1 gives k = r, s = 0:
    Iso-C. N = 1 gives Iso-C of t_1 (R_1 holds t_1's remaining components).

    Defined where the code leaves rounding to choose (identical to the code where T has
    k and every R_i has s singular values above the cutoff, and the stacks have full
    column rank):
      - T's singular values at or below max(out, in) * eps * sigma_max are dropped
        (fewer than k common directions); R_i's at or below max(out, in) * eps *
        ||t_i||_F (R_i's own largest value is rounding where t_i lies in the common
        subspace); the polar factors are taken on the stacks' ranges (_spectral.polar);
        the mean is over the kept values (the code's over all r);
      - s is capped at floor(r / N), so that k >= 0 (the code slices with a negative k
        where round() goes past r, which only tiny r and f allow);
      - zero or non-finite task vectors are excluded before N is counted;
      - T = 0 with s = 0 gives zero.
    The code averages non-2-D tensors (and CLIP's text_projection); here those go to the
    adapter's fallback.

    Memory (tensor = out x in in the compute dtype), beside the input (N): first T, its
    float64 Gram matrix and k of its eigenvectors (at most 1 + 2 + 2k/r tensors); then
    the stacks U_hat, V_hat ((out + in) r elements: 2 tensors when square), one residual
    R_i and its float64 Gram matrix (2 r^2 elements): 5 tensors when square, the peak;
    then the two polar factors as TSV's (_spectral.polar_; measured in
    docs/methods-2025.md).

    Input, output and dtypes: SpectralSolver (_spectral.py).
    """

    name = "iso_cts"
    pretty_name = "Iso-CTS"
    paper = "https://arxiv.org/abs/2502.04959"
    config_cls = IsoCtsConfig
    one_thread = True

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
