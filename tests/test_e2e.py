"""The real `mergekit-yaml`, in a subprocess, on a tiny Llama family built here.

Linear tensors are checked against independent float64 references of each paper's
formula; every other tensor against a plain `merge_method: task_arithmetic` run.
"""

import json
from pathlib import Path

import models
import pytest
import torch
from models import is_llama_linear, load_model, make_family, save_model, write_config
from reference import SCALES, calibrated, doge, trimmed, wudi_adam, wudi_closed_form
from reference_2025 import EPS32, iso_c, iso_cts, tsv_merge
from reference_ace import ace_heterogeneity, ace_reference
from runner import mergekit_yaml

from mergekit_wudi.solvers import DogeConfig, DogeSolver

pytestmark = pytest.mark.e2e

WEIGHTS = [1.0, 0.8, 1.2]


@pytest.fixture(scope="module")
def task_arithmetic(family, tmp_path_factory):
    root = tmp_path_factory.mktemp("ta")
    base, *models = family
    config = write_config(root / "ta.yml", "task_arithmetic", base, models, {"lambda": 0.9},
                          [{"weight": w} for w in WEIGHTS])
    mergekit_yaml(config, root / "out")
    return load_model(root / "out")


def run_method(family, root: Path, method: str, parameters=None, *flags) -> dict:
    base, *models = family
    root.mkdir(parents=True, exist_ok=True)
    params = {"lambda": 0.9, **(parameters or {})}
    config = write_config(root / f"{method}.yml", method, base, models, params, [{"weight": w} for w in WEIGHTS])
    mergekit_yaml(config, root / "out", *flags)
    return load_model(root / "out")


def task_vectors(family, name):
    base, *models = [load_model(p) for p in family]
    return base[name].double(), torch.stack([w * (m[name].double() - base[name].double()) for w, m in zip(WEIGHTS, models)])


def check_linear(merged, family, solve, tolerance=1e-4):
    checked = 0
    for name, tensor in merged.items():
        if not is_llama_linear(name):
            continue
        base, tv = task_vectors(family, name)
        expected = base + 0.9 * solve(tv)
        change = (expected - base).norm()
        error = (tensor.double() - expected).norm() / change
        assert error < tolerance, f"{name}: relative error {error:.2e}"
        assert (tensor.double() - (base + 0.9 * tv.sum(0))).norm() > 10 * tolerance * change  # not task arithmetic
        checked += 1
    assert checked == 14


def check_rest_is_task_arithmetic(merged, task_arithmetic):
    assert merged.keys() == task_arithmetic.keys()
    for name, tensor in merged.items():
        if not is_llama_linear(name):
            assert torch.equal(tensor, task_arithmetic[name]), name


def test_wudi(family, task_arithmetic, tmp_path):
    merged = run_method(family, tmp_path, "wudi")
    check_linear(merged, family, wudi_adam)
    check_rest_is_task_arithmetic(merged, task_arithmetic)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "[WUDI-Merging](https://arxiv.org/abs/2503.08099)" in card


def test_wudi_cfs(family, task_arithmetic, tmp_path):
    merged = run_method(family, tmp_path, "wudi_cfs", {"omega": 0.05})
    check_linear(merged, family, lambda tv: wudi_closed_form(tv, 0.05))
    check_rest_is_task_arithmetic(merged, task_arithmetic)


@pytest.mark.parametrize("method, reference", [("wudi_cfs", lambda tv: wudi_closed_form(tv, 0.1)),
                                               ("tsv", lambda tv: tsv_merge(tv, EPS32))], ids=["wudi_cfs", "tsv"])
