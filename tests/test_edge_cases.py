"""Numerical edge cases and bad inputs, each through the real `mergekit-yaml` command.

The merges run in this process (tests/runner.py `mergekit_yaml_in_process`: the same
click command, planner, executor and writer, without a subprocess's ~5 s start-up), and
each checks values against an independent expectation.
"""

import pytest
import torch
from mergekit.merge_methods import registry
from models import fine_tune, is_llama_linear, llama_state_dict, load_model, make_family, save_model, write_config
from reference import calibrated, usable, wudi_adam, wudi_closed_form, wudi_ridge, wudi_ridge_loss
from reference_2025 import EPS32, iso_c, iso_cts, tsv_merge
from reference_ace import ace_reference
from registry import METHODS
from runner import mergekit_yaml_in_process as run

from mergekit_wudi.adapter import SolverMergeMethod

pytestmark = pytest.mark.e2e

LAMBDA = 0.9


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """base, ft1, ft2, a copy of the base (zero task vector), a second copy, a copy of ft1."""
    root = tmp_path_factory.mktemp("family")
    base, ft1, ft2 = make_family(root, fine_tunes=2)
    zero = save_model(root / "zero", load_model(base)).resolve()
    zero2 = save_model(root / "zero2", load_model(base)).resolve()
    ft1_copy = save_model(root / "ft1_copy", load_model(ft1)).resolve()
    return {"base": base, "ft1": ft1, "ft2": ft2, "zero": zero, "zero2": zero2, "ft1_copy": ft1_copy}


def count_solves(monkeypatch, method):
    """A list that gets N for every solve of `method`'s solver in this process."""
    solver_cls = registry.get(method).solver_cls
    original = solver_cls.solve
    solves = []

    def solve(self, task_vectors, **per_model):
        solves.append(task_vectors.shape[0])
        return original(self, task_vectors, **per_model)

    monkeypatch.setattr(solver_cls, "solve", solve)
    return solves


def merge(tmp_path, method, base, models, parameters=None, weights=None, label="out", *flags):
    parameters = {"lambda": LAMBDA, **(parameters or {})}
    config = write_config(tmp_path / f"{label}.yml", method, base, models, parameters,
                          [{"weight": w} for w in weights] if weights else None)
    run(config, tmp_path / label, *flags)
    return load_model(tmp_path / label)


def failed_merge(tmp_path, method, base, models, parameters=None, *flags):
    config = write_config(tmp_path / "bad.yml", method, base, models, parameters)
    result = run(config, tmp_path / "bad", *flags, check=False)
    assert result.exit_code != 0
    return str(result.exception), list((tmp_path / "bad").glob("*.safetensors"))


def task_vector(base_path, model_path, name, weight=1.0):
    """(W_i - W0) * weight in float64, from the stored values."""
    return (load_model(model_path)[name].double() - load_model(base_path)[name].double()) * weight


def relative_error(actual, expected, base):
    return float((actual.double() - expected).norm() / (expected - base).norm())


