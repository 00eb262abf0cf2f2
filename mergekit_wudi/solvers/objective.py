"""The WUDI interference objective, for reports and logs (not used by the solvers).

    L(t_m) = sum_i ||(t_m - t_i) t_i^T||_F^2 / ||t_i||_F^2

over the usable task vectors (zero or non-finite ones excluded, as in the solvers).
"""

from __future__ import annotations

import torch

from mergekit_wudi.solvers.numerics import CHUNK_ELEMENTS, prepare_task_vectors, row_chunks


def wudi_objective(task_vectors: torch.Tensor, merged: torch.Tensor, *, chunk_elements: int = CHUNK_ELEMENTS) -> float:
    """L(merged) for stacked task vectors (N, out, in) and a merged vector (out, in).

    Computed in the solvers' compute dtype, by row chunks of (rows, out) products, so the
    extra memory stays at about one chunk beside the inputs. Returns a Python float; 0.0
    when no task vector is usable.
    """
    prepared = prepare_task_vectors(task_vectors)
    vectors = prepared.vectors
    if prepared.count == 0:
        return 0.0
    if tuple(merged.shape) != tuple(vectors.shape[1:]):
        raise ValueError(f"merged has shape {tuple(merged.shape)}, task vectors {tuple(vectors.shape[1:])}")
    merged = merged.to(vectors.dtype)
    out_features, in_features = merged.shape
    total = 0.0
    for task, sq_norm in zip(vectors, prepared.sq_norms):
        task_total = 0.0
        for rows in row_chunks(out_features, max(in_features, out_features), chunk_elements):
            residual = (merged[rows] - task[rows]) @ task.T  # (rows, out)
            task_total += float(torch.linalg.vector_norm(residual).square())
        total += task_total / sq_norm
    return total


def task_arithmetic_objective(task_vectors: torch.Tensor) -> float:
    """L at task arithmetic's merged vector sum_i t_i (the solvers' starting point)."""
    prepared = prepare_task_vectors(task_vectors)
    if prepared.count == 0:
        return 0.0
    return wudi_objective(prepared.vectors, prepared.vectors.sum(dim=0))
