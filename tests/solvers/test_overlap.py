"""solvers/overlap.py: input and output subspace overlap against values known by construction."""

import math

import pytest
import torch

from mergekit_wudi.solvers.overlap import (
    LORA_INPUT_OVERLAP,
    ONE_SEED_RATIO,
    expert_kind,
    subspace_overlap,
    top_subspaces,
)

OUT, IN, RANK = 24, 32, 8


def orthonormal_rows(generator: torch.Generator, count: int, dim: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(dim, count, generator=generator, dtype=torch.float64))
    return q.T  # (count, dim), orthonormal rows


def low_rank(left: torch.Tensor, right: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """left (OUT, RANK) diag(distinct values) right (RANK, IN): exactly those subspaces, rank RANK."""
    values = torch.linspace(3.0, 1.0, RANK, dtype=torch.float64) * (1 + torch.rand(RANK, generator=generator, dtype=torch.float64))
    return left @ torch.diag(values) @ right


def test_shared_input_space_disjoint_output_space():
    # One "A" for both (LoRA from one seed); B's on disjoint coordinates: the input overlap is
    # the most there is, IN / RANK times chance, and the output overlap exactly 0.
    g = torch.Generator().manual_seed(0)
    a = orthonormal_rows(g, RANK, IN)
    b = torch.eye(OUT, dtype=torch.float64)
    t = torch.stack([low_rank(b[:, :RANK], a, g), low_rank(b[:, RANK:2 * RANK], a, g)])
    inputs, outputs = subspace_overlap(t)
    assert inputs == pytest.approx((IN / RANK,) * 2, rel=1e-9)
    assert outputs == pytest.approx((0.0, 0.0), abs=1e-12)


def test_half_shared_input_space_and_the_maximum_over_the_others():
    # t_2 shares half of t_1's input space (4 of 8 directions): the mean squared cosine is 1/2,
    # so 1/2 / (RANK / IN) = 2 times chance; t_3 is disjoint from both. The maximum over the
    # other tasks gives t_1 and t_2 their pair's value and t_3 zero.
    g = torch.Generator().manual_seed(1)
    basis = orthonormal_rows(g, 3 * RANK, IN)
    left = orthonormal_rows(g, RANK, OUT).T
    half = RANK // 2
    rights = [basis[:RANK], torch.cat([basis[:half], basis[RANK:RANK + half]]), basis[2 * RANK:]]
    t = torch.stack([low_rank(left, right, g) for right in rights])
    inputs, outputs = subspace_overlap(t)
    assert inputs == pytest.approx((0.5 * IN / RANK, 0.5 * IN / RANK, 0.0), abs=1e-9)
    assert outputs == pytest.approx((OUT / RANK,) * 3, rel=1e-9)  # one output space for all


def test_transpose_swaps_the_two_sides():
    # Rank 6 (at most 16: the range finder is exact there), some overlap so the sides differ.
    g = torch.Generator().manual_seed(2)
    t = torch.randn(3, OUT, 6, generator=g, dtype=torch.float64) @ torch.randn(3, 6, IN, generator=g, dtype=torch.float64)
    t[1] += t[0]
    inputs, outputs = subspace_overlap(t)
    inputs_t, outputs_t = subspace_overlap(t.transpose(1, 2))
    assert inputs_t == pytest.approx(outputs, rel=1e-9) and outputs_t == pytest.approx(inputs, rel=1e-9)


def test_zero_and_single_task_vectors_give_nan():
    g = torch.Generator().manual_seed(3)
    t = torch.randn(3, OUT, IN, generator=g)
    t[1] = 0
    inputs, outputs = subspace_overlap(t)
    assert math.isnan(inputs[1]) and math.isnan(outputs[1])
    assert all(math.isfinite(v) for v in (inputs[0], inputs[2], outputs[0], outputs[2]))
    both = subspace_overlap(t[:2])  # one usable left: nothing to compare with
    assert all(math.isnan(v) for side in both for v in side)


def test_expert_kind_thresholds():
    assert expert_kind(LORA_INPUT_OVERLAP * 0.99, 10.0) == "lora"
    assert expert_kind(LORA_INPUT_OVERLAP * 1.01, LORA_INPUT_OVERLAP) == "full"
    assert expert_kind(40.0, 40.0 / (ONE_SEED_RATIO * 0.99)) == "full"  # input / output just below the ratio
    assert expert_kind(40.0, 40.0 / (ONE_SEED_RATIO * 1.01)) == "lora, one seed"
    assert expert_kind(math.nan, 1.0) == "" and expert_kind(10.0, 0.0) == ""
    # The benchmarks' medians (module docstring) fall on their own side.
    assert [expert_kind(i, o) for i, o in [(22.8, 8.6), (13.2, 8.7), (14.8, 17.3), (1.7, 3.5), (2.9, 7.9),
                                           (58.8, 3.7), (37.7, 5.7)]] == ["full"] * 3 + ["lora"] * 2 + ["lora, one seed"] * 2


def test_low_rank_adapters_are_compared_on_their_own_directions():
    # Rank-2 updates sharing one input space: with the top 8 the six rounding directions would
    # dilute the overlap to about 2/8 of its value; k = 2 gives the most there is, IN / 2.
    g = torch.Generator().manual_seed(4)
    a = orthonormal_rows(g, 2, IN)
    t = torch.stack([torch.randn(OUT, 2, generator=g, dtype=torch.float64) @ a for _ in range(3)])
    inputs, _ = subspace_overlap(t)
    assert inputs == pytest.approx((IN / 2,) * 3, rel=1e-9)


@pytest.mark.parametrize("rank", [3, 16])
def test_range_finder_is_exact_up_to_rank_16(rank):
    g = torch.Generator().manual_seed(6)
    matrix = torch.randn(40, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, 56, generator=g, dtype=torch.float64)
    first = top_subspaces(matrix, 8)
    u, values, v = first
    u0, values0, vh0 = torch.linalg.svd(matrix, full_matrices=False)
    k = min(8, rank)  # the triplets beyond the rank are rounding, in both
    assert values.shape == (8,) and values[:k] == pytest.approx(values0[:k], rel=1e-10)
    u, v = u[:, :k], v[:, :k]
    assert u @ u.T == pytest.approx(u0[:, :k] @ u0[:, :k].T, abs=1e-10)  # the same subspaces
    assert v @ v.T == pytest.approx(vh0[:k].T @ vh0[:k], abs=1e-10)
    again = top_subspaces(matrix, 8)
    assert all(torch.equal(a, b) for a, b in zip(again, first))  # fixed seed