def test_density_trims_each_models_task_vector_before_the_solve(family, task_arithmetic, tmp_path, method, reference):
    # Per model, as mergekit's ties takes it: the three task vectors keep their largest 50%, 20%
    # and 100% of entries (by hand: torch.kthvalue on the float32 magnitudes), then the method's
    # float64 reference solves those; density 1 everywhere is the untrimmed solve.
    densities = [0.5, 0.2, 1.0]
    base, *models = family
    config = write_config(tmp_path / "trim.yml", method, base, models, {"lambda": 0.9},
                          [{"weight": w, "density": d} for w, d in zip(WEIGHTS, densities)])
    mergekit_yaml(config, tmp_path / "trim")
    merged = load_model(tmp_path / "trim")

    def per_model(tv):
        return reference(torch.stack([trimmed(t.unsqueeze(0), d)[0] for t, d in zip(tv, densities)]))

    check_linear(merged, family, per_model, tolerance=1e-4)
    check_rest_is_task_arithmetic(merged, task_arithmetic)
    untrimmed = run_method(family, tmp_path / "untrimmed", method, {"density": 1.0})
    check_linear(untrimmed, family, reference, tolerance=1e-4)


def test_a_bad_density_fails_before_writing(family, tmp_path):
    base, *models = family
    config = write_config(tmp_path / "bad.yml", "wudi_cfs", base, models, {"density": 1.5})
    result = mergekit_yaml(config, tmp_path / "out", check=False)
    assert result.returncode != 0
    assert "density" in result.stderr and "(0, 1]" in result.stderr
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_doge(family, task_arithmetic, tmp_path):
    # These task vectors have rank 2, below DOGE's k = floor(r / N) = 21 singular vectors
    # per task: only the directions above the rank tolerance are kept (docs/reliability.md, "DOGE
    # subspaces and low-rank task vectors"), so the float32 merge agrees with the float64
    # reference (before the tolerance: O(1) apart, the other 19 set by rounding).
    merged = run_method(family, tmp_path, "doge")
    check_linear(merged, family, lambda tv: doge(tv, [0.3] * 3), tolerance=1e-4)
    check_rest_is_task_arithmetic(merged, task_arithmetic)
    short = run_method(family, tmp_path / "short", "doge", {"steps": 0})
    check_linear(short, family, lambda tv: doge(tv, [0.3] * 3, steps=0), tolerance=1e-5)


# The 2025 spectral methods: (method, parameters, float64 reference). The references
# (tests/reference_2025.py) take the SVDs in float64 with the float32 merge's cutoff
# (EPS32: the stored fine-tunes are rank 2 plus their float32 rounding, which both drop).
# Largest relative error of a linear tensor, solvers on these inputs: 7.0e-7 (tsv),
# 6.1e-7 (iso_c, iso_cts); 1e-5 leaves room for another BLAS.
# At their YAML defaults iso_c and iso_cts also apply calibrate: first_order (the references
# scaled by the float64 min(sum_i ||t_i||^2, ||T||^2) / <M, T>; these rank-2 fine-tunes are not
# adapters to adapter_guard, which keeps the rule); with calibrate: none they are the papers' math.
SPECTRAL = [
    ("tsv", {}, lambda tv: tsv_merge(tv, eps=EPS32)),
    ("iso_c", {}, calibrated(lambda tv: iso_c(tv, eps=EPS32))),
    ("iso_cts", {}, calibrated(lambda tv: iso_cts(tv, eps=EPS32))),
]
PAPERS = [
    ("iso_c", {"calibrate": "none"}, lambda tv: iso_c(tv, eps=EPS32)),
    ("iso_cts", {"calibrate": "none"}, lambda tv: iso_cts(tv, eps=EPS32)),
]


@pytest.mark.parametrize("method, parameters, reference", SPECTRAL + PAPERS,
                         ids=[m for m, _, _ in SPECTRAL] + [f"{m}-calibrate-none" for m, _, _ in PAPERS])
def test_spectral_methods(family, task_arithmetic, tmp_path, method, parameters, reference):
    merged = run_method(family, tmp_path, method, parameters)
    check_linear(merged, family, reference, tolerance=1e-5)
    check_rest_is_task_arithmetic(merged, task_arithmetic)


