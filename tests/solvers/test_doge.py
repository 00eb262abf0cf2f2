"""DogeSolver against a float64 autograd + explicit-projection transcription of DOGE-TA."""

import math

import pytest
import torch
from reference import doge, doge_loss
from tensors import full_rank_task_vectors, low_rank_task_vectors

from mergekit_wudi.solvers import DogeConfig, DogeSolver
from mergekit_wudi.solvers.doge import trim_mask

SHAPES = [(24, 12), (16, 16), (10, 40)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [2, 5])
@pytest.mark.parametrize("factory", [low_rank_task_vectors, full_rank_task_vectors])
@pytest.mark.parametrize("steps", [0, 1, 10, 400])
def test_matches_reference_float64(generator, device, shape, count, factory, steps):
    tv = factory(generator, count, *shape)
    densities = [0.3, 0.6, 1.0, 0.2, 0.45][:count]
    ours = DogeSolver(DogeConfig(steps=steps)).solve(tv.to(device), density=densities).cpu()
    expected = doge(tv, densities, steps=steps)
    # Same arithmetic in float64. (At these defaults DOGE amplifies rounding: a 1e-12
    # relative change of the inputs moves a float32 result by O(1), see README; float64
    # with the same operations stays within ~1e-13.)
    torch.testing.assert_close(ours, expected, rtol=1e-8, atol=1e-10 * expected.abs().max().item())


def test_delta_changes_the_result(generator):
    tv = low_rank_task_vectors(generator, 3, 16, 16)
    with_delta = DogeSolver().solve(tv)
    without = DogeSolver(DogeConfig(steps=0)).solve(tv)
    assert (with_delta - without).norm() > 1e-3 * without.norm()


def test_loss_decreases(generator):
    tv = low_rank_task_vectors(generator, 3, 16, 16)
    solver = DogeSolver(DogeConfig(steps=50))
    coefficients = [0.07 / t.norm().item() for t in tv]
    delta = solver._solve_delta(tv, coefficients)
    assert doge_loss(delta, list(tv), coefficients) < doge_loss(torch.zeros_like(delta), list(tv), coefficients)


def test_single_and_all_zero_task_vectors(generator):
    tv = low_rank_task_vectors(generator, 1, 12, 12)
    assert torch.isfinite(DogeSolver().solve(tv)).all()
    assert torch.equal(DogeSolver().solve(torch.zeros(2, 5, 6)), torch.zeros(5, 6))
    padded = torch.cat([tv, torch.zeros_like(tv)])
    torch.testing.assert_close(DogeSolver().solve(padded, density=[0.3, 0.9]), DogeSolver().solve(tv), rtol=0, atol=0)


@pytest.mark.parametrize("density", [0.3, 0.5, 0.999, 1.0])
def test_trim_keeps_the_kth_magnitude_and_above(generator, density):
    task = torch.randn(7, 13, generator=generator)
    mask = trim_mask(task, density)
    d = task.numel()
    kth = d - math.floor(d * density)
    expected = d if kth == 0 else d - kth + 1  # distinct magnitudes: kth..d kept
    assert int(mask.sum()) == expected
    if kth:
        assert task.abs()[mask.bool()].min() == task.abs().flatten().sort().values[kth - 1]


@pytest.mark.parametrize("bad", [{"density": 0.0}, {"density": 1.5}, {"eta": -1.0}, {"subspace": 0}, {"lr": -1e-4}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        DogeConfig(**bad)
