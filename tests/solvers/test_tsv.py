"""TsvSolver against TSV-Merge written out in float64 (tests/reference_2025.py)."""

import os

import pytest
import torch
from reference_2025 import tsv_merge, tsv_merge_code
from tensors import full_rank_task_vectors, low_rank_task_vectors, solve_at_one_and_two_threads

from mergekit_wudi.solvers.tsv import TsvConfig, TsvSolver

SHAPES = [(24, 12), (16, 16), (10, 40)]  # out > in, square, out < in


def relative_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return float((ours.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [1, 2, 5])
@pytest.mark.parametrize("factory", [full_rank_task_vectors, low_rank_task_vectors])
def test_matches_the_whitening_reference(generator, device, shape, count, factory):
    # low_rank_task_vectors have rank 3: below k = floor(r / N) for N <= 2 (rank-deficient
    # tasks, whose zero singular values are dropped), above it for N = 5.
    tv = factory(generator, count, *shape)
    ours = TsvSolver().solve(tv.to(device)).cpu()
    expected = tsv_merge(tv)
    assert ours.dtype == torch.float64
    if count == 1:
        torch.testing.assert_close(expected, tv[0], rtol=0, atol=1e-12 * tv[0].abs().max().item())
    else:  # a solver returning plain task arithmetic fails here
        assert relative_error(tv.sum(0), expected) > 0.1
    # float64 both; the whitening (Gram eigendecomposition) and the solver's SVD route
    # differ by rounding amplified by the stacks' condition number (< 1e-11 seen).
    assert relative_error(ours, expected) < 1e-9


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [2, 3, 5])
def test_follows_the_official_code_on_full_rank_tasks(generator, shape, count):
    tv = full_rank_task_vectors(generator, count, *shape)
    assert relative_error(TsvSolver().solve(tv), tsv_merge_code(tv)) < 1e-9


def test_float32_input_is_solved_in_float32(generator):
    tv = full_rank_task_vectors(generator, 3, 16, 16)
    ours = TsvSolver().solve(tv.float())
    assert ours.dtype == torch.float32
    assert relative_error(ours, tsv_merge(tv)) < 1e-5  # float32 rounding, well-conditioned stacks


@pytest.mark.parametrize("shape, count, rank", [((24, 12), 2, 2), ((48, 64), 5, 8), ((16, 16), 3, 1)])
def test_float32_low_rank_tasks_give_the_float64_answer(generator, shape, count, rank):
    # LoRA-like task vectors of rank below k: the float32 cutoff drops the same
    # rounding-level singular values as the float64 reference does.
    tv = low_rank_task_vectors(generator, count, *shape, rank=rank)
    assert relative_error(TsvSolver().solve(tv.float()), tsv_merge(tv)) < 1e-4  # measured < 1e-5


def test_bfloat16_input_is_solved_in_float32(generator):
    tv = full_rank_task_vectors(generator, 2, 12, 12).bfloat16()
    ours = TsvSolver().solve(tv)
    assert ours.dtype == torch.float32
    assert relative_error(ours, tsv_merge(tv.double())) < 1e-5


def test_one_task_gives_the_task(generator):
    tv = full_rank_task_vectors(generator, 1, 14, 9)
    torch.testing.assert_close(TsvSolver().solve(tv), tv[0], rtol=0, atol=1e-13 * tv.abs().max().item())


def orthonormal(generator, size):
    return torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64)).Q


def test_orthogonal_kept_components_give_the_sum_of_truncations(generator):
    # Three tasks on 12 x 12, k = 4. Task i: singular values 4..7 on its own block B_i of
    # orthonormal directions, plus a weak tail (0.1, 0.2) on the next task's block. The
    # kept parts are mutually orthogonal, so the whitening changes nothing and TSV is the
    # sum of the rank-4 truncations (the tails go), not the sum of the tasks.
    left, right = orthonormal(generator, 12), orthonormal(generator, 12)
    blocks = [slice(0, 4), slice(4, 8), slice(8, 12)]
    tasks, truncations = [], []
    for index, block in enumerate(blocks):
        tail = blocks[(index + 1) % 3]
        top = left[:, block] @ torch.diag(torch.tensor([7.0, 6.0, 5.0, 4.0], dtype=torch.float64)) @ right[:, block].T
        weak = left[:, tail][:, :2] @ torch.diag(torch.tensor([0.2, 0.1], dtype=torch.float64)) @ right[:, tail][:, :2].T
        tasks.append(top + weak)
        truncations.append(top)
    tv = torch.stack(tasks)
    expected = sum(truncations)
    torch.testing.assert_close(TsvSolver().solve(tv), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(tsv_merge(tv), expected, rtol=0, atol=1e-12)
    assert (tv.sum(0) - expected).norm() > 0.1


def test_identical_tasks_give_one_truncation(generator):
    # U_hat = [U_k, U_k] is rank-deficient: its polar factor on the range gives the rank-k
    # truncation of t (the code's full polar factor adds a rounding-chosen rank-k term).
    t = full_rank_task_vectors(generator, 1, 10, 8)[0]
    u, s, vh = torch.linalg.svd(t, full_matrices=False)
    truncation = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
    ours = TsvSolver().solve(torch.stack([t, t]))
    torch.testing.assert_close(ours, truncation, rtol=0, atol=1e-12 * t.abs().max().item())
    assert relative_error(tsv_merge(torch.stack([t, t])), truncation) < 1e-9


def test_zero_and_non_finite_task_vectors_are_excluded(generator):
    tv = low_rank_task_vectors(generator, 2, 10, 12)
    bad = torch.full((10, 12), float("nan"), dtype=tv.dtype)
    padded = torch.stack([torch.zeros_like(tv[0]), tv[0], bad, tv[1]])
    assert torch.equal(TsvSolver().solve(padded), TsvSolver().solve(tv))
    assert torch.equal(TsvSolver().solve(torch.zeros(3, 4, 5)), torch.zeros(4, 5))


def test_more_tasks_than_rank_gives_zero(generator):
    tv = full_rank_task_vectors(generator, 5, 4, 20)  # r = 4, k = floor(4 / 5) = 0
    assert torch.equal(TsvSolver().solve(tv), torch.zeros(4, 20, dtype=tv.dtype))


def test_order_and_scale(generator):
    tv = full_rank_task_vectors(generator, 3, 12, 15)
    solver = TsvSolver()
    reference = solver.solve(tv)
    assert relative_error(solver.solve(tv.flip(0)), reference) < 1e-12
    assert relative_error(solver.solve(tv * 1e-4), reference * 1e-4) < 1e-12


def test_config_has_no_parameters():
    import dataclasses

    assert dataclasses.fields(TsvConfig()) == ()


needs_cores = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores to run 2 threads")


@needs_cores
def test_bit_identical_across_thread_counts():
    # At 384 x 512 MKL's SVD rounds differently on 1 and 2 threads; the solver runs its
    # factorisations on one thread (solvers.numerics.one_cpu_thread).
    tv = full_rank_task_vectors(torch.Generator().manual_seed(0), 3, 384, 512, scale=1e-2, dtype=torch.float32)
    one, two = solve_at_one_and_two_threads(TsvSolver().solve, tv)
    assert torch.equal(one, two)
