"""A solver method's mergekit spec: its own, pass-through and look-alike parameters.

A parameter's role is its type:

* `OwnParameter`: declared by this package (the solver config's fields, plus `weight`,
  `lambda`, `fallback`, `solve` and `input_major`); its value is checked into one
  ConfigError line.
* `PassThroughParameter`: a parameter of another registered method, optional, only
  forwarded to the fallback method.
* `LookAlikeParameter`: not a parameter. mergekit silently ignores a `parameters:` key
  that no method declares, and never shows a method the raw keys (it looks up only
  the declared names), so `step: 50` would merge with the defaults. The spec therefore
  also declares the likely look-alikes of our names (synonyms and spelling variants,
  each mapped to its target by names.suggest), input scope, so mergekit looks for them
  in every `parameters:` block, and any value fails with "did you mean ...?".
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

from mergekit.merge_methods import registry
from mergekit.merge_methods.base import BasePolicy, InputContract, MergeMethodSpec, ParameterScope, ParameterSpec
from pydantic import AfterValidator, ValidationError, WrapValidator
from typing_extensions import Annotated

from mergekit_wudi.config_error import ConfigError
from mergekit_wudi.fallback import DEFAULT_FALLBACK, check_fallback
from mergekit_wudi.names import SYNONYMS, spelling_variants, suggest
from mergekit_wudi.solvers.calibrate import CALIBRATIONS
from mergekit_wudi.solvers.checks import check_bool, check_choice, check_fraction

_SCOPE_ORDER = (ParameterScope.SHARED, ParameterScope.NON_BASE, ParameterScope.INPUT)
PASSTHROUGH_DESCRIPTION = "passed to the fallback method"


@dataclasses.dataclass(frozen=True)
class OwnParameter(ParameterSpec):
    """A parameter this package defines for the method."""


@dataclasses.dataclass(frozen=True)
class PassThroughParameter(ParameterSpec):
    """Another registered method's parameter, accepted only to be passed to the fallback."""


@dataclasses.dataclass(frozen=True)
class LookAlikeParameter(ParameterSpec):
    """A name that is not a parameter but looks like one: any value raises ConfigError.

    Part of the spec only so that mergekit looks the key up; listings of the method's
    parameters (`mergekit-wudi methods`) leave these out.
    """

    meant: str = ""


def parameter_role(parameter: ParameterSpec) -> str:
    """'own', 'passthrough' or 'lookalike': the role of a parameter of our spec, by type."""
    if isinstance(parameter, LookAlikeParameter):
        return "lookalike"
    if isinstance(parameter, PassThroughParameter):
        return "passthrough"
    return "own"


@functools.cache
def build_spec(method: Any, ours: Tuple[Any, ...], registered: Tuple[str, ...]) -> MergeMethodSpec:
    """The spec of `method` (a SolverMergeMethod): its parameters, contract and names.

    ours: all our methods (their configs' fields are traps under the others);
    registered: the names of the other registered methods, whose parameters pass through.
    """
    passthrough = _passthrough_parameters(registered)
    parameters = list(_own_parameters(method, passthrough))
    own = {parameter.name for parameter in parameters}
    parameters.extend(
        dataclasses.replace(spec, value_type=_validated(spec.value_type, None, method.method_name, name))
        for name, spec in passthrough.items()
        if name not in own
    )
    foreign: Dict[str, str] = {}  # our other methods' own parameters -> "wudi or doge"
    for other in ours:
        for field in dataclasses.fields(other.config_cls) if other is not method else ():
            foreign[field.name] = " or ".join(filter(None, (foreign.get(field.name), other.method_name)))
    parameters.extend(lookalike_parameters(method.method_name, own, [p.name for p in parameters], foreign))
    return MergeMethodSpec(
        name=method.method_name,
        parameters=tuple(parameters),
        contract=InputContract(base=BasePolicy.REQUIRED),  # no fine-tune: validate_inputs
        pretty_name=method.method_pretty_name,
        reference_url=method.method_reference_url,
        uses_accelerator=True,
    )


