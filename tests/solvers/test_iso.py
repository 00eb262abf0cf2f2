"""IsoCSolver and IsoCtsSolver against Iso-C / Iso-CTS written out in float64 (tests/reference_2025.py)."""

import os

import pytest
import torch
from reference_2025 import iso_c, iso_c_code, iso_cts, iso_cts_code
from tensors import full_rank_task_vectors, low_rank_task_vectors, solve_at_one_and_two_threads

from mergekit_wudi.solvers.iso import IsoCConfig, IsoCSolver, IsoCtsConfig, IsoCtsSolver, iso_cts_sizes

SHAPES = [(24, 12), (16, 16), (10, 40)]  # out > in, square, out < in
FACTORIES = [full_rank_task_vectors, low_rank_task_vectors]


def relative_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return float((ours.double() - expected).norm() / expected.norm())


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(matrix.double())


# --- Iso-C ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [1, 2, 5])
@pytest.mark.parametrize("factory", FACTORIES)
def test_iso_c_matches_the_reference(generator, device, shape, count, factory):
    # low_rank_task_vectors (rank 3 each) make the sum rank-deficient: rank 3N < r.
    tv = factory(generator, count, *shape)
    ours = IsoCSolver().solve(tv.to(device)).cpu()
    expected = iso_c(tv)
    assert ours.dtype == torch.float64
    assert relative_error(tv.sum(0), expected) > 0.05  # plain task arithmetic fails
    assert relative_error(ours, expected) < 1e-10  # float64; Gram vs SVD route


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [1, 2, 5])
def test_iso_c_follows_the_official_code_on_full_rank_sums(generator, shape, count):
    tv = full_rank_task_vectors(generator, count, *shape)
    assert relative_error(IsoCSolver().solve(tv), iso_c_code(tv)) < 1e-12


@pytest.mark.parametrize("factory", FACTORIES)
def test_iso_c_flattens_the_spectrum_of_the_sum(generator, factory):
    tv = factory(generator, 3, 20, 14)
    ours = IsoCSolver().solve(tv)
    total = singular_values(tv.sum(0))
    rank = int((total > 1e-12 * total[0]).sum())
    values = singular_values(ours)
    mean = total[:rank].mean()
    torch.testing.assert_close(values[:rank], mean.expand(rank), rtol=1e-12, atol=0)
    assert float(values[rank:].sum()) < 1e-12 * mean  # rank 9 < 14 for the low-rank sum
    # ...and keeps T's singular vectors: t_m = s_bar * polar(T), T = U S V^T, so t_m V = s_bar U.
    u, _, vh = torch.linalg.svd(tv.sum(0), full_matrices=False)
    torch.testing.assert_close(ours @ vh[:rank].T, mean * u[:, :rank], rtol=0, atol=1e-12 * mean.item())


def test_iso_c_rank_deficient_sum_keeps_its_rank_where_the_code_fills_the_null_space(generator):
    # The deviation of methods-2025.md: on a rank-6 sum the code returns rank r = 12,
    # its extra directions chosen by rounding, with a mean over all 12 values.
    tv = low_rank_task_vectors(generator, 2, 12, 18)
    ours, code = IsoCSolver().solve(tv), iso_c_code(tv)
    assert int((singular_values(ours) > 1e-8 * singular_values(ours)[0]).sum()) == 6
    assert int((singular_values(code) > 1e-8 * singular_values(code)[0]).sum()) == 12


def test_iso_c_one_task_is_its_flattened_spectrum(generator):
    t = full_rank_task_vectors(generator, 1, 9, 13)
    u, s, vh = torch.linalg.svd(t[0], full_matrices=False)
    torch.testing.assert_close(IsoCSolver().solve(t), s.mean() * u @ vh, rtol=1e-12, atol=0)


def test_iso_c_cancelling_zero_and_non_finite_tasks(generator):
    tv = full_rank_task_vectors(generator, 2, 8, 6)
    assert torch.equal(IsoCSolver().solve(torch.stack([tv[0], -tv[0]])), torch.zeros(8, 6, dtype=tv.dtype))
    padded = torch.stack([tv[0], torch.zeros_like(tv[0]), torch.full_like(tv[0], float("inf")), tv[1]])
    assert torch.equal(IsoCSolver().solve(padded), IsoCSolver().solve(tv))
    assert torch.equal(IsoCSolver().solve(torch.zeros(2, 3, 4)), torch.zeros(3, 4))


