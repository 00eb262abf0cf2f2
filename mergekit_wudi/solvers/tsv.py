"""TSV-Merge: task singular vectors, truncated per task and decorrelated.

TSV: Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model
Merging", CVPR 2025, arXiv:2412.00081. Official code: AntoAndGar/task_singular_vectors,
src/utils/TSVM_utils.py, compute_and_sum_svd_mem_reduction (method "TSVM").
"""

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
    """Hyperparameters of TSV-Merge: none of its own.

    Each task keeps floor(r / N) singular components (r = min(out, in)), the 1/N share
    the official code fixes (`sv_reduction = 1 / len(config.DATASETS)`); the only
    scale is the merged vector's `lambda` (the paper's alpha), which the adapter applies.
    """

    def __post_init__(self):
        check_config(self)


class TsvSolver(Solver):
    """Merged task vector of TSV-Merge for one linear weight.

    TSV-M, Gargiulo et al., CVPR 2025 (arXiv:2412.00081): the TSV-C truncation, then the
    whitening / orthogonal Procrustes step, as the official code computes it
    (src/utils/TSVM_utils.py, compute_and_sum_svd_mem_reduction, l. 303-377; the
    paper's text was not at hand, so no equation number), per tensor:
        r = min(out, in),  k = floor(r / N)
        t_i = U_i diag(s_i) V_i^T;  keep each task's top k: U_i,k (out, k), s_i,k, V_i,k
        U_hat = [U_1,k ... U_N,k] (out, Nk),  S_hat = diag(s_1,k ... s_N,k),
        V_hat = [V_1,k ... V_N,k] (in, Nk)
        U_perp = P_U Q_U^T with U_hat = P_U D_U Q_U^T (its SVD); V_perp likewise
        t_m = U_perp S_hat V_perp^T
    U_perp is the orthonormal matrix nearest U_hat, U_hat (U_hat^T U_hat)^(-1/2): the
    whitening that decorrelates the tasks' singular vectors. Where the tasks' kept
    subspaces are mutually orthogonal (left and right), U_perp = U_hat, V_perp = V_hat and
    t_m is the sum of the rank-k truncations.

    Defined where the code leaves rounding to choose (the code and this solver agree
    wherever each t_i has k singular values above the cutoff and U_hat, V_hat have full
    column rank; see _spectral for the cutoff):
      - a task's singular values at or below max(out, in) * eps * s_i,max are dropped
        with their vectors (a task of rank below k, e.g. a LoRA delta, contributes its
        rank): the code stacks them, and their rounding-chosen vectors change the
        whitening of every other task;
      - U_perp, V_perp are the polar factors on the range of U_hat, V_hat (singular
        values below the cutoff dropped): the code's full polar factor adds
        rounding-chosen directions where two tasks share a singular direction exactly
        (identical task vectors: the code adds an arbitrary rank-k term; here two
        identical t give the truncation of t);
      - zero or non-finite task vectors are excluded before N is counted (the code
        counts them, and whitens with their SVD's arbitrary vectors);
      - N = 1 gives t_1 exactly (k = r: U_perp = U_1, V_perp = V_1);
      - N > r gives k = 0 and zero, as in the code (the base weight is kept);
      - where s_i,k = s_i,k+1 the kept subspace of that task is set by rounding, as for
        any truncated SVD.
    The code averages non-2-D tensors (and CLIP's text_projection); here those go to the
    adapter's fallback.

    Memory (tensor = out x in in the compute dtype), beside the input (N): the stacks
    U_hat, V_hat (at most (out + in) r elements: 2 tensors when square), and while each
    task's top k come from its float64 Gram matrix, that matrix (2 r^2 elements) and k of
    its eigenvectors (2 r k); then, for each polar factor, the Gram matrix of a stack and
    its eigenvectors (dsyevr, 4 m^2) or the eigenvectors written over it (dsyev, 2 m^2)
    where the bound leaves no room for dsyevr (square tensors). At most 4 + 2/N tensors
    on square ones, under 5 elsewhere (_spectral.py; measured in docs/methods-2025.md).

    Input, output and dtypes: SpectralSolver (_spectral.py).
    """

    name = "tsv"
    pretty_name = "TSV-Merge"
    paper = "https://arxiv.org/abs/2412.00081"
    config_cls = TsvConfig
    one_thread = True

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
        for task in vectors:
            stacks.add(*top_singular_triplets(task, per_task))  # its top j <= k
        if stacks.count == 0:  # not reached: a usable task vector keeps its largest component
            return vectors.new_zeros(out_features, in_features)
        logger.debug("TSV: %d of %d components kept (k = %d)", stacks.count, count * per_task, per_task)
        left, right, values = stacks.polar_factors()  # U_perp, V_perp^T, diag(S_hat)
        return left.mul_(values) @ right  # U_perp S_hat V_perp^T