@pytest.mark.parametrize("method, reference, tolerance",
                         [("iso_c", lambda tv: iso_c(tv, eps=EPS32), 1e-5), ("wudi_cfs", lambda tv: wudi_closed_form(tv, 0.1), 1e-4)],
                         ids=["iso_c", "wudi_cfs"])  # the tolerances of their own tests above
@pytest.mark.parametrize("rule", ["input_space", "sum_norm", "first_order"])
def test_calibrate_scales_each_tensor_by_its_rule(family, task_arithmetic, tmp_path, method, reference, tolerance, rule):
    # c per tensor from its definition (input_space: a float64 SVD of each task vector;
    # sum_norm: the float64 sum's norm; first_order: float64 inner products), times the
    # method's float64 reference:
    # W0 + lambda c t_m; everything else is the fallback's.
    merged = run_method(family, tmp_path, method, {"calibrate": rule})
    scales = []

    def calibrated(tv):
        solved = reference(tv)
        scales.append(SCALES[rule]([t for t in tv.double() if t.norm() > 0], solved))
        return scales[-1] * solved

    check_linear(merged, family, calibrated, tolerance=tolerance)
    check_rest_is_task_arithmetic(merged, task_arithmetic)
    # the rule changed these merges by more than the tolerance could hide (first_order moves
    # wudi_cfs's near-sum merge of these near-orthogonal rank-2 deltas by under 1%)
    assert max(abs(c - 1) for c in scales) > 10 * tolerance


def test_a_bad_calibrate_value_fails_before_writing(family, tmp_path):
    base, *models = family
    config = write_config(tmp_path / "bad.yml", "iso_c", base, models, {"calibrate": "auto"})
    result = mergekit_yaml(config, tmp_path / "out", check=False)
    assert result.returncode != 0
    assert "calibrate must be one of none, input_space, sum_norm, sum_cap, mean_cap, first_order" in result.stderr
    assert not list((tmp_path / "out").glob("*.safetensors"))


@pytest.fixture(scope="module")
def rank4_family(tmp_path_factory):
    """The tiny family with rank-4 fine-tunes (issue 14's case): 12 directions in all, more
    than the 10 (64-wide) or 5 (k/v_proj) shared ones, so the stack's cut is inside them."""
    root = tmp_path_factory.mktemp("rank4")
    return models.make_family(root, rank=4)


def test_doge_on_rank_4_task_vectors_matches_the_float64_reference(rank4_family, tmp_path):
    merged = run_method(rank4_family, tmp_path, "doge", {"steps": 100})
    check_linear(merged, rank4_family, lambda tv: doge(tv, [0.3] * 3, steps=100), tolerance=1e-4)


@pytest.fixture(scope="module")
def full_rank_family(tmp_path_factory):
    """The tiny family with full-rank fine-tunes (rank 64 deltas: min(out, in) everywhere)."""
    root = tmp_path_factory.mktemp("full_rank")
    return models.make_family(root, rank=64)


