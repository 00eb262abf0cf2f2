"""The mergekit-facing layer on in-memory tensors, through mergekit's own merge_tensors API."""

import pytest
import torch
from mergekit.merge_methods import merge_tensors
from registry import METHODS
from tensors import low_rank_task_vectors

from mergekit_wudi.config_error import ConfigError
from mergekit_wudi.solvers import (
    DogeSolver,
    IsoCSolver,
    IsoCtsSolver,
    TsvSolver,
    WudiCfsSolver,
    WudiConfig,
    WudiSolver,
)


def family(generator, count=3, shape=(12, 10), dtype=torch.float32):
    base = torch.randn(*shape, generator=generator, dtype=torch.float64) * 0.05
    if len(shape) == 2:
        deltas = low_rank_task_vectors(generator, count, *shape, scale=1e-2)
    else:
        deltas = torch.randn(count, *shape, generator=generator, dtype=torch.float64) * 1e-2
    return [base.to(dtype)] + [(base + d).to(dtype) for d in deltas]


def merge(method, tensors, name="model.layers.0.mlp.up_proj.weight", **parameters):
    return merge_tensors(tensors, method, base_index=0, name=name, parameters=parameters)


@pytest.mark.parametrize(
    "method, solver",
    [("wudi", WudiSolver()), ("wudi_cfs", WudiCfsSolver()), ("doge", DogeSolver()), ("tsv", TsvSolver()),
     ("iso_c", IsoCSolver(calibration="first_order")), ("iso_cts", IsoCtsSolver(calibration="first_order"))],
)  # each at its YAML defaults: iso_c and iso_cts calibrate (docs/methods.md), the others do not
def test_linear_weight_is_base_plus_lambda_times_solution(generator, method, solver):
    tensors = family(generator)
    weights = [1.0, 0.5, 2.0]
    merged = merge(method, tensors, weight=weights, **{"lambda": 0.8})
    task_vectors = torch.stack([w * (t - tensors[0]) for w, t in zip(weights, tensors[1:])])
    expected = tensors[0] + 0.8 * solver.solve(task_vectors)
    torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-7)
    plain = merge("task_arithmetic", tensors, weight=weights, **{"lambda": 0.8})
    assert (merged - plain).norm() > 1e-3 * (plain - tensors[0]).norm()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name, shape", [("model.norm.weight", (12,)), ("model.embed_tokens.weight", (40, 12))])
def test_non_linear_tensors_are_bit_identical_to_task_arithmetic(generator, method, name, shape):
    tensors = family(generator, shape=shape, dtype=torch.bfloat16)
    ours = merge(method, tensors, name=name, weight=[0.3, 1.0, 0.7], **{"lambda": 1.3})
    plain = merge("task_arithmetic", tensors, name=name, weight=[0.3, 1.0, 0.7], **{"lambda": 1.3})
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, plain)


@pytest.mark.parametrize("method", METHODS)
def test_solve_false_sends_a_linear_weight_to_the_fallback(generator, method):
    tensors = family(generator)
    ours = merge(method, tensors, solve=False, weight=[1.0, 1.0, 1.0])
    assert torch.equal(ours, merge("task_arithmetic", tensors, weight=[1.0, 1.0, 1.0]))


def test_fallback_base_keeps_the_base_tensor(generator):
    tensors = family(generator, shape=(12,))
    assert torch.equal(merge("wudi", tensors, name="model.norm.weight", fallback="base"), tensors[0])


def test_fallback_parameters_pass_through(generator):
    tensors = family(generator, shape=(30,))
    args = dict(name="model.norm.weight", weight=[1.0, 0.5, 1.0], density=[0.5, 0.2, 0.9])
    ours = merge("wudi", tensors, fallback="ties", normalize=False, **args)
    plain = merge("ties", tensors, normalize=False, **args)
    assert torch.equal(ours, plain)
    assert not torch.equal(ours, merge("ties", tensors, **args))  # normalize did pass through


def test_doge_density_reaches_the_solver_and_the_fallback(generator):
    tensors = family(generator)
    merged = merge("doge", tensors, density=[0.5, 0.5, 0.2])
    task_vectors = torch.stack([t - tensors[0] for t in tensors[1:]])
    expected = tensors[0] + DogeSolver().solve(task_vectors, density=[0.5, 0.5, 0.2])
    torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-7)
    norms = family(generator, shape=(30,))
    assert torch.equal(
        merge("doge", norms, name="model.norm.weight", fallback="ties", density=0.4),
        merge("ties", norms, name="model.norm.weight", weight=1.0, density=0.4),
    )


def test_input_major_weights_are_solved_transposed(generator):
    tensors = family(generator, shape=(10, 30))  # stored (in, out) as GPT-2's Conv1D
    config = WudiConfig(steps=30)
    name = "transformer.h.0.mlp.c_fc.weight"
    merged = merge("wudi", tensors, name=name, steps=30)
    task_vectors = torch.stack([t - tensors[0] for t in tensors[1:]])
    expected = tensors[0] + WudiSolver(config).solve(task_vectors.transpose(1, 2)).T
    torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-7)
    not_transposed = tensors[0] + WudiSolver(config).solve(task_vectors)
    assert (merged - not_transposed).norm() > 1e-3 * (expected - tensors[0]).norm()
    forced = merge("wudi", tensors, name=name, steps=30, input_major=False)
    torch.testing.assert_close(forced, not_transposed, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_solved_in_float32_and_returned_in_kind(generator, dtype):
    tensors = family(generator, dtype=dtype)
    merged = merge("wudi_cfs", tensors)
    assert merged.dtype == dtype
    task_vectors = torch.stack([t.float() - tensors[0].float() for t in tensors[1:]])
    expected = (tensors[0].float() + WudiCfsSolver().solve(task_vectors)).to(dtype)
    torch.testing.assert_close(merged, expected, rtol=0, atol=0)


def test_non_finite_input_names_tensor_and_model(generator):
    tensors = family(generator)
    tensors[2] = tensors[2].clone()
    tensors[2][3, 4] = float("nan")
    with pytest.raises(FloatingPointError, match=r"up_proj.weight.*model 2"):
        merge_tensors(tensors, "wudi", base_index=0, ids=[0, 1, 2, 3], name="model.layers.0.mlp.up_proj.weight")


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"fallback": "nope"}, "fallback 'nope' is not a registered merge method"),
        ({"fallback": "wudi_cfs"}, "solver method"),
        ({"steps": -3}, "steps must be"),
        ({"lr": 0}, "lr must be"),
    ],
)
def test_bad_parameters_are_rejected_with_their_name(generator, parameters, message):
    with pytest.raises(ConfigError, match=message):
        merge("wudi", family(generator), **parameters)


def test_all_zero_task_vectors_give_the_base(generator):
    base = torch.randn(8, 8, generator=generator)
    merged = merge("wudi", [base, base.clone(), base.clone()])
    assert torch.equal(merged, base)


def test_a_failed_factorisation_names_the_tensor_and_the_models(generator, monkeypatch):
    from mergekit_wudi.solvers import AceSolver

    def fail(self, prepared):
        raise torch.linalg.LinAlgError("not positive definite")

    monkeypatch.setattr(AceSolver, "_solve", fail)
    with pytest.raises(FloatingPointError, match=r"ace: solving tensor 'model.layers.0.mlp.up_proj.weight' failed "
                                                 r"\(models: .*\): not positive definite; nothing was written"):
        merge("ace", family(generator))