# --- zero task vectors, N = 1, identical fine-tunes -------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_zero_task_vector_takes_no_part(family, tmp_path, method):
    # A fine-tune identical to the base: the merge equals the merge without it (N = 1),
    # bit for bit, on every tensor (its zero delta adds nothing to the fallback either).
    with_zero = merge(tmp_path, method, family["base"], [family["ft1"], family["zero"]], weights=[0.8, 1.0])
    alone = merge(tmp_path, method, family["base"], [family["ft1"]], weights=[0.8], label="alone")
    assert with_zero.keys() == alone.keys()
    for name in alone:
        assert torch.equal(with_zero[name], alone[name]), name
    if method == "doge":
        return  # DOGE with N = 1 is checked against its reference in test_e2e.py
    # wudi, wudi_cfs and tsv with N = 1 return t_1: W0 + lambda * 0.8 * (W_1 - W0) (bit for
    # bit for wudi_cfs: test_wudi_cfs_with_one_fine_tune_returns_it_exactly); iso_c and
    # iso_cts return t_1 with its spectrum flattened (their float64 references, with the
    # float32 merge's cutoff: the stored t_1 is rank 2 plus its float32 rounding).
    # ace with N = 1 is its closed form, not t_1 (the code's switch is off for one task).
    single = {"wudi": lambda tv: tv[0], "wudi_cfs": lambda tv: tv[0], "tsv": lambda tv: tsv_merge(tv, EPS32),
              "iso_c": calibrated(lambda tv: iso_c(tv, EPS32)), "iso_cts": calibrated(lambda tv: iso_cts(tv, eps=EPS32)),
              "ace": lambda tv: ace_reference(list(tv))}
    base = load_model(family["base"])
    for name, tensor in alone.items():
        if is_llama_linear(name):
            tv = task_vector(family["base"], family["ft1"], name, 0.8).unsqueeze(0)
            expected = base[name].double() + LAMBDA * single[method](tv)
            assert relative_error(tensor, expected, base[name].double()) < 1e-5, name  # float32 rounding only
            if method in ("iso_c", "iso_cts", "ace"):  # the flattened spectrum, or ACE's closed form, is not t_1
                assert relative_error(tensor, base[name].double() + LAMBDA * tv[0], base[name].double()) > 1e-2, name


@pytest.mark.parametrize("method", METHODS)
def test_all_task_vectors_zero_give_the_base(family, tmp_path, monkeypatch, method):
    solves = count_solves(monkeypatch, method)
    merged = merge(tmp_path, method, family["base"], [family["zero"], family["zero2"]])
    assert solves and all(count == 2 for count in solves)  # the linear weights were solved, with N = 2
    base = load_model(family["base"])
    assert merged.keys() == base.keys()
    for name, tensor in merged.items():
        assert torch.equal(tensor, base[name]), name


def test_identical_fine_tunes_wudi_matches_the_reference(family, tmp_path):
    merged = merge(tmp_path, "wudi", family["base"], [family["ft1"], family["ft1_copy"]])
    base = load_model(family["base"])
    for name, tensor in merged.items():
        if is_llama_linear(name):
            t = task_vector(family["base"], family["ft1"], name)
            expected = base[name].double() + LAMBDA * wudi_adam(torch.stack([t, t]))
            assert relative_error(tensor, expected, base[name].double()) < 1e-4, name
            task_arithmetic = base[name].double() + LAMBDA * 2 * t
            assert relative_error(tensor, task_arithmetic, base[name].double()) > 1e-2, name


def test_identical_fine_tunes_wudi_cfs_give_that_fine_tune(family, tmp_path):
    # t_1 = t_2 = t: (2a t (t^T t + rI)) (2a (t^T t + rI))^-1 = t, for any omega (0: pinv).
    for omega in (0.1, 0.0):
        merged = merge(tmp_path, "wudi_cfs", family["base"], [family["ft1"], family["ft1_copy"]],
                       {"omega": omega}, label=f"omega{omega}")
        base = load_model(family["base"])
        for name, tensor in merged.items():
            if is_llama_linear(name):
                expected = base[name].double() + LAMBDA * task_vector(family["base"], family["ft1"], name)
                assert relative_error(tensor, expected, base[name].double()) < 1e-3, (omega, name)  # as above


@pytest.mark.parametrize("omega", [0.1, 0.0])
@pytest.mark.parametrize("with_zero", [False, True], ids=["N=1", "N_effective=1"])
def test_wudi_cfs_with_one_fine_tune_returns_it_exactly(family, tmp_path, omega, with_zero):
    # The closed form's exact answer for one task vector is t_1, for any ridge; the
    # merge must be W0 + lambda * (0.8 * (W_1 - W0)) in float32, bit for bit (before: a
    # float32 ridge solve, 2.6e-5 relative off).
    models = [family["ft1"], family["zero"]] if with_zero else [family["ft1"]]
    weights = [0.8, 1.0] if with_zero else [0.8]
    merged = merge(tmp_path, "wudi_cfs", family["base"], models, {"omega": omega}, weights=weights)
    base, tuned = load_model(family["base"]), load_model(family["ft1"])
    for name, tensor in merged.items():
        if is_llama_linear(name):
            expected = torch.add(base[name], (tuned[name] - base[name]) * 0.8, alpha=LAMBDA)
            assert torch.equal(tensor, expected), name


