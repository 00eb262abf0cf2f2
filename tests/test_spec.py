"""spec.py: the spec of each method; a parameter's role is its type."""

import dataclasses

import pytest
from mergekit.merge_methods import registry
from registry import METHODS

from mergekit_wudi.solvers import SOLVERS, DogeConfig, WudiConfig
from mergekit_wudi.spec import (
    PASSTHROUGH_DESCRIPTION,
    LookAlikeParameter,
    OwnParameter,
    PassThroughParameter,
    parameter_role,
)


@pytest.mark.parametrize("method", METHODS)
def test_no_lookalike_is_a_real_parameter_of_any_method(method):
    """No false positives: a trap never shadows a parameter of any registered method
    (the fallback's parameters are passed through), and a real name never traps."""
    spec = registry.get(method).spec
    traps = {p.name for p in spec.parameters if isinstance(p, LookAlikeParameter)}
    real = {p.name for m in registry.registered_methods() for p in m.spec.parameters if not isinstance(p, LookAlikeParameter)}
    ours = {p.name for p in spec.parameters if not isinstance(p, LookAlikeParameter)}
    assert traps and not traps & ours
    # Names that are real for another method are only traps when they are one of our
    # other methods' own parameters (omega under wudi).
    foreign = {field.name for solver in SOLVERS for field in dataclasses.fields(solver.config_cls)} - ours
    assert traps & real <= foreign


@pytest.mark.parametrize("method", METHODS)
def test_roles_are_types(method):
    spec = registry.get(method).spec
    roles = {p.name: parameter_role(p) for p in spec.parameters}
    assert roles["weight"] == roles["lambda"] == roles["fallback"] == roles["solve"] == "own"
    assert roles["int8_mask"] == "passthrough" and roles["lamda"] == "lookalike"
    for parameter in spec.parameters:
        expected = {"own": OwnParameter, "passthrough": PassThroughParameter, "lookalike": LookAlikeParameter}
        assert isinstance(parameter, expected[roles[parameter.name]]), parameter.name


def test_role_does_not_depend_on_the_description():
    passthrough = next(p for p in registry.get("wudi").spec.parameters if isinstance(p, PassThroughParameter))
    assert passthrough.description == PASSTHROUGH_DESCRIPTION
    assert parameter_role(dataclasses.replace(passthrough, description="reworded")) == "passthrough"
    own = next(p for p in registry.get("wudi").spec.parameters if p.name == "steps")
    assert parameter_role(dataclasses.replace(own, description=PASSTHROUGH_DESCRIPTION)) == "own"


def test_spec_defaults_come_from_the_config():
    spec = registry.get("wudi").spec
    defaults = {p.name: p.default for p in spec.parameters}
    assert defaults["steps"] == WudiConfig().steps and defaults["lr"] == WudiConfig().lr
    assert defaults["fallback"] == "task_arithmetic" and defaults["lambda"] == 1.0 and defaults["weight"] == 1.0
    doge = {p.name: p for p in registry.get("doge").spec.parameters}
    assert doge["eta"].default == DogeConfig().eta and doge["density"].scope.value == "non_base"
    assert registry.get("wudi_cfs").spec.pretty_name and registry.get("doge").spec.reference_url.startswith("https://arxiv.org/")
