"""calibrate: input_space (solvers/calibrate.py) against its definition computed with a float64
SVD (tests/reference.py), sum_norm against the float64 sum's norm and first_order against float64
inner products, and, for Iso-C, the flat spectrum they give; their limit cases, and through
every solver."""

import pytest
import torch
from reference import input_space_scale
from registry import METHODS
from tensors import full_rank_task_vectors, low_rank_task_vectors, solve_at_one_and_two_threads

from mergekit_wudi.solvers import SOLVERS, IsoCSolver, TsvSolver, WudiCfsSolver
from mergekit_wudi.solvers.base import Part
from mergekit_wudi.solvers.calibrate import calibrate

SHAPES = [(48, 80), (80, 48), (64, 64)]


@pytest.mark.parametrize("shape", SHAPES, ids=["wide", "tall", "square"])
@pytest.mark.parametrize("kind", ["full", "low"])
@pytest.mark.parametrize("solver_cls", [WudiCfsSolver, IsoCSolver, TsvSolver], ids=lambda c: c.name)
def test_scale_matches_the_definition(generator, shape, kind, solver_cls):
    if kind == "full":
        tv = full_rank_task_vectors(generator, 4, *shape, dtype=torch.float32)
    else:
        tv = low_rank_task_vectors(generator, 4, *shape, rank=8, scale=1e-2, dtype=torch.float32)
    merged = solver_cls().solve(tv)
    chosen = calibrate(tv, merged)
    assert chosen.scale == pytest.approx(input_space_scale(list(tv), merged), rel=1e-6)
    calibrated = solver_cls(calibration="input_space").solve(tv)
    torch.testing.assert_close(calibrated, merged * chosen.scale, rtol=1e-6, atol=0)


def test_limit_cases(generator):
    t = full_rank_task_vectors(generator, 1, 40, 60, dtype=torch.float32)
    assert calibrate(t, t[0]).scale == pytest.approx(1.0, abs=1e-9)  # N = 1, the task itself
    copies = t.repeat(4, 1, 1)
    assert calibrate(copies, copies.sum(0)).scale == pytest.approx(0.25, abs=1e-9)  # four copies summed: one copy
    # disjoint input spaces: the sum gives every task exactly its own update
    basis = torch.linalg.qr(torch.randn(60, 60, generator=generator, dtype=torch.float64))[0]
    disjoint = torch.stack([torch.randn(40, 8, generator=generator, dtype=torch.float64) @ basis[:, 8 * i : 8 * i + 8].T for i in range(4)])
    assert calibrate(disjoint, disjoint.sum(0)).scale == pytest.approx(1.0, abs=1e-9)
    # homogeneous: c(a M) a M = c(M) M
    merged = WudiCfsSolver().solve(disjoint * 1.0)
    assert calibrate(disjoint, 3 * merged).scale * 3 == pytest.approx(calibrate(disjoint, merged).scale, rel=1e-12)
    # nothing to scale
    assert calibrate(disjoint, torch.zeros(40, 60, dtype=torch.float64)).scale == 1.0


def test_the_norm_term_binds_a_merge_larger_than_the_sum(generator):
    tv = full_rank_task_vectors(generator, 2, 30, 50)
    basis = torch.linalg.qr(torch.randn(50, 50, generator=generator, dtype=torch.float64))[0]
    outside = torch.randn(30, 50, generator=generator, dtype=torch.float64) @ basis[:, -5:] @ basis[:, -5:].T
    chosen = calibrate(tv, tv.sum(0) * 1e-3 + outside * 1e3)  # almost all of it outside the tasks' spaces
    assert chosen.binding == "norm"
    assert chosen.scale == pytest.approx(float(tv.sum(0).norm() / (tv.sum(0) * 1e-3 + outside * 1e3).norm()), rel=1e-9)


