"""solvers/numerics.py: task-vector preparation, chunks, and the Gram terms C and D."""

import pytest
import torch

from mergekit_wudi.solvers import compute_dtype, numerics
from mergekit_wudi.solvers.numerics import (
    SymmetricSpectrum,
    cholesky_,
    gram_terms,
    permute_rows_,
    prepare_task_vectors,
    rank_cutoff,
    row_blocks,
    row_chunks,
    symmetric_eigh,
    symmetric_product_,
)


@pytest.mark.parametrize("shape", [(3, 7, 5), (3, 5, 7), (1, 6, 6)], ids=["tall", "wide", "square"])
@pytest.mark.parametrize("ridge", [0.0, 0.3])
def test_gram_terms_match_their_definition(generator, shape, ridge):
    vectors = torch.randn(*shape, generator=generator, dtype=torch.float64)
    weights = [0.5 + index for index in range(shape[0])]
    gram, d_term = gram_terms(vectors, weights, ridge=ridge)
    # C = sum_i w_i t_i^T t_i;  D = sum_i w_i t_i (t_i^T t_i + r I)
    expected_gram = sum(w * t.T @ t for w, t in zip(weights, vectors))
    expected_d = sum(w * t @ (t.T @ t + ridge * torch.eye(shape[2], dtype=torch.float64)) for w, t in zip(weights, vectors))
    torch.testing.assert_close(gram, expected_gram, rtol=1e-12, atol=0)
    torch.testing.assert_close(d_term, expected_d, rtol=1e-12, atol=0)
    only_gram, none = gram_terms(vectors, weights, with_d=False)
    assert none is None and torch.equal(only_gram, gram)


@pytest.mark.parametrize("shape", [(3, 70, 50), (3, 50, 70)], ids=["tall", "wide"])
def test_gram_terms_by_panels_match_their_definition(generator, monkeypatch, shape):
    # From PANEL_MIN_ELEMENTS the symmetric products are computed on and above the diagonal, then mirrored.
    monkeypatch.setattr(numerics, "PANEL_MIN_ELEMENTS", 1000)
    vectors = torch.randn(*shape, generator=generator, dtype=torch.float64)
    weights = [0.5 + index for index in range(shape[0])]
    gram, d_term = gram_terms(vectors, weights, ridge=0.3)
    expected_gram = sum(w * t.T @ t for w, t in zip(weights, vectors))
    expected_d = sum(w * t @ (t.T @ t + 0.3 * torch.eye(shape[2], dtype=torch.float64)) for w, t in zip(weights, vectors))
    torch.testing.assert_close(gram, expected_gram, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d_term, expected_d, rtol=1e-12, atol=1e-12)


def test_symmetric_product_writes_the_upper_triangle_and_mirrors_it(generator, monkeypatch):
    monkeypatch.setattr(numerics, "PANEL_MIN_ELEMENTS", 1000)
    rows = torch.randn(40, 48, generator=generator, dtype=torch.float64)
    expected = 0.5 * rows.T @ rows
    assert len(numerics.panels(48, rows.numel())) == numerics.PANELS
    target = torch.full((48, 48), float("nan"), dtype=torch.float64)
    torch.testing.assert_close(symmetric_product_(target, rows, alpha=0.5), expected, rtol=1e-12, atol=1e-12)
    half = torch.full((48, 48), float("nan"), dtype=torch.float64)
    symmetric_product_(half, rows, alpha=0.5, mirror=False)
    upper = torch.ones(48, 48, dtype=torch.bool).triu()
    torch.testing.assert_close(half[upper], expected[upper], rtol=1e-12, atol=1e-12)
    assert half.isnan().any()  # below the diagonal blocks: never written
    symmetric_product_(target, rows, accumulate=True)  # + 1.0 A^T A
    torch.testing.assert_close(target, 3 * expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [50, 130])
