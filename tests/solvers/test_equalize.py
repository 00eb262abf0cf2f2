"""equalize: the norm equalization before a solve (solvers/equalize.py, Solver.solve) against
values computed by hand, through every solver."""

import math

import pytest
import torch
from reference import equalized as by_hand
from tensors import full_rank_task_vectors

from mergekit_wudi.solvers import SOLVERS, WudiCfsSolver
from mergekit_wudi.solvers.equalize import equalized
from mergekit_wudi.solvers.numerics import prepare_task_vectors


def test_two_norms_become_their_root_mean_square():
    # norms 1 and 3: both become sqrt((1 + 9) / 2) = sqrt(5), each keeping its direction; a third,
    # share 0, is left as it is.
    vectors = torch.zeros(3, 2, 2, dtype=torch.float64)
    vectors[0, 0, 0] = 1.0
    vectors[1, 1, 1] = -3.0
    vectors[2, 0, 1] = 7.0
    result, factors = equalized(prepare_task_vectors(vectors), [1.0, 1.0, 0.0], overwrite=False)
    assert factors == pytest.approx([math.sqrt(5), math.sqrt(5) / 3, 1.0], rel=1e-15)
    assert result.vectors[0, 0, 0] == pytest.approx(math.sqrt(5), rel=1e-15)
    assert result.vectors[1, 1, 1] == pytest.approx(-math.sqrt(5), rel=1e-15)
    assert torch.equal(result.vectors[2], vectors[2])
    assert result.sq_norms == pytest.approx([5.0, 5.0, 49.0], rel=1e-14)
    assert vectors[0, 0, 0] == 1.0  # not in place


def test_weights_keep_their_ratio():
    # t_0 = 2 u_0 with ||u_0|| = 1, t_1 = u_1 with ||u_1|| = 3: R = sqrt(5) from the own norms, and
    # the weights stay: ||t_0|| = 2 sqrt(5), ||t_1|| = sqrt(5).
    vectors = torch.zeros(2, 1, 2, dtype=torch.float64)
    vectors[0, 0, 0] = 2.0
    vectors[1, 0, 1] = 3.0
    result, _ = equalized(prepare_task_vectors(vectors), [2.0, 1.0], overwrite=False)
    assert [math.sqrt(s) for s in result.sq_norms] == pytest.approx([2 * math.sqrt(5), math.sqrt(5)], rel=1e-15)


def test_one_vector_alone_and_none_are_unchanged(generator):
    tv = full_rank_task_vectors(generator, 3, 5, 7, dtype=torch.float64)
    alone, factors = equalized(prepare_task_vectors(tv), [0.0, 1.0, 0.0], overwrite=False)
    assert factors[1] == pytest.approx(1.0, rel=1e-15) and torch.allclose(alone.vectors, tv, rtol=1e-15, atol=0)
    prepared = prepare_task_vectors(tv)
    none, factors = equalized(prepared, [0.0] * 3, overwrite=False)
    assert none is prepared and factors == (1.0,) * 3


def test_in_place_writes_into_the_given_stack(generator):
    tv = full_rank_task_vectors(generator, 3, 6, 4)
    expected = by_hand(tv, [0, 2])
    prepared = prepare_task_vectors(tv.clone())
    result, _ = equalized(prepared, [1.0, 0.0, 1.0], overwrite=True)
    assert result.vectors.data_ptr() == prepared.vectors.data_ptr()
    torch.testing.assert_close(result.vectors, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("solver_cls", SOLVERS, ids=lambda cls: cls.name)
def test_every_solver_equalizes_before_its_solve(generator, solver_cls):
    # Solver(equalize=shares) is the solver run on the task vectors equalized by hand; the zero
    # vector takes no part (factor 1, not in the mean); the input stack is left alone.
    tv = full_rank_task_vectors(generator, 4, 10, 8, dtype=torch.float64)
    tv[1] *= 4.0
    tv[3] = 0.0
    given = tv.clone()
    solver = solver_cls(equalize=[1.0, 1.0, 0.0, 1.0])
    merged = solver.solve(tv)
    torch.testing.assert_close(merged, solver_cls().solve(by_hand(tv, [0, 1])), rtol=1e-12, atol=1e-14)
    assert torch.equal(tv, given)
    norms = [float(t.norm()) for t in tv[:2]]
    target = math.sqrt((norms[0] ** 2 + norms[1] ** 2) / 2)
    assert solver.last_equalization == pytest.approx([target / norms[0], target / norms[1], 1.0, 1.0], rel=1e-12)
    plain = solver_cls()
    plain.solve(tv)
    assert plain.last_equalization is None
    solver.solve(torch.zeros_like(tv))  # nothing usable: no factors left from the solve before
    assert solver.last_equalization is None


def test_bad_shares_are_refused(generator):
    tv = full_rank_task_vectors(generator, 2, 4, 4)
    with pytest.raises(ValueError, match=r"equalize: 3 values for 2 task vectors"):
        WudiCfsSolver(equalize=[1.0, 1.0, 1.0]).solve(tv)
    with pytest.raises(ValueError, match=r"equalize must be a finite number >= 0, got -1.0"):
        WudiCfsSolver(equalize=[1.0, -1.0]).solve(tv)
