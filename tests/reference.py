"""Literal float64 transcriptions of each paper's objective, solved the slow, obvious way.

Autograd, torch.optim.Adam, explicit matrices (P = U_k U_k^T), no Gram tricks, no
chunking, no caching: meant to be read next to the papers. Test-only; the package never
imports it.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch


def usable(task_vectors: torch.Tensor) -> List[torch.Tensor]:
    """Task vectors that take part: finite and non-zero, in float64."""
    result = []
    for t in task_vectors.to(torch.float64):
        norm = torch.linalg.norm(t)
        if torch.isfinite(norm) and norm > 0:
            result.append(t)
    return result


def trimmed(task_vectors: torch.Tensor, density: float, rank_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The magnitude trim before a solve (docs/methods.md, "density"): each task vector keeps the
    entries with |t| >= its (d - floor(d density))-th smallest |t|, d entries, ranked by
    torch.kthvalue on the magnitudes in rank_dtype (the merge's compute dtype: float32, float64
    for float64 inputs); the values stay as given."""
    result = []
    for t in task_vectors:
        kth = t.numel() - math.floor(t.numel() * density)
        magnitude = t.to(rank_dtype).abs()
        threshold = torch.kthvalue(magnitude.flatten(), kth).values if kth > 0 else magnitude.min()
        result.append(torch.where(magnitude >= threshold, t, torch.zeros_like(t)))
    return torch.stack(result)


