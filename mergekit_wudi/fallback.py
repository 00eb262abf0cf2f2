"""The fallback method: which names are allowed, and running it on one tensor group.

Every tensor our methods do not solve (see tensor_kinds.will_solve) goes to the
`fallback` method, with our resolved parameters re-scoped to what it declares.
"""

from __future__ import annotations

from typing import Any, Dict, Hashable, Mapping

import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import MISSING, BasePolicy, ParameterScope, ParameterSpec, TensorGroup

from mergekit_wudi.config_error import ConfigError
from mergekit_wudi.names import suggest
from mergekit_wudi.tensor_kinds import is_ours

BASE_FALLBACK = "base"
DEFAULT_FALLBACK = "task_arithmetic"


def check_fallback(value: str) -> str:
    """The `fallback` parameter's check: 'base' or a registered method that merges any tensor."""
    if value == BASE_FALLBACK:
        return value
    try:
        method = registry.get(value)
    except RuntimeError:
        names = sorted(m.spec.name for m in registry.registered_methods() if not is_ours(m))
        guess = suggest(value, [*names, BASE_FALLBACK])
        hint = f"did you mean {guess!r}? " if guess else ""
        raise ValueError(
            f"fallback {value!r} is not a registered merge method; {hint}use 'base' or one of: {', '.join(names)}"
        ) from None
    if is_ours(method):
        raise ValueError(f"fallback {value!r} is a solver method of mergekit-wudi; pick a method that merges any tensor")
    if method.spec.contract.base == BasePolicy.FORBIDDEN:
        raise ValueError(f"fallback {value!r} does not accept a base model")
    return value


def merge_by_fallback(method_name: str, group: TensorGroup, parameters: Mapping[str, Any]) -> torch.Tensor:
    """The tensor merged by parameters['fallback'], given the parameters it declares."""
    fallback = parameters["fallback"]
    if fallback == BASE_FALLBACK:
        return group.base.tensor
    method = registry.get(fallback)
    arguments = {}
    for parameter in method.spec.parameters:
        if parameter.name in parameters:
            value = _fallback_argument(parameter, parameters[parameter.name], group, fallback)
            if value is not None:
                arguments[parameter.name] = value
    try:
        (result,) = method((group,), parameters=arguments)
    except (TypeError, ValueError, RuntimeError) as error:
        raise RuntimeError(
            f"{method_name}: fallback {fallback!r} failed on tensor {group.metadata.name!r}: {error}"
        ) from error
    return result


def _fallback_argument(parameter: ParameterSpec, value: Any, group: TensorGroup, fallback: str) -> Any:
    """Our resolved value of a parameter, in the scope the fallback declares; None: unset."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        return value  # a shared value; mergekit broadcasts it to per-model scopes
    given = {key: v for key, v in value.items() if v is not None}
    if not given:
        return None
    if parameter.scope == ParameterScope.SHARED:
        distinct = set(given.values())
        if len(distinct) > 1:
            raise ConfigError(
                f"fallback {fallback!r} takes one shared {parameter.name!r}, but the models give {sorted(distinct)} "
                f"on tensor {group.metadata.name!r}"
            )
        return distinct.pop()
    entries = group.non_base if parameter.scope == ParameterScope.NON_BASE else group.entries
    result: Dict[Hashable, Any] = {}
    for entry in entries:
        if entry.id in given:
            result[entry.id] = given[entry.id]
        elif parameter.default is not MISSING:
            result[entry.id] = parameter.default
        else:
            raise ConfigError(
                f"fallback {fallback!r} needs {parameter.name!r} for model {entry.id} on tensor "
                f"{group.metadata.name!r}; set it in that model's parameters"
            )
    return result
