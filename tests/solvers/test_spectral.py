"""_spectral.py: the cutoff, the singular triplets and the polar factor."""

import pytest
import torch
from tensors import full_rank_task_vectors

from mergekit_wudi.solvers import IsoCSolver, IsoCtsSolver, TsvSolver
from mergekit_wudi.solvers._spectral import (
    cutoff,
    polar_,
    top_singular_triplets,
    top_singular_triplets_and_complement,
)

SOLVERS = [TsvSolver(), IsoCSolver(), IsoCtsSolver()]
IDS = ["tsv", "iso_c", "iso_cts"]


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_a_per_model_keyword_is_a_type_error(generator, solver):
    # None of the three has a per-model parameter: a keyword (doge's density) is a mistake.
    tv = full_rank_task_vectors(generator, 2, 8, 6).float()
    with pytest.raises(TypeError, match="has no per-model parameter 'density'"):
        solver.solve(tv, density=[0.5, 0.5])
    assert solver.solve(tv).shape == (8, 6)


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_no_usable_task_vector_gives_zero_in_the_compute_dtype(solver):
    tv = torch.zeros(2, 5, 4, dtype=torch.bfloat16)
    tv[1, 0, 0] = float("nan")
    merged = solver.solve(tv)
    assert merged.dtype == torch.float32 and torch.equal(merged, torch.zeros(5, 4))