def test_cholesky_reads_the_upper_triangle_and_reports_the_failing_minor(generator, monkeypatch, size):
    # Below CHOLESKY_BLOCKED_SIZE LAPACK; from it (here 64) by blocks of CHOLESKY_BLOCK (here 16).
    monkeypatch.setattr(numerics, "CHOLESKY_BLOCKED_SIZE", 64)
    monkeypatch.setattr(numerics, "CHOLESKY_BLOCK", 16)
    rows = torch.randn(size + 5, size, generator=generator, dtype=torch.float64)
    matrix = rows.T @ rows
    work = torch.where(torch.ones(size, size, dtype=torch.bool).triu(), matrix, float("nan"))
    factor, info = cholesky_(work)
    assert info == 0
    torch.testing.assert_close(factor.tril(), torch.linalg.cholesky(matrix), rtol=1e-10, atol=1e-10)
    broken = matrix.clone()
    broken[37, 37] = -1.0  # the 38th leading minor is the first not positive definite
    assert cholesky_(broken)[1] == 38


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["lapack", "torch"])
@pytest.mark.parametrize("count", [0, 1, 7, 40])
def test_symmetric_spectrum_gives_every_value_then_the_top_pairs(generator, dtype, count):
    rows = torch.randn(50, 40, generator=generator, dtype=torch.float64)
    rows[:, :5] *= 30  # a spread spectrum; the matrix is overwritten, so a copy goes in
    matrix = rows.T @ rows
    expected = torch.linalg.eigvalsh(matrix)
    spectrum = SymmetricSpectrum(matrix.clone().to(dtype))
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(spectrum.values.double(), expected, rtol=tolerance, atol=tolerance * expected[-1].item())
    values, vectors = spectrum.top(count)
    assert values.shape == (count,) and vectors.shape == (40, count)
    torch.testing.assert_close(values.double().sort().values, expected[40 - count :], rtol=tolerance, atol=tolerance * expected[-1].item())
    vectors = vectors.double()
    torch.testing.assert_close(matrix @ vectors, vectors * values.double(), rtol=0, atol=10 * tolerance * expected[-1].item())
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(count, dtype=torch.float64), rtol=0, atol=10 * tolerance)


def test_prepare_drops_zero_and_non_finite_task_vectors(generator):
    vectors = torch.randn(4, 3, 2, generator=generator, dtype=torch.float16)
    vectors[1] = 0
    vectors[3, 0, 0] = float("nan")
    prepared = prepare_task_vectors(vectors)
    assert prepared.indices == (0, 2) and prepared.count == 2
    assert prepared.vectors.dtype == torch.float32 == compute_dtype(torch.float16)
    assert prepared.sq_norms == pytest.approx([float(vectors[i].float().square().sum()) for i in (0, 2)])
    assert compute_dtype(torch.float64) == torch.float64


@pytest.mark.parametrize("rows, cols, elements", [(10, 3, 7), (5, 100, 10), (1, 1, 1)])
def test_row_chunks_cover_every_row_once(rows, cols, elements):
    chunks = list(row_chunks(rows, cols, elements))
    assert [i for chunk in chunks for i in range(rows)[chunk]] == list(range(rows))
    assert all((chunk.stop - chunk.start) * cols <= elements or chunk.stop - chunk.start == 1 for chunk in chunks)


@pytest.mark.parametrize(
    "dtype, in_place, lean",
    [(torch.float64, False, True), (torch.float64, True, True), (torch.float64, True, False), (torch.float32, True, False),
     (torch.float32, False, False)],
    ids=["dsyevr", "dsyev", "torch-in-place-64", "torch-in-place-32", "torch"],
)
def test_symmetric_eigh_returns_the_largest_pairs(generator, dtype, in_place, lean):
    # A symmetric matrix with eigenvalues 1..6: the top 2 are 5 and 6 (ascending), on every route.
    basis, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))
    values = torch.arange(1.0, 7.0, dtype=torch.float64)
    matrix = (basis @ torch.diag(values) @ basis.T).to(dtype)
    values_out, vectors = symmetric_eigh(matrix, top=2, in_place=in_place, lean=lean)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(values_out.double(), values[4:], rtol=0, atol=tolerance)
    torch.testing.assert_close((vectors.double().T @ basis[:, 4:]).abs(), torch.eye(2, dtype=torch.float64), rtol=0, atol=tolerance)


def test_rank_cutoff_and_row_blocks():
    assert rank_cutoff(7, torch.float32, 2.0) == 7 * torch.finfo(torch.float32).eps * 2.0
    assert [(b.start, b.stop) for b in row_blocks(10, 4)] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert [(b.start, b.stop) for b in row_blocks(3)] == [(0, 1), (1, 2), (2, 3)]


@pytest.mark.parametrize("order", [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [1, 2, 3, 4, 0], [2, 0, 1, 4, 3], [0, 2, 4, 1, 3]])
def test_permute_rows_in_place_is_fancy_indexing(order):
    stack = torch.arange(5 * 6, dtype=torch.float32).reshape(5, 2, 3)
    expected = stack[order]
    assert permute_rows_(stack, order) is stack
    assert torch.equal(stack, expected)


def test_permute_rows_refuses_what_is_not_a_permutation():
    with pytest.raises(ValueError, match="not a permutation of 3 rows"):
        permute_rows_(torch.zeros(3, 2, 2), [0, 0, 1])
