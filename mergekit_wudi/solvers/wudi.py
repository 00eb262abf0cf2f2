"""WUDI-Merging solved with Adam, without autograd.

WUDI-Merging: Cheng et al., "Whoever Started the Interference Should End It: Guiding
Data-Free Model Merging via Task Vectors", ICML 2025, arXiv:2503.08099.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from mergekit_wudi.solvers.checks import (
    check_config,
    check_non_negative_int,
    check_positive,
    config_field,
    per_model_values,
)
from mergekit_wudi.solvers.numerics import (
    CHUNK_DIVISOR,
    CHUNK_ELEMENTS,
    adam_optimizer,
    gram_terms,
    one_thread_if_small,
    prepare_task_vectors,
    release,
    solver_row_chunks,
)

# The in-space gradient keeps C = (in, in) in memory; past this many multiples of the
# tensor's own size the out-space form is used even where it costs more flops. At 3.5,
# C, D, the iterate and a row chunk's Adam state stay within N + 6 tensors with the N
# task vectors (chunks of 1/8 of the tensor where C is over 2.5 tensors), and the
# down_proj of Llama 2 (in = 2.7 out), Llama 3 and Mistral (in = 3.5 out) keeps the
# cheaper form.
_MAX_GRAM_OVER_TENSOR = 3.5
_WIDE_GRAM_OVER_TENSOR = 2.5
_WIDE_CHUNK_DIVISOR = 8
# Where in <= out, C is at most one tensor, so a chunk may hold half of the tensor: its
# Adam state then takes 1.5 tensors, and GEMMs on larger chunks run closer to torch.mm's
# rate (benchmarks/results/tensors.md).
_TALL_CHUNK_DIVISOR = 2


@dataclass(frozen=True)
class WudiConfig:
    """Hyperparameters of WUDI-Merging (paper Sec. 4 and A.8: Adam, lr 1e-5, 300 steps).

    Args:
        steps (int, default 300): Adam iterations; 0 returns task arithmetic's sum.
        lr (float, default 1e-5): Adam learning rate, in the task vectors' own units.
    """

    steps: int = config_field(300, check_non_negative_int, "Adam iterations")
    lr: float = config_field(1e-5, check_positive, "Adam learning rate")

    def __post_init__(self):
        check_config(self)


class WudiSolver:
    """Merged task vector minimising the WUDI interference loss, solved with Adam.

    WUDI-Merging, Cheng et al., ICML 2025 (arXiv:2503.08099), Eq. 21 of the ICML text:
        L(t_m) = sum_i ||(t_m - t_i) t_i^T||_F^2 / ||t_i||_F^2
    Gradient used instead of autograd:
        grad = 2 (t_m C - D),  C = sum_i t_i^T t_i / ||t_i||^2   (in, in)
                               D = sum_i t_i t_i^T t_i / ||t_i||^2  (out, in)
    or, where `in` is large next to `out`, the same thing in out-space
        t_m C = sum_i ((t_m t_i^T) / ||t_i||^2) t_i = ((t_m T^T) * w) T,
    with T the (N*out, in) stack of task vectors and w the per-block weights
    1/||t_i||^2: two GEMMs, and no (N, out, out) intermediate. The in-space form costs
    2*out*in^2 flops a step, the out-space one 4*N*out^2*in; the cheaper is used,
    unless C would take more than _MAX_GRAM_OVER_TENSOR times the tensor's memory.

    Adam as torch.optim.Adam (betas 0.9/0.999, eps 1e-8; the fused kernel where the
    device has one, see adam_optimizer), from t_m = sum_i t_i. The
    loss is a sum over rows of t_m and Adam is element-wise, so rows are solved in
    chunks (every step of one chunk, then the next): same result, bounded memory.

    Input (N, out, in), any float dtype; solved in float32 (float64 if given float64);
    returns (out, in) in that compute dtype on the input device. Zero or non-finite task
    vectors are excluded; with none left the result is zero. With one left it is
    returned as is: t_m = t_1 is a stationary point, where float32 rounding in the
    gradient would otherwise be amplified by Adam's normalisation.
    """

    def __init__(self, config: Optional[WudiConfig] = None, *, chunk_elements: int = CHUNK_ELEMENTS):
        self.config = config or WudiConfig()
        self.chunk_elements = chunk_elements

    @staticmethod
    def uses_in_space(count: int, out_features: int, in_features: int) -> bool:
        """Whether the (in, in) Gram form is used: cheaper in flops and small enough."""
        cheaper = in_features <= 2 * count * out_features
        small = in_features <= _MAX_GRAM_OVER_TENSOR * out_features
        return cheaper and small

    @one_thread_if_small
    def solve(self, task_vectors: torch.Tensor, **per_model: Any) -> torch.Tensor:
        """task_vectors: (N, out, in). WUDI has no per-model parameter (any keyword: TypeError)."""
        per_model_values(self.config, per_model, 0)
        prepared = prepare_task_vectors(task_vectors)
        if prepared.count <= 1 or self.config.steps == 0:
            return prepared.vectors.sum(dim=0)  # zeros where no task vector is usable
        vectors = prepared.vectors  # (n, out, in)
        count, out_features, in_features = vectors.shape
        weights = [1.0 / sq for sq in prepared.sq_norms]

        if self.uses_in_space(count, out_features, in_features):
            # C and D formed once; where in > out, D from (out, out) overlaps, as the chunks would
            gram, full_d = gram_terms(vectors, weights, with_d=in_features <= out_features)
            if full_d is None:
                full_d = _d_rows_out_space(vectors, weights, slice(None))
        else:
            gram, full_d = None, None
            flat = vectors.reshape(count * out_features, in_features)  # (n*out, in)
            block_weights = torch.tensor(weights, dtype=vectors.dtype, device=vectors.device)
            block_weights = block_weights.view(1, count, 1)

        if gram is not None and in_features <= out_features:
            divisor = _TALL_CHUNK_DIVISOR
        elif gram is not None and in_features > _WIDE_GRAM_OVER_TENSOR * out_features:
            divisor = _WIDE_CHUNK_DIVISOR
        else:
            divisor = CHUNK_DIVISOR
        merged = torch.empty_like(vectors[0])  # (out, in)
        for rows in solver_row_chunks(out_features, in_features, self.chunk_elements, divisor):
            if gram is not None:
                d_rows = full_d[rows]
                grad_fn = _in_space_gradient(gram, d_rows)
            else:
                d_rows = _d_rows_out_space(vectors, weights, rows)
                grad_fn = _out_space_gradient(flat, block_weights, d_rows, count)
            # The chunk of the iterate lives in `merged` itself: Adam updates that view.
            torch.sum(vectors[:, rows], dim=0, out=merged[rows])
            self._adam(merged[rows], grad_fn)
            del d_rows, grad_fn
        return merged

    def _adam(self, param: torch.Tensor, grad_fn) -> None:
        """config.steps Adam steps on `param`, in place."""
        optimizer = adam_optimizer(param, self.config.lr)
        for _ in range(self.config.steps):
            grad_fn(param, param.grad)
            optimizer.step()
        release(optimizer)


def _d_rows_out_space(vectors: torch.Tensor, weights, rows: slice) -> torch.Tensor:
    """D[rows] = sum_i w_i (t_i[rows] t_i^T) t_i, with (rows, out) intermediates only."""
    d_rows = None
    for task, weight in zip(vectors, weights):
        overlap = task[rows] @ task.T  # (rows, out)
        if d_rows is None:
            d_rows = torch.mm(overlap, task).mul_(weight)
        else:
            d_rows.addmm_(overlap, task, alpha=weight)
    return d_rows


def _in_space_gradient(gram: torch.Tensor, d_rows: torch.Tensor):
    def gradient(param: torch.Tensor, out: torch.Tensor) -> None:
        # grad = 2 (t_m C - D)
        torch.addmm(d_rows, param, gram, beta=-2, alpha=2, out=out)

    return gradient


def _out_space_gradient(flat: torch.Tensor, block_weights: torch.Tensor, d_rows: torch.Tensor, count: int):
    overlap = flat.new_empty(d_rows.shape[0], flat.shape[0])  # (rows, n*out), reused every step

    def gradient(param: torch.Tensor, out: torch.Tensor) -> None:
        # t_m C = ((t_m T^T) * w) T, T = (n*out, in); grad = 2 (t_m C - D)
        torch.mm(param, flat.T, out=overlap)
        overlap.view(param.shape[0], count, -1).mul_(block_weights)
        torch.addmm(d_rows, overlap, flat, beta=-2, alpha=2, out=out)

    return gradient