# --- non-finite inputs --------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, name, value",
    [
        ("ft2", "model.layers.1.mlp.up_proj.weight", float("nan")),  # a solved tensor
        ("ft1", "model.layers.1.input_layernorm.weight", float("inf")),  # a fallback tensor
        ("base", "model.layers.1.self_attn.o_proj.weight", float("-inf")),
    ],
)
def test_non_finite_input_fails_naming_tensor_and_model_and_writes_no_nan(family, tmp_path, model, name, value):
    state = load_model(family[model])
    state[name][1, ...] = value
    broken = save_model(tmp_path / f"{model}_broken", state).resolve()
    paths = {key: broken if key == model else family[key] for key in ("base", "ft1", "ft2")}
    # Small shards: tensors before the broken one may already be on disk.
    message, written = failed_merge(tmp_path, "wudi", paths["base"], [paths["ft1"], paths["ft2"]], None,
                                    "--out-shard-size", "20K")
    assert name in message and str(broken) in message and "NaN or Inf" in message
    for shard in written:
        for tensor_name, tensor in load_model(shard.parent).items():
            assert torch.isfinite(tensor).all(), tensor_name
    assert not (tmp_path / "bad" / "model.safetensors.index.json").exists()


# --- half precision, tiny task vectors ---------------------------------------------------------


def test_float16_with_large_task_vectors_is_solved_in_float32(tmp_path):
    # Deltas of ~10: ||t||^2 ~ 1e5 and the Gram entries overflow float16 (max 65504);
    # solved in float32 the merge is finite and within float16 rounding of the float64 answer.
    generator = torch.Generator().manual_seed(3)
    base_state = llama_state_dict(generator)
    base = save_model(tmp_path / "base", base_state, torch.float16).resolve()
    models = [save_model(tmp_path / f"ft{i}", fine_tune(base_state, generator, scale=20.0), torch.float16).resolve()
              for i in range(2)]
    merged = merge(tmp_path, "wudi_cfs", base, models)
    assert {t.dtype for t in merged.values()} == {torch.float16}
    base_tensors = load_model(base)
    for name, tensor in merged.items():
        assert torch.isfinite(tensor).all(), name
        if is_llama_linear(name):
            tv = torch.stack([task_vector(base, m, name) for m in models])
            assert tv.pow(2).sum(dim=(1, 2)).min() > 65504  # ||t||^2 itself overflows float16
            expected = base_tensors[name].double() + LAMBDA * wudi_closed_form(tv, 0.1)
            error = (tensor.double() - expected).norm()
            rounding = (expected.half().double() - expected).norm()
            assert error <= 1.5 * rounding + 1e-4 * (expected - base_tensors[name].double()).norm(), name


@pytest.mark.parametrize("method, parameters", [("wudi_cfs", {}), ("wudi_cfs", {"omega": 0.0}),
                                                ("wudi", {"lr": 1e-10, "steps": 100})])