def test_zero_task_vectors_are_skipped_and_reported_by_their_index(generator):
    tv = low_rank_task_vectors(generator, 3, 40, 60, rank=4, scale=1e-2, dtype=torch.float32)
    with_zero = torch.cat([torch.zeros(1, 40, 60), tv])
    solver = WudiCfsSolver(calibration="input_space")
    result = solver.solve(with_zero)
    torch.testing.assert_close(result, WudiCfsSolver(calibration="input_space").solve(tv), rtol=0, atol=0)
    assert solver.last_calibration.task >= 1  # an index into the four given, never the zero one


@pytest.mark.parametrize("solver_cls", SOLVERS, ids=lambda c: c.name)
def test_every_method_takes_it_and_stays_thread_count_independent(generator, solver_cls):
    tv = low_rank_task_vectors(generator, 3, 40, 72, rank=6, scale=1e-2, dtype=torch.float32)
    quick = {"steps": 5} if "steps" in solver_cls.config_cls.__dataclass_fields__ else {}
    solver = solver_cls(solver_cls.config_cls(**quick), calibration="input_space")
    one, two = solve_at_one_and_two_threads(solver.solve, tv)
    assert torch.equal(one, two)
    assert solver.last_calibration is not None and solver.last_calibration.scale > 0
    assert solver_cls.name in METHODS


def test_a_bad_rule_is_refused(generator):
    with pytest.raises(ValueError, match="calibrate must be one of none, input_space, sum_norm, sum_cap, mean_cap, first_order"):
        WudiCfsSolver(calibration="auto")
    t = full_rank_task_vectors(generator, 2, 8, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="no rule 'none' to apply"):  # the function applies a rule; none is the caller's
        calibrate(t, t.sum(0), "none")


def test_the_callers_task_vectors_are_never_scaled(generator):
    # wudi_cfs returns t_1 itself for N = 1: scaling it in place would change the caller's tensor
    tv = full_rank_task_vectors(generator, 1, 40, 60, dtype=torch.float32) * 3
    before = tv.clone()
    WudiCfsSolver(calibration="input_space").solve(tv)
    assert torch.equal(tv, before)


def solved_both_ways(generator, solver_cls, rule):
    """(task vectors, the uncalibrated merge, the solver with `rule`, its merge): three low-rank
    task vectors, Adam methods at 5 steps."""
    tv = low_rank_task_vectors(generator, 3, 40, 72, rank=6, scale=1e-2, dtype=torch.float32)
    quick = {"steps": 5} if "steps" in solver_cls.config_cls.__dataclass_fields__ else {}
    config = solver_cls.config_cls(**quick)
    solver = solver_cls(config, calibration=rule)
    return tv, solver_cls(config).solve(tv), solver, solver.solve(tv)


@pytest.mark.parametrize("solver_cls", SOLVERS, ids=lambda c: c.name)
def test_sum_norm_gives_every_merge_the_norm_of_the_sum(generator, solver_cls):
    tv, plain, solver, scaled = solved_both_ways(generator, solver_cls, "sum_norm")
    total = float(tv.double().sum(0).norm())
    assert float(scaled.double().norm()) == pytest.approx(total, rel=1e-6)
    assert solver.last_calibration.scale == pytest.approx(total / float(plain.double().norm()), rel=1e-6)
    assert solver.last_calibration.binding == "norm"
    torch.testing.assert_close(scaled, plain * solver.last_calibration.scale, rtol=1e-6, atol=0)  # one scalar


@pytest.mark.parametrize("shape", SHAPES, ids=["wide", "tall", "square"])
def test_iso_c_at_sum_norm_is_the_flat_spectrum_at_the_root_mean_square(generator, shape):
    # Iso-C flattens the sum's spectrum at the mean singular value; sum_norm puts it at the
    # root mean square instead: float64 SVD of the sum, every singular value replaced.
    tv = full_rank_task_vectors(generator, 4, *shape, dtype=torch.float32)
    u, s, vh = torch.linalg.svd(tv.double().sum(0), full_matrices=False)
    expected = s.square().mean().sqrt() * (u @ vh)
    assert float(s.square().mean().sqrt() / s.mean()) > 1.05  # a spectrum steep enough to tell the two apart
    torch.testing.assert_close(IsoCSolver(calibration="sum_norm").solve(tv).double(), expected, rtol=1e-5, atol=1e-6 * float(s[0]))


