"""The adapter guard (issue 23): where the fine-tunes look like LoRA adapters, lambda is capped.

Why. A LoRA update B A reads A's row space, and A stays near its random initialisation.
- Adapters trained from one seed share one A, so every adapter reads the same random input
  space: each acts on every task's inputs alike, and the methods that separate tasks by their
  input spaces (WUDI's premise) cannot. At lambda 1 their merge adds N updates where each task
  expects one: every method but doge broke SmolLM2's one-seed set (13-24 against 52 for
  task_arithmetic at 0.2), and doge fell short of its own lambda 0.7 (41.6 against 49.9, test).
  Cap: 1/(N+1), the average of the base and the N fine-tunes. And where `calibrate` is left at
  the method's default, the tensor is merged as that average itself, (1/(N+1)) sum_i t_i, in
  place of the method's solve: what the methods do beyond the sum is to reweight directions by
  how the tasks' subspaces differ, and over one shared input space those differences are the
  shared initialisation's, not the tasks'. Over two expert seeds of both benchmarks' one-seed
  sets, every method's own merge at the cap then in force, 1/N (wudi_cfs and ace capped at the
  sum's size, doge at the mean's), scored under the plain average on SmolLM2 (test, 1.0-3.9
  points) and level with it on MiniLM (docs/benchmarks.md, "One-seed adapters merged as their
  average"). Why the base counts: every adapter acts on every task's inputs, so lambda sets one
  trade for all tasks between each one's own update and the others' (the least-squares point of
  the N fine-tunes is 1/N; of the N fine-tunes and the base, whose behaviour every task also
  relies on, 1/(N+1)), and the trade is lopsided: above the best lambda these merges collapse
  (SmolLM2, validation: 2-6 points under 0.25 at 0.3 on four expert seeds, 17-27 at 0.5 on
  three), under it they lose little (0.1: at most 4). Over four expert seeds 1/(N+1) against
  1/N, test: SmolLM2 +1.6 [+1.0, +2.1], MiniLM -0.1 [-0.3, +0.1] (docs/benchmarks.md, "The base
  counted in the one-seed average"). doge's merge is not the sum's size but about one task
  vector's whatever N (Solver.task_sized: each t_i weighted eta / ||t_i||, and delta fitted to
  each task's own row dots), so its lambda is capped at N/(N+1) instead and its merge is
  N/(N+1) times the mean: the same merge. A `calibrate` rule other than the method's default
  keeps the method's solve, at the capped lambda (naming the default itself changes nothing:
  mergekit gives the solver the value, not whether the YAML set it).
- Adapters with a seed each read random, nearly disjoint input spaces, so the methods that
  return the sum of task vectors with disjoint row spaces (Solver.sums_disjoint: wudi, wudi_cfs,
  tsv, ace) return about the sum of the K adapters' updates (measured: sqrt(N) times one task
  vector's norm where all N are such adapters). A random A reads any input about as much as its
  own task's, so on each task's inputs the K adapters add outputs about as large as one adapter's
  each: sqrt(K) times one adapter's effect. Cap: 1/sqrt(K), which brings it back to one adapter's,
  K the number of such adapters among the fine-tunes (none for one). Full fine-tunes are not
  counted: each update reads mostly its own task's inputs, and lambda 1 is right for them (K was
  N until issue 23's mixed sets showed the difference: docs/benchmarks.md, "Trim and the guard
  on mixed sets"). On MiniLM's LoRA set wudi_cfs at lambda 1 was 3.5 points below
  task_arithmetic at 0.3, and level with it at 1/sqrt(N) (K = N there). iso_c and iso_cts are
  not capped there: their merge is as large, but at lambda 1 they were the best methods on
  SmolLM2's such set and level on MiniLM's. Where full fine-tunes are merged with adapters,
  every method but doge also trims the full ones (ExpertKinds.full_beside_adapters; adapter.py).
  The adapters that set the 1/sqrt(K) cap are also equalized first, each task vector rescaled to
  the root mean square of their norms (adapter.equalize_shares; docs/methods.md, "equalize"): on
  every task's inputs the K updates compete at their sizes, and the one that moved least lost its task.
docs/benchmarks.md, "The adapter guard", has the numbers.

What. Once per process and set of models: the first SAMPLE linear weights that the base and every
fine-tune hold and at least two fine-tunes changed (among the first SCAN candidates), in layer
order (the numbers in the name, then the name), give each fine-tune's median input and output
subspace overlap (solvers/overlap.py, one task vector at a time: at most three tensors of that
size beside the merge's own), and the median number of directions compared (k).
- "one seed": input over output overlap above 5 (full fine-tunes gave 0.9-3.5 on both
  benchmarks, one-seed adapters 7.7-14.6);
- "a seed each": input overlap under 5 (at chance: 1.4-2.9; full fine-tunes 11-25), output
  overlap at least TRAINED_OUTPUT = 2 (the B's of trained adapters write to shared output
  directions, 2.5-5.5 times chance; independent random low-rank deltas stay near 1), and k at
  least MIN_RANK = 4 (below it random subspaces' overlaps are too noisy to tell: rank-1 and
  rank-2 random deltas reached 2-4).
Where any fine-tune is "one seed", every solved tensor's lambda becomes min(lambda, 1/(N+1)) (for
a task-sized method, doge, min(lambda, N/(N+1))), and, where `calibrate` is the method's default, the
merge is the task vectors' average (AVERAGE; Solver(average=True)); else
where K >= 2 are "a seed each", min(lambda, 1/sqrt(K)) for the methods that sum. Where any fine-tune is
an adapter of either kind, `calibrate: first_order` (Iso's default) becomes sum_norm: first_order
counts each task's gain along its own update, and an adapter's random input space makes its update
act on every task's inputs (docs/methods.md, "calibrate"); for a method that merges by kind
(Solver.by_kind: Iso) with full fine-tunes among them, the adapters' part takes sum_norm and the
full fine-tunes' part first_order instead (kind_parts). The sample is fixed
by the names, not by the order mergekit merges tensors in, so runs, shards and thread counts
agree. `adapter_guard: false` keeps lambda as given (and warns instead).

Only where the models are known (mergekit-yaml, run_merge, mergekit-wudi report): merge_tensors
gives one tensor and no models, and there the guard does nothing.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mergekit_wudi.solvers.base import Part, warn_once
from mergekit_wudi.solvers.overlap import common_rank, model_kind, overlaps, task_subspaces
from mergekit_wudi.tensor_kinds import is_input_major, will_solve

logger = logging.getLogger(__name__)

SAMPLE = 12  # linear weights whose overlaps decide
SCAN = 16 * SAMPLE  # candidate names read at most, where few hold a change (a module no fine-tune trained)
ONE_SEED = "lora, one seed"
FULL = "full"  # solvers.overlap.expert_kind's word for neither kind of adapter
SEED_EACH = "lora"  # solvers.overlap.expert_kind's word; the guard also asks for TRAINED_OUTPUT and MIN_RANK
TRAINED_OUTPUT = 2.0  # median output overlap (times chance) from which a "lora" fine-tune looks trained
MIN_RANK = 4  # median k (directions compared) under which the overlaps cannot tell trained from random
AVERAGE = "average"  # the guarded parameters' flag: the one-seed rule merges the average, not the method's solve
ADAPTER_CALIBRATIONS = {"first_order": "sum_norm"}  # what a rule becomes where any fine-tune looks like an adapter

_MEASURED: Dict[Tuple[Any, ...], Optional[ExpertKinds]] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class ExpertKinds:
    """What the sample showed: the tensors, per fine-tune its medians and solvers.overlap kind,
    and the median number of directions compared."""

    tensors: Tuple[str, ...]
    models: Tuple[str, ...]
    inputs: Tuple[float, ...]
    outputs: Tuple[float, ...]
    kinds: Tuple[str, ...]
    rank: float

    @property
    def one_seed(self) -> Tuple[int, ...]:
        return tuple(i for i, kind in enumerate(self.kinds) if kind == ONE_SEED)

    @property
    def seed_each(self) -> Tuple[int, ...]:
        """The fine-tunes that look like trained LoRA adapters with a seed each (the module docstring)."""
        if self.rank < MIN_RANK:
            return ()
        return tuple(i for i, kind in enumerate(self.kinds) if kind == SEED_EACH and self.outputs[i] >= TRAINED_OUTPUT)

    @property
    def full_beside_adapters(self) -> Tuple[int, ...]:
        """The fine-tunes that look like full fine-tunes, where others look like LoRA adapters (of
        either kind); () where none does. `density`'s default trims these (adapter.trim_densities)."""
        if not self.adapters:
            return ()
        return tuple(i for i, kind in enumerate(self.kinds) if kind == FULL)

    @property
    def adapters(self) -> Tuple[int, ...]:
        """The fine-tunes that look like LoRA adapters of either kind (where there are any,
        calibrate's first_order becomes sum_norm: ADAPTER_CALIBRATIONS)."""
        return tuple(sorted({*self.one_seed, *self.seed_each}))

    def cap(self, count: int, sums_disjoint: bool, task_sized: bool = False) -> Optional[Tuple[float, Tuple[int, ...]]]:
        """(the lambda cap, the fine-tunes that set it) for a method that sums disjoint updates or
        not, and whose merge is one task vector's size or not (Solver.task_sized: N/(N+1), not
        1/(N+1), under the one-seed rule, its merge being about the mean's size); None where no cap
        applies."""
        if self.one_seed:
            return (count / (count + 1) if task_sized else 1.0 / (count + 1)), self.one_seed
        if sums_disjoint and len(self.seed_each) >= 2:
            return 1.0 / math.sqrt(len(self.seed_each)), self.seed_each
        return None


