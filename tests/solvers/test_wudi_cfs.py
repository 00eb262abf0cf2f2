"""WudiCfsSolver against Eq. 20 written literally, and against its own objective."""

import pytest
import torch
from reference import wudi_closed_form, wudi_ridge, wudi_ridge_loss
from tensors import full_rank_task_vectors, low_rank_task_vectors

from mergekit_wudi.solvers import WudiCfsConfig, WudiCfsSolver

SHAPES = [(24, 12), (16, 16), (10, 40)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [1, 2, 5])
@pytest.mark.parametrize("omega", [0.0, 0.1, 2.0])
@pytest.mark.parametrize("factory", [low_rank_task_vectors, full_rank_task_vectors])
def test_matches_literal_closed_form(generator, device, shape, count, omega, factory):
    tv = factory(generator, count, *shape)
    ours = WudiCfsSolver(WudiCfsConfig(omega=omega)).solve(tv.to(device)).cpu()
    expected = wudi_closed_form(tv, omega)
    assert (expected - tv.sum(0)).norm() > 1e-3 * expected.norm() or count == 1
    torch.testing.assert_close(ours, expected, rtol=1e-8, atol=1e-14 * expected.abs().max().item() + 1e-18)


@pytest.mark.parametrize("omega", [0.05, 1.0])
def test_is_a_stationary_point_of_the_ridge_objective(generator, omega):
    tv = low_rank_task_vectors(generator, 3, 18, 14)
    solved = WudiCfsSolver(WudiCfsConfig(omega=omega)).solve(tv).requires_grad_(True)
    (gradient,) = torch.autograd.grad(wudi_ridge_loss(solved, list(tv), wudi_ridge(tv, omega)), solved)
    start = tv.sum(0).requires_grad_(True)
    (gradient_at_sum,) = torch.autograd.grad(wudi_ridge_loss(start, list(tv), wudi_ridge(tv, omega)), start)
    assert gradient.norm() < 1e-10 * gradient_at_sum.norm()


def test_omega_zero_is_the_minimum_norm_minimiser(generator):
    # Rank-deficient: 2 tasks of rank 3 in a 20-dim input space; many minimisers.
    tv = low_rank_task_vectors(generator, 2, 8, 20)
    solved = WudiCfsSolver(WudiCfsConfig(omega=0.0)).solve(tv)
    torch.testing.assert_close(solved, wudi_closed_form(tv, 0.0), rtol=1e-8, atol=1e-16)
    span = torch.linalg.svd(torch.cat(list(tv)), full_matrices=False).Vh[:6]  # row space
    torch.testing.assert_close(solved @ span.T @ span, solved, rtol=1e-8, atol=1e-16)


def test_scale_equivariant(generator):
    tv = low_rank_task_vectors(generator, 3, 12, 12)
    solver = WudiCfsSolver()
    torch.testing.assert_close(solver.solve(tv * 1e-4), solver.solve(tv) * 1e-4, rtol=1e-9, atol=0)


def test_float32_input_is_solved_in_float32(generator):
    tv = low_rank_task_vectors(generator, 3, 16, 16)
    ours = WudiCfsSolver().solve(tv.float())
    assert ours.dtype == torch.float32
    expected = wudi_closed_form(tv, 0.1)
    assert ((ours.double() - expected).norm() / expected.norm()) < 1e-4


def test_zero_task_vectors_are_skipped(generator):
    tv = low_rank_task_vectors(generator, 2, 10, 10)
    padded = torch.cat([torch.zeros(1, 10, 10, dtype=tv.dtype), tv])
    torch.testing.assert_close(WudiCfsSolver().solve(padded), WudiCfsSolver().solve(tv), rtol=0, atol=0)


def test_negative_omega_is_rejected():
    with pytest.raises(ValueError, match="omega"):
        WudiCfsConfig(omega=-0.1)


@pytest.mark.parametrize("shape", [(16, 12), (10, 40)])
def test_cholesky_failure_falls_back_to_the_eigendecomposition(generator, monkeypatch, shape):
    # The factorisation runs in place in M; a failed one (info > 0) leaves M half
    # overwritten, so the fallback must rebuild M before its eigendecomposition.
    tv = full_rank_task_vectors(generator, 3, *shape)
    factorise = torch.linalg.cholesky_ex

    def failing(matrix, *args, **kwargs):
        factor, info = factorise(matrix, *args, **kwargs)
        factor.fill_(float("nan"))
        info.fill_(1)
        return factor, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    ours = WudiCfsSolver(WudiCfsConfig(omega=0.1)).solve(tv)
    expected = wudi_closed_form(tv, 0.1)
    torch.testing.assert_close(ours, expected, rtol=1e-8, atol=1e-14 * expected.abs().max().item())


def test_the_stacked_output_space_is_taken_where_it_is_cheaper():
    from mergekit_wudi.solvers.wudi_cfs import output_space, solve_cost

    assert output_space(4, 2048, 8192)  # Llama-3.2-1B down_proj, base + 4: 0.70x the multiply-adds
    assert output_space(2, 4096, 14336) and output_space(4, 4096, 14336)  # Llama-3.1-8B down_proj
    assert not output_space(4, 2048, 2048) and not output_space(4, 8192, 2048)  # square, up_proj
    assert not output_space(8, 2048, 8192)  # n out = 2 in
    in_space, out_space = solve_cost(2, 10, 40)
    assert out_space < in_space


@pytest.mark.parametrize("omega", [0.0, 0.1])
@pytest.mark.parametrize("count", [2, 3])
def test_both_spaces_give_the_same_solution(generator, monkeypatch, omega, count):
    # The push-through identity T (T^T T + r A I)^-1 = (T T^T + r A I)^-1 T, and its pseudo-inverse form.
    from mergekit_wudi.solvers import wudi_cfs

    tv = low_rank_task_vectors(generator, count, 10, 40)
    assert wudi_cfs.output_space(count, 10, 40)
    stacked = WudiCfsSolver(WudiCfsConfig(omega=omega)).solve(tv)
    monkeypatch.setattr(wudi_cfs, "output_space", lambda *shape: False)
    in_space = WudiCfsSolver(WudiCfsConfig(omega=omega)).solve(tv)
    torch.testing.assert_close(stacked, in_space, rtol=1e-9, atol=1e-12 * in_space.abs().max().item())
    torch.testing.assert_close(stacked, wudi_closed_form(tv, omega), rtol=1e-8, atol=1e-12 * in_space.abs().max().item())
