"""DOGE-TA: data-free merging by adaptive projective gradient descent.

DOGE: Wei et al., "Modeling Multi-Task Model Merging as Adaptive Projective Gradient
Descent", ICML 2025, arXiv:2501.01230.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from mergekit_wudi.solvers._common import (
    adam_optimizer,
    check_config,
    check_fraction,
    check_non_negative_int,
    check_positive,
    check_positive_int,
    config_field,
    per_task_values,
    prepare_task_vectors,
    release,
    thread_independent,
)


@dataclass(frozen=True)
class DogeConfig:
    """Hyperparameters of DOGE-TA (the paper's defaults: eta 0.07, Adam lr 1e-4, 400 steps,
    keep 30% of each task vector, keep r/6 shared directions).

    Args:
        eta (float, default 0.07): per-task coefficient l_i = eta / ||t_i||_F.
        lr (float, default 1e-4): Adam learning rate for the shared correction delta.
        steps (int, default 400): Adam iterations.
        density (float in (0, 1], default 0.3): fraction of each task vector's entries
            kept by the magnitude trim; per model in YAML.
        subspace (int, default 6): keep floor(min(out, in) / subspace) shared directions.
    """

    eta: float = config_field(0.07, check_positive, "l_i = eta / ||t_i||")
    lr: float = config_field(1e-4, check_positive, "Adam learning rate")
    steps: int = config_field(400, check_non_negative_int, "Adam iterations")
    density: float = config_field(0.3, check_fraction, "kept fraction in the trim", per_model=True)
    subspace: int = config_field(6, check_positive_int, "keep r/subspace shared directions")

    def __post_init__(self):
        check_config(self)


class DogeSolver:
    """Merged task vector of DOGE-TA for one linear weight.

    DOGE, Wei et al., ICML 2025 (arXiv:2501.01230), Sec. 4 and Alg. 1, the
    task-arithmetic variant, per tensor:
        l_i = eta / ||t_i||_F,   S = sum_i l_i t_i,   L = sum_i l_i
        shared subspace: r = min(out, in), k = floor(r / N); the top-k left singular
            vectors of every t_i, stacked as columns of an (out, r) matrix (zeros
            elsewhere); U_k = its first floor(r / subspace) left singular vectors;
            P = U_k U_k^T (never formed: P g = U_k (U_k^T g))
        loss(delta) = sum_j sum_rows (rowsum(t_j * (t_j - S - L delta)))^2
        gradient (closed form, no autograd), with E_j = rowsum(t_j * (t_j - S - L delta)):
            grad = -2 L sum_j E_j[:, None] * t_j,   projected: g <- g - P g
        Adam (torch.optim.Adam arithmetic) on delta from 0, then the trim:
            M_i keeps |t_i| >= the (d - floor(d * density_i))-th smallest |t_i|, d = numel
        t_m = sum_i l_i * M_i * (t_i + delta)

    Deviations from the paper: the trim is per tensor where the paper trims globally
    across layers (mergekit hands over one tensor at a time, as for its TIES), and the
    loss uses row-wise inner products (one per output neuron). Where k = 0 (more tasks
    than r) or floor(r / subspace) = 0 there is no shared direction and no projection.
    Singular vectors come from a full thin SVD (torch.linalg.svd, full_matrices=False).

    Input (N, out, in), any float dtype; solved in float32 (float64 if given float64);
    returns (out, in) in the compute dtype on the input device. Zero or non-finite task
    vectors are excluded; with none left the result is zero.
    """

    def __init__(self, config: Optional[DogeConfig] = None):
        self.config = config or DogeConfig()

    def solve(self, task_vectors: torch.Tensor, density: Optional[Sequence[float]] = None) -> torch.Tensor:
        """density: one kept fraction per task vector; config.density for all when None."""
        if density is None:
            density = [self.config.density] * task_vectors.shape[0]
        densities = per_task_values("density", density, task_vectors.shape[0])
        for value in densities:
            check_fraction("density", value)
        prepared = prepare_task_vectors(task_vectors)
        vectors = prepared.vectors  # (n, out, in)
        count = vectors.shape[0]
        if count == 0:
            return vectors.new_zeros(task_vectors.shape[1:])
        densities = [densities[index] for index in prepared.indices]
        coefficients = [self.config.eta / math.sqrt(sq) for sq in prepared.sq_norms]  # l_i

        delta = self._solve_delta(vectors, coefficients)
        merged = torch.zeros_like(vectors[0])
        for task, coefficient, density in zip(vectors, coefficients, densities):
            kept = task + delta
            kept.mul_(trim_mask(task, density))
            merged.add_(kept, alpha=coefficient)
        return merged

    def shared_basis(self, vectors: torch.Tensor) -> Optional[torch.Tensor]:
        """U_k, (out, floor(r / subspace)), or None where there is no shared direction."""
        count, out_features, in_features = vectors.shape
        rank = min(out_features, in_features)
        per_task = rank // count
        keep = rank // self.config.subspace
        if per_task == 0 or keep == 0:
            return None
        stacked = vectors.new_zeros(out_features, rank)  # (out, r)
        for index, task in enumerate(vectors):
            with thread_independent(task.device):
                left = torch.linalg.svd(task, full_matrices=False).U  # (out, r)
            stacked[:, index * per_task : (index + 1) * per_task] = left[:, :per_task]
            del left
        with thread_independent(stacked.device):
            return torch.linalg.svd(stacked, full_matrices=False).U[:, :keep].contiguous()

    def _solve_delta(self, vectors: torch.Tensor, coefficients) -> torch.Tensor:
        count, out_features, in_features = vectors.shape
        if self.config.steps == 0:
            return torch.zeros_like(vectors[0])
        basis = self.shared_basis(vectors)  # first: LAPACK's SVD workspace is the peak
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
                torch.mm(basis.T, grad, out=coords)
                grad.addmm_(basis, coords, alpha=-1)  # g - P g = g - U_k (U_k^T g)
            optimizer.step()
        release(optimizer)
        return delta


def _row_dots(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """rowsum(left * right) for (out, in) tensors, as a batch of dot products: (out,)."""
    return torch.bmm(left.unsqueeze(1), right.unsqueeze(2)).view(left.shape[0])


def trim_mask(task: torch.Tensor, density: float) -> torch.Tensor:
    """M: keep |t| >= the (d - floor(d * density))-th smallest |t|, d = t.numel().

    This keeps floor(d * density) + 1 entries when magnitudes are distinct (the
    threshold entry itself is kept), and every entry at density 1.
    """
    magnitude = task.abs()
    numel = magnitude.numel()
    kth = numel - math.floor(numel * density)
    if kth <= 0:
        return torch.ones_like(magnitude)
    threshold = magnitude.view(-1).kthvalue(kth).values
    return (magnitude >= threshold).to(task.dtype)
