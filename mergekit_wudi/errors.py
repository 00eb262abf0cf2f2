"""Configuration mistakes, reported as one line that says what to change.

Two problems with mergekit's own reporting are handled here:

* A bad parameter value fails inside pydantic, whose ValidationError spreads the reason
  over three lines and ends with a URL. `ConfigError` is a RuntimeError, which pydantic
  passes through unwrapped, so the last line of the traceback is our sentence.
* mergekit silently ignores a `parameters:` key that no method declares, so `step: 50`
  or `learning_rate: 1e-4` would merge with the defaults. mergekit never shows a merge
  method the raw keys: it only looks up the names the method's spec declares
  (`parameter_resolver.resolve_parameter`). So the spec also declares the likely
  look-alikes of our names (`LookAlikeParameter`, input scope, so mergekit looks for
  them in the global, per-slice and every per-model `parameters:` block, plain or as a
  filter list or gradient) and fails as soon as one has a value. The table comes from a
  synonym list and spelling variants, each mapped to its target by `suggest()`, the same
  closeness rule `check_config_keys()` applies to every key of a whole configuration
  where one is at hand (the tests, `mergekit-wudi`).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

from mergekit.merge_methods.base import ParameterScope, ParameterSpec
from pydantic import AfterValidator, ValidationError, WrapValidator
from typing_extensions import Annotated

from mergekit_wudi import registration as _registration


class ConfigError(RuntimeError):
    """A mistake in the merge configuration that the user fixes in the YAML.

    A RuntimeError, not a ValueError: pydantic wraps ValueError raised by a validator
    into a multi-line ValidationError, and passes any other exception through.
    """


def install_excepthook() -> None:
    """Print an uncaught ConfigError as one line (`error: ...`) instead of a traceback.

    mergekit-yaml lets a configuration mistake escape as an exception, so the user would
    read our sentence at the bottom of a 40-line traceback. The hook is chained: every
    other exception goes to the hook that was there before. Idempotent.
    """
    import sys

    previous = sys.excepthook
    if getattr(previous, "_mergekit_wudi", False):
        return

    def hook(exc_type, exc, tb):
        if isinstance(exc, ConfigError):
            sys.stderr.write(f"error: {exc}\n")
            sys.stderr.flush()
        else:
            previous(exc_type, exc, tb)

    hook._mergekit_wudi = True
    sys.excepthook = hook


# Words people write for our parameters (other libraries' names, paper symbols,
# misspellings). Spelling variants (case, plural, trailing "_", "-" for "_") are
# generated from every declared name by `_variants`.
SYNONYMS: Mapping[str, str] = {
    "step": "steps",
    "iter": "steps",
    "iters": "steps",
    "iteration": "steps",
    "iterations": "steps",
    "num_steps": "steps",
    "n_steps": "steps",
    "max_steps": "steps",
    "num_iters": "steps",
    "num_iterations": "steps",
    "n_iter": "steps",
    "n_iters": "steps",
    "epochs": "steps",
    "num_epochs": "steps",
    "learning_rate": "lr",
    "learningrate": "lr",
    "lr_rate": "lr",
    "step_size": "lr",
    "lamda": "lambda",
    "lambd": "lambda",
    "lmbda": "lambda",
    "lam": "lambda",
    "scaling_coef": "lambda",
    "scaling_coefficient": "lambda",
    "scaling_factor": "lambda",
    "ridge": "omega",
    "reg": "omega",
    "regularization": "omega",
    "densities": "density",
    "keep_ratio": "density",
    "top_k": "density",
    "topk": "density",
    "trim": "density",
    "subspace_ratio": "subspace",
    "fall_back": "fallback",
    "fallback_method": "fallback",
    "fallback_merge_method": "fallback",
    "solver": "solve",
    "transpose": "input_major",
    "transposed": "input_major",
    "conv1d": "input_major",
}

_CUTOFF = 0.75  # difflib ratio; "stpes" -> "steps" is 0.8, "eta" -> "beta" 0.86


def _normal(key: str) -> str:
    return key.strip().lower().replace("-", "_").strip("_")


def suggest(key: str, names: Iterable[str]) -> Optional[str]:
    """The declared name that `key` most likely meant, or None.

    Synonym table first, then the same key up to case, "-"/"_" and surrounding "_",
    then its singular/plural, then difflib's closest name above `_CUTOFF`.
    """
    names = sorted(set(names))
    normal = _normal(key)
    by_normal = {_normal(name): name for name in names}
    target = SYNONYMS.get(normal)
    if target is not None and target in names:
        return target
    for candidate in (normal, normal[:-1] if normal.endswith("s") else normal + "s"):
        if candidate in by_normal:
            return by_normal[candidate]
    close = difflib.get_close_matches(normal, list(by_normal), n=1, cutoff=_CUTOFF)
    return by_normal[close[0]] if close else None


def _variants(name: str) -> Tuple[str, ...]:
    forms = {name + "_", name.capitalize(), name.upper(), name.replace("_", "-")}
    forms.add(name[:-1] if name.endswith("s") else name + "s")
    return tuple(forms)


# --- pydantic glue ---------------------------------------------------------------------


def value_error_as_config_error(method_name: str, parameter_name: str) -> WrapValidator:
    """A validator that turns any failure of the inner validation into one ConfigError line."""

    def wrap(value: Any, handler) -> Any:
        try:
            return handler(value)
        except ValidationError as error:
            detail = error.errors()[0]
            reason = str(detail.get("ctx", {}).get("error", "")) or f"{detail['msg']}, got {value!r}"
            raise ConfigError(
                f"invalid value for parameter {parameter_name!r} of merge_method {method_name}: {reason}"
            ) from None

    return WrapValidator(wrap)


@dataclasses.dataclass(frozen=True)
class LookAlikeParameter(ParameterSpec):
    """A name that is not a parameter but looks like one: any value raises ConfigError.

    Part of the spec only so that mergekit looks the key up; listings of the method's
    parameters (`mergekit-wudi methods`) leave these out.
    """

    meant: str = ""


def lookalike_parameters(
    method_name: str, own: Iterable[str], declared: Iterable[str], foreign: Mapping[str, str]
) -> Tuple[LookAlikeParameter, ...]:
    """Traps for the look-alikes of the method's own parameter names, and for `foreign` ones.

    own: the names this package defines for the method (`steps`, `lambda`, `fallback`...).
    declared: every parameter name of the method, the fallback's included: never a trap.
    foreign: name -> method, for our other methods' own parameters that this method does
    not take (`omega` under `merge_method: wudi` would otherwise be ignored).
    """
    own = set(own)
    declared = set(declared) | own
    candidates: Dict[str, str] = {key: target for key, target in SYNONYMS.items() if target in own}
    for name in sorted(own):
        for variant in _variants(name):
            candidates.setdefault(variant, name)
    traps = []
    for key, meant in sorted(candidates.items()):
        if key in declared or key in foreign or suggest(key, declared) != meant:
            continue
        message = f"unknown parameter {key!r} for merge_method {method_name}: did you mean {meant!r}?"
        traps.append(_trap(key, meant, message))
    for key, owner in sorted(foreign.items()):
        if key in declared:
            continue
        message = (
            f"parameter {key!r} belongs to merge_method {owner}, not {method_name}: remove it, "
            f"or set merge_method: {owner}"
        )
        traps.append(_trap(key, key, message))
    return tuple(traps)


def _trap(key: str, meant: str, message: str) -> LookAlikeParameter:
    def reject(value: Any) -> None:
        if value is not None:
            raise ConfigError(message)
        return None

    return LookAlikeParameter(
        key,
        Annotated[Optional[Any], AfterValidator(reject)],
        ParameterScope.INPUT,
        default=None,
        description=f"not a parameter (did you mean {meant!r}?)",
        meant=meant,
    )


# --- whole-configuration check -----------------------------------------------------------


def check_config_keys(config: Any) -> None:
    """Raise ConfigError for any `parameters:` key that mergekit would ignore.

    config: a mergekit MergeConfiguration whose merge_method is one of ours (others are
    left alone). Checks the global, per-module, per-slice and per-model blocks: every
    key must be a declared parameter, and a shared one (`steps`, `fallback`...) must
    not sit in a per-model block, where mergekit does not read it.
    """
    from mergekit.merge_methods import registry

    from mergekit_wudi.adapter import SolverMergeMethod

    method = registry.get(config.merge_method)
    if not isinstance(method, SolverMergeMethod):
        return
    real = [p for p in method.spec.parameters if not isinstance(p, LookAlikeParameter)]
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


# mergekit may have been imported for the first time by this module: finish the automatic
# registration that had to wait for it (a no-op otherwise).
_registration.module_loaded(__name__)
