"""WudiSolver against a float64 autograd + torch.optim.Adam transcription of Eq. 21."""

import pytest
import torch
from reference import wudi_adam, wudi_loss
from tensors import full_rank_task_vectors, low_rank_task_vectors

from mergekit_wudi.solvers import (
    CHUNK_DIVISOR,
    CHUNK_ELEMENTS,
    MIN_CHUNK_ELEMENTS,
    WudiConfig,
    WudiSolver,
    solver_row_chunks,
)

# (out, in): out > in, square and out < in <= 3 out use the in-space Gram; out << in the out-space form.
SHAPES = [(24, 12), (16, 16), (12, 30), (10, 40)]


def relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_reference_differs_from_task_arithmetic(generator):
    # Guards every comparison below: a solver that returned sum_i t_i would fail them.
    tv = low_rank_task_vectors(generator, 3, 16, 16)
    assert relative(tv.sum(0), wudi_adam(tv)) > 0.1


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [2, 5])
@pytest.mark.parametrize("factory", [low_rank_task_vectors, full_rank_task_vectors])
@pytest.mark.parametrize("steps", [1, 7])
def test_first_steps_match_reference_float64(generator, device, shape, count, factory, steps):
    # Same update arithmetic as torch.optim.Adam, analytic gradient vs autograd: in float64
    # only rounding of a different (but equivalent) matmul order separates them.
    tv = factory(generator, count, *shape)
    ours = WudiSolver(WudiConfig(steps=steps)).solve(tv.to(device)).cpu()
    torch.testing.assert_close(ours, wudi_adam(tv, steps=steps), rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [2, 5])
def test_default_float32_run_matches_float64_reference(generator, device, shape, count):
    tv = low_rank_task_vectors(generator, count, *shape)
    ours = WudiSolver().solve(tv.float().to(device)).cpu()
    assert ours.dtype == torch.float32
    # 300 float32 Adam steps against float64: error measured relative to ||t_m||.
    assert relative(ours, wudi_adam(tv)) < 1e-4


def test_loss_decreases_from_task_arithmetic(generator):
    tv = low_rank_task_vectors(generator, 4, 20, 20)
    solved = WudiSolver().solve(tv)
    assert wudi_loss(solved, list(tv)) < 0.5 * wudi_loss(tv.sum(0), list(tv))


@pytest.mark.parametrize("shape", SHAPES)
def test_row_chunks_give_the_same_result(generator, shape):
    tv = low_rank_task_vectors(generator, 3, *shape)
    whole = WudiSolver(WudiConfig(steps=20)).solve(tv)
    chunked = WudiSolver(WudiConfig(steps=20), chunk_elements=shape[1] * 3).solve(tv)
    # Rows are independent in exact arithmetic; BLAS blocks a (3, k) product differently
    # from a (24, k) one, so the last bits can differ (measured: ~1e-18 absolute).
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-18)


def test_single_task_vector_is_returned(generator):
    tv = low_rank_task_vectors(generator, 1, 12, 20, dtype=torch.float32)
    assert torch.equal(WudiSolver().solve(tv), tv[0])


def test_model_order_does_not_matter(generator):
    tv = low_rank_task_vectors(generator, 3, 16, 12)
    forward = WudiSolver().solve(tv)
    backward = WudiSolver().solve(tv.flip(0))
    torch.testing.assert_close(forward, backward, rtol=1e-9, atol=1e-14)


def test_zero_and_non_finite_task_vectors_take_no_part(generator):
    tv = low_rank_task_vectors(generator, 2, 16, 12)
    padded = torch.cat([tv, torch.zeros(1, 16, 12, dtype=tv.dtype), torch.full((1, 16, 12), float("nan"), dtype=tv.dtype)])
    padded[3, 0, 0] = 1.0
    torch.testing.assert_close(WudiSolver().solve(padded), WudiSolver().solve(tv), rtol=0, atol=0)
    assert torch.equal(WudiSolver().solve(torch.zeros(3, 4, 5)), torch.zeros(4, 5))


def test_steps_zero_is_task_arithmetic(generator):
    tv = low_rank_task_vectors(generator, 3, 8, 8)
    torch.testing.assert_close(WudiSolver(WudiConfig(steps=0)).solve(tv), tv.sum(0), rtol=0, atol=0)


def test_in_space_choice_follows_flops_and_memory():
    assert WudiSolver.uses_in_space(3, 1024, 1024)
    assert WudiSolver.uses_in_space(3, 2816, 1024)
    assert WudiSolver.uses_in_space(2, 1024, 2816)  # Llama 2 down_proj: C is 2.75x the tensor
    assert WudiSolver.uses_in_space(2, 4096, 14336)  # Llama 3 down_proj: 3.5x
    assert not WudiSolver.uses_in_space(3, 1024, 2816 * 2)  # C would be 5.5x the tensor
    assert not WudiSolver.uses_in_space(1, 100, 300)  # 2*N*out < in: out-space is cheaper


@pytest.mark.parametrize("bad", [{"steps": -1}, {"lr": 0.0}, {"lr": float("nan")}, {"steps": 1.5}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        WudiConfig(**bad)


def test_input_shape_is_checked():
    with pytest.raises(ValueError, match="shape"):
        WudiSolver().solve(torch.zeros(4, 5))


@pytest.mark.parametrize("shape", [(1024, 512), (1000, 300), (3, 100000)])
def test_row_chunks_bound_the_adam_state(shape):
    # Past MIN_CHUNK_ELEMENTS a chunk holds at most 1/CHUNK_DIVISOR of the tensor (at
    # least one row), so gradient and moments stay under 3/4 of it; chunks tile the rows.
    rows, cols = shape
    chunks = list(solver_row_chunks(rows, cols, CHUNK_ELEMENTS))
    assert [c.start for c in chunks] == [0] + [c.stop for c in chunks[:-1]] and chunks[-1].stop == rows
    largest = max(c.stop - c.start for c in chunks) * cols
    assert largest <= max(MIN_CHUNK_ELEMENTS, rows * cols / CHUNK_DIVISOR) or largest == cols
    assert len(list(solver_row_chunks(16, 16, CHUNK_ELEMENTS))) == 1  # small: one chunk
