"""Checks of a whole merge configuration, before mergekit runs it.

`load_config` reads a YAML file into mergekit's MergeConfiguration and
`check_merge_method` looks its method up (both used by `mergekit-wudi run` and
`report`), with one line on failure. `check_config_keys` finds `parameters:` keys that
mergekit would silently ignore (the tests run it on every example).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import ParameterScope
from pydantic import ValidationError

from mergekit_wudi.config_error import ConfigError
from mergekit_wudi.names import suggest
from mergekit_wudi.spec import real_parameters
from mergekit_wudi.tensor_kinds import is_ours


def load_config(path: str):
    """A mergekit MergeConfiguration from a YAML file; ConfigError with one line on failure."""
    try:
        with open(path, encoding="utf-8") as file:
            data = yaml.safe_load(file)
    except OSError as error:
        raise ConfigError(f"cannot read config {path!r}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path!r} is not valid YAML: {error}") from None
    try:
        return MergeConfiguration.model_validate(data)
    except (ValidationError, RuntimeError, ValueError) as error:
        first = str(error).strip().splitlines()
        raise ConfigError(f"config {path!r} is not a valid mergekit config: {' '.join(first[:3])}") from None


def check_merge_method(config: Any, path: str) -> None:
    """ConfigError (one line) when the config's merge_method is not registered."""
    try:
        registry.get(config.merge_method)
    except RuntimeError:
        names = sorted(method.spec.name for method in registry.registered_methods())
        raise ConfigError(
            f"config {path!r}: unknown merge_method {config.merge_method!r}; registered: {', '.join(names)}"
        ) from None


def check_config_keys(config: Any) -> None:
    """Raise ConfigError for any `parameters:` key that mergekit would ignore.

    config: a mergekit MergeConfiguration whose merge_method is one of ours (others are
    left alone). Checks the global, per-module, per-slice and per-model blocks: every
    key must be a declared parameter, and a shared one (`steps`, `fallback`...) must
    not sit in a per-model block, where mergekit does not read it.
    """
    method = registry.get(config.merge_method)
    if not is_ours(method):
        return
    real = real_parameters(method.spec)
    names = [p.name for p in real]
    shared = {p.name for p in real if p.scope == ParameterScope.SHARED}
    for where, block, per_model in _parameter_blocks(config):
        for key in block or {}:
            if key not in names:
                guess = suggest(key, names)
                hint = f"did you mean {guess!r}?" if guess else f"the parameters are: {', '.join(sorted(names))}"
                raise ConfigError(f"unknown parameter {key!r} in {where} for merge_method {method.spec.name}: {hint}")
            if per_model and key in shared:
                raise ConfigError(
                    f"parameter {key!r} in {where} is shared by all models of merge_method {method.spec.name}, "
                    "and mergekit ignores it there: move it to the top-level parameters"
                )


def _parameter_blocks(config: Any) -> Sequence[Tuple[str, Optional[dict], bool]]:
    blocks = [("parameters", config.parameters, False)]
    for index, model in enumerate(config.models or ()):
        blocks.append((f"models[{index}] ({model.model}) parameters", model.parameters, True))

    def slices(prefix: str, definitions) -> None:
        for index, definition in enumerate(definitions or ()):
            blocks.append((f"{prefix}slices[{index}].parameters", definition.parameters, False))
            for source_index, source in enumerate(definition.sources):
                where = f"{prefix}slices[{index}].sources[{source_index}] ({source.model}) parameters"
                blocks.append((where, source.parameters, True))

    slices("", config.slices)
    for name, module in (config.modules or {}).items():
        blocks.append((f"modules.{name}.parameters", module.parameters, False))
        for index, model in enumerate(module.models or ()):
            blocks.append((f"modules.{name}.models[{index}] ({model.model}) parameters", model.parameters, True))
        slices(f"modules.{name}.", module.slices)
    return blocks