def test_iso_cts_task_specific_directions_on_full_rank_task_vectors(full_rank_family, tmp_path):
    # With the rank-2 family every task vector lies in the common subspace (T has rank 6,
    # below k), so Iso-CTS is Iso-C there. With low-rank task vectors and k below T's
    # rank the stack is rank-deficient up to the checkpoints' rounding, amplified
    # (docs/methods-2025.md); full-rank ones with common_space_fraction 0.5 give k = 31
    # common directions and 11 per task (64-wide), well conditioned (largest relative
    # error of the solver on these inputs: 5.0e-6).
    merged = run_method(full_rank_family, tmp_path, "iso_cts", {"common_space_fraction": 0.5, "calibrate": "none"})
    check_linear(merged, full_rank_family, lambda tv: iso_cts(tv, 0.5, EPS32), tolerance=1e-4)
    _, tv = task_vectors(full_rank_family, "model.layers.0.self_attn.q_proj.weight")
    assert (iso_cts(tv, 0.5, EPS32) - iso_c(tv, EPS32)).norm() > 0.05 * iso_c(tv, EPS32).norm()  # not Iso-C


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [1.0, 0.25, 4.0]], ids=["equal", "spread"])
def test_ace_matches_the_official_code_on_full_rank_task_vectors(full_rank_family, tmp_path, weights):
    # Spread weights turn on the code's switch (trace normalisation, prior scaling and the
    # spectral refinement) on some tensors; equal weights leave it off on all of them.
    base, *fine_tunes = full_rank_family
    config = write_config(tmp_path / "ace.yml", "ace", base, fine_tunes, {"lambda": 0.9}, [{"weight": w} for w in weights])
    mergekit_yaml(config, tmp_path / "out")
    merged, models_ = load_model(tmp_path / "out"), [load_model(p) for p in full_rank_family]
    switched = []
    for name in (n for n in merged if is_llama_linear(n)):
        w0 = models_[0][name].double()
        tv = [w * (m[name].double() - w0) for w, m in zip(weights, models_[1:])]
        switched.append(ace_heterogeneity(tv)[1])
        expected = w0 + 0.9 * ace_reference(tv)
        error = (merged[name].double() - expected).norm() / (expected - w0).norm()
        assert error < 1e-5, f"{name}: relative error {error:.2e}"
    assert len(switched) == 14 and any(switched) == (weights[1] != 1.0)


def test_shards_and_lazy_unpickle_give_the_same_tensors(family, tmp_path):
    # The same family saved as pytorch_model.bin, read with --lazy-unpickle, written in shards.
    bin_family = []
    for path in family:
        target = tmp_path / "bin" / path.name
        target.mkdir(parents=True)
        (target / "config.json").write_text((path / "config.json").read_text())
        torch.save(load_model(path), target / "pytorch_model.bin")
        bin_family.append(target)
    sharded = run_method(bin_family, tmp_path, "wudi_cfs", None, "--lazy-unpickle", "--out-shard-size", "40K")
    shards = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 3
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sharded)
    whole = run_method(family, tmp_path / "whole", "wudi_cfs")
    assert sharded.keys() == whole.keys()
    for name in whole:
        assert torch.equal(sharded[name], whole[name]), name


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("bf16"), dtype=torch.bfloat16)


@pytest.mark.parametrize(
    "method, reference",
    [("wudi_cfs", lambda tv: wudi_closed_form(tv, 0.1)), *((m, r) for m, _, r in SPECTRAL)],
    ids=["wudi_cfs", *(m for m, _, _ in SPECTRAL)],
)
def test_bfloat16_checkpoints_come_back_bfloat16(bf16_family, tmp_path, method, reference):
    family = bf16_family
    merged = run_method(family, tmp_path, method, None)
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    name = "model.layers.1.mlp.down_proj.weight"
    base, tv = task_vectors(family, name)  # from the bf16 values, in float64
    expected = base + 0.9 * reference(tv)
    # Solved in float32, then rounded once to bf16: about as far from the float64 answer
    # as that answer rounded to bf16 is, plus a float32-solve term (wudi_cfs: the Gram of
    # rank-2 task vectors is ill-conditioned) small next to the tensor's change.
    error = (merged[name].double() - expected).norm()
    rounding = (expected.to(torch.bfloat16).double() - expected).norm()
    assert error <= 1.5 * rounding + 1e-3 * (expected - base).norm()
    assert (merged[name].double() - (base + 0.9 * tv.sum(0))).norm() > 5 * error


def test_solve_filter_sends_down_proj_to_the_fallback(family, task_arithmetic, tmp_path):
    solve = [{"filter": "down_proj", "value": False}, {"value": True}]
    merged = run_method(family, tmp_path, "wudi_cfs", {"solve": solve})
    for name, tensor in merged.items():
        if "down_proj" in name:
            assert torch.equal(tensor, task_arithmetic[name]), name
        elif is_llama_linear(name):
            assert not torch.equal(tensor, task_arithmetic[name]), name