def test_sum_norm_limit_cases(generator):
    t = full_rank_task_vectors(generator, 1, 40, 60, dtype=torch.float32)
    assert calibrate(t, t[0], "sum_norm").scale == pytest.approx(1.0, abs=1e-9)  # N = 1, the task itself
    copies = t.repeat(4, 1, 1)
    assert calibrate(copies, copies.sum(0), "sum_norm").scale == pytest.approx(1.0, abs=1e-9)  # the sum is kept
    assert calibrate(copies, 3 * copies.sum(0), "sum_norm").scale * 3 == pytest.approx(1.0, rel=1e-6)  # homogeneous (3 M rounded in float32)
    assert calibrate(copies, torch.zeros(40, 60), "sum_norm").scale == 1.0  # nothing to scale


@pytest.mark.parametrize("solver_cls", SOLVERS, ids=lambda c: c.name)
def test_first_order_gives_the_tasks_their_experts_summed_gain(generator, solver_cls):
    # sum_i <t_i, c M> = sum_i ||t_i||^2, in float64 from the solver's own merge
    tv, plain, solver, scaled = solved_both_ways(generator, solver_cls, "first_order")
    tasks = tv.double()
    assert float((scaled.double() * tasks.sum(0)).sum()) == pytest.approx(float(tasks.square().sum()), rel=1e-5)
    assert solver.last_calibration.binding == "gain"
    torch.testing.assert_close(scaled, plain * solver.last_calibration.scale, rtol=1e-6, atol=0)  # one scalar


@pytest.mark.parametrize("shape", SHAPES, ids=["wide", "tall", "square"])
def test_iso_c_at_first_order_is_the_flat_spectrum_at_the_energy_over_the_nuclear_norm(generator, shape):
    # Iso-C at first_order: <s_bar U V^T, T> = s_bar ||T||_*, so c s_bar = sum_i ||t_i||^2 / ||T||_*
    # (T = sum_i t_i): float64 SVD of the sum, every singular value replaced by it. The tasks
    # share a component, so that the experts' gain is the target (not the sum's: below).
    shared = full_rank_task_vectors(generator, 1, *shape, dtype=torch.float32)
    tv = full_rank_task_vectors(generator, 4, *shape, dtype=torch.float32) + 0.5 * shared
    u, s, vh = torch.linalg.svd(tv.double().sum(0), full_matrices=False)
    own = float(tv.double().square().sum())
    assert own < float(s.square().sum())
    level = own / float(s.sum())
    assert abs(level / float(s.square().mean().sqrt()) - 1) > 0.05  # apart from sum_norm's level
    torch.testing.assert_close(IsoCSolver(calibration="first_order").solve(tv).double(), level * (u @ vh),
                               rtol=1e-5, atol=1e-6 * float(s[0]))


def test_first_order_limit_cases(generator):
    t = full_rank_task_vectors(generator, 3, 40, 60, dtype=torch.float32)
    assert calibrate(t[:1], t[0], "first_order").scale == pytest.approx(1.0, rel=1e-9)  # N = 1, the task itself
    copies = t[:1].repeat(4, 1, 1)
    assert calibrate(copies, copies.sum(0), "first_order").scale == pytest.approx(0.25, rel=1e-6)  # copies: their average
    orthogonal = torch.zeros(2, 40, 60)
    orthogonal[0, :20], orthogonal[1, 20:] = t[0, :20], t[1, 20:]  # disjoint rows: the sum is kept
    assert calibrate(orthogonal, orthogonal.sum(0), "first_order").scale == pytest.approx(1.0, rel=1e-6)
    merged = t.sum(0)
    assert calibrate(t, 3 * merged, "first_order").scale * 3 == pytest.approx(calibrate(t, merged, "first_order").scale, rel=1e-6)
    assert calibrate(t, torch.zeros(40, 60), "first_order").scale == 1.0  # nothing to scale
    against = calibrate(t, -merged, "first_order")  # no positive c gives the gain: sum_norm's c
    assert (against.scale, against.binding) == (pytest.approx(1.0, rel=1e-6), "norm")


