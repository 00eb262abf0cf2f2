"""WUDI-Merging: Cheng et al., ICML 2025, arXiv:2503.08099, Eq. 21, solved with Adam."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from mergekit_wudi.solvers.base import Solver
from mergekit_wudi.solvers.checks import check_config, check_non_negative_int, check_positive, config_field
from mergekit_wudi.solvers.numerics import (
    CHUNK_DIVISOR,
    CHUNK_ELEMENTS,
    TaskVectors,
    adam_optimizer,
    gram_terms,
    release,
    solver_row_chunks,
)

# The in-space gradient keeps C = (in, in) in memory; past this many multiples of the
# tensor's own size the out-space form is used even where it costs more flops. At 3.5,
# C, D, the iterate and a row chunk's Adam state stay within the memory bound (SOLVE_EXTRA_TENSORS) with the N
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
# Out-space, where N out <= in (k_proj and v_proj of Llama 3 with up to 4 fine-tunes), half
# the tensor a chunk too: its GEMMs then run closer to torch.mm's rate (512x2048, N = 4:
# 86% against 79% with quarters), at 8.2 tensors of peak memory against the bound of 10
# (N = 3: 7.2 of 9; tests/test_memory.py). At N out = 2 in, halves measured 15.5 against
# the bound of 14.
_OUT_SPACE_HALVES_OVERLAP = 1


@dataclass(frozen=True)
class WudiConfig:
    """The paper's Adam settings (Sec. 4, A.8); steps 0 returns the plain sum."""

    steps: int = config_field(300, check_non_negative_int, "Adam iterations")
    lr: float = config_field(1e-5, check_positive, "Adam learning rate")

    def __post_init__(self):
        check_config(self)


class WudiSolver(
    Solver, name="wudi", pretty_name="WUDI-Merging", paper="https://arxiv.org/abs/2503.08099", config=WudiConfig
):
    """WUDI-Merging (Eq. 21), solved with Adam from t_m = sum_i t_i:

        L(t_m) = sum_i ||(t_m - t_i) t_i^T||_F^2 / ||t_i||_F^2,   grad = 2 (t_m C - D)
        C = sum_i t_i^T t_i / ||t_i||^2 (in, in),  D = sum_i t_i t_i^T t_i / ||t_i||^2 (out, in)

    or t_m C in out-space, ((t_m T^T) * w) T with T the (N*out, in) stack, where that
    costs fewer flops or C would not fit the memory bound. Rows are solved in chunks
    (the loss is a sum over rows, Adam is element-wise). One usable task vector is
    returned as is (a stationary point). docs/methods.md has the details.
    """

    def __init__(self, config: Optional[WudiConfig] = None, calibration: str = "none",
                 density: Union[float, Sequence[float]] = 1.0, *, chunk_elements: int = CHUNK_ELEMENTS,
                 equalize: Optional[Sequence[float]] = None, average: bool = False):
        super().__init__(config, calibration, density, equalize=equalize, average=average)
        self.chunk_elements = chunk_elements

    @staticmethod
    def uses_in_space(count: int, out_features: int, in_features: int) -> bool:
        """Whether the (in, in) Gram form is used: cheaper in flops and small enough."""
        cheaper = in_features <= 2 * count * out_features
        small = in_features <= _MAX_GRAM_OVER_TENSOR * out_features
        return cheaper and small

    def _solve(self, prepared: TaskVectors) -> torch.Tensor:
        if prepared.count <= 1 or self.config.steps == 0:
            return prepared.vectors.sum(dim=0)
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
        elif gram is None and count * out_features <= _OUT_SPACE_HALVES_OVERLAP * in_features:
            divisor = _TALL_CHUNK_DIVISOR
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
