"""The pre-solve norm equalization: chosen task vectors rescaled, per tensor, to one norm
(docs/methods.md, "equalize").

A pre-step, not a method: `Solver.solve` equalizes after the trim and before the method sees
the task vectors. Why (issue 23): LoRA adapters with a seed each read random, nearly disjoint
input spaces, so the methods that sum disjoint updates keep each adapter's update whole, and a
random A reads every task's inputs about as much as its own. On a task's inputs its own update
then competes with the others' at their sizes, so the adapter that moved least loses its task
first (SmolLM2's addition adapter, the smallest, scored 0-1.4 in every merge that kept the sizes,
and 80 in Iso-C's, whose flat spectrum gives every direction one size). Equal norms give every
adapter the same share.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

from mergekit_wudi.solvers.numerics import TaskVectors

__all__ = ["equalized"]


def equalized(prepared: TaskVectors, shares: Sequence[float], overwrite: bool) -> Tuple[TaskVectors, Tuple[float, ...]]:
    """(the task vectors with those of share s_i > 0 rescaled, the factor each was multiplied by).

    shares: one value >= 0 per task vector of `prepared`: 0 keeps it as given; s_i > 0 is the
    |weight| it was multiplied by, so that t_i / s_i is the fine-tune's own task vector. With E
    the vectors of share > 0,

        R   = sqrt(mean_{j in E} (||t_j|| / s_j)^2)   the root mean square of their own norms
        t_i <- (s_i R / ||t_i||) t_i                    for i in E: norm s_i R

    so the equalized vectors keep their summed energy (all shares 1) and their weights' ratios,
    and one vector in E alone is unchanged. overwrite: rescale prepared.vectors in place (the
    caller gives them up); else into a new stack.
    """
    rows = [row for row, share in enumerate(shares) if share > 0]
    if not rows:
        return prepared, (1.0,) * prepared.count
    target = math.sqrt(sum(prepared.sq_norms[row] / shares[row] ** 2 for row in rows) / len(rows))
    factors = tuple(shares[row] * target / math.sqrt(prepared.sq_norms[row]) if share > 0 else 1.0
                    for row, share in enumerate(shares))
    vectors = prepared.vectors if overwrite else torch.empty_like(prepared.vectors)
    sq_norms = []
    for row, factor in enumerate(factors):
        if factor == 1.0 and overwrite:
            sq_norms.append(prepared.sq_norms[row])
            continue
        torch.mul(prepared.vectors[row], factor, out=vectors[row])
        norm = float(torch.linalg.vector_norm(vectors[row]))  # as prepare_task_vectors computes it
        sq_norms.append(norm * norm)
    return TaskVectors(vectors=vectors, sq_norms=tuple(sq_norms), indices=prepared.indices), factors
