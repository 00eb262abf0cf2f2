"""guard.py: which tensors the adapter guard samples, what it calls each family, and where it cannot act."""

from types import SimpleNamespace

import pytest
import torch
from mergekit.common import ModelReference
from mergekit.merge_methods import merge_tensors
from models import make_family, make_one_seed_family, make_seed_each_family
from reference import wudi_closed_form

from mergekit_wudi.guard import (
    AVERAGE,
    MIN_RANK,
    SAMPLE,
    TRAINED_OUTPUT,
    ExpertKinds,
    expert_kinds,
    sample_order,
    with_guarded_lambda,
)


def kinds_of(paths):
    """expert_kinds of [base, fine-tune, ...] saved under these paths."""
    return expert_kinds(ModelReference.parse(str(paths[0])), [ModelReference.parse(str(m)) for m in paths[1:]])


def group_of(paths):
    """A stand-in for the mergekit TensorGroup of [base, fine-tune, ...] saved under these paths:
    what with_guarded_lambda reads (the models' ids, the base tensor's device)."""
    entry = lambda path: SimpleNamespace(id=ModelReference.parse(str(path)), tensor=torch.zeros(1))  # noqa: E731
    return SimpleNamespace(base=entry(paths[0]), non_base=[entry(p) for p in paths[1:]])


def test_sample_order_is_layer_order_of_the_linear_weights_all_models_hold():
    base = [
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.layers.10.mlp.down_proj.weight",
        "model.layers.2.self_attn.q_proj.weight",
        "model.layers.2.input_layernorm.weight",
        "model.layers.2.mlp.down_proj.weight",
        "model.layers.2.self_attn.q_proj.bias",
        "pooler.dense.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
    ]
    others = [list(base), [name for name in base if name != "model.layers.1.self_attn.o_proj.weight"]]
    # Numbered blocks by number (2 before 10, not as text), then the name; no norms, biases or
    # embeddings; what one fine-tune lacks is not sampled; unnumbered tensors and lm_head last.
    assert sample_order(base, others) == [
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.2.mlp.down_proj.weight",
        "model.layers.2.self_attn.q_proj.weight",
        "model.layers.10.mlp.down_proj.weight",
        "lm_head.weight",
        "pooler.dense.weight",
    ]
    assert SAMPLE == 12


def test_without_models_the_guard_does_not_act():
    # merge_tensors has tensors and ids, no models: one-seed-looking task vectors are merged at
    # the lambda given, and expert_kinds has nothing to measure.
    generator = torch.Generator().manual_seed(3)
    shared = torch.linalg.qr(torch.randn(48, 2, generator=generator, dtype=torch.float64))[0].T  # one A
    base = torch.randn(32, 48, generator=generator, dtype=torch.float64)
    tuned = [base + torch.randn(32, 2, generator=generator, dtype=torch.float64) @ shared for _ in range(3)]
    merged = merge_tensors([base, *tuned], "wudi_cfs", base_index=0, name="model.layers.0.mlp.up_proj.weight")
    expected = base + wudi_closed_form(torch.stack([t - base for t in tuned]), 0.1)
    assert torch.allclose(merged, expected, rtol=0, atol=1e-9 * float(expected.abs().max()))
    assert expert_kinds(0, [1, 2, 3]) is None


def test_the_sample_skips_modules_no_fine_tune_trained(family, tmp_path):
    # Adapters on q_proj and v_proj only (peft's default for Llama), one seed: the sample is the
    # four tensors they changed, in layer order, and every model looks like a one-seed adapter
    # (input overlap in / 2 = 32 times chance: one shared rank-2 input space). The conftest
    # family's independent rank-2 deltas are "lora" (input spaces at chance), not one seed.
    kinds = kinds_of(make_one_seed_family(tmp_path / "qv", modules=("q_proj", "v_proj")))
    assert kinds.tensors == tuple(f"model.layers.{i}.self_attn.{m}.weight" for i in (0, 1) for m in ("q_proj", "v_proj"))
    assert kinds.kinds == ("lora, one seed",) * 3 and kinds.one_seed == (0, 1, 2)
    assert all(abs(value - 32.0) < 1e-3 for value in kinds.inputs)

    independent = kinds_of(family)
    assert len(independent.tensors) == SAMPLE and not independent.one_seed
    assert set(independent.kinds) == {"lora"}


