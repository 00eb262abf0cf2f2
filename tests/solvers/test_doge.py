"""DogeSolver against a float64 autograd + explicit-projection transcription of DOGE-TA."""

import math

import pytest
import torch
from reference import doge, doge_loss, doge_projector
from tensors import full_rank_task_vectors, low_rank_task_vectors

from mergekit_wudi.solvers import DogeConfig, DogeSolver
from mergekit_wudi.solvers import doge as doge_module
from mergekit_wudi.solvers.doge import top_left_singular_vectors
from mergekit_wudi.solvers.trim import kth_smallest_bits, trim_mask

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


@pytest.fixture
def gram_route(monkeypatch):
    """Every matrix takes the Gram + Rayleigh-Ritz route, however small."""
    monkeypatch.setattr(doge_module, "GRAM_MIN_ELEMENTS", 0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [2, 5])
def test_gram_route_matches_reference_float64(generator, device, gram_route, shape, count):
    # Full-rank task vectors, whose top singular subspaces are defined (the reference
    # takes them from torch.linalg.svd, the solver from Gram eigendecompositions).
    tv = full_rank_task_vectors(generator, count, *shape)
    densities = [0.3, 0.6, 1.0, 0.2, 0.45][:count]
    ours = DogeSolver().solve(tv.to(device), density=densities).cpu()
    expected = doge(tv, densities)
    torch.testing.assert_close(ours, expected, rtol=1e-8, atol=1e-10 * expected.abs().max().item())


