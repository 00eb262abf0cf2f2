"""mergekit-facing layer: one GroupMergeMethod class, instantiated once per method.

A tensor that tensor_kinds.will_solve accepts becomes task vectors in the compute dtype,
goes through the solver, and comes back as W0 + lambda * t_m in the base dtype; every
other tensor goes to the configured fallback method (fallback.py). The spec is built in
spec.py from the solver's config.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import GroupMergeMethod, MergeMethodSpec, TensorGroup

from mergekit_wudi.cache import SolveCache
from mergekit_wudi.config_error import ConfigError
from mergekit_wudi.fallback import merge_by_fallback
from mergekit_wudi.guard import AVERAGE, expert_kinds, kind_parts, with_guarded_lambda
from mergekit_wudi.progress import PROGRESS, log_objective, objective_logged
from mergekit_wudi.solvers import SOLVERS, compute_dtype
from mergekit_wudi.solvers.base import Part, warn_once
from mergekit_wudi.spec import build_spec
from mergekit_wudi.tensor_kinds import OURS_MARKER, fallback_reason, is_input_major, is_ours

logger = logging.getLogger(__name__)


def warn_lora_adapters(method: str, entries, strength: float) -> None:
    """Once per method and process, where the YAML names two or more LoRA adapters (`model: base+adapter`)
    and lambda is still 1 after adapter_guard (off, or the weights did not show adapters): what
    the task vectors cannot show about them, and what was measured. Only for methods whose
    strength lambda alone sets (Solver.sums_disjoint)."""
    adapters = [str(entry.id) for entry in entries if getattr(entry.id, "lora", None) is not None]
    if len(adapters) < 2 or strength != 1.0:  # one adapter: no other adapter to add on its inputs (guard.py)
        return
    count = len(entries)
    warn_once(
        logger, "lora adapters", method,
        "%s: %d of the %d fine-tunes are LoRA adapters (%s), and lambda stays 1 (adapter_guard is off, or their "
        "weights did not show what kind of adapters they are). An adapter's input space is its random "
        "initialisation, so the task vectors do not show how much adapters interfere on real inputs, and lambda 1 "
        "can be far too strong: on this package's benchmarks (test split) adapters with a seed each were 0.4-3.8 "
        "points below the best built-in at lambda 1 and level with it at 1/sqrt(K), K adapters; adapters trained from one seed scored "
        "13-24 with wudi_cfs, tsv, ace and iso_c at lambda 1, against 52 for task_arithmetic at 0.2. Without a "
        "validation set, lambda %.2g (1/sqrt(K)), or %.2g (1/(N+1)) for adapters trained from one seed, is the "
        "safer start; README, 'Which method when', has each method's numbers.",
        method, len(adapters), count, ", ".join(adapters), 1.0 / math.sqrt(len(adapters)), 1.0 / (count + 1),
    )


@dataclass(frozen=True)
class SolverMergeMethod(GroupMergeMethod):
    """A mergekit method that solves linear weights with `solver_cls` and sends the rest to a fallback.

    Parameters (see spec.py): the solver config's fields, plus `weight` (per model),
    `lambda`, `fallback`, `solve` and `input_major`, plus every parameter of the other
    registered methods as an optional pass-through for the fallback.
    """

    solver_cls: type

    method_name = property(lambda self: self.solver_cls.name)
    method_pretty_name = property(lambda self: self.solver_cls.pretty_name)
    method_reference_url = property(lambda self: self.solver_cls.paper)
    config_cls = property(lambda self: self.solver_cls.config_cls)

    @property
    def spec(self) -> MergeMethodSpec:
        # Pass-through parameters mirror the registry, which can grow after this method
        # was built; the key is the tuple of registered names.
        registered = tuple(m.spec.name for m in registry.registered_methods() if not is_ours(m))
        return build_spec(self, tuple(MERGE_METHODS), registered)

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

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        name = group.metadata.name
        base = group.base
        if base is None:
            raise ConfigError(f"merge_method {self.method_name} needs a base model: tensor {name!r} has none; set base_model")
        _require_finite(self.method_name, group)
        reason = fallback_reason(
            name, base.tensor, group.metadata.vocabulary_axis, solve=parameters["solve"], fine_tunes=len(group.non_base)
        )
        if reason is not None:
            logger.debug("%s: %s -> fallback %s (%s)", self.method_name, name, parameters["fallback"], reason)
            PROGRESS.skipped(self.method_name, name)
            return merge_by_fallback(self.method_name, group, parameters)
        solver_cls = self.solver_cls
        parameters = with_guarded_lambda(self.method_name, group, parameters, sums_disjoint=solver_cls.sums_disjoint,
                                         task_sized=solver_cls.task_sized, by_kind=solver_cls.by_kind,
                                         default_calibration=solver_cls.calibration)
        if solver_cls.sums_disjoint:
            warn_lora_adapters(self.method_name, group.non_base, parameters["lambda"])
        densities = trim_densities(solver_cls, group, parameters)  # once: the key and the solve take them
        shares = equalize_shares(solver_cls, group, parameters)
        parts = kind_parts(self.method_name, group, parameters) if solver_cls.by_kind else None
        with PROGRESS.solving(self.method_name, name):
            cache = SolveCache.from_environment()  # opt-in: MERGEKIT_WUDI_CACHE=DIR
            if cache is None:
                return self._solve(group, parameters, densities, parts, shares)
            inputs = [base.tensor, *(entry.tensor for entry in group.non_base)]
            key_parameters = cache_key_parameters(self.config_cls, parameters, group.non_base, densities, parts, shares)
            return cache.solve(self.method_name, name, inputs, key_parameters,
                               lambda: self._solve(group, parameters, densities, parts, shares))

    def _solve(self, group: TensorGroup, parameters: Mapping[str, Any], densities: Tuple[float, ...],
               parts: Optional[Tuple[Part, ...]] = None, shares: Optional[Tuple[float, ...]] = None) -> torch.Tensor:
        name = group.metadata.name
        base = group.base.tensor
        entries = group.non_base
        transpose = is_input_major(name) if parameters["input_major"] is None else parameters["input_major"]
        base_c, task_vectors = _task_vectors(group, parameters["weight"], transpose)
        config, per_model = solver_arguments(self.config_cls, parameters, entries)
        by_kind = {} if parts is None else {"parts": parts}  # only by-kind solvers get them (a subclass's own __init__)
        solver = self.solver_cls(config, calibration=parameters["calibrate"], density=densities, equalize=shares,
                                 average=parameters.get(AVERAGE, False), **by_kind)
        try:  # the task vectors are ours; only -v's objective log reads them after the solve
            merged = solver.solve(task_vectors, overwrite=not objective_logged(), **per_model)  # (out, in)
        except torch.linalg.LinAlgError as error:
            models = ", ".join(str(entry.id) for entry in entries)
            raise FloatingPointError(
                f"{self.method_name}: solving tensor {name!r} failed (models: {models}): {error}; nothing was written"
            ) from None
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


def cache_key_parameters(config_cls: type, parameters: Mapping[str, Any], entries, densities: Tuple[float, ...],
                         parts: Optional[Tuple[Part, ...]] = None,
                         shares: Optional[Tuple[float, ...]] = None) -> Dict[str, Any]:
    """What a solved tensor depends on besides its inputs (the cache key): never `fallback`."""
    config, per_model = solver_arguments(config_cls, parameters, entries)
    key = {
        "lambda": parameters["lambda"],
        "calibrate": parameters["calibrate"],
        "input_major": parameters["input_major"],
        "weight": [parameters["weight"][entry.id] for entry in entries],
        "density": list(densities),  # doge's: its config's, below
    }
    if parts is not None:  # absent otherwise: the keys of every other merge as before
        key["parts"] = [[list(part.indices), part.rule] for part in parts]
    if shares is not None:  # likewise
        key["equalize"] = list(shares)
    if parameters.get(AVERAGE):  # likewise
        key["average"] = True
    # The values the solver runs with: an unset parameter and its default share a key.
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        key[field.name] = per_model.get(field.name, [value] * len(entries)) if field.metadata.get("per_model") else value
    return key


def trim_densities(solver_cls: type, group: TensorGroup, parameters: Mapping[str, Any]) -> Tuple[float, ...]:
    """The pre-solve trim's density per fine-tune: its own where set; else the method's
    Solver.density for a fine-tune that adapter_guard's sample shows as a full fine-tune beside
    LoRA adapters, 1 (no trim) otherwise (docs/methods.md, "density"); 1 for doge, which trims
    inside its solve."""
    entries = group.non_base
    if solver_cls.density is None:
        return (1.0,) * len(entries)
    given = [parameters["density"][entry.id] for entry in entries]
    auto = set()
    if solver_cls.density < 1.0 and None in given and len(entries) >= 2:
        kinds = expert_kinds(group.base.id, [entry.id for entry in entries], group.base.tensor.device)
        auto = set(() if kinds is None else kinds.full_beside_adapters)
        if auto:
            names = ", ".join(str(entries[i].id) for i in sorted(auto) if given[i] is None)
            warn_once(logger, "trim", solver_cls.name,
                      "%s: %s look like full fine-tunes beside LoRA adapters (adapter_guard's sample), so their task "
                      "vectors keep their largest %.0f%% of entries before the solve (density %g; the adapters keep "
                      "theirs whole). Set density to choose.", solver_cls.name, names, 100 * solver_cls.density,
                      solver_cls.density)
    return tuple(value if value is not None else solver_cls.density if i in auto else 1.0 for i, value in enumerate(given))


def equalize_shares(solver_cls: type, group: TensorGroup, parameters: Mapping[str, Any]) -> Optional[Tuple[float, ...]]:
    """equalize.equalized's shares per fine-tune (|weight| for one equalized, else 0), None where
    fewer than two are: `equalize` where set; else, for a method that sums disjoint updates
    (Solver.sums_disjoint), the fine-tunes that adapter_guard's sample shows as LoRA adapters with a
    seed each, where it shows two or more and no adapter trained from one seed (the fine-tunes of its
    1/sqrt(K) cap, guard.ExpertKinds.cap; decided with adapter_guard: false too, as density is);
    docs/methods.md, "equalize"."""
    entries = group.non_base
    given = [parameters["equalize"][entry.id] for entry in entries]
    auto = set()
    if solver_cls.sums_disjoint and None in given and len(entries) >= 2:
        kinds = expert_kinds(group.base.id, [entry.id for entry in entries], group.base.tensor.device)
        decided = None if kinds is None else kinds.cap(len(entries), sums_disjoint=True)
        if decided is not None and not kinds.one_seed:
            auto = {i for i in decided[1] if given[i] is None}
        if len(auto) >= 2:
            warn_once(logger, "equalize", solver_cls.name,
                      "%s: %s look like LoRA adapters with a seed each (adapter_guard's sample), so their task vectors "
                      "are rescaled, per tensor, to one norm (the root mean square of theirs) before the solve: each "
                      "adapter reads every task's inputs about as much as its own, and at their own sizes the one that "
                      "moved least loses its task first. Set equalize: false to keep their sizes.", solver_cls.name,
                      ", ".join(str(entries[i].id) for i in sorted(auto)))
    chosen = [value if value is not None else i in auto for i, value in enumerate(given)]
    if sum(chosen) < 2:  # one alone would come back unchanged
        return None
    weights = parameters["weight"]
    return tuple(abs(float(weights[entry.id])) if on else 0.0 for entry, on in zip(entries, chosen))


def solver_arguments(config_cls: type, parameters: Mapping[str, Any], entries) -> Tuple[Any, Dict[str, Any]]:
    """The solver config from the resolved parameters, and the per-model values set by any model."""
    shared: Dict[str, Any] = {}
    per_model: Dict[str, Any] = {}
    for field in dataclasses.fields(config_cls):
        value = parameters[field.name]
        if field.metadata.get("per_model"):
            values = [value[entry.id] for entry in entries]
            if any(v is not None for v in values):
                default = field.default
                per_model[field.name] = [default if v is None else v for v in values]
        elif value is not None:
            shared[field.name] = value
    return config_cls(**shared), per_model


def _task_vectors(group: TensorGroup, weights: Mapping[Any, float], transpose: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The base, (out, in), and t_i = weight_i (W_i - W0), (N, out, in), in the compute dtype.

    Peak memory of a solve, in tensors: the N task vectors, a float32 base where the
    checkpoint is not float32, and what the solver adds (at most SOLVE_EXTRA_TENSORS).
    """
    base = group.base.tensor
    dtype = compute_dtype(base.dtype)
    base_c = base.to(dtype)
    if transpose:
        base_c = base_c.T
    task_vectors = base_c.new_empty((len(group.non_base), *base_c.shape))  # (N, out, in)
    for index, entry in enumerate(group.non_base):
        tensor = entry.tensor
        if torch.promote_types(tensor.dtype, dtype) != dtype:
            tensor = tensor.to(dtype)  # wider than the compute dtype
        # bf16/fp16 are promoted inside the subtraction: no float32 temporary
        torch.sub(tensor.T if transpose else tensor, base_c, out=task_vectors[index])
        task_vectors[index].mul_(weights[entry.id])
    return base_c, task_vectors