def test_first_order_never_gives_more_gain_than_the_plain_sum_where_tasks_cancel(generator):
    # t_2 = -t_1 + a small residue: the sum is the residue, and the experts' gain would need
    # c = sum_i ||t_i||^2 / <M, T>, hundreds of times the residue's size, for Iso-C's flat
    # spectrum of it. The plain sum's gain, ||T||^2, bounds it: c = ||T||^2 / <M, T>.
    t = full_rank_task_vectors(generator, 2, 40, 60, dtype=torch.float64)
    cancelling = torch.stack([t[0], -t[0] + 1e-2 * t[1]])
    total = cancelling.sum(0)
    merged = IsoCSolver().solve(cancelling)
    chosen = calibrate(cancelling, merged, "first_order")
    assert chosen.binding == "sum"
    assert chosen.scale == pytest.approx(float(total.square().sum()) / float((merged * total).sum()), rel=1e-12)
    assert float((chosen.scale * merged).norm()) < 2 * float(total.norm())  # the residue's size, not the tasks'
    assert float(cancelling.square().sum()) / float((merged * total).sum()) > 1e3  # what the experts' gain would ask


def test_mean_cap_shrinks_a_merge_larger_than_the_mean_counting_zero_task_vectors(generator):
    t = full_rank_task_vectors(generator, 3, 40, 60, dtype=torch.float32)
    mean = float(t.double().sum(0).norm()) / 3
    larger = calibrate(t, t.sum(0), "mean_cap")  # the sum: three times the mean
    assert larger.scale == pytest.approx(1 / 3, rel=1e-6) and larger.binding == "norm"
    smaller = calibrate(t, t.mean(0) / 2, "mean_cap")
    assert smaller.scale == 1.0 and smaller.binding == "none"
    # Through a solver, with a fourth fine-tune that left the tensor alone: it takes no part in
    # the solve, but the mean is over the four models, ||sum t_i|| / 4.
    with_zero = torch.cat([t, torch.zeros_like(t[:1])])
    solver = WudiCfsSolver(calibration="mean_cap")
    capped = solver.solve(with_zero)
    uncapped = WudiCfsSolver().solve(t)
    assert solver.last_calibration.scale == pytest.approx(min(1.0, 3 * mean / 4 / float(uncapped.double().norm())), rel=1e-5)
    assert solver.last_calibration.scale < 1.0
    torch.testing.assert_close(capped, uncapped * solver.last_calibration.scale, rtol=1e-6, atol=0)
    assert float(capped.double().norm()) == pytest.approx(3 * mean / 4, rel=1e-5)


def test_sum_cap_shrinks_a_merge_larger_than_the_sum_and_never_enlarges_one(generator):
    t = full_rank_task_vectors(generator, 3, 40, 60, dtype=torch.float32)
    total = float(t.double().sum(0).norm())
    larger = calibrate(t, 2 * t.sum(0), "sum_cap")
    assert larger.scale == pytest.approx(0.5, rel=1e-6) and larger.binding == "norm"
    flat = IsoCSolver().solve(t)  # Iso-C at its mean singular value: smaller than the sum
    assert float(flat.double().norm()) < total
    smaller = calibrate(t, flat, "sum_cap")
    assert smaller.scale == 1.0 and smaller.binding == "none"
    solver = WudiCfsSolver(calibration="sum_cap")
    torch.testing.assert_close(solver.solve(t), WudiCfsSolver().solve(t) * solver.last_calibration.scale, rtol=1e-6, atol=0)
    assert solver.last_calibration.scale <= 1.0