def guarded_lambda(method: str, group: Any, strength: float, guard: bool, sums_disjoint: bool, *,
                   task_sized: bool = False, averages: bool = True) -> Tuple[float, bool]:
    """(the lambda a solved tensor of `group` (a mergekit TensorGroup) gets, whether the one-seed
    rule applies to it): capped where the guard is on and the fine-tunes look like LoRA adapters (the
    module docstring), else strength. For a task-sized method (doge) the one-seed rule keeps lambda
    at most N/(N+1). `averages`: whether the one-seed rule would merge the average (calibrate at the
    method's default; with_guarded_lambda), for what is said. With the guard off, it says so once
    where it would have applied."""
    models = [entry.id for entry in group.non_base]
    capped, kinds = capped_lambda(group.base.id, models, strength, group.base.tensor.device, sums_disjoint, task_sized)
    count = len(models)
    decided = None if kinds is None else kinds.cap(count, sums_disjoint, task_sized)
    one_seed = decided is not None and bool(kinds.one_seed)
    if decided is None or (capped == strength and not one_seed):  # the one-seed rule always acts (capped_lambda)
        return strength, False
    cap, found = decided
    names = ", ".join(kinds.models[i] for i in found)
    if one_seed:
        evidence = (
            f"{len(found)} of the {count} fine-tunes look like LoRA adapters trained from one seed ({names}: median "
            f"input-space overlap {'/'.join(f'{kinds.inputs[i]:.0f}' for i in found)} times chance, "
            f"{'/'.join(f'{kinds.inputs[i] / kinds.outputs[i]:.1f}' for i in found)} times their output spaces', over "
            f"{len(kinds.tensors)} tensors; full fine-tunes gave 0.9-3.5 times on this package's benchmarks). Such "
            "adapters all read one random input space, so each acts on every task's inputs, and what the subspaces "
            "of their task vectors differ in is their shared initialisation, not their tasks"
        )
        rule = "N/(N+1)" if task_sized else "1/(N+1)"
        measured = ("on SmolLM2's one-seed set the solved methods at lambda 1 scored 13-24 (doge 41.6) against 52 "
                    "for task_arithmetic at 0.2, at 1/N every method's own merge scored under the adapters' average "
                    "(two expert seeds, test: SmolLM2 1.0-3.9 points; MiniLM level), and the average of the base and "
                    "the fine-tunes, 1/(N+1), scored above the average at 1/N on SmolLM2 and level with it on MiniLM "
                    "(four expert seeds)")
        average = "mean" if task_sized else "sum"
        extra = (f", and each tensor is merged as the adapters' {average} (the average of the base and the fine-tunes "
                 f"at that lambda) in place of {method}'s solve: on this package's one-seed sets every method's own "
                 "merge scored under the average (SmolLM2, 1.0-3.9 points) or level with it (MiniLM). Name a "
                 f"calibrate rule other than the method's default to keep {method}'s solve"
                 if averages else "")
    else:
        evidence = (
            f"{len(found)} of the {count} fine-tunes look like LoRA adapters trained with a seed each ({names}: median "
            f"input-space overlap {'/'.join(f'{kinds.inputs[i]:.1f}' for i in found)} times chance, output-space "
            f"{'/'.join(f'{kinds.outputs[i]:.1f}' for i in found)} times, over {len(kinds.tensors)} tensors; full "
            "fine-tunes' inputs gave 11-25 times on this package's benchmarks). Their input spaces are random and "
            f"nearly disjoint, so {method} returns about the sum of their updates, sqrt({len(found)}) times one adapter's size, "
            "while each still acts on every task's inputs"
        )
        rule, measured = f"1/sqrt({len(found)})", "on MiniLM's such set wudi_cfs at lambda 1 was 3.5 points below task_arithmetic at 0.3"
        extra = ""
    if not guard:
        advice = (f"adapter_guard would merge them with the base as one average (lambda at most {rule} = {cap:.2g}"
                  f"{', times their mean' if task_sized else ''})" if one_seed
                  else f"Lambda {cap:.2g} ({rule}) is the safer start")
        warn_once(logger, "adapters", method,
                  "%s: %s; adapter_guard is off, so lambda stays %.3g: %s. %s; `mergekit-wudi report` shows each "
                  "model's overlaps.", method, evidence, strength, measured, advice)
        return strength, False
    limit = f"{rule} = {cap:.3g}"
    warn_once(logger, "adapters", method,
              "%s: %s. %s for every solved tensor%s (adapter_guard; set adapter_guard: false to keep lambda %.3g and "
              "the method's own merge).", method, evidence,
              f"lambda stays {strength:.3g} (at most {limit})" if strength < cap else f"lambda is capped at {limit}",
              extra, strength)
    return capped, one_seed


