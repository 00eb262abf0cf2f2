"""Float64 transcriptions of TSV-Merge (CVPR 2025) and Iso-C / Iso-CTS (ICML 2025), test-only.

Two versions of each method:
  - `*_code`: the official code's steps, literally (AntoAndGar/task_singular_vectors,
    src/utils/TSVM_utils.py, compute_and_sum_svd_mem_reduction; danielm1405/iso-merging,
    src/utils/iso.py, iso_c and iso_cts): zero-padded (out, r) stacks, full polar
    factors from SVDs, the mean over all r singular values. Defined by rounding where
    an input is rank-deficient; used on full-rank inputs only.
  - the plain names: the methods as docs/methods-2025.md defines them, with the
    paper's whitening form X (X^T X)^(-1/2) (eigendecomposition of the Gram matrix,
    pseudo-inverse square root) instead of the solvers' SVD route, and the cutoff
    rule: singular values at or below max(out, in) * eps * scale count as zero. eps is
    the machine epsilon of the merge's compute dtype: float64's by default; a float32
    merge of stored checkpoints is checked with eps=EPS32, since its inputs carry the
    checkpoints' float32 rounding (full rank at ~1e-7), which that cutoff drops.
No chunking, no in-place tricks; the package never imports this file.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from reference import usable

EPS64 = torch.finfo(torch.float64).eps
EPS32 = torch.finfo(torch.float32).eps


def truncated(t: torch.Tensor, k: int, scale: float, eps: float = EPS64) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k singular triplets of t, without those at or below max(t.shape) * eps * scale."""
    u, s, vh = torch.linalg.svd(t, full_matrices=False)
    keep = int((s[:k] > max(t.shape) * eps * scale).sum())
    return u[:, :keep], s[:keep], vh[:keep]


def whiten(x: torch.Tensor, eps: float = EPS64) -> torch.Tensor:
    """x (x^T x)^(+1/2): the polar factor of x, on its range.

    Eigenvalues of the Gram x^T x at or below max(x.shape) * EPS64 * its largest count as
    zero (the Gram's own rounding level; it agrees with the solvers' singular-value
    cutoff on inputs whose singular values are exactly zero or far above sqrt(eps)).
    With a coarser eps (EPS32), the singular-value cutoff itself: eigenvalues at or
    below (max(x.shape) * eps)^2 times the largest."""
    gram = x.T @ x
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    keep = eigenvalues > max(max(x.shape) * EPS64, (max(x.shape) * eps) ** 2) * eigenvalues.max()
    basis = eigenvectors[:, keep]
    inverse_root = basis @ torch.diag(eigenvalues[keep].rsqrt()) @ basis.T
    return x @ inverse_root


# --- TSV-Merge ------------------------------------------------------------------------


def tsv_merge(task_vectors: torch.Tensor, eps: float = EPS64) -> torch.Tensor:
    """TSV-M: per task the top floor(r/N) components; U_perp S V_perp^T with whitened stacks."""
    tasks = usable(task_vectors)
    out_features, in_features = task_vectors.shape[1:]
    if not tasks or min(out_features, in_features) // len(tasks) == 0:
        return torch.zeros(out_features, in_features, dtype=torch.float64)
    k = min(out_features, in_features) // len(tasks)
    lefts: List[torch.Tensor] = []
    values: List[torch.Tensor] = []
    rights: List[torch.Tensor] = []
    for t in tasks:
        u, s, vh = truncated(t, k, torch.linalg.matrix_norm(t, ord=2).item(), eps)
        lefts.append(u)
        values.append(s)
        rights.append(vh.T)
    u_hat = torch.cat(lefts, dim=1)  # (out, m)
    v_hat = torch.cat(rights, dim=1)  # (in, m)
    return whiten(u_hat, eps) @ torch.diag(torch.cat(values)) @ whiten(v_hat, eps).T


def tsv_merge_code(task_vectors: torch.Tensor) -> torch.Tensor:
    """compute_and_sum_svd_mem_reduction, literally: (out, r) zero-padded stacks."""
    tasks = [t.to(torch.float64) for t in task_vectors]
    sv_reduction = 1 / len(tasks)
    for i, vec in enumerate(tasks):
        u, s, v = torch.linalg.svd(vec, full_matrices=False)
        if i == 0:
            sum_u, sum_s, sum_v = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
        reduced_index_s = int(s.shape[0] * sv_reduction)
        sum_u[:, i * reduced_index_s : (i + 1) * reduced_index_s] = u[:, :reduced_index_s]
        sum_s[i * reduced_index_s : (i + 1) * reduced_index_s] = s[:reduced_index_s]
        sum_v[i * reduced_index_s : (i + 1) * reduced_index_s, :] = v[:reduced_index_s, :]
    u_u, s_u, v_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_v, s_v, v_v = torch.linalg.svd(sum_v, full_matrices=False)
    return torch.linalg.multi_dot((u_u, v_u, torch.diag(sum_s), u_v, v_v))


# --- Iso-C ----------------------------------------------------------------------------