def test_tiny_task_vectors_do_not_underflow(tmp_path, method, parameters):
    # Fine-tunes 1e-8 away from the base: ||t||^2 ~ 1e-13, weights 1/||t||^2 ~ 1e13. The
    # base's linear weights are 0 so that float32 stores such task vectors exactly (next
    # to weights of ~0.05 it would keep ~2 significant bits of them).
    generator = torch.Generator().manual_seed(4)
    base_state = {name: torch.zeros_like(t) if is_llama_linear(name) else t
                  for name, t in llama_state_dict(generator).items()}
    base = save_model(tmp_path / "base", base_state).resolve()
    models = [save_model(tmp_path / f"ft{i}", fine_tune(base_state, generator, scale=1e-8)).resolve() for i in range(3)]
    merged = merge(tmp_path, method, base, models, parameters)
    for name, tensor in merged.items():
        if is_llama_linear(name):
            tv = torch.stack([task_vector(base, m, name) for m in models])
            assert 0 < tv.pow(2).sum(dim=(1, 2)).max() < 1e-11
            if method == "wudi":
                expected = LAMBDA * wudi_adam(tv, parameters["steps"], parameters["lr"])
            else:
                expected = LAMBDA * wudi_closed_form(tv, parameters.get("omega", 0.1))
            zero = torch.zeros_like(expected)
            assert relative_error(tensor, expected, zero) < 1e-4, name
            assert relative_error(tensor, LAMBDA * tv.sum(0), zero) > 1e-2, name  # not task arithmetic


# --- singular and ill-conditioned Gram matrices for wudi_cfs ---------------------------------------


def test_singular_gram_omega_zero_is_the_minimum_norm_solution(family, tmp_path):
    # Rank-2 task vectors: sum_i a_i t_i^T t_i has rank <= 4 of 64 or 96; omega 0 -> pinv.
    merged = merge(tmp_path, "wudi_cfs", family["base"], [family["ft1"], family["ft2"]], {"omega": 0.0},
                   weights=[1.0, 0.7])
    base = load_model(family["base"])
    for name, tensor in merged.items():
        if is_llama_linear(name):
            tv = torch.stack([task_vector(family["base"], family["ft1"], name),
                              task_vector(family["base"], family["ft2"], name, 0.7)])
            w0 = base[name].double()
            expected = w0 + LAMBDA * wudi_closed_form(tv, 0.0)
            assert relative_error(tensor, expected, w0) < 1e-4, name
            assert relative_error(tensor, w0 + LAMBDA * tv.sum(0), w0) > 1e-2, name


def ill_conditioned_family(root, generator, spread=1e-5):
    """Linear deltas U diag(s) V^T with s from 0.01 down to 0.01 * spread (Gram: spread^2)."""
    base_state = llama_state_dict(generator)
    models = []
    for index in range(2):
        state = dict(base_state)
        for name, tensor in base_state.items():
            if is_llama_linear(name):
                out_features, in_features = tensor.shape
                rank = min(out_features, in_features)
                u, _ = torch.linalg.qr(torch.randn(out_features, rank, generator=generator, dtype=torch.float64))
                v, _ = torch.linalg.qr(torch.randn(in_features, rank, generator=generator, dtype=torch.float64))
                s = torch.logspace(0, torch.log10(torch.tensor(spread)).item(), rank, dtype=torch.float64) * 0.01
                state[name] = (tensor.double() + u @ torch.diag(s) @ v.T).float()
        models.append(save_model(root / f"ft{index}", state).resolve())
    return save_model(root / "base", base_state).resolve(), models