def equalized(task_vectors: torch.Tensor, positions: Sequence[int], weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """The equalization before a solve (docs/methods.md, "equalize"), written out: the task vectors
    at `positions` rescaled to |weight_i| times the root mean square of their own (unweighted)
    norms, the others as given."""
    weights = weights or [1.0] * len(task_vectors)
    own = [float(task_vectors[i].double().norm()) / abs(weights[i]) for i in positions]
    target = math.sqrt(sum(n * n for n in own) / len(own))
    result = task_vectors.clone()
    for i in positions:
        result[i] = task_vectors[i] * (abs(weights[i]) * target / float(task_vectors[i].double().norm()))
    return result


def wudi_loss(t_m: torch.Tensor, tasks: Sequence[torch.Tensor]) -> torch.Tensor:
    """WUDI Eq. 21: sum_i ||(t_m - t_i) t_i^T||_F^2 / ||t_i||_F^2."""
    return sum(((t_m - t) @ t.T).pow(2).sum() / t.pow(2).sum() for t in tasks)


def wudi_ridge_loss(t_m: torch.Tensor, tasks: Sequence[torch.Tensor], ridge: float) -> torch.Tensor:
    """WUDI Eq. 71: sum_i (||(t_m - t_i) t_i^T||^2 + r ||t_m - t_i||^2) / ||t_i||^2."""
    return sum(
        (((t_m - t) @ t.T).pow(2).sum() + ridge * (t_m - t).pow(2).sum()) / t.pow(2).sum() for t in tasks
    )


def wudi_adam(task_vectors: torch.Tensor, steps: int = 300, lr: float = 1e-5) -> torch.Tensor:
    tasks = usable(task_vectors)
    if not tasks:
        return torch.zeros(task_vectors.shape[1:], dtype=torch.float64)
    t_m = torch.stack(tasks).sum(0).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([t_m], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        wudi_loss(t_m, tasks).backward()
        optimizer.step()
    return t_m.detach()


def wudi_ridge(task_vectors: torch.Tensor, omega: float) -> float:
    tasks = usable(task_vectors)
    return omega * sum(t.pow(2).sum().item() for t in tasks) / len(tasks) / task_vectors.shape[2]


def wudi_closed_form(task_vectors: torch.Tensor, omega: float) -> torch.Tensor:
    """Eq. 20, literally: (sum_i a_i t_i (t_i^T t_i + r I)) (sum_i a_i (t_i^T t_i + r I))^+."""
    tasks = usable(task_vectors)
    ridge = wudi_ridge(task_vectors, omega)
    eye = torch.eye(task_vectors.shape[2], dtype=torch.float64)
    left = sum(t @ (t.T @ t + ridge * eye) / t.pow(2).sum() for t in tasks)
    right = sum((t.T @ t + ridge * eye) / t.pow(2).sum() for t in tasks)
    return left @ torch.linalg.pinv(right, hermitian=True)


def kept_left_singular_vectors(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """The first k left singular vectors whose singular value is above rtol * sigma_1,
    rtol = max(out, in) * eps(float32) (docs/reliability.md, DOGE subspaces and low-rank task vectors)."""
    u, s, _ = torch.linalg.svd(matrix, full_matrices=False)
    rtol = max(matrix.shape) * torch.finfo(torch.float32).eps
    return u[:, :k][:, s[:k] > rtol * s[0]]


def numerical_rank(matrix: torch.Tensor) -> int:
    """Singular values above rtol * sigma_1, rtol = max(out, in) * eps(float32)."""
    s = torch.linalg.svdvals(matrix)
    return int((s > max(matrix.shape) * torch.finfo(torch.float32).eps * s[0]).sum())


def doge_projector(tasks: Sequence[torch.Tensor], subspace: int) -> Optional[torch.Tensor]:
    """The paper's App. B: k_i = rank(t_i) // N per task, rank // subspace shared directions,
    rank the task vector's (numerical) rank; min(out, in) for full-rank task vectors."""
    out_features, in_features = tasks[0].shape
    ranks = [numerical_rank(t) for t in tasks]
    keep = max(ranks) // subspace
    columns = [kept_left_singular_vectors(t, r // len(tasks)) for t, r in zip(tasks, ranks)]
    if keep == 0 or sum(c.shape[1] for c in columns) == 0:
        return None
    stacked = torch.cat(columns, dim=1)
    u_k = kept_left_singular_vectors(stacked, keep)
    return u_k @ u_k.T

def doge_loss(delta, tasks, coefficients):
    """sum_j sum_rows (rowsum(t_j * (t_j - S - L delta)))^2."""
    shared = sum(c * t for c, t in zip(coefficients, tasks))
    total = sum(coefficients)
    return sum(((t * (t - shared - total * delta)).sum(dim=1)).pow(2).sum() for t in tasks)


def doge(task_vectors: torch.Tensor, densities: Sequence[float], eta=0.07, lr=1e-4, steps=400, subspace=6):
    keep = [i for i, t in enumerate(task_vectors.to(torch.float64)) if torch.isfinite(t.norm()) and t.norm() > 0]
    tasks = [task_vectors[i].to(torch.float64) for i in keep]
    densities = [densities[i] for i in keep]
    if not tasks:
        return torch.zeros(task_vectors.shape[1:], dtype=torch.float64)
    coefficients = [eta / t.norm().item() for t in tasks]
    projector = doge_projector(tasks, subspace)
    delta = torch.zeros_like(tasks[0], requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        doge_loss(delta, tasks, coefficients).backward()
        if projector is not None:
            delta.grad -= projector @ delta.grad
        optimizer.step()
    delta = delta.detach()
    merged = torch.zeros_like(delta)
    for t, c, density in zip(tasks, coefficients, densities):
        magnitudes = t.abs().flatten().sort().values
        d = magnitudes.numel()
        kth = d - math.floor(d * density)
        mask = torch.ones_like(t) if kth == 0 else (t.abs() >= magnitudes[kth - 1]).to(t.dtype)
        merged += c * mask * (t + delta)
    return merged


def input_space_scale(tasks: Sequence[torch.Tensor], merged: torch.Tensor) -> float:
    """calibrate: input_space, from its definition with a float64 SVD: c = min(1 / max_i rho_i,
    ||sum t_i|| / ||M||), rho_i = ||M V_i|| / ||t_i V_i||, V_i the top max(1, rank_i // N) right
    singular vectors of t_i."""
    tasks = [t.double() for t in tasks]
    merged = merged.double()
    rhos = []
    for t in tasks:
        _, s, vh = torch.linalg.svd(t, full_matrices=False)
        rank = int((s > max(t.shape) * torch.finfo(torch.float32).eps * s[0]).sum())
        v = vh[: max(1, rank // len(tasks))].T
        rhos.append(float((merged @ v).norm() / (t @ v).norm()))
    return min(1 / max(rhos), float(sum(tasks).norm() / merged.norm()))


def sum_norm_scale(tasks: Sequence[torch.Tensor], merged: torch.Tensor) -> float:
    """calibrate: sum_norm, from its definition: c = ||sum t_i|| / ||M||."""
    return float(sum(t.double() for t in tasks).norm() / merged.double().norm())


def sum_cap_scale(tasks: Sequence[torch.Tensor], merged: torch.Tensor) -> float:
    """calibrate: sum_cap, from its definition: c = min(1, ||sum t_i|| / ||M||)."""
    return min(1.0, sum_norm_scale(tasks, merged))


def mean_cap_scale(tasks: Sequence[torch.Tensor], merged: torch.Tensor, count: Optional[int] = None) -> float:
    """calibrate: mean_cap, from its definition: c = min(1, ||sum t_i|| / (N ||M||)), N = count
    (the task vectors given, zero ones too) or len(tasks)."""
    return min(1.0, sum_norm_scale(tasks, merged) / (count or len(tasks)))


def first_order_scale(tasks: Sequence[torch.Tensor], merged: torch.Tensor) -> float:
    """calibrate: first_order, from its definition: c = min(sum_i ||t_i||^2, ||T||^2) / <M, T>,
    T = sum_i t_i, or sum_norm's c where that inner product is not positive."""
    tasks = [t.double() for t in tasks]
    total = sum(tasks)
    delivered = float((merged.double() * total).sum())
    if delivered <= 0:
        return sum_norm_scale(tasks, merged)
    return min(sum(float(t.square().sum()) for t in tasks), float(total.square().sum())) / delivered


SCALES = {"input_space": input_space_scale, "sum_norm": sum_norm_scale, "sum_cap": sum_cap_scale,
          "mean_cap": mean_cap_scale, "first_order": first_order_scale}


def calibrated(reference, rule: str = "first_order"):
    """reference, scaled by the calibrate rule (default first_order: the YAML default of iso_c and
    iso_cts); zero task vectors take no part, as in the solvers."""

    def merge(task_vectors: torch.Tensor) -> torch.Tensor:
        merged = reference(task_vectors)
        tasks = [t for t in task_vectors.double() if t.norm() > 0]
        scale = mean_cap_scale(tasks, merged, len(task_vectors)) if rule == "mean_cap" else SCALES[rule](tasks, merged)
        return scale * merged if tasks and merged.norm() > 0 else merged

    return merge