def test_a_density_scoped_by_filter_reaches_the_fallback_only(family, tmp_path):
    # examples/wudi_filters.yml's pattern: down_proj goes to a ties fallback at density 0.5, and
    # density, also the method's own trim, is 1 on the tensors it solves. Those then match a run
    # with no density (full fine-tunes: no trim by default), down_proj a run with 0.5 everywhere.
    base, *models = family

    def run(name, per_model_density=None, shared=None):
        parameters = {"fallback": "ties", "solve": [{"filter": "down_proj", "value": False}, {"value": True}], **(shared or {})}
        model_parameters = [{"weight": w, **({"density": per_model_density} if per_model_density else {})} for w in WEIGHTS]
        mergekit_yaml(write_config(tmp_path / f"{name}.yml", "wudi_cfs", base, models, parameters, model_parameters), tmp_path / name)
        return load_model(tmp_path / name)

    scoped = run("scoped", [{"filter": "down_proj", "value": 0.5}, {"value": 1.0}])
    unset, everywhere = run("unset"), run("everywhere", shared={"density": 0.5})
    linear = [name for name in scoped if is_llama_linear(name)]
    assert any("down_proj" in name for name in linear) and any("down_proj" not in name for name in linear)
    for name in linear:
        if "down_proj" in name:
            assert torch.equal(scoped[name], everywhere[name]) and not torch.equal(scoped[name], unset[name]), name
        else:
            assert torch.equal(scoped[name], unset[name]) and not torch.equal(scoped[name], everywhere[name]), name


def test_bad_parameter_fails_before_writing(family, tmp_path):
    base, *models = family
    config = write_config(tmp_path / "bad.yml", "wudi", base, models, {"lr": -1.0})
    result = mergekit_yaml(config, tmp_path / "out", check=False)
    assert result.returncode != 0
    assert "lr must be a finite number > 0" in result.stderr
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_doge_with_one_real_and_one_all_zero_task_vector(family, tmp_path):
    # ft_zero is a copy of the base: its task vector is zero everywhere and takes no
    # part, so the merge is DOGE with N = 1 on ft1's task vector.
    zero = save_model(tmp_path / "ft_zero", load_model(family[0]))
    config = write_config(tmp_path / "doge.yml", "doge", family[0], [family[1], zero], {"steps": 50})
    mergekit_yaml(config, tmp_path / "out")
    merged = load_model(tmp_path / "out")
    base, ft1 = load_model(family[0]), load_model(family[1])
    for name, tensor in merged.items():
        assert torch.isfinite(tensor).all(), name
        if is_llama_linear(name):
            single = (ft1[name].float() - base[name].float()).unsqueeze(0)
            expected = base[name].float() + DogeSolver(DogeConfig(steps=50)).solve(single)
            torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-7)


def test_iso_warns_once_when_lora_and_full_fine_tunes_are_merged_together(family, full_rank_family, tmp_path):
    # ft1 of the rank-2 family and ft1 of the full-rank one (same base, seed 0): ranks 2
    # and 64 of 64 in every linear weight, LoRA-like and fully fine-tuned together.
    base, low, *_ = family
    _, full, *_ = full_rank_family
    assert torch.equal(load_model(base)["model.norm.weight"], load_model(full_rank_family[0])["model.norm.weight"])
    config = write_config(tmp_path / "mixed.yml", "iso_c", base, [low, full])
    result = mergekit_yaml(config, tmp_path / "out")
    assert result.stderr.count("iso_c: the task vectors mix low and full rank") == 1
    assert "prefer wudi_cfs or doge" in result.stderr
    same_rank = mergekit_yaml(write_config(tmp_path / "low.yml", "iso_c", base, family[1:]), tmp_path / "out2")
    assert "mix low and full rank" not in same_rank.stderr
    # Low-rank task vectors of full models are not adapters the YAML names: no adapter warning.
    assert "LoRA adapters" not in result.stderr + same_rank.stderr