def test_ill_conditioned_gram(tmp_path):
    # Singular values spread over 1e5: the Gram's condition number is ~1e10 > 1/eps(float32).
    base, models = ill_conditioned_family(tmp_path, torch.Generator().manual_seed(5))
    base_tensors = load_model(base)
    for omega in (1e-3, 0.0):
        merged = merge(tmp_path, "wudi_cfs", base, models, {"omega": omega}, label=f"omega{omega}")
        for name, tensor in merged.items():
            assert torch.isfinite(tensor).all(), name
            if not is_llama_linear(name):
                continue
            tv = torch.stack([task_vector(base, m, name) for m in models])
            w0 = base_tensors[name].double()
            solved = (tensor.double() - w0) / LAMBDA
            best = wudi_closed_form(tv, omega)
            tasks, ridge = usable(tv), wudi_ridge(tv, omega)
            loss = [wudi_ridge_loss(x, tasks, ridge).item() for x in (solved, best, tv.sum(0))]
            excess = (loss[0] - loss[1]) / (loss[2] - loss[1])  # 0: optimal, 1: no better than task arithmetic
            if omega > 0:
                # The ridge bounds the condition number (~1e4 here): measured <= 1.5e-3 relative.
                assert relative_error(tensor, w0 + LAMBDA * best, w0) < 5e-3, name
                assert excess < 1e-6, name
            else:
                # No ridge: the float32 pseudo-inverse drops eigenvalues under in * eps * max (as
                # torch.linalg.pinv does), so the result is a near-minimiser (measured excess
                # <= 8e-5) but not the float64 minimum-norm one (measured 0.6-1.0 relative apart).
                assert excess < 1e-3, name


# --- structural faults and bad parameters: rejected before anything is written ---------------


def test_missing_tensor_names_the_tensor_and_the_model(family, tmp_path):
    state = load_model(family["ft2"])
    del state["model.layers.1.mlp.up_proj.weight"]
    missing = save_model(tmp_path / "missing", state).resolve()
    message, written = failed_merge(tmp_path, "wudi_cfs", family["base"], [family["ft1"], missing])
    assert "model.layers.1.mlp.up_proj.weight" in message and str(missing) in message
    assert not written


def test_shape_mismatch_names_the_tensor_and_the_shapes(family, tmp_path):
    state = load_model(family["ft2"])
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:95]
    wrong = save_model(tmp_path / "wrong", state).resolve()
    message, written = failed_merge(tmp_path, "wudi_cfs", family["base"], [family["ft1"], wrong])
    # mergekit's own message (raised before the merge method sees the tensors): the tensor
    # and the shapes in model order, not the model paths.
    assert "Tensor size mismatch for model.layers.1.mlp.up_proj.weight" in message
    assert "(95, 64)" in message and "(96, 64)" in message
    assert not written


@pytest.mark.parametrize(
    "method, parameters, message",
    [
        ("wudi", {"steps": -1}, "steps must be an integer >= 0, got -1"),
        ("doge", {"lr": -1e-4}, "lr must be a finite number > 0"),
        ("doge", {"density": 1.5}, "density must be in (0, 1], got 1.5"),
        ("doge", {"density": 0.0}, "density must be in (0, 1], got 0.0"),
        ("wudi_cfs", {"omega": -0.1}, "omega must be a finite number >= 0, got -0.1"),
        ("iso_cts", {"common_space_fraction": 1.5}, "common_space_fraction must be in (0, 1], got 1.5"),
        ("iso_cts", {"common_space_fraction": 0}, "common_space_fraction must be in (0, 1], got 0"),
        ("wudi", {"fallback": "no_such_method"}, "fallback 'no_such_method' is not a registered merge method"),
    ],
)
def test_bad_parameter_is_rejected_before_any_tensor_is_solved(family, tmp_path, monkeypatch, method, parameters, message):
    groups = []
    original = SolverMergeMethod.merge_group
    monkeypatch.setattr(SolverMergeMethod, "merge_group", lambda self, group, **p: groups.append(group) or original(self, group, **p))
    error, written = failed_merge(tmp_path, method, family["base"], [family["ft1"], family["ft2"]], parameters)
    assert message in error
    assert not written
    assert not groups  # no tensor reached the method, neither to be solved nor to go to the fallback


def test_per_model_density_out_of_range_names_the_parameter(family, tmp_path):
    config = write_config(tmp_path / "bad.yml", "doge", family["base"], [family["ft1"], family["ft2"]], None,
                          [{"density": 0.5}, {"density": -0.2}])
    result = run(config, tmp_path / "bad", check=False)
    assert "density must be in (0, 1], got -0.2" in str(result.exception)
    assert not list((tmp_path / "bad").glob("*.safetensors"))