def test_adapters_with_a_seed_each_are_told_from_independent_random_deltas(tmp_path):
    # Rank-8 deltas Q C_i A_i with a random A_i per model and one output space Q per tensor
    # (trained adapters' B's share output directions): input overlaps near chance, output
    # overlaps out / 8 times chance (64 / 8 for most tensors, 32 / 8 for k_proj and v_proj,
    # so the median is 8), k = 8: "a seed each", capped at 1/sqrt(N) for methods that sum.
    seed_each = kinds_of(make_seed_each_family(tmp_path / "seed_each"))
    assert seed_each.kinds == ("lora",) * 3 and seed_each.seed_each == (0, 1, 2) and not seed_each.one_seed
    assert all(value < 2 for value in seed_each.inputs)
    assert all(abs(value - 8.0) < 1e-3 for value in seed_each.outputs) and seed_each.rank == 8
    cap, found = seed_each.cap(3, sums_disjoint=True)
    assert cap == pytest.approx(3 ** -0.5, rel=1e-15) and found == (0, 1, 2)
    assert seed_each.cap(3, sums_disjoint=False) is None  # iso_c, iso_cts, doge

    # Independent random deltas, rank 8 and rank 4: output overlaps near chance, no cap. Rank
    # 2 (the conftest family): below MIN_RANK, where random overlaps reach TRAINED_OUTPUT.
    for rank in (8, 4, 2):
        independent = kinds_of(make_family(tmp_path / f"rank{rank}", rank=rank))
        assert independent.kinds == ("lora",) * 3 and independent.rank == rank, rank
        assert not independent.seed_each and independent.cap(3, sums_disjoint=True) is None, rank
        if rank >= MIN_RANK:
            assert max(independent.outputs) < 0.7 * TRAINED_OUTPUT, (rank, independent.outputs)

    # One seed wins over a seed each: 1/(N+1), the base counted with the N fine-tunes, for every method.
    one_seed = kinds_of(make_one_seed_family(tmp_path / "one_seed"))
    assert one_seed.cap(3, sums_disjoint=True) == one_seed.cap(3, sums_disjoint=False) == (1 / 4, (0, 1, 2))
    # but N/(N+1) for a task-sized method (doge), whose average is taken of the mean instead
    assert one_seed.cap(3, sums_disjoint=False, task_sized=True) == (3 / 4, (0, 1, 2))
    assert seed_each.cap(3, sums_disjoint=False, task_sized=True) is None


def test_the_one_seed_rule_merges_the_average_where_calibrate_is_the_default(tmp_path):
    # One-seed adapters: lambda at most 1/(N+1) and, with calibrate at the method's default, the
    # AVERAGE flag (the solve replaced by the sum), at any lambda, under the cap too; a rule other
    # than the default keeps the solve; adapters with a seed each never average; the guard off
    # changes nothing. (What the flag makes of a merge: test_workflows.py, solvers/test_base.py.)
    def guarded(group, strength, rule="none", default="none", guard=True):
        parameters = {"lambda": strength, "calibrate": rule, "adapter_guard": guard}
        return dict(with_guarded_lambda("wudi_cfs", group, parameters, sums_disjoint=True, default_calibration=default))

    one_seed = group_of(make_one_seed_family(tmp_path / "one_seed"))
    assert guarded(one_seed, 1.0) == {"lambda": pytest.approx(1 / 4), "calibrate": "none", "adapter_guard": True,
                                      AVERAGE: True}
    assert guarded(one_seed, 0.2) == {"lambda": 0.2, "calibrate": "none", "adapter_guard": True, AVERAGE: True}
    assert guarded(one_seed, 1.0, "input_space") == {"lambda": pytest.approx(1 / 4), "calibrate": "input_space",
                                                     "adapter_guard": True}
    # Iso's default is first_order: named or not, it is the default and averages; sum_norm keeps the solve
    assert guarded(one_seed, 1.0, "first_order", default="first_order")[AVERAGE] is True
    assert AVERAGE not in guarded(one_seed, 1.0, "sum_norm", default="first_order")
    assert guarded(one_seed, 1.0, guard=False) == {"lambda": 1.0, "calibrate": "none", "adapter_guard": False}
    seed_each = group_of(make_seed_each_family(tmp_path / "seed_each"))
    assert guarded(seed_each, 1.0) == {"lambda": pytest.approx(3 ** -0.5), "calibrate": "none", "adapter_guard": True}