def capped_lambda(base: Any, models: Sequence[Any], strength: float, device: Any = "cpu",
                  sums_disjoint: bool = True, task_sized: bool = False) -> Tuple[float, Optional[ExpertKinds]]:
    """(strength capped as the module docstring says for a method that sums disjoint updates or
    not and is task-sized or not, else strength; the sample's verdict, None where none was possible).
    Measured at any strength: the one-seed rule decides the merge's form as well as its lambda."""
    if len(models) < 2:
        return strength, None
    kinds = expert_kinds(base, models, device)
    cap = None if kinds is None else kinds.cap(len(models), sums_disjoint, task_sized)
    return (strength if cap is None else min(strength, cap[0])), kinds


def with_guarded_lambda(method: str, group: Any, parameters: Mapping[str, Any], *, sums_disjoint: bool,
                        task_sized: bool = False, by_kind: bool = False,
                        default_calibration: str = "none") -> Mapping[str, Any]:
    """The resolved parameters of a solved tensor with `lambda` replaced by guarded_lambda's,
    where the one-seed rule applies and `calibrate` is the method's default, AVERAGE set (the
    merge is the task vectors' average, not the method's solve), and, where the guard is on and
    the sample shows any adapter, a rule of ADAPTER_CALIBRATIONS by its replacement (the cache key
    and the solve then take them), unless the method merges by kind (Solver.by_kind) and full
    fine-tunes are among them: kind_parts then gives the adapters' part the replacement and the full
    fine-tunes' part the rule."""
    averages = parameters["calibrate"] == default_calibration
    strength, one_seed = guarded_lambda(method, group, parameters["lambda"], parameters["adapter_guard"], sums_disjoint,
                                        task_sized=task_sized, averages=averages)
    guarded = {**parameters, "lambda": strength}
    if one_seed and averages:
        guarded[AVERAGE] = True
        return guarded
    rule = parameters["calibrate"]
    if rule in ADAPTER_CALIBRATIONS and parameters["adapter_guard"] and len(group.non_base) >= 2:
        kinds = expert_kinds(group.base.id, [entry.id for entry in group.non_base], group.base.tensor.device)
        if kinds is not None and kinds.adapters and not (by_kind and kinds.full_beside_adapters):
            guarded["calibrate"] = ADAPTER_CALIBRATIONS[rule]
            warn_once(logger, "adapter calibration", method,
                      "%s: %d of the %d fine-tunes look like LoRA adapters (%s; adapter_guard's sample), so calibrate: "
                      "%s becomes %s, the plain sum's energy: %s counts each task's gain along its own update only, "
                      "and an adapter's random input space makes its update act on every task's inputs (set "
                      "adapter_guard: false to keep %s).", method, len(kinds.adapters), len(kinds.kinds),
                      ", ".join(kinds.models[i] for i in kinds.adapters), rule, guarded["calibrate"], rule, rule)
    return guarded if guarded != parameters else parameters