def test_polar_of_a_rank_deficient_matrix_is_the_factor_on_its_range():
    # [[3, 0], [0, 0], [0, 0]]: polar factor on the range = e1 e1^T (a 3x2 partial isometry).
    matrix = torch.zeros(3, 2, dtype=torch.float64)
    matrix[0, 0] = 3.0
    expected = torch.zeros(3, 2, dtype=torch.float64)
    expected[0, 0] = 1.0
    values = polar_(matrix, 0)
    torch.testing.assert_close(matrix, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(values, torch.tensor([3.0], dtype=torch.float64), rtol=0, atol=0)
    assert cutoff(matrix, 3.0) == 3 * torch.finfo(torch.float64).eps * 3.0


# --- the float32 route: Gram matrices in float64 (_spectral's module docstring) ---------

SHAPES = [(96, 64), (64, 64), (48, 80)]  # out > in, square, out < in


def with_spectrum(generator, out_features, in_features, decades):
    """A float64 (out, in) matrix whose singular values fall evenly over `decades` decades
    from 1, so its condition number is 10**decades."""
    rank = min(out_features, in_features)
    left, _ = torch.linalg.qr(torch.randn(out_features, rank, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(in_features, rank, generator=generator, dtype=torch.float64))
    return left @ torch.diag(torch.logspace(0, -decades, rank, dtype=torch.float64)) @ right.T


def polar64(matrix):
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_singular_triplets_are_as_accurate_as_float32_gesdd(generator, shape):
    # Condition number 10^3.5 (every value far above the cutoff, 96 * 1.2e-7): the
    # float64 Gram route finds the singular values to float64 rounding of the float32
    # input, where float32 gesdd (torch.linalg.svd) is off by ~1e-7 of the largest.
    matrix = with_spectrum(generator, *shape, decades=3.5).float()
    exact = torch.linalg.svdvals(matrix.double())
    u, s, vh = top_singular_triplets(matrix, 10**6)
    assert s.shape == exact.shape and u.shape == (shape[0], s.shape[0]) and vh.shape == (s.shape[0], shape[1])
    order = s.argsort(descending=True)
    ours = (s[order].double() - exact).abs().max() / exact[0]
    gesdd = (torch.linalg.svdvals(matrix).double() - exact).abs().max() / exact[0]
    assert ours <= max(gesdd, 1e-7)  # measured ~3e-8 (float32 storage of s) against ~2e-7
    # The triplets rebuild the matrix, and U, V have orthonormal columns, to float32 rounding
    # amplified by the condition number at most, as gesdd's.
    torch.testing.assert_close((u * s) @ vh, matrix, rtol=0, atol=1e-6 * float(exact[0]))
    for basis in (u, vh.T):
        torch.testing.assert_close(basis.T.double() @ basis.double(), torch.eye(s.shape[0], dtype=torch.float64), rtol=0, atol=1e-3)


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_top_triplets_keep_the_largest_and_drop_below_the_cutoff(generator, shape):
    # Rank 5 (a LoRA-like delta): of the 8 asked for, the 5 above the cutoff.
    low = torch.randn(shape[0], 5, generator=generator, dtype=torch.float64) @ torch.randn(
        5, shape[1], generator=generator, dtype=torch.float64
    )
    u, s, vh = top_singular_triplets(low.float(), 8)
    exact = torch.linalg.svdvals(low)
    assert s.shape == (5,)
    torch.testing.assert_close(s.sort(descending=True).values.double(), exact[:5], rtol=1e-6, atol=0)
    torch.testing.assert_close(((u * s) @ vh).double(), low, rtol=0, atol=1e-5 * float(exact[0]))
    # A scale set by the caller: everything at or below shape * eps32 * scale is dropped.
    eps = torch.finfo(torch.float32).eps
    assert top_singular_triplets(low.float(), 8, scale=1.01 * float(exact[2]) / (max(shape) * eps))[1].shape == (2,)
    assert top_singular_triplets(low.float(), 8, scale=0.99 * float(exact[2]) / (max(shape) * eps))[1].shape == (3,)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spare", [0, 10**9], ids=["dsyev", "dsyevr"])
def test_float32_polar_factor_is_as_accurate_as_float32_gesdd(generator, shape, spare):
    # Condition number 10^3: the polar factor moves by ~eps * kappa under float32 rounding.
    matrix64 = with_spectrum(generator, *shape, decades=3.0)
    matrix = matrix64.float()
    expected = polar64(matrix.double())  # of the float32 input itself
    gesdd = float((polar64(matrix).double() - expected).norm())  # float32 gesdd's error
    values = polar_(matrix, spare)
    # Products and whitening in float64, rounded to float32 once: measured 0.002-0.005x gesdd's.
    assert float((matrix.double() - expected).norm()) <= 0.1 * gesdd
    torch.testing.assert_close(values.sort(descending=True).values.double(), torch.linalg.svdvals(matrix64), rtol=1e-5, atol=0)


def test_float32_polar_factor_of_a_rank_deficient_matrix_is_on_its_range(generator):
    # Rank 3 in float32: no rounding-chosen direction comes in (the factor has rank 3).
    low = torch.randn(40, 3, generator=generator) @ torch.randn(3, 30, generator=generator)
    matrix = low.clone()
    assert polar_(matrix, 10**9).shape == (3,)
    # In float64 the float32 input has full rank (its rounding, ~1e-7): the factor on the
    # top 3 directions is what the float32 cutoff keeps.
    u, _, vh = torch.linalg.svd(low.double(), full_matrices=False)
    torch.testing.assert_close(matrix.double(), u[:, :3] @ vh[:3], rtol=0, atol=1e-5)
    assert torch.linalg.matrix_rank(matrix.double(), atol=1e-3).item() == 3


@pytest.mark.parametrize("shape", SHAPES)
def test_the_two_eigensolvers_agree(generator, shape):
    matrix = with_spectrum(generator, *shape, decades=2.0).float()
    in_place, separate = matrix.clone(), matrix.clone()
    polar_(in_place, 0)
    polar_(separate, 10**9)
    torch.testing.assert_close(in_place, separate, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rank", [48, 5])  # full rank; LoRA-like (the rest of the top 30 is below the cutoff)
def test_the_complement_spans_what_the_top_directions_leave(generator, dtype, rank):
    low = torch.randn(48, rank, generator=generator, dtype=torch.float64) @ torch.randn(
        rank, 80, generator=generator, dtype=torch.float64
    )
    matrix = low.to(dtype)
    u, s, vh, complement = top_singular_triplets_and_complement(matrix, 30)
    kept = min(rank, 30)
    assert u.shape == (48, kept) and s.shape == (kept,) and vh.shape == (kept, 80) and complement.shape == (48, 48 - kept)
    basis = torch.cat([u, complement], dim=1).double()  # [U Q]: an orthonormal basis of R^48
    torch.testing.assert_close(basis.T @ basis, torch.eye(48, dtype=torch.float64), rtol=0, atol=1e-5)
    exact = torch.linalg.svdvals(low)[:kept]
    torch.testing.assert_close(s.double().sort(descending=True).values, exact, rtol=1e-6, atol=0)
    # The projection on the complement is the residual the top directions leave.
    other = torch.randn(48, 7, generator=generator, dtype=torch.float64)
    projector = torch.eye(48, dtype=torch.float64) - u.double() @ u.double().T
    torch.testing.assert_close(complement.double() @ (complement.double().T @ other), projector @ other, rtol=0, atol=1e-5)


def test_the_complement_needs_out_at_most_in(generator):
    with pytest.raises(ValueError, match="needs out <= in, got a 6x4 matrix"):
        top_singular_triplets_and_complement(torch.randn(6, 4, generator=generator), 2)
