"""_spectral.py: the cutoff, the polar factor and SpectralSolver's common solve."""

import pytest
import torch
from tensors import full_rank_task_vectors

from mergekit_wudi.solvers import IsoCSolver, IsoCtsSolver, TsvSolver
from mergekit_wudi.solvers._spectral import cutoff, polar

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
    torch.testing.assert_close(polar(matrix), expected, rtol=0, atol=1e-15)
    assert cutoff(matrix, 3.0) == 3 * torch.finfo(torch.float64).eps * 3.0
