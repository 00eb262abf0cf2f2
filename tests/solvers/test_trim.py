"""density: the magnitude trim before a solve (solvers/trim.py, Solver.solve) against a trim done by
hand with torch.kthvalue (tests/reference.py), through every solver that takes it."""

import pytest
import torch
from reference import trimmed as trimmed_by_hand
from tensors import full_rank_task_vectors, low_rank_task_vectors

from mergekit_wudi.solvers import SOLVERS, DogeSolver, WudiCfsSolver, WudiSolver, trim
from mergekit_wudi.solvers.numerics import prepare_task_vectors
from mergekit_wudi.solvers.trim import trimmed

TRIMMING = [cls for cls in SOLVERS if cls.density is not None]  # every method but doge, which trims inside


def test_the_yaml_defaults():
    # issue 23: every method trims full fine-tunes beside adapters at 0.3 (DOGE's value;
    # adapter.trim_densities); doge trims itself, after its solve.
    assert {cls.name: cls.density for cls in SOLVERS} == {
        "ace": 0.3, "doge": None, "iso_c": 0.3, "iso_cts": 0.3, "tsv": 0.3, "wudi": 0.3, "wudi_cfs": 0.3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.999])
def test_trimmed_keeps_the_largest_entries_of_each_task_vector(generator, dtype, density):
    tv = full_rank_task_vectors(generator, 3, 17, 23, dtype=dtype)
    prepared = prepare_task_vectors(tv)
    result = trimmed(prepared, [density] * 3, overwrite=False)
    expected = trimmed_by_hand(tv, density, rank_dtype=dtype)
    assert torch.equal(result.vectors, expected)
    assert torch.equal(prepared.vectors, tv)  # not in place
    assert result.sq_norms == pytest.approx([float(t.double().pow(2).sum()) for t in expected], rel=1e-6)
    kept = (result.vectors != 0).flatten(1).sum(1)
    assert kept.tolist() == [int(17 * 23 * density) + 1] * 3  # distinct magnitudes: floor(d density) + 1 kept


def test_trimmed_in_place_writes_into_the_given_stack(generator):
    tv = full_rank_task_vectors(generator, 2, 9, 11)
    expected = trimmed_by_hand(tv, 0.3)
    prepared = prepare_task_vectors(tv)
    result = trimmed(prepared, [0.3, 0.3], overwrite=True)
    assert result.vectors.data_ptr() == tv.data_ptr() and torch.equal(tv, expected)


@pytest.mark.parametrize("solver_cls", TRIMMING, ids=lambda c: c.name)
@pytest.mark.parametrize("kind", ["full", "low"])
def test_solve_at_a_density_is_the_solve_of_the_trimmed_task_vectors(generator, solver_cls, kind):
    # Bit for bit, for every per-model density (a zero task vector dropped keeps the others' own),
    # and the caller's task vectors are left as given.
    if kind == "full":
        tv = full_rank_task_vectors(generator, 3, 24, 40)
    else:
        tv = low_rank_task_vectors(generator, 3, 24, 40, rank=4, scale=1e-2, dtype=torch.float32)
    tv = torch.cat([tv[:1], torch.zeros_like(tv[:1]), tv[1:]])  # (4, out, in), the second one zero
    densities = [0.3, 0.7, 0.5, 1.0]
    given = tv.clone()
    solver = solver_cls(solver_cls.config_cls(steps=20) if solver_cls.name == "wudi" else None, density=densities)
    merged = solver.solve(tv)
    assert torch.equal(tv, given)
    by_hand = torch.stack([trimmed_by_hand(t.unsqueeze(0), d)[0] if t.any() else t for t, d in zip(tv, densities)])
    plain = solver_cls(solver_cls.config_cls(steps=20) if solver_cls.name == "wudi" else None).solve(by_hand)
    assert torch.equal(merged, plain)
    untrimmed = solver_cls(solver_cls.config_cls(steps=20) if solver_cls.name == "wudi" else None).solve(tv)
    assert (merged - untrimmed).norm() > 1e-3 * untrimmed.norm()


def test_overwrite_gives_the_same_merge_and_takes_the_stack(generator):
    tv = full_rank_task_vectors(generator, 3, 30, 20)
    kept = WudiCfsSolver(density=0.3).solve(tv.clone())
    consumed = tv.clone()
    assert torch.equal(WudiCfsSolver(density=0.3).solve(consumed, overwrite=True), kept)
    assert torch.equal(consumed, trimmed_by_hand(tv, 0.3))  # the caller gave it up


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.1, float("nan"), [0.3, 0.3]])
def test_a_bad_density_is_refused(generator, bad):
    tv = full_rank_task_vectors(generator, 3, 6, 5)
    with pytest.raises(ValueError, match="density"):
        WudiSolver(density=bad).solve(tv)


def test_doge_takes_its_density_in_its_config():
    with pytest.raises(ValueError, match="doge trims inside its solve"):
        DogeSolver(density=0.3)
    DogeSolver(density=1.0)  # the no-trim value is what the adapter passes it


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("spread", ["wide", "below 2^16", "one bucket"])
def test_kth_smallest_bits_over_several_chunks(generator, monkeypatch, dtype, spread):
    # The radix selection reads 16 bits at a time over chunks; against torch.kthvalue, with
    # values whose high bits are all zero (the first digit 0) or all equal (one bucket).
    monkeypatch.setattr(trim, "_CHUNK", 97)
    top = 2**31 - 1 if dtype == torch.int32 else 2**63 - 1  # the largest non-negative value
    if spread == "wide":
        values = torch.randint(0, top, (1000,), generator=generator, dtype=torch.int64)
    elif spread == "below 2^16":
        values = torch.randint(0, 2**16, (1000,), generator=generator, dtype=torch.int64)
    else:
        values = top // 3 + torch.randint(0, 50, (1000,), generator=generator, dtype=torch.int64)
    bits = values.to(dtype).view(20, 50)
    for kth in [1, 2, 97, 500, 999, 1000]:
        assert trim.kth_smallest_bits(bits, kth) == int(torch.kthvalue(bits.flatten(), kth).values), kth