def iso_c(task_vectors: torch.Tensor, eps: float = EPS64) -> torch.Tensor:
    """s_bar * polar(T), T = sum_i t_i, s_bar the mean of T's kept singular values.

    polar(T) = T (T^T T)^(+1/2) and the kept singular values are the square roots of the
    Gram's kept eigenvalues: no SVD of T here."""
    tasks = usable(task_vectors)
    if not tasks:
        return torch.zeros(task_vectors.shape[1:], dtype=torch.float64)
    total = sum(tasks)
    if total.abs().max() == 0:
        return total
    wide = total.shape[0] < total.shape[1]
    tall = total.T if wide else total  # whiten the short side's Gram
    polar = whiten(tall, eps)
    singular = (polar.T @ tall).diagonal().sum()  # trace(polar^T T) = sum of kept s
    count = round((polar.T @ polar).diagonal().sum().item())  # a partial isometry: its rank
    result = polar * (singular / count)
    return result.T if wide else result


def iso_c_code(task_vectors: torch.Tensor) -> torch.Tensor:
    """iso_c, literally: sum / N * N, SVD, every singular value replaced by the mean."""
    tvs = [t.to(torch.float64) for t in task_vectors]
    new_vector = sum(tvs) / len(tvs)
    new_vector *= len(tvs)
    u, s, v = torch.linalg.svd(new_vector, full_matrices=False)
    s_mean = torch.ones_like(s) * s.mean()
    return torch.linalg.multi_dot((u, torch.diag(s_mean), v))


# --- Iso-CTS --------------------------------------------------------------------------


def iso_cts_sizes(rank: int, count: int, fraction: float) -> Tuple[int, int]:
    common = int(rank * fraction)
    per_task = round((rank - common) / count)
    per_task = min(per_task, rank // count)
    return rank - per_task * count, per_task


def iso_cts(task_vectors: torch.Tensor, fraction: float = 0.8, eps: float = EPS64) -> torch.Tensor:
    """mean(values) * whiten(U_hat) whiten(V_hat)^T over the common and task-specific stacks."""
    tasks = usable(task_vectors)
    out_features, in_features = task_vectors.shape[1:]
    if not tasks:
        return torch.zeros(out_features, in_features, dtype=torch.float64)
    common, per_task = iso_cts_sizes(min(out_features, in_features), len(tasks), fraction)
    total = sum(tasks)
    u_c, s_c, vh_c = truncated(total, common, torch.linalg.matrix_norm(total, ord=2).item(), eps)
    lefts, values, rights = [u_c], [s_c], [vh_c.T]
    projector = u_c @ u_c.T
    for t in tasks:
        if per_task == 0:
            break
        u, s, vh = truncated(t - projector @ t, per_task, torch.linalg.norm(t).item(), eps)
        lefts.append(u)
        values.append(s)
        rights.append(vh.T)
    flat = torch.cat(values)
    if flat.numel() == 0:
        return torch.zeros(out_features, in_features, dtype=torch.float64)
    return flat.mean() * whiten(torch.cat(lefts, dim=1), eps) @ whiten(torch.cat(rights, dim=1), eps).T


def iso_cts_code(task_vectors: torch.Tensor, common_space_fraction: float = 0.8) -> torch.Tensor:
    """iso_cts, literally (order: task-specific blocks, then the common block)."""
    tvs = [t.to(torch.float64) for t in task_vectors]
    shape_ = tvs[0].shape
    n = len(tvs)
    combined_w = sum(tvs)
    common_space_index_s = int(min(shape_) * common_space_fraction)
    _task_specific_total_space_index_s = round((min(shape_) - common_space_index_s) / n) * n
    common_space_index_s = min(shape_) - _task_specific_total_space_index_s
    u, s, v = torch.linalg.svd(combined_w, full_matrices=False)
    common_space_u = u[:, :common_space_index_s]
    common_space_s = s[:common_space_index_s]
    common_space_v = v[:common_space_index_s, :]
    n_dims_per_task = int((min(shape_) - common_space_index_s) / n)
    for i, w in enumerate(tvs):
        w_ts = w - common_space_u @ common_space_u.T @ w
        u_ts, s_ts, v_ts = torch.linalg.svd(w_ts, full_matrices=False)
        if i == 0:
            combined_space_u = torch.zeros_like(u_ts)
            combined_space_s = torch.zeros_like(s_ts)
            combined_space_v = torch.zeros_like(v_ts)
        combined_space_u[:, i * n_dims_per_task : (i + 1) * n_dims_per_task] = u_ts[:, :n_dims_per_task]
        combined_space_s[i * n_dims_per_task : (i + 1) * n_dims_per_task] = s_ts[:n_dims_per_task]
        combined_space_v[i * n_dims_per_task : (i + 1) * n_dims_per_task, :] = v_ts[:n_dims_per_task, :]
    start = n * n_dims_per_task
    combined_space_u[:, start : start + common_space_index_s] = common_space_u
    combined_space_s[start : start + common_space_index_s] = common_space_s
    combined_space_v[start : start + common_space_index_s, :] = common_space_v
    u_u, _, v_u = torch.linalg.svd(combined_space_u, full_matrices=False)
    u_v, _, v_v = torch.linalg.svd(combined_space_v, full_matrices=False)
    combined_space_s = torch.ones_like(combined_space_s) * combined_space_s.mean()
    return torch.linalg.multi_dot((u_u @ v_u, torch.diag(combined_space_s), u_v @ v_v))
