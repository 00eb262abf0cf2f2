"""The one-seed guard (issue 23): where the fine-tunes look like LoRA adapters trained from one
seed, lambda is capped at 1/N.

Why. LoRA adapters trained from one seed start from one random A, and A barely moves in
training, so every adapter reads the same random input space: each acts on every task's inputs
alike, and the methods that separate tasks by their input spaces (WUDI's premise) cannot. At
lambda 1 their merge adds N updates where each task expects one. At lambda 1 every method but
doge broke SmolLM2's one-seed set (13-24 against 52 for task_arithmetic at 0.2) and lost 3-15
points on MiniLM's; at 1/N, the average, they were 40-50 and level with the best built-in
(docs/benchmarks.md, "The one-seed guard"). Such sets are common where trainers seed the random
number generator with one fixed default before the adapter is built.

What. Once per process and set of models: the first SAMPLE linear weights that the base and every
fine-tune hold and at least two fine-tunes changed (among the first SCAN candidates), in layer
order (the numbers in the name, then the name), give each fine-tune's median input and output
subspace overlap (solvers/overlap.py, one task vector at a time: at most three tensors of that
size beside the merge's own). Where any fine-tune's medians say "lora, one seed" (input
over output overlap above 5; full fine-tunes gave 0.9-3.5 on both benchmarks), every solved
tensor's lambda becomes min(lambda, 1/N). The sample is fixed by the names, not by the order
mergekit merges tensors in, so runs, shards and thread counts agree. `one_seed_guard: false`
keeps lambda as given (and warns instead).

Only where the models are known (mergekit-yaml, run_merge, mergekit-wudi report): merge_tensors
gives one tensor and no models, and there the guard does nothing.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mergekit_wudi.solvers.base import warn_once
from mergekit_wudi.solvers.overlap import model_kind, overlaps, task_subspaces
from mergekit_wudi.tensor_kinds import is_input_major, will_solve

logger = logging.getLogger(__name__)

SAMPLE = 12  # linear weights whose overlaps decide
SCAN = 16 * SAMPLE  # candidate names read at most, where few hold a change (a module no fine-tune trained)
ONE_SEED = "lora, one seed"

_MEASURED: Dict[Tuple[Any, ...], Optional[ExpertKinds]] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class ExpertKinds:
    """What the sample showed: the tensors, and per fine-tune its medians and solvers.overlap kind."""

    tensors: Tuple[str, ...]
    models: Tuple[str, ...]
    inputs: Tuple[float, ...]
    outputs: Tuple[float, ...]
    kinds: Tuple[str, ...]

    @property
    def one_seed(self) -> Tuple[int, ...]:
        return tuple(i for i, kind in enumerate(self.kinds) if kind == ONE_SEED)


def guarded_lambda(method: str, group: Any, strength: float, guard: bool, *, warn: bool = True) -> float:
    """The lambda a solved tensor of `group` (a mergekit TensorGroup) gets: min(strength, 1/N)
    where the guard is on and the fine-tunes look like one-seed adapters, else strength. With the
    guard off, `warn` says so once where they look like that (doge, whose default is off: not)."""
    if not (guard or warn):
        return strength
    models = [entry.id for entry in group.non_base]
    capped, kinds = capped_lambda(group.base.id, models, strength, group.base.tensor.device)
    if capped == strength:
        return strength
    count, found = len(models), kinds.one_seed
    evidence = (
        f"{len(found)} of the {count} fine-tunes look like LoRA adapters trained from one seed "
        f"({', '.join(kinds.models[i] for i in found)}: median input-space overlap "
        f"{'/'.join(f'{kinds.inputs[i]:.0f}' for i in found)} times chance, "
        f"{'/'.join(f'{kinds.inputs[i] / kinds.outputs[i]:.1f}' for i in found)} times their output spaces', over "
        f"{len(kinds.tensors)} tensors; full fine-tunes gave 0.9-3.5 times on this package's benchmarks). Such adapters "
        "all read one random input space, so each acts on every task's inputs"
    )
    if not guard:
        warn_once(logger, "one-seed adapters", method,
                  "%s: %s; one_seed_guard is off, so lambda stays %.3g: on SmolLM2's one-seed set the solved methods "
                  "at lambda 1 scored 13-24 against 52 for task_arithmetic at 0.2. Lambda %.2g (1/N) is the safer "
                  "start; `mergekit-wudi report` shows each model's overlaps.", method, evidence, strength, 1.0 / count)
        return strength
    warn_once(logger, "one-seed adapters", method,
              "%s: %s. lambda is capped at 1/N = %.3g for every solved tensor (one_seed_guard; set one_seed_guard: "
              "false to keep lambda %.3g).", method, evidence, 1.0 / count, strength)
    return capped


def capped_lambda(base: Any, models: Sequence[Any], strength: float, device: Any = "cpu") -> Tuple[float, Optional[ExpertKinds]]:
    """(min(strength, 1/N) where any of the N fine-tunes looks like a one-seed adapter, else
    strength; the sample's verdict, None where none was needed or possible)."""
    count = len(models)
    if count < 2 or strength <= 1.0 / count:
        return strength, None
    kinds = expert_kinds(base, models, device)
    return (1.0 / count if kinds is not None and kinds.one_seed else strength), kinds


def with_guarded_lambda(method: str, group: Any, parameters: Mapping[str, Any], *, warn: bool) -> Mapping[str, Any]:
    """The resolved parameters of a solved tensor with `lambda` replaced by guarded_lambda's (the
    cache key and the solve then take the capped one)."""
    strength = guarded_lambda(method, group, parameters["lambda"], parameters["one_seed_guard"], warn=warn)
    return parameters if strength == parameters["lambda"] else {**parameters, "lambda": strength}


def expert_kinds(base: Any, models: Sequence[Any], device: Any = "cpu") -> Optional[ExpertKinds]:
    """The sample's verdict for these models, measured once per process (None: they are not
    mergekit models, or no linear weight is common to them all)."""
    from mergekit.common import ModelReference

    if not all(isinstance(model, ModelReference) for model in (base, *models)):
        return None
    key = (base, tuple(models))
    with _LOCK:  # one measurement per set of models, whatever the thread count
        if key not in _MEASURED:
            try:
                _MEASURED[key] = _measure(base, list(models), device)
            except (OSError, KeyError, RuntimeError) as error:  # a file the merge itself may not need
                logger.warning("one_seed_guard: could not sample the models' linear weights (%s: %s); "
                               "lambda is left as given", type(error).__name__, error)
                _MEASURED[key] = None
        return _MEASURED[key]


def _measure(base: Any, models: List[Any], device: Any) -> Optional[ExpertKinds]:
    from mergekit.io.tasks import LoaderCache

    base_loader = LoaderCache().get(base)
    loaders = [LoaderCache().get(model) for model in models]
    per_model: List[List[Tuple[float, float]]] = [[] for _ in models]
    used: List[str] = []
    for scanned, name in enumerate(sample_order(base_loader.index.tensor_paths, [ld.index.tensor_paths for ld in loaders])):
        if len(used) == SAMPLE or scanned == SCAN:
            break
        w0 = base_loader.get_tensor(name, device=str(device))
        if not will_solve(name, w0):
            continue
        w0 = w0.float()
        found = []
        for loader in loaders:
            tensor = loader.get_tensor(name, device=str(device))
            if tensor.shape != w0.shape:
                break
            vector = tensor.float() - w0  # a new tensor: the loader's may be the one a merge reads
            found.append(task_subspaces(vector.T if is_input_major(name) else vector))
            del tensor, vector
        else:
            if sum(subspaces is not None for subspaces in found) < 2:
                continue  # a module the fine-tunes did not train (LoRA on q and v only): not counted
            shape = w0.shape[::-1] if is_input_major(name) else w0.shape
            for pairs, pair in zip(per_model, zip(*overlaps(found, shape))):
                if math.isfinite(pair[0]):
                    pairs.append(pair)
            used.append(name)
    if not used:
        return None
    medians = [model_kind(pairs) if pairs else (math.nan, math.nan, "") for pairs in per_model]
    return ExpertKinds(
        tensors=tuple(used), models=tuple(str(model) for model in models),
        inputs=tuple(m[0] for m in medians), outputs=tuple(m[1] for m in medians), kinds=tuple(m[2] for m in medians),
    )


def sample_order(base_names: Sequence[str], model_names: Sequence[Sequence[str]]) -> List[str]:
    """The names every model holds that may be linear weights, in layer order: those with a block
    number first, by their numbers then name; lm_head and unnumbered tensors last."""
    held = [set(names) for names in model_names]
    names = [name for name in base_names if will_solve(name, None) and all(name in names for names in held)]

    def order(name: str) -> Tuple[bool, Tuple[int, ...], str]:
        numbers = tuple(int(part) for part in name.split(".") if part.isdigit())
        return (not numbers or "lm_head" in name, numbers, name)

    return sorted(names, key=order)