def flat_at(tasks: torch.Tensor, rule: str) -> torch.Tensor:
    """Iso-C of float64 tasks by SVD, with `rule`'s c written out: first_order
    min(sum_i ||t_i||^2, ||T||^2) / <M, T>, sum_norm ||T|| / ||M||."""
    total = tasks.sum(0)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    keep = s > max(total.shape) * torch.finfo(torch.float32).eps * s[0]
    merge = s[keep].mean() * (u[:, keep] @ vh[keep])
    if rule == "first_order":
        return merge * min(float(tasks.square().sum()), float(total.square().sum())) / float((merge * total).sum())
    return merge * float(total.norm()) / float(merge.norm())


@pytest.mark.parametrize("overwrite", [False, True])
def test_parts_merge_each_kind_on_its_own_and_add_the_two(generator, overwrite):
    # Two full-rank and two rank-4 task vectors, interleaved: Iso-C of each part with its own
    # rule, added (guard.kind_parts' merge of a mixed set), against a float64 SVD reference.
    full = full_rank_task_vectors(generator, 2, 40, 72, dtype=torch.float32)
    full[1] += 0.5 * full[0]  # tasks that agree: the experts' gain binds, not the sum's
    low = low_rank_task_vectors(generator, 2, 40, 72, rank=4, scale=1e-2, dtype=torch.float32)
    tv = torch.stack([full[0], low[0], full[1], low[1]])
    given = tv.clone()
    parts = [Part((0, 2), "first_order", "full"), Part((1, 3), "sum_norm", "adapters")]
    solver = IsoCSolver(parts=parts)
    merged = solver.solve(tv, overwrite=overwrite)
    expected = flat_at(full.double(), "first_order") + flat_at(low.double(), "sum_norm")
    torch.testing.assert_close(merged.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    if not overwrite:
        assert torch.equal(tv, given)  # the caller's stack, not reordered
    assert solver.last_calibration.binding == "parts" and solver.last_calibration.scale == 1.0
    (label_f, full_c), (label_a, low_c) = solver.last_calibration.parts
    assert (label_f, full_c.binding, label_a, low_c.binding) == ("full", "gain", "adapters", "norm")
    alone = IsoCSolver(calibration="sum_norm")
    alone.solve(low)
    assert low_c.scale == alone.last_calibration.scale  # the part's c is the set's own
    assert not torch.allclose(merged, IsoCSolver(calibration="first_order").solve(tv), rtol=1e-2)  # not one merge of all


def test_parts_skip_zero_task_vectors_and_must_cover_each_task_vector_once(generator):
    tv = full_rank_task_vectors(generator, 3, 30, 50, dtype=torch.float32)
    with_zero = torch.cat([tv[:1], torch.zeros_like(tv[:1]), tv[1:]])  # positions 0, 2, 3 hold tasks
    parts = [Part((1, 3), "sum_norm", "a"), Part((0, 2), "none", "b")]  # part a: the zero one and tv[2]
    merged = IsoCSolver(parts=parts).solve(with_zero)
    expected = flat_at(tv[2:].double(), "sum_norm") + IsoCSolver().solve(tv[:2]).double()
    torch.testing.assert_close(merged.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    only_zero = [Part((1,), "sum_norm", "a"), Part((0, 2, 3), "none", "b")]  # a part with no task left
    torch.testing.assert_close(IsoCSolver(parts=only_zero).solve(with_zero), IsoCSolver().solve(tv), rtol=0, atol=0)
    for wrong in ([Part((0, 1), "none", "a"), Part((1, 2, 3), "none", "b")], [Part((0, 1), "none", "a")]):
        with pytest.raises(ValueError, match="do not cover the 4 task vectors once each"):
            IsoCSolver(parts=wrong).solve(with_zero)
    with pytest.raises(ValueError, match="calibrate"):
        IsoCSolver(parts=[Part((0,), "svd", "a")])
