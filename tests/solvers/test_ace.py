"""AceSolver against a float64 transcription of the official ace_merging (tests/reference_ace.py)."""

import pytest
import torch
from reference_ace import ace_heterogeneity, ace_reference
from tensors import full_rank_task_vectors, low_rank_task_vectors, solve_at_one_and_two_threads

from mergekit_wudi.solvers import AceConfig, AceSolver

SHAPES = [(48, 32), (32, 48), (40, 40)]  # out > in, out < in, square
OPTIONS = [{}, {"prior": "mean"}, {"centre_update": False}, {"residual_ridge": False}, {"eps": 0.1, "k_frac": 0.5}]


def relative_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return float((ours.double() - expected).norm() / expected.norm())


def spread(generator, shape, weights=(1.0, 0.25, 4.0), std=0.01):
    """Task vectors of spread scales: the code's heterogeneity switch is on (checked)."""
    tv = torch.stack([w * full_rank_task_vectors(generator, 1, *shape, scale=std)[0] for w in weights])
    assert ace_heterogeneity(list(tv))[1]
    return tv


def equal(generator, shape, std=0.05):
    tv = full_rank_task_vectors(generator, 3, *shape, scale=std)
    assert not ace_heterogeneity(list(tv))[1]
    return tv


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
@pytest.mark.parametrize("make", [spread, equal], ids=["refined", "closed-form"])
def test_matches_the_official_code(generator, device, shape, options, make):
    tv = make(generator, shape)
    expected = ace_reference(list(tv), **options)
    ours = AceSolver(AceConfig(**options)).solve(tv.to(device)).cpu()
    assert ours.dtype == torch.float64
    assert relative_error(ours, expected) < 1e-10
    assert relative_error(tv.sum(0), expected) > 0.05  # not task arithmetic
    ours32 = AceSolver(AceConfig(**options)).solve(tv.float().to(device)).cpu()
    assert ours32.dtype == torch.float32 and relative_error(ours32, expected) < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("options", [{}, {"centre_update": False}], ids=["defaults", "centre_update=False"])
def test_matches_the_official_code_with_panelled_grams_and_blocked_cholesky(generator, monkeypatch, shape, options):
    # At real sizes the Grams are computed on and above the diagonal in panels and the
    # covariance is factored by blocks (numerics); here both thresholds are lowered.
    from mergekit_wudi.solvers import numerics

    monkeypatch.setattr(numerics, "PANEL_MIN_ELEMENTS", 64)
    monkeypatch.setattr(numerics, "CHOLESKY_BLOCKED_SIZE", 16)
    monkeypatch.setattr(numerics, "CHOLESKY_BLOCK", 8)
    tv = spread(generator, shape)
    expected = ace_reference(list(tv), **options)
    assert relative_error(AceSolver(AceConfig(**options)).solve(tv), expected) < 1e-10


def test_the_corrections_change_the_result(generator):
    tv = spread(generator, (48, 32))
    default = AceSolver().solve(tv)
    for options in OPTIONS[1:4]:
        assert relative_error(AceSolver(AceConfig(**options)).solve(tv), default) > 1e-3, options


def test_refinement_adds_a_flat_rank_k_term(generator):
    # t_m - W_0 = mean(s_k) U_k V_k^T: k equal singular values, k = floor(32 * 0.3) = 9.
    tv = spread(generator, (48, 32))
    closed = ace_reference(list(tv), k_frac=0.0, deviations=True)  # W_0
    values = torch.linalg.svdvals(AceSolver().solve(tv) - closed)
    assert torch.allclose(values[:9], values[:9].mean().expand(9), rtol=1e-10)
    assert float(values[9]) < 1e-10 * float(values[0])


def test_inputs_the_code_fails_on(generator):
    tv = spread(generator, (48, 32))
    zero, constant_rows = torch.zeros(48, 32, dtype=torch.float64), torch.ones(48, 1, dtype=torch.float64) * tv[0, :1]
    # A zero task vector, or one whose rows are all equal (no centred part), would make the
    # code's ridge eps / 1e-12 blow up; here they take no part.
    with_zero = AceSolver().solve(torch.cat([tv, zero[None], constant_rows[None]]))
    torch.testing.assert_close(with_zero, AceSolver().solve(tv), rtol=1e-12, atol=0)
    # Nothing left: zero. One left: the closed form, never refined (the code's var is NaN).
    assert not AceSolver().solve(torch.stack([zero, constant_rows])).any()
    torch.testing.assert_close(AceSolver().solve(tv[:1]), ace_reference(list(tv[:1])), rtol=1e-10, atol=0)
    # k = floor(r k_frac) = 0: no refinement (the code returns NaN).
    tiny = spread(generator, (8, 3), std=0.1)
    torch.testing.assert_close(AceSolver().solve(tiny), ace_reference(list(tiny), k_frac=0.0, deviations=True), rtol=1e-10, atol=0)


@pytest.mark.parametrize("make", [spread, equal], ids=["refined", "closed-form"])
def test_rank_deficient_lora_like_inputs_are_finite(generator, make):
    # Rank-3 task vectors: each covariance is singular, the ridge keeps the solve defined.
    tv = low_rank_task_vectors(generator, 3, 48, 32, scale=0.05) * torch.tensor([1.0, 0.25, 4.0], dtype=torch.float64)[:, None, None]
    ours = AceSolver().solve(tv.float())
    assert bool(torch.isfinite(ours).all())
    assert relative_error(ours, ace_reference(list(tv), deviations=True)) < 1e-4


def test_bf16_input_is_solved_in_float32(generator):
    tv = spread(generator, (48, 32))
    ours = AceSolver().solve(tv.to(torch.bfloat16))
    assert ours.dtype == torch.float32
    assert relative_error(ours, ace_reference(list(tv.to(torch.bfloat16).double()))) < 1e-5


@pytest.mark.parametrize("shape", [(300, 260), (260, 300)], ids=["tall", "wide"])
def test_same_bits_at_one_and_two_threads(generator, shape):
    # over solve_threads's one-thread size; the row prior's addmv_ on both of its paths
    # (an Intel Xeon rounded it differently on 2 threads, an AMD EPYC did not), and the
    # refinement's row blocks of T Sbar (another AMD EPYC rounded the last, 5 rows, differently)
    tv = spread(generator, shape).float()
    first, second = solve_at_one_and_two_threads(AceSolver().solve, tv)
    assert torch.equal(first, second)


@pytest.mark.parametrize(
    "options, message",
    [({"eps": 0}, "eps must be a finite number > 0"), ({"k_frac": 1.5}, "k_frac must be in [0, 1]"),
     ({"prior": "rows"}, "prior must be one of row, mean"), ({"centre_update": "yes"}, "centre_update must be true or false")],
)
def test_bad_values_are_refused(options, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        AceConfig(**options)