# --- Iso-CTS --------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [1, 2, 5])
@pytest.mark.parametrize("factory", FACTORIES)
@pytest.mark.parametrize("fraction", [0.8, 0.5])
def test_iso_cts_matches_the_reference(generator, device, shape, count, factory, fraction):
    # low_rank_task_vectors: the sum has rank 3N, below the common size k for N <= 2
    # (common directions dropped) and the residuals are then zero (nothing task-specific).
    tv = factory(generator, count, *shape)
    config = IsoCtsConfig(common_space_fraction=fraction)
    ours = IsoCtsSolver(config).solve(tv.to(device)).cpu()
    expected = iso_cts(tv, fraction)
    assert ours.dtype == torch.float64
    assert relative_error(tv.sum(0), expected) > 0.05  # plain task arithmetic fails
    if count > 1 and iso_cts_sizes(min(shape), count, fraction)[1] > 0 and factory is full_rank_task_vectors:
        assert relative_error(iso_c(tv), expected) > 1e-3  # the task-specific part matters (N = 1: Iso-C)
    assert relative_error(ours, expected) < 1e-9  # float64; Gram vs SVD route


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [2, 3, 5])
@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.2])
def test_iso_cts_follows_the_official_code_on_full_rank_tasks(generator, shape, count, fraction):
    tv = full_rank_task_vectors(generator, count, *shape)
    config = IsoCtsConfig(common_space_fraction=fraction)
    assert relative_error(IsoCtsSolver(config).solve(tv), iso_cts_code(tv, fraction)) < 1e-9


@pytest.mark.parametrize("factory", FACTORIES)
def test_iso_cts_spectrum_is_flat(generator, factory):
    tv = factory(generator, 4, 16, 20)
    values = singular_values(IsoCtsSolver().solve(tv))
    rank = int((values > 1e-8 * values[0]).sum())
    assert rank == (16 if factory is full_rank_task_vectors else 12)  # low rank: 4 x 3 directions
    torch.testing.assert_close(values[:rank], values[0].expand(rank), rtol=1e-12, atol=0)


def test_iso_cts_with_the_whole_space_common_is_iso_c(generator):
    tv = full_rank_task_vectors(generator, 3, 14, 11)
    ours = IsoCtsSolver(IsoCtsConfig(common_space_fraction=1.0)).solve(tv)
    assert relative_error(ours, IsoCSolver().solve(tv)) < 1e-12


def test_iso_cts_one_task_is_iso_c_of_it(generator):
    # N = 1: the residual of t after its own top-k directions is the rest of t.
    t = full_rank_task_vectors(generator, 1, 13, 10)
    assert relative_error(IsoCtsSolver().solve(t), IsoCSolver().solve(t)) < 1e-12


def test_iso_cts_zero_and_non_finite_tasks_are_excluded(generator):
    tv = full_rank_task_vectors(generator, 2, 8, 10)
    padded = torch.stack([torch.zeros_like(tv[0]), tv[0], tv[1], torch.full_like(tv[0], float("nan"))])
    assert torch.equal(IsoCtsSolver().solve(padded), IsoCtsSolver().solve(tv))
    assert torch.equal(IsoCtsSolver().solve(torch.zeros(2, 3, 4)), torch.zeros(3, 4))


def test_iso_cts_identical_tasks_use_the_polar_factor_on_the_range(generator):
    # Two identical tasks give identical residual blocks: the stack is rank-deficient.
    # The code's full polar factor then adds rounding-chosen directions (it differs from
    # the defined result by ~45%); the solver matches the whitening reference in float64
    # and float32.
    t = full_rank_task_vectors(generator, 1, 16, 12)[0]
    tv = torch.stack([t, t])
    expected = iso_cts(tv)
    assert relative_error(IsoCtsSolver().solve(tv), expected) < 1e-9
    assert relative_error(IsoCtsSolver().solve(tv.float()), expected) < 1e-5
    assert relative_error(iso_cts_code(tv), expected) > 0.1


