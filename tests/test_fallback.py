"""fallback.py: which fallbacks are allowed, and how our parameters reach the fallback."""

import pytest
import torch
from mergekit.merge_methods import merge_tensors
from mergekit.merge_methods.base import TensorEntry, TensorGroup, TensorMetadata

from mergekit_wudi.config_error import ConfigError
from mergekit_wudi.fallback import BASE_FALLBACK, check_fallback, merge_by_fallback


def group(generator, count=2, name="model.norm.weight"):
    tensors = [torch.randn(6, generator=generator) for _ in range(count + 1)]
    entries = tuple(TensorEntry(id=f"m{index}", tensor=t, is_base=index == 0) for index, t in enumerate(tensors))
    return TensorGroup(entries=entries, metadata=TensorMetadata(name=name)), tensors


@pytest.mark.parametrize("value", [BASE_FALLBACK, "task_arithmetic", "ties", "linear"])
def test_mergers_of_any_tensor_are_accepted(value):
    assert check_fallback(value) == value


@pytest.mark.parametrize(
    "value, message",
    [
        ("tie", "fallback 'tie' is not a registered merge method; did you mean 'ties'?"),
        ("colour", "use 'base' or one of: "),
        ("wudi_cfs", "fallback 'wudi_cfs' is a solver method of mergekit-wudi"),
    ],
)
def test_other_fallbacks_are_refused_with_a_hint(value, message):
    with pytest.raises(ValueError, match=message):
        check_fallback(value)


def test_base_fallback_returns_the_base_tensor(generator):
    tensors, originals = group(generator)
    assert merge_by_fallback("wudi", tensors, {"fallback": BASE_FALLBACK}) is originals[0]


def test_per_model_values_are_rescoped_for_the_fallback(generator):
    tensors, originals = group(generator)
    parameters = {"fallback": "ties", "weight": {"m1": 0.5, "m2": 2.0}, "density": {"m1": None, "m2": 0.5},
                  "lambda": 2.0, "normalize": None}
    merged = merge_by_fallback("wudi", tensors, parameters)
    # density of m1 unset: ties' default 1.0; normalize unset: left to ties
    expected = merge_tensors(originals, "ties", base_index=0, name="model.norm.weight",
                             parameters={"weight": [0.5, 2.0], "density": [1.0, 0.5], "lambda": 2.0})
    assert torch.equal(merged, expected)
    assert not torch.equal(merged, originals[0])


def test_a_required_per_model_value_names_the_model(generator):
    tensors, _ = group(generator)
    parameters = {"fallback": "task_arithmetic", "weight": {"m1": 0.5, "m2": None}}
    with pytest.raises(ConfigError, match="fallback 'task_arithmetic' needs 'weight' for model m2 on tensor 'model.norm.weight'"):
        merge_by_fallback("wudi", tensors, parameters)


def test_a_shared_fallback_parameter_must_agree_across_models(generator):
    tensors, _ = group(generator)
    parameters = {"fallback": "karcher", "tol": {"m1": 1e-5, "m2": 1e-6}}
    with pytest.raises(ConfigError, match="fallback 'karcher' takes one shared 'tol', but the models give"):
        merge_by_fallback("wudi", tensors, parameters)