def _own_parameters(method: Any, passthrough: Mapping[str, ParameterSpec]) -> Iterable[OwnParameter]:
    hints = typing.get_type_hints(method.config_cls)

    def declare(name, value_type, scope, default, description, check=None) -> OwnParameter:
        """One of our parameters, its value checked into a one-line ConfigError."""
        value_type = _validated(value_type, check, method.method_name, name)
        return OwnParameter(name, value_type, scope, default=default, description=description)

    shared = ParameterScope.SHARED
    yield declare("weight", float, ParameterScope.NON_BASE, 1.0, "scales this model's task vector")
    yield declare("lambda", float, shared, 1.0, "scales the merged task vector")
    yield declare("calibrate", str, shared, method.solver_cls.calibration,
                  "merge strength rule before lambda: 'none', 'input_space' (no task gets more than its own update "
                  "in its own input space), 'sum_norm' (the merge takes the norm of the task vectors' sum), 'sum_cap' "
                  "(the merge no larger than that sum), 'mean_cap' (no larger than the task vectors' mean) or "
                  "'first_order' (the tasks' summed first-order gain, "
                  "sum_i <t_i, c t_m>, equals the experts' sum_i ||t_i||^2)",
                  check=functools.partial(check_choice(*CALIBRATIONS), "calibrate"))
    yield declare("adapter_guard", bool, shared, method.solver_cls.adapter_guard,
                  "cap lambda where the fine-tunes look like LoRA adapters: at "
                  + ("N/(N+1)" if method.solver_cls.task_sized else "1/(N+1)")
                  + " for adapters trained from one seed, merged with the base as one average unless calibrate names "
                    "another rule than the default"
                  + (", at 1/sqrt(K) for K >= 2 adapters with a seed each" if method.solver_cls.sums_disjoint else "")
                  + ("; full fine-tunes beside adapters merged apart from them, the two merges added"
                     if method.solver_cls.by_kind else "")
                  + " (guard.py); false keeps lambda and the method's own merge")
    if method.solver_cls.density is not None:  # doge declares its own, in its config
        # Also ties' parameter: unset stays None, so a ties fallback keeps its own default.
        auto = method.solver_cls.density
        yield declare("density", Optional[float], ParameterScope.NON_BASE, None,
                      "fraction of each task vector's entries kept by the magnitude trim before the solve (default "
                      + (f"{auto:g} for fine-tunes that look like full fine-tunes beside LoRA adapters, else 1;" if auto < 1
                         else "1;") + " 1 = no trim; when set, also passed to the fallback)",
                      check=functools.partial(_none_or, functools.partial(check_fraction, "density")))
    yield declare("equalize", Optional[bool], ParameterScope.NON_BASE, None,
                  "rescale this fine-tune's task vector, per tensor, to the root mean square norm of those equalized "
                  "with it (times |weight|) before the solve (default "
                  + ("true for LoRA adapters with a seed each where adapter_guard's sample shows two or more and none trained "
                     "from one seed, else false"
                     if method.solver_cls.sums_disjoint else "false") + ")",
                  check=functools.partial(_none_or, functools.partial(check_bool, "equalize")))
    yield declare("fallback", str, shared, DEFAULT_FALLBACK, "merge method for tensors that are not solved, or 'base'",
                  check=check_fallback)
    yield declare("solve", bool, shared, True, "false sends the tensor to the fallback")
    yield declare("input_major", Optional[bool], shared, None, "weight stored (in, out); unset: detect GPT-2 Conv1D names")
    for field in dataclasses.fields(method.config_cls):
        scope = ParameterScope.NON_BASE if field.metadata.get("per_model") else shared
        check = functools.partial(field.metadata["check"], field.name)
        value_type = hints[field.name]
        description = field.metadata["help"]
        default = field.default
        if field.name in passthrough:
            # Also a parameter of other methods: unset stays None so the fallback keeps
            # its own default, and the solver uses the config default.
            value_type = Optional[value_type]
            description += f" (default {field.default}; when set, also passed to the fallback)"
            check = functools.partial(_none_or, check)
            default = None
        yield declare(field.name, value_type, scope, default, description, check=check)


def _none_or(check, value):
    return None if value is None else check(value)


def _passthrough_parameters(registered: Tuple[str, ...]) -> Dict[str, PassThroughParameter]:
    """Every parameter of the other registered methods, optional, for the fallback.

    Where methods disagree, the widest scope (shared < non-base < input) and `Any` win.
    """
    collected: Dict[str, PassThroughParameter] = {}
    for method_name in registered:
        for parameter in registry.get(method_name).spec.parameters:
            if parameter.name in ("weight", "lambda"):
                continue
            previous = collected.get(parameter.name)
            value_type = parameter.value_type
            scope = parameter.scope
            if previous is not None:
                if previous.value_type != Optional[value_type]:
                    value_type = Any
                scope = max(previous.scope, scope, key=_SCOPE_ORDER.index)
            collected[parameter.name] = PassThroughParameter(
                parameter.name, Optional[value_type], scope, default=None, description=PASSTHROUGH_DESCRIPTION
            )
    return collected


# --- value checks: pydantic failures as one ConfigError line -------------------------------


def _validated(value_type: Any, check, method_name: str, name: str) -> Any:
    checks = () if check is None else (AfterValidator(check),)
    return Annotated[(value_type, *checks, value_error_as_config_error(method_name, name))]


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


# --- look-alikes ------------------------------------------------------------------------


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
        for variant in spelling_variants(name):
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


def real_parameters(spec: MergeMethodSpec) -> Sequence[ParameterSpec]:
    """The spec's parameters without the look-alike traps."""
    return [p for p in spec.parameters if not isinstance(p, LookAlikeParameter)]