def kind_parts(method: str, group: Any, parameters: Mapping[str, Any]) -> Optional[Tuple[Part, Part]]:
    """For a method that merges by kind (Solver.by_kind), with the guard on, where the sample shows
    full fine-tunes beside LoRA adapters: the full fine-tunes' part, calibrated by `calibrate`
    (as a set of full fine-tunes is), and the others', by what the guard makes of it for adapters
    (ADAPTER_CALIBRATIONS); said once. None elsewhere: one merge of all."""
    if not parameters["adapter_guard"] or len(group.non_base) < 2:
        return None
    models = [entry.id for entry in group.non_base]
    kinds = expert_kinds(group.base.id, models, group.base.tensor.device)
    full = () if kinds is None else kinds.full_beside_adapters
    if not full:
        return None
    rule = parameters["calibrate"]
    others = tuple(index for index in range(len(models)) if index not in full)
    parts = (Part(full, rule, "full"), Part(others, ADAPTER_CALIBRATIONS.get(rule, rule), "adapters"))
    warn_once(logger, "by kind", method,
              "%s: %s look like full fine-tunes beside LoRA adapters (%s; adapter_guard's sample), so each kind is "
              "merged on its own (the full fine-tunes with calibrate: %s, the adapters with %s) and the two merges "
              "are added: one flat spectrum over both would spread the adapters' few directions over the full "
              "fine-tunes' many (set adapter_guard: false for one merge of all).", method,
              ", ".join(kinds.models[i] for i in full), ", ".join(kinds.models[i] for i in others), parts[0].rule,
              parts[1].rule)
    return parts


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
                logger.warning("adapter_guard: could not sample the models' linear weights (%s: %s); "
                               "lambda is left as given", type(error).__name__, error)
                _MEASURED[key] = None
        return _MEASURED[key]


def _measure(base: Any, models: List[Any], device: Any) -> Optional[ExpertKinds]:
    from mergekit.io.tasks import LoaderCache

    base_loader = LoaderCache().get(base)
    loaders = [LoaderCache().get(model) for model in models]
    per_model: List[List[Tuple[float, float]]] = [[] for _ in models]
    used: List[str] = []
    ranks: List[int] = []
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
            ranks.append(common_rank(found, shape))
            used.append(name)
    if not used:
        return None
    medians = [model_kind(pairs) if pairs else (math.nan, math.nan, "") for pairs in per_model]
    return ExpertKinds(
        tensors=tuple(used), models=tuple(str(model) for model in models),
        inputs=tuple(m[0] for m in medians), outputs=tuple(m[1] for m in medians), kinds=tuple(m[2] for m in medians),
        rank=statistics.median(ranks),
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