def test_the_one_seed_rule_keeps_a_task_sized_lambda_at_most_n_over_n_plus_1(tmp_path):
    # doge (task-sized): lambda at most N/(N+1), not 1/(N+1), times the mean (Solver.task_sized);
    # for adapters with a seed each, nothing changes.
    def guarded(group, strength, rule="none"):
        parameters = {"lambda": strength, "calibrate": rule, "adapter_guard": True}
        return dict(with_guarded_lambda("doge", group, parameters, sums_disjoint=False, task_sized=True))

    one_seed = group_of(make_one_seed_family(tmp_path / "one_seed"))
    for strength, kept in ((1.0, 0.75), (1.5, 0.75), (0.5, 0.5), (1 / 3, 1 / 3)):
        assert guarded(one_seed, strength) == {"lambda": kept, "calibrate": "none", "adapter_guard": True, AVERAGE: True}
    assert guarded(one_seed, 1.5, "sum_norm") == {"lambda": 0.75, "calibrate": "sum_norm", "adapter_guard": True}
    seed_each = group_of(make_seed_each_family(tmp_path / "seed_each"))
    assert guarded(seed_each, 1.0) == {"lambda": 1.0, "calibrate": "none", "adapter_guard": True}


def test_first_order_becomes_sum_norm_where_any_fine_tune_looks_like_an_adapter(tmp_path):
    # iso_c's first_order counts each task's gain along its own update only; where a fine-tune
    # is an adapter (of either kind) the guard gives it the sum's energy instead. Not for rank-2
    # random deltas (neither kind: under MIN_RANK), not with the guard off, not for another rule.
    def rule_of(group, rule="first_order", guard=True):
        parameters = {"lambda": 1.0, "calibrate": rule, "adapter_guard": guard}
        return with_guarded_lambda("iso_c", group, parameters, sums_disjoint=False)["calibrate"]

    seed_each = group_of(make_seed_each_family(tmp_path / "seed_each"))
    one_seed = group_of(make_one_seed_family(tmp_path / "one_seed"))
    random_deltas = group_of(make_family(tmp_path / "random", rank=2))
    assert rule_of(seed_each) == rule_of(one_seed) == "sum_norm"
    assert rule_of(random_deltas) == "first_order"
    assert rule_of(seed_each, guard=False) == "first_order"
    assert rule_of(seed_each, "input_space") == "input_space"

    def found(kinds):
        return ExpertKinds(tensors=("t",), models=tuple("abc"), inputs=(2.0,) * 3, outputs=(3.0,) * 3, kinds=kinds, rank=8.0)

    assert found(("lora", "lora, one seed", "lora")).adapters == (0, 1, 2)
    assert found(("lora", "full", "full")).adapters == (0,)  # a mixed set: sum_norm too
    assert found(("full", "full", "")).adapters == ()  # full fine-tunes (one not measured) keep first_order
    assert ExpertKinds(tensors=("t",), models=("a", "b"), inputs=(2.0,) * 2, outputs=(3.0,) * 2,
                       kinds=("lora",) * 2, rank=2.0).adapters == ()  # under MIN_RANK: not trained adapters


@pytest.mark.parametrize("kinds, cap", [
    (("lora",) * 4, 1 / 2),  # every fine-tune an adapter with a seed each: 1/sqrt(N), as before
    (("full", "lora", "full", "lora"), 2 ** -0.5),  # a mixed set: 1/sqrt(K), K = 2 adapters
    (("full", "lora", "full", "full"), None),  # one adapter: nothing to cap (K = 1)
    (("full",) * 4, None),
])
def test_the_seed_each_cap_counts_the_adapters(kinds, cap):
    # guard.py: on each task's inputs the K adapters add about sqrt(K) adapters' outputs; full
    # fine-tunes read their own inputs and are not counted.
    found = ExpertKinds(tensors=("t",), models=tuple("abcd"), inputs=(2.0,) * 4, outputs=(3.0,) * 4, kinds=kinds,
                        rank=8.0)
    decided = found.cap(4, sums_disjoint=True)
    if cap is None:
        assert decided is None
    else:
        assert decided == (pytest.approx(cap, rel=1e-15), tuple(i for i, kind in enumerate(kinds) if kind == "lora"))
    assert found.cap(4, sums_disjoint=False) is None  # iso_c, iso_cts: not capped for adapters with a seed each
    # density's default (adapter.trim_densities) trims the full ones, and only beside adapters.
    full = tuple(i for i, kind in enumerate(kinds) if kind == "full")
    assert found.full_beside_adapters == (full if "lora" in kinds else ())
