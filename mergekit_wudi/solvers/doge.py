"""DOGE-TA: Wei et al., ICML 2025, arXiv:2501.01230, Sec. 4 and Alg. 1."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from mergekit_wudi.solvers.base import Solver
from mergekit_wudi.solvers.checks import (
    check_config,
    check_fraction,
    check_non_negative_int,
    check_positive,
    check_positive_int,
    config_field,
)
from mergekit_wudi.solvers.numerics import (
    TaskVectors,
    adam_optimizer,
    gram_singular_values,
    kept,
    numerical_rank,
    one_cpu_thread,
    rank_cutoff,
    release,
    row_blocks,
    symmetric_eigh,
)
from mergekit_wudi.solvers.trim import trim_mask_of_magnitudes


@dataclass(frozen=True)
class DogeConfig:
    """The paper's defaults: eta 0.07, Adam lr 1e-4 for 400 steps, keep 30% of each task
    vector, keep rank/6 shared directions."""

    eta: float = config_field(0.07, check_positive, "l_i = eta / ||t_i||")
    lr: float = config_field(1e-4, check_positive, "Adam learning rate")
    steps: int = config_field(400, check_non_negative_int, "Adam iterations")
    density: float = config_field(0.3, check_fraction, "kept fraction in the trim", per_model=True)
    subspace: int = config_field(6, check_positive_int, "keep rank/subspace shared directions")

    def __post_init__(self):
        check_config(self)


class DogeSolver(
    Solver, name="doge", pretty_name="DOGE-TA", paper="https://arxiv.org/abs/2501.01230", config=DogeConfig,
    sums_disjoint=False, task_sized=True, trims_itself=True,
):
    """DOGE-TA (Sec. 4, Alg. 1), per tensor:

        l_i = eta / ||t_i||_F,  S = sum_i l_i t_i,  L = sum_i l_i
        P = U_k U_k^T, U_k: the shared subspace of the tasks' top left singular vectors
        min over delta of  sum_j sum_rows (rowsum(t_j * (t_j - S - L delta)))^2,
            Adam from 0, every gradient projected g <- g - P g
        t_m = sum_i l_i * M_i * (t_i + delta),  M_i: the magnitude trim at density_i

    The trim is per tensor (the paper's is global), and rank-deficient inputs keep only
    directions above the rank cutoff (docs/methods.md).
    """

    def _solve(self, prepared: TaskVectors, density: Sequence[float]) -> torch.Tensor:
        vectors = prepared.vectors  # (n, out, in)
        coefficients = [self.config.eta / math.sqrt(sq) for sq in prepared.sq_norms]  # l_i
        delta = self._solve_delta(vectors, coefficients)
        merged = torch.zeros_like(delta)
        kept = torch.empty_like(delta)  # |t_i|, then M_i * (t_i + delta)
        for task, coefficient, task_density in zip(vectors, coefficients, density):
            mask = trim_mask_of_magnitudes(torch.abs(task, out=kept), task_density)
            torch.add(task, delta, out=kept).mul_(mask)
            merged.add_(kept, alpha=coefficient)
        return merged

    def shared_basis(self, vectors: torch.Tensor) -> Optional[torch.Tensor]:
        """U_k, (out, at most floor(max_i rank_i / subspace)), or None where there is no shared direction.

        "Rank" is each task vector's numerical rank, as the paper's App. B words it ("the rank
        of the task vector divided by the number of tasks"): rank_i = the singular values of t_i
        above rank_cutoff(max(out, in), float32, sigma_1). Task i gives its top
        k_i = floor(rank_i / N) left singular vectors; the stack gives at most
        floor(max_i rank_i / subspace). For full-rank task vectors rank_i = min(out, in), the
        code's r; for rank-8 LoRA task vectors the code's r would make U_k the union of every
        task's whole column space and the projected descent would stall (docs/research/doge-lora.md).

        Only the subspaces matter: P = U_k U_k^T, and the stacked matrix's left singular
        subspace depends on each task's kept subspace, not on the basis chosen in it.
        """
        count, out_features, in_features = vectors.shape
        subspaces = [task_subspace(task, count) for task in vectors]  # (out, k_i), together at most (out, min(out, in))
        stacked = vectors.new_zeros(out_features, min(out_features, in_features))  # unused columns stay 0
        start = 0
        for columns, _ in subspaces:
            stacked[:, start : start + columns.shape[1]] = columns
            start += columns.shape[1]
        top_rank = max(rank for _, rank in subspaces)
        del subspaces
        keep = top_rank // self.config.subspace
        if start == 0 or keep == 0:
            return None
        basis = top_left_singular_vectors(stacked, keep)
        return basis.contiguous() if basis.shape[1] else None

    def _solve_delta(self, vectors: torch.Tensor, coefficients) -> torch.Tensor:
        count, out_features, in_features = vectors.shape
        if self.config.steps == 0:
            return torch.zeros_like(vectors[0])
        basis = self.shared_basis(vectors)  # first, before delta and the Adam state exist
        delta = torch.zeros_like(vectors[0])
        total = sum(coefficients)  # L
        weighted_sum = torch.zeros_like(delta)  # S
        for task, coefficient in zip(vectors, coefficients):
            weighted_sum.add_(task, alpha=coefficient)
        # E_j = c_j - L rowsum(t_j * delta), with c_j = rowsum(t_j * (t_j - S)) fixed
        offsets = torch.stack([_row_dots(task, task - weighted_sum) for task in vectors])  # (n, out)
        del weighted_sum

        optimizer = adam_optimizer(delta, self.config.lr)
        grad = delta.grad
        residuals = torch.empty_like(offsets)  # (n, out)
        if basis is not None:
            coords = delta.new_empty(basis.shape[1], in_features)  # (keep, in)
        for _ in range(self.config.steps):
            for index, task in enumerate(vectors):
                torch.sub(offsets[index], _row_dots(task, delta), alpha=total, out=residuals[index])
            torch.mul(vectors[0], residuals[0].unsqueeze(1), out=grad)
            for index in range(1, count):
                grad.addcmul_(residuals[index].unsqueeze(1), vectors[index])
            grad.mul_(-2 * total)
            if basis is not None:
                # (keep, out) @ (out, in): MKL splits the sum over `out` across threads
                # where keep is small next to out, so one thread
                with one_cpu_thread(grad.device):
                    torch.mm(basis.T, grad, out=coords)
                    grad.addmm_(basis, coords, alpha=-1)  # g - P g = g - U_k (U_k^T g)
            optimizer.step()
        release(optimizer)
        return delta


# Singular subspaces of matrices with fewer elements come from a full SVD; from this many
# on, from a Gram eigendecomposition and a Rayleigh-Ritz step (top_left_singular_vectors).
GRAM_MIN_ELEMENTS = 1 << 20


def top_left_singular_vectors(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """(out, j), j <= k: orthonormal columns spanning the left singular vectors of M's
    first k singular values, keeping only those above rank_cutoff(max(out, in), float32, sigma_1).

    j = k where M has k singular values above the tolerance (full-rank task vectors: the
    paper's behaviour); fewer where its rank is lower, as those past the rank would be
    set by rounding (by the route, the dtype, the thread count). Same rule on both
    routes, applied to the singular values each computes.

    Under GRAM_MIN_ELEMENTS elements: torch.linalg.svd (LAPACK gesdd), as the paper's code
    does. From there on, in two steps that need far less memory than
    gesdd (its input copy, U, Vh and divide-and-conquer buffers take more than the memory
    bound of a whole DOGE solve leaves):
      1. Q, the top k + p eigenvectors of the smaller Gram matrix, M M^T or M^T M
         (p = k / 4 extra directions, at least 16, at most r - k);
      2. a Rayleigh-Ritz step on M itself, which resolves the cut at k and gives the
         singular values: for out <= in (Q holds left singular vectors), Q times the top
         k eigenvectors of B B^T, B = Q^T M, in float64 (the float32 Gram would square M
         again; sigma^2 are its eigenvalues); for out > in (Q holds right singular
         vectors), the SVD of M Q, (out, k + p).
    The Gram matrix squares M, so float32 rounding moves the subspace more than gesdd
    does; step 2 recovers most of it (docs/reliability.md, "DOGE subspaces").
    """
    # All on one thread: besides the SVD and eigh, the Gram route's products (k + p, out)
    # @ (out, in) and the Gram itself round differently with the thread count (docs/reliability.md).
    with one_cpu_thread(matrix.device):
        return _top_left_singular_vectors(matrix, k)


def task_subspace(task: torch.Tensor, count: int) -> Tuple[torch.Tensor, int]:
    """(the top floor(rank / count) left singular vectors of one task vector, its numerical rank).

    rank: singular values above rank_cutoff(max(out, in), float32, sigma_1). Under
    GRAM_MIN_ELEMENTS both come from the one SVD; from there on the rank comes from the
    singular values of numerics.gram_singular_values, then the vectors as
    top_left_singular_vectors computes them.
    """
    out_features, in_features = task.shape
    size = max(out_features, in_features)
    with one_cpu_thread(task.device):
        if task.numel() < GRAM_MIN_ELEMENTS:
            left, values, _ = torch.linalg.svd(task, full_matrices=False)
            rank = numerical_rank(values, size)
            return left[:, : rank // count], rank
        rank = numerical_rank(gram_singular_values(task), size)
    k = rank // count
    return (top_left_singular_vectors(task, k) if k else task.new_zeros(out_features, 0)), rank


def _top_left_singular_vectors(matrix: torch.Tensor, k: int) -> torch.Tensor:
    out_features, in_features = matrix.shape
    size = max(out_features, in_features)
    if matrix.numel() < GRAM_MIN_ELEMENTS:
        left, values, _ = torch.linalg.svd(matrix, full_matrices=False)
        return _above_tolerance(left, values, k, size)
    width = k + min(min(out_features, in_features) - k, max(16, k // 4))  # k + p
    gram = matrix @ matrix.T if out_features <= in_features else matrix.T @ matrix
    _, top = symmetric_eigh(gram, width, in_place=True)
    del gram
    if out_features <= in_features:
        # B B^T, B = Q^T M (k + p, in), accumulated in float64 over column blocks of M.
        small = top.new_zeros(width, width, dtype=torch.float64)
        for columns in row_blocks(in_features, 8):
            block = (top.T @ matrix[:, columns]).double()
            small.addmm_(block, block.T)
        del block
        squares, vectors = symmetric_eigh(small, width, in_place=True)  # ascending sigma^2
        values = squares.flip(0).clamp_(min=0).sqrt_()
        return top @ _above_tolerance(vectors.flip(1), values, k, size).to(matrix.dtype)
    ritz = matrix @ top  # (out, k + p)
    del top
    left, values, _ = torch.linalg.svd(ritz, full_matrices=False)
    return _above_tolerance(left, values, k, size)


def _above_tolerance(vectors: torch.Tensor, values: torch.Tensor, k: int, size: int) -> torch.Tensor:
    """The first k columns of `vectors` whose singular value (`values`, descending) is above
    rank_cutoff(size, float32, values[0]): float32's eps whatever the compute dtype, so a
    float64 solve keeps the directions a float32 one keeps (docs/methods.md)."""
    return vectors[:, : kept(values, k, rank_cutoff(size, torch.float32, values[0])) if values.numel() else 0]


def _row_dots(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """rowsum(left * right) for (out, in) tensors, as a batch of dot products: (out,)."""
    return torch.bmm(left.unsqueeze(1), right.unsqueeze(2)).view(left.shape[0])