def _require_finite(method_name: str, group: TensorGroup) -> None:
    for entry in group.entries:
        tensor = entry.tensor
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            role = "base model" if entry.is_base else "model"
            raise FloatingPointError(
                f"{method_name}: tensor {group.metadata.name!r} of {role} {entry.id} holds NaN or Inf values; "
                "refusing to merge it (fix or drop that checkpoint)"
            )


setattr(SolverMergeMethod, OURS_MARKER, True)  # is_ours: a marker, not a module name

# Our mergekit methods, one per solver; registration.add_method appends.
MERGE_METHODS: List[SolverMergeMethod] = [SolverMergeMethod(solver) for solver in SOLVERS]


def append_method(solver_cls: type) -> SolverMergeMethod:
    """A merge method for a Solver subclass, added to MERGE_METHODS (registration.add_method
    also registers it with mergekit)."""
    if any(method.method_name == solver_cls.name for method in MERGE_METHODS):
        raise ValueError(f"a merge method named {solver_cls.name!r} already exists")
    method = SolverMergeMethod(solver_cls)
    MERGE_METHODS.append(method)
    return method


def method_named(name: str) -> SolverMergeMethod:
    for method in MERGE_METHODS:
        if method.method_name == name:
            return method
    raise KeyError(name)


def __getattr__(attribute: str) -> SolverMergeMethod:
    """`<name>_merge_method`: the pyproject entry points' targets."""
    if attribute.endswith("_merge_method"):
        try:
            return method_named(attribute[: -len("_merge_method")])
        except KeyError:
            pass
    raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")