def matrix_with_spectrum(generator, out_features, in_features, values):
    """(out, in) = U diag(values) V^T with random orthonormal U, V; returns (matrix, U)."""
    rank = len(values)
    left = torch.linalg.qr(torch.randn(out_features, rank, generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(in_features, rank, generator=generator, dtype=torch.float64)).Q
    return left @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ right.T, left


@pytest.mark.parametrize("route", ["svd", "gram"])
@pytest.mark.parametrize("shape", [(40, 40), (60, 24), (24, 60)])
def test_top_left_singular_vectors_span_the_top_subspace(generator, monkeypatch, route, shape):
    monkeypatch.setattr(doge_module, "GRAM_MIN_ELEMENTS", 0 if route == "gram" else 1 << 40)
    k = 7
    rank = min(shape)
    values = [100.0 / (i + 1) for i in range(k)] + [5.0 / (i + 1) for i in range(rank - k)]  # gap after k
    matrix, left = matrix_with_spectrum(generator, *shape, values)
    basis = top_left_singular_vectors(matrix, k)
    assert basis.shape == (shape[0], k)
    torch.testing.assert_close(basis.T @ basis, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
    expected = left[:, :k] @ left[:, :k].T
    torch.testing.assert_close(basis @ basis.T, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("route", ["svd", "gram"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(40, 40), (60, 24), (24, 60)])
def test_rank_deficient_matrix_gives_only_its_column_space(generator, monkeypatch, route, dtype, shape):
    # rank 2 < k = 9: the 7 directions past the rank would be set by rounding; only the
    # two above max(out, in) * eps(float32) * sigma_1 are kept, on both routes and dtypes.
    monkeypatch.setattr(doge_module, "GRAM_MIN_ELEMENTS", 0 if route == "gram" else 1 << 40)
    matrix, left = matrix_with_spectrum(generator, *shape, [3.0, 1.0])
    basis = top_left_singular_vectors(matrix.to(dtype), 9).double()
    assert basis.shape == (shape[0], 2)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(basis @ basis.T, left @ left.T, rtol=0, atol=tolerance)


@pytest.mark.parametrize("route", ["svd", "gram"])
def test_tolerance_cuts_at_max_dimension_times_float32_eps(generator, monkeypatch, route):
    # sigma_3 / sigma_1 just above and just below rtol = 60 * eps(float32) = 7.2e-6 (float64 input).
    monkeypatch.setattr(doge_module, "GRAM_MIN_ELEMENTS", 0 if route == "gram" else 1 << 40)
    rtol = 60 * torch.finfo(torch.float32).eps
    for factor, kept in ((2.0, 3), (0.5, 2)):
        matrix, _ = matrix_with_spectrum(generator, 60, 24, [1.0, 0.5, factor * rtol])
        assert top_left_singular_vectors(matrix, 5).shape[1] == kept


def low_rank_family(generator, dtype=torch.float32, shape=(64, 96)):
    """Four rank-8 task vectors, as rank-8 LoRA adapters give: the paper's sizes read from
    the task vectors' rank give k_i = 8 // 4 = 2 directions per task and 8 // 6 = 1 shared
    one; read from min(out, in) they gave k = 16 and keep = 10, all of every task's column space."""
    return low_rank_task_vectors(generator, 4, *shape, rank=8, scale=3e-3, dtype=dtype)


@pytest.mark.parametrize("route", ["svd", "gram"])
def test_low_rank_shared_basis_is_sized_by_the_task_vectors_rank(generator, monkeypatch, route):
    monkeypatch.setattr(doge_module, "GRAM_MIN_ELEMENTS", 0 if route == "gram" else 1 << 40)
    tv = low_rank_family(generator)
    basis = DogeSolver().shared_basis(tv).double()
    assert basis.shape == (64, 1)
    expected = doge_projector(list(tv.double()), 6)
    torch.testing.assert_close(basis @ basis.T, expected, rtol=0, atol=1e-5)
    for task in tv.double():  # U_k is no longer every task's whole column space
        assert (basis.T @ task).norm() ** 2 < 0.5 * task.norm() ** 2


def test_full_rank_shared_basis_keeps_the_min_out_in_sizes(generator):
    tv = full_rank_task_vectors(generator, 4, 48, 80, dtype=torch.float32)
    assert DogeSolver().shared_basis(tv).shape == (48, 48 // 6)


def test_low_rank_experts_keep_their_task_content(generator):
    # Issue 23: with U_k spanning every task's column space the projected descent stalled and
    # Adam moved delta outside it, 0.08-0.10 of each task kept at this size; now about 0.42.
    tv = low_rank_family(generator, shape=(192, 256))
    merged = DogeSolver().solve(tv).double()
    for task in tv.double():
        assert (merged * task).sum() / task.pow(2).sum() > 0.3


def test_rank_deficient_merge_agrees_across_routes_dtypes_and_the_reference(generator, monkeypatch):
    # Before the rank cut, the directions past each task's rank came from rounding and the
    # merges differed by O(1) between routes and dtypes (issue 14: 46% against float64).
    tv = low_rank_family(generator)
    expected = doge(tv.double(), [0.3] * 4, steps=100)
    results = {}
    for route in ("svd", "gram"):
        monkeypatch.setattr(doge_module, "GRAM_MIN_ELEMENTS", 0 if route == "gram" else 1 << 40)
        for dtype in (torch.float32, torch.float64):
            results[route, dtype] = DogeSolver(DogeConfig(steps=100)).solve(tv.to(dtype)).double()
    for key, result in results.items():
        tolerance = 1e-10 if key[1] == torch.float64 else 1e-5
        assert (result - expected).norm() < tolerance * expected.norm(), key


def test_gram_route_without_the_in_place_eigh_gives_the_same_basis(generator, gram_route, monkeypatch):
    # A torch that refused eigh's aliased out= would take the out-of-place call.
    matrix, _ = matrix_with_spectrum(generator, 30, 50, [9.0, 7.0, 5.0, 3.0, 1.0])
    in_place = top_left_singular_vectors(matrix, 3)
    eigh = torch.linalg.eigh

    def refusing(tensor, *args, out=None, **kwargs):
        if out is not None:
            raise RuntimeError("some elements of the input tensor and the written-to tensor refer to a single memory location")
        return eigh(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", refusing)
    out_of_place = top_left_singular_vectors(matrix, 3)
    torch.testing.assert_close(out_of_place @ out_of_place.T, in_place @ in_place.T, rtol=0, atol=1e-12)


def test_gram_route_on_a_384x1024_float32_merge_is_within_float32_rounding(generator, gram_route):
    # Structured task vectors (a rank-16 part above full-rank noise) put the cut at
    # k = 128 inside a dense spectrum, where float32 rounding moves the result whichever
    # route: here 1.1e-4 for gesdd, 4.0e-4 for this route, 1.9e-3 for its Gram step
    # alone (without the Rayleigh-Ritz step), which this bound rejects.
    tv = full_rank_task_vectors(generator, 3, 384, 1024)
    tv += low_rank_task_vectors(generator, 3, 384, 1024, rank=16, scale=4e-3)
    expected = doge(tv, [0.3] * 3)
    ours = DogeSolver().solve(tv.float()).double()
    assert (ours - expected).norm() < 1.5e-3 * expected.norm()


def test_the_route_changes_at_one_million_elements(monkeypatch):
    calls = []
    svd = torch.linalg.svd

    def recording(matrix, *args, **kwargs):
        calls.append(tuple(matrix.shape))
        return svd(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", recording)
    top_left_singular_vectors(torch.randn(1023, 1024), 8)  # under 2^20 elements: gesdd
    top_left_singular_vectors(torch.randn(1024, 1024), 8)  # 2^20: Gram, then eigh of B B^T
    assert calls == [(1023, 1024)]


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kth_smallest_bits_equals_kthvalue(generator, dtype):
    task = torch.randn(37, 11, generator=generator, dtype=dtype)
    task[0, :5] = 0.0
    task[1, :3] = -0.0
    task[2, :4] = 0.5
    task[3, :4] = -0.5  # ties across signs
    task[4, 0] = torch.finfo(dtype).tiny / 4  # a subnormal
    magnitude = task.abs()
    bits = magnitude.view(torch.int64 if dtype == torch.float64 else torch.int32)
    for kth in [1, 2, 5, 9, 10, 200, magnitude.numel() - 1, magnitude.numel()]:
        expected = torch.kthvalue(magnitude.flatten(), kth).values
        found = torch.tensor(kth_smallest_bits(bits, kth), dtype=bits.dtype).view(dtype)
        assert found == expected, kth


def test_trim_mask_with_ties_keeps_every_entry_at_the_threshold():
    task = torch.tensor([[0.1, -0.3, 0.3, 0.2], [0.3, -0.05, 0.0, 0.3]])
    # d = 8, density 0.5: kth = 4, the 4th smallest |t| is 0.2; four entries tie at 0.3.
    assert trim_mask(task, 0.5).tolist() == [[False, True, True, True], [True, False, False, True]]


@pytest.mark.parametrize("bad", [{"density": 0.0}, {"density": 1.5}, {"eta": -1.0}, {"subspace": 0}, {"lr": -1e-4}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        DogeConfig(**bad)