@pytest.mark.parametrize(
    "rank, count, fraction, sizes",
    [
        (10, 3, 0.8, (7, 1)),  # k0 = 8, round(2/3) = 1
        (10, 5, 0.8, (10, 0)),  # round(0.4) = 0: no task-specific directions
        (768, 8, 0.8, (616, 19)),  # ViT-B width: k0 = 614, round(19.25) = 19
        (10, 2, 0.5, (6, 2)),  # round(2.5) = 2: Python rounds half to even
        (10, 6, 0.05, (4, 1)),  # round(10/6) = 2 would give k = -2: capped at floor(10/6)
    ],
)
def test_iso_cts_sizes(rank, count, fraction, sizes):
    assert iso_cts_sizes(rank, count, fraction) == sizes


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.5, float("nan"), True, "0.8"])
def test_iso_cts_rejects_a_bad_fraction(value):
    with pytest.raises(ValueError, match="common_space_fraction"):
        IsoCtsConfig(common_space_fraction=value)


def test_defaults():
    assert IsoCtsConfig().common_space_fraction == 0.8  # config/method/iso_cts.yaml
    import dataclasses

    assert dataclasses.fields(IsoCConfig()) == ()


# --- both -----------------------------------------------------------------------------


SOLVERS = [IsoCSolver(), IsoCtsSolver()]
IDS = ["iso_c", "iso_cts"]


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_float32_and_bfloat16_inputs_are_solved_in_float32(generator, solver):
    tv = full_rank_task_vectors(generator, 3, 16, 12)
    reference = iso_c(tv) if isinstance(solver, IsoCSolver) else iso_cts(tv)
    for low in (tv.float(), tv.bfloat16()):
        ours = solver.solve(low)
        assert ours.dtype == torch.float32
        expected = reference if low.dtype == torch.float32 else (
            iso_c(low.double()) if isinstance(solver, IsoCSolver) else iso_cts(low.double())
        )
        assert relative_error(ours, expected) < 1e-5  # float32 rounding


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
@pytest.mark.parametrize("shape, count, rank", [((24, 12), 2, 2), ((48, 64), 5, 8), ((16, 16), 3, 1)])
def test_float32_low_rank_tasks_give_the_float64_answer(generator, solver, shape, count, rank):
    # LoRA-like task vectors: the float32 cutoff (max(out, in) * 1.2e-7 * scale) drops the
    # same rounding-level singular values as the float64 reference does.
    tv = low_rank_task_vectors(generator, count, *shape, rank=rank)
    expected = iso_c(tv) if isinstance(solver, IsoCSolver) else iso_cts(tv)
    assert relative_error(solver.solve(tv.float()), expected) < 1e-4  # measured < 3e-6


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_order_and_scale(generator, solver):
    tv = full_rank_task_vectors(generator, 3, 12, 15)
    reference = solver.solve(tv)
    assert relative_error(solver.solve(tv.flip(0)), reference) < 1e-12
    assert relative_error(solver.solve(tv * 1e-4), reference * 1e-4) < 1e-12


needs_cores = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores to run 2 threads")


@needs_cores
@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_bit_identical_across_thread_counts(solver):
    # At 384 x 512 MKL's SVD rounds differently on 1 and 2 threads; the solvers run their
    # factorisations on one thread (solvers.numerics.one_cpu_thread).
    tv = full_rank_task_vectors(torch.Generator().manual_seed(0), 3, 384, 512, scale=1e-2, dtype=torch.float32)
    one, two = solve_at_one_and_two_threads(solver.solve, tv)
    assert torch.equal(one, two)



def test_the_mixed_rank_warning_reads_ranks_on_the_first_tensors_under_sum_norm(generator, monkeypatch, caplog):
    # Under sum_norm nothing else counts the ranks: the check counts them itself, on the first
    # RANK_SAMPLE tensors a method solves in the process, and stops once it has warned.
    from mergekit_wudi.solvers import base, iso

    monkeypatch.setattr(iso, "_RANKS_READ", iso.Counter())
    monkeypatch.setattr(base, "_WARNED", set())
    low = low_rank_task_vectors(generator, 1, 64, 64, rank=2, dtype=torch.float32)
    full = full_rank_task_vectors(generator, 1, 64, 64, dtype=torch.float32)
    mixed, same = torch.cat([low, full]), torch.cat([full, full * 2])
    solver = IsoCSolver(calibration="sum_norm")
    for _ in range(iso.RANK_SAMPLE):
        solver.solve(same)
    solver.solve(mixed)  # the thirteenth tensor: past the sample, not read
    assert "mix low and full rank" not in caplog.text
    iso._RANKS_READ.clear()
    solver.solve(mixed)
    solver.solve(mixed)
    assert caplog.text.count("iso_c: the task vectors mix low and full rank (ranks 2, 64 of 64)") == 1
    assert iso._RANKS_READ["iso_c"] == iso.RANK_SAMPLE  # said: no more counting
