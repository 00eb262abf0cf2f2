"""mergekit-facing layer: one GroupMergeMethod class, instantiated once per method.

It decides which tensors are linear weights, turns them into task vectors in the compute
dtype, calls a solver and writes W0 + lambda * t_m back in the base dtype; every other
tensor goes to the configured fallback method.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import typing
from dataclasses import dataclass
from typing import Any, Dict, Hashable, Mapping, Optional, Tuple

import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import (
    MISSING,
    BasePolicy,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)
from pydantic import AfterValidator
from typing_extensions import Annotated

from mergekit_wudi import registration as _registration
from mergekit_wudi.cache import SolveCache
from mergekit_wudi.errors import (
    ConfigError,
    LookAlikeParameter,
    lookalike_parameters,
    suggest,
    value_error_as_config_error,
)
from mergekit_wudi.progress import PROGRESS, log_objective
from mergekit_wudi.solvers import (
    DogeConfig,
    DogeSolver,
    WudiCfsConfig,
    WudiCfsSolver,
    WudiConfig,
    WudiSolver,
    compute_dtype,
)

logger = logging.getLogger(__name__)

BASE_FALLBACK = "base"
DEFAULT_FALLBACK = "task_arithmetic"

# 2-D `.weight` tensors that are lookup tables, not linear maps (besides anything with
# "embed" in its name and anything mergekit marks with a vocabulary axis).
_TABLE_MODULES = frozenset(
    {"wte", "wpe", "position_embeddings", "token_type_embeddings", "word_embeddings", "relative_attention_bias"}
)
# GPT-2 style Conv1D modules store their weight as (in, out).
_INPUT_MAJOR_MODULES = frozenset({"c_attn", "c_fc", "c_proj", "q_attn"})

# How the spec describes the other methods' parameters, which it only forwards to the fallback.
PASSTHROUGH_DESCRIPTION = "passed to the fallback method"

_SCOPE_ORDER = (ParameterScope.SHARED, ParameterScope.NON_BASE, ParameterScope.INPUT)


def parameter_role(parameter: ParameterSpec) -> str:
    """What a parameter of our spec is: 'own', 'passthrough' (another method's, for the
    fallback) or 'lookalike' (a trap for a misspelt name: not a parameter)."""
    if isinstance(parameter, LookAlikeParameter):
        return "lookalike"
    if parameter.description == PASSTHROUGH_DESCRIPTION:
        return "passthrough"
    return "own"


def _module_name(tensor_name: str) -> str:
    parts = tensor_name.split(".")
    return parts[-2] if len(parts) >= 2 else ""


def is_linear_weight(name: Optional[str], tensor: torch.Tensor, vocabulary_axis: Optional[int] = None) -> bool:
    """Whether a tensor is solved: a 2-D `*.weight` that is a linear map.

    Not linear: anything that is not 2-D, not named `*.weight`, marked by mergekit as
    having a vocabulary axis (token embeddings, lm_head), named like an embedding table
    (`embed` anywhere in the name, BERT's position/token-type embeddings, GPT-2's
    wte/wpe, T5's relative_attention_bias). An unnamed 2-D tensor (direct API use) is
    treated as linear.
    """
    if tensor.ndim != 2 or not tensor.is_floating_point() or vocabulary_axis is not None:
        return False
    if name is None:
        return True
    if not name.endswith(".weight"):
        return False
    return "embed" not in name.lower() and _module_name(name) not in _TABLE_MODULES


def is_input_major(name: Optional[str]) -> bool:
    """Detects GPT-2 style Conv1D weights (c_attn, c_fc, c_proj, q_attn), stored (in, out)."""
    return name is not None and _module_name(name) in _INPUT_MAJOR_MODULES


def _check_fallback(value: str) -> str:
    if value == BASE_FALLBACK:
        return value
    try:
        method = registry.get(value)
    except RuntimeError:
        names = sorted(m.spec.name for m in registry.registered_methods() if not _is_ours(m))
        guess = suggest(value, [*names, BASE_FALLBACK])
        hint = f"did you mean {guess!r}? " if guess else ""
        raise ValueError(
            f"fallback {value!r} is not a registered merge method; {hint}use 'base' or one of: {', '.join(names)}"
        ) from None
    if _is_ours(method):
        raise ValueError(f"fallback {value!r} is a solver method of mergekit-wudi; pick a method that merges any tensor")
    if method.spec.contract.base == BasePolicy.FORBIDDEN:
        raise ValueError(f"fallback {value!r} does not accept a base model")
    return value


def _is_ours(method: Any) -> bool:
    return isinstance(method, SolverMergeMethod)


def _validated(value_type: Any, check, method_name: str, name: str) -> Any:
    checks = () if check is None else (AfterValidator(check),)
    return Annotated[(value_type, *checks, value_error_as_config_error(method_name, name))]


@dataclass(frozen=True)
class SolverMergeMethod(GroupMergeMethod):
    """A mergekit method that solves linear weights with `solver_cls` and sends the rest to a fallback.

    Parameters (see `spec`): the solver config's fields, plus `weight` (per model),
    `lambda`, `fallback`, `solve` and `input_major`, plus every parameter of the other
    registered methods as an optional pass-through for the fallback.
    """

    method_name: str
    method_pretty_name: str
    method_reference_url: str
    config_cls: type
    solver_cls: type

    @property
    def spec(self) -> MergeMethodSpec:
        # Pass-through parameters mirror the registry, which can grow after this method
        # was built; the key is the tuple of registered names.
        return _build_spec(self, tuple(m.spec.name for m in registry.registered_methods() if not _is_ours(m)))

    def validate_inputs(self, input_ids, base_id=None, *, group_name=None) -> None:
        """mergekit's structural checks, with the two a user can cause said in one line."""
        if base_id is None:
            raise ConfigError(
                f"merge_method {self.method_name} needs a base model: set base_model to the model "
                "the fine-tunes started from (base_index= in merge_tensors)"
            )
        # mergekit checks the configured models at plan time (group_name "<module>.slices[i]",
        # or None from merge_tensors) and, per tensor, the models that hold it. A tensor that
        # only the base holds (an optional buffer the fine-tunes were saved without) goes to
        # the fallback, as task_arithmetic keeps the base's; only a config without
        # fine-tunes is an error.
        planning = group_name is None or ".slices[" in group_name
        if planning and all(input_id == base_id for input_id in input_ids):
            raise ConfigError(
                f"merge_method {self.method_name} needs at least one model besides the base model {base_id}: "
                "list the fine-tunes under models"
            )
        super().validate_inputs(input_ids, base_id, group_name=group_name)

    # --- the merge -----------------------------------------------------------------

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        name = group.metadata.name
        base = group.base
        if base is None:
            raise ValueError(f"{self.method_name}: tensor {name!r} has no base model; set base_model")
        _require_finite(self.method_name, group)
        if not group.non_base:
            reason = "only the base model has it"
        elif not parameters["solve"]:
            reason = "solve: false"
        elif not is_linear_weight(name, base.tensor, group.metadata.vocabulary_axis):
            reason = "not a linear weight"
        else:
            reason = None
        if reason is not None:
            logger.debug("%s: %s -> fallback %s (%s)", self.method_name, name, parameters["fallback"], reason)
            PROGRESS.skipped(self.method_name, name)
            return self._fallback(group, parameters)
        with PROGRESS.solving(self.method_name, name):
            cache = SolveCache.from_environment()  # opt-in: MERGEKIT_WUDI_CACHE=DIR
            if cache is None:
                return self._solve(group, parameters)
            inputs = [base.tensor, *(entry.tensor for entry in group.non_base)]
            keyed = self._keyed_parameters(parameters, group.non_base)
            return cache.solve(self.method_name, name, inputs, keyed, lambda: self._solve(group, parameters))

    def _keyed_parameters(self, parameters: Mapping[str, Any], entries) -> Dict[str, Any]:
        """What a solved tensor depends on besides its inputs (the cache key): never `fallback`."""
        config, per_model = self._config(parameters, entries)
        keyed = {
            "lambda": parameters["lambda"],
            "input_major": parameters["input_major"],
            "weight": [parameters["weight"][entry.id] for entry in entries],
        }
        # The values the solver runs with: an unset parameter and its default share a key.
        for field in dataclasses.fields(config):
            value = getattr(config, field.name)
            keyed[field.name] = per_model.get(field.name, [value] * len(entries)) if field.metadata.get("per_model") else value
        return keyed

    def _solve(self, group: TensorGroup, parameters: Mapping[str, Any]) -> torch.Tensor:
        name = group.metadata.name
        base = group.base.tensor
        entries = group.non_base
        transpose = parameters["input_major"]
        if transpose is None:
            transpose = is_input_major(name)

        # Peak memory of a solve, in tensors: the N task vectors, a float32 base where the
        # checkpoint is not float32, and what the solver adds (at most 6, see README).
        dtype = compute_dtype(base.dtype)
        base_c = base.to(dtype)
        if transpose:
            base_c = base_c.T
        task_vectors = base_c.new_empty((len(entries), *base_c.shape))  # (N, out, in)
        for index, entry in enumerate(entries):
            tensor = entry.tensor
            if torch.promote_types(tensor.dtype, dtype) != dtype:
                tensor = tensor.to(dtype)  # wider than the compute dtype
            # bf16/fp16 are promoted inside the subtraction: no float32 temporary
            torch.sub(tensor.T if transpose else tensor, base_c, out=task_vectors[index])
            task_vectors[index].mul_(parameters["weight"][entry.id])

        config, per_model = self._config(parameters, entries)
        merged = self.solver_cls(config).solve(task_vectors, **per_model)  # (out, in)
        log_objective(self.method_name, name, task_vectors, merged)
        del task_vectors
        result = torch.add(base_c, merged, alpha=parameters["lambda"], out=merged)  # in place
        if not bool(torch.isfinite(result).all()):
            models = ", ".join(str(entry.id) for entry in entries)
            raise FloatingPointError(
                f"{self.method_name}: the solved tensor {name!r} is not finite (models: {models}); "
                "nothing was written. Check the inputs, or lower lr / raise omega."
            )
        if transpose:
            result = result.T.contiguous()
        logger.debug(
            "%s: %s solved (N=%d, shape=%s, %s)",
            self.method_name,
            name,
            len(entries),
            tuple(base.shape),
            "input-major" if transpose else "output-major",
        )
        return result.to(base.dtype)

    def _config(self, parameters: Mapping[str, Any], entries) -> Tuple[Any, Dict[str, Any]]:
        """The solver config from the resolved parameters, and the per-model values."""
        shared: Dict[str, Any] = {}
        per_model: Dict[str, Any] = {}
        for field in dataclasses.fields(self.config_cls):
            value = parameters[field.name]
            if field.metadata.get("per_model"):
                values = [value[entry.id] for entry in entries]
                if any(v is not None for v in values):
                    default = field.default
                    per_model[field.name] = [default if v is None else v for v in values]
            elif value is not None:
                shared[field.name] = value
        return self.config_cls(**shared), per_model

    def _fallback(self, group: TensorGroup, parameters: Mapping[str, Any]) -> torch.Tensor:
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
                f"{self.method_name}: fallback {fallback!r} failed on tensor {group.metadata.name!r}: {error}"
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
            raise ValueError(
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
            raise ValueError(
                f"fallback {fallback!r} needs {parameter.name!r} for model {entry.id} on tensor "
                f"{group.metadata.name!r}; set it in that model's parameters"
            )
    return result


def _require_finite(method_name: str, group: TensorGroup) -> None:
    for entry in group.entries:
        tensor = entry.tensor
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            role = "base model" if entry.is_base else "model"
            raise FloatingPointError(
                f"{method_name}: tensor {group.metadata.name!r} of {role} {entry.id} holds NaN or Inf values; "
                "refusing to merge it (fix or drop that checkpoint)"
            )


@functools.cache
def _build_spec(method: SolverMergeMethod, registered: Tuple[str, ...]) -> MergeMethodSpec:
    passthrough = _passthrough_parameters(registered)
    hints = typing.get_type_hints(method.config_cls)

    def declare(name, value_type, scope, default, description, check=None) -> ParameterSpec:
        """One of our parameters, its value checked into a one-line ConfigError."""
        return ParameterSpec(
            name, _validated(value_type, check, method.method_name, name), scope, default=default, description=description
        )

    shared = ParameterScope.SHARED
    parameters = [
        declare("weight", float, ParameterScope.NON_BASE, 1.0, "scales this model's task vector"),
        declare("lambda", float, shared, 1.0, "scales the merged task vector"),
        declare("fallback", str, shared, DEFAULT_FALLBACK, "merge method for tensors that are not solved, or 'base'",
            check=_check_fallback),
        declare("solve", bool, shared, True, "false sends the tensor to the fallback"),
        declare("input_major", Optional[bool], shared, None, "weight stored (in, out); unset: detect GPT-2 Conv1D names"),
    ]
    for field in dataclasses.fields(method.config_cls):
        scope = ParameterScope.NON_BASE if field.metadata.get("per_model") else shared
        check = functools.partial(field.metadata["check"], field.name)
        shared_name = field.name in passthrough
        value_type = hints[field.name]
        description = field.metadata["help"]
        if shared_name:
            # Also a parameter of other methods: unset stays None so the fallback keeps
            # its own default, and the solver uses the config default.
            value_type = Optional[value_type]
            description += f" (default {field.default}; when set, also passed to the fallback)"
            check = functools.partial(_none_or, check)
        parameters.append(
            declare(field.name, value_type, scope, None if shared_name else field.default, description, check=check)
        )
    own = {parameter.name for parameter in parameters}
    parameters.extend(
        dataclasses.replace(spec, value_type=_validated(spec.value_type, None, method.method_name, name))
        for name, spec in passthrough.items()
        if name not in own
    )
    foreign: Dict[str, str] = {}  # our other methods' own parameters -> "wudi or doge"
    for other in MERGE_METHODS:
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


def _none_or(check, value):
    return None if value is None else check(value)


def _passthrough_parameters(registered: Tuple[str, ...]) -> Dict[str, ParameterSpec]:
    """Every parameter of the other registered methods, optional, for the fallback.

    Where methods disagree, the widest scope (shared < non-base < input) and `Any` win.
    """
    collected: Dict[str, ParameterSpec] = {}
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
            collected[parameter.name] = ParameterSpec(
                parameter.name,
                Optional[value_type],
                scope,
                default=None,
                description=PASSTHROUGH_DESCRIPTION,
            )
    return collected


wudi_merge_method = SolverMergeMethod(
    method_name="wudi",
    method_pretty_name="WUDI-Merging",
    method_reference_url="https://arxiv.org/abs/2503.08099",
    config_cls=WudiConfig,
    solver_cls=WudiSolver,
)
wudi_cfs_merge_method = SolverMergeMethod(
    method_name="wudi_cfs",
    method_pretty_name="WUDI-Merging (closed form)",
    method_reference_url="https://arxiv.org/abs/2503.08099",
    config_cls=WudiCfsConfig,
    solver_cls=WudiCfsSolver,
)
doge_merge_method = SolverMergeMethod(
    method_name="doge",
    method_pretty_name="DOGE-TA",
    method_reference_url="https://arxiv.org/abs/2501.01230",
    config_cls=DogeConfig,
    solver_cls=DogeSolver,
)

MERGE_METHODS = (wudi_merge_method, wudi_cfs_merge_method, doge_merge_method)


# mergekit may have been imported for the first time by this module: finish the automatic
# registration that had to wait for it (a no-op otherwise).
_registration.module_loaded(__name__)
