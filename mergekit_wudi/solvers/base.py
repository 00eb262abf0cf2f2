"""The solver template: every method is a `Solver` subclass with a config and a `_solve`.

`solve` does the prologue once for all methods: per-model values checked, task vectors
cast to the compute dtype with zero or non-finite ones dropped, the thread policy, and
the empty case. A subclass writes only `_solve(prepared, **per_model)`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from mergekit_wudi.solvers.calibrate import CALIBRATIONS, Calibration, calibrate
from mergekit_wudi.solvers.checks import check_choice, check_fraction, check_non_negative, per_model_values
from mergekit_wudi.solvers.equalize import equalized
from mergekit_wudi.solvers.numerics import (
    SOLVE_EXTRA_TENSORS,
    TaskVectors,
    permute_rows_,
    prepare_task_vectors,
    solve_threads,
)
from mergekit_wudi.solvers.trim import trimmed

__all__ = ["SOLVE_EXTRA_TENSORS", "Part", "Solver", "warn_once"]

_WARNED = set()  # (topic, method) pairs already warned in this process


def warn_once(logger: logging.Logger, topic: str, method: str, message: str, *args: Any) -> None:
    """logger.warning(message, *args), the first time only for this topic and method in the process."""
    if (topic, method) in _WARNED:
        return
    _WARNED.add((topic, method))
    logger.warning(message, *args)


class Part(NamedTuple):
    """Task vectors merged on their own (Solver(parts=...)): their positions among the N given,
    the `calibrate` rule their merge takes, and a label for the report."""

    indices: Tuple[int, ...]
    rule: str
    label: str


def checked_part(part: Part) -> Part:
    return Part(tuple(part.indices), check_choice(*CALIBRATIONS)("calibrate", part.rule), part.label)


class Solver:
    """`Solver(config).solve(task_vectors, **per_model)`: (N, out, in) in, (out, in) out.

    A method is declared in its class statement: `name` (the YAML merge_method),
    `pretty_name`, `paper` (a URL), `config` (a frozen dataclass of `config_field`s), and
    `one_thread` (True: the whole solve runs on one CPU thread, so results do not depend
    on the thread count; False: only tensors under ONE_THREAD_ELEMENTS do), and
    `calibration`, the YAML default of `calibrate` for the method (calibrate.CALIBRATIONS). A
    solver built directly applies the rule it is given, "none" unless told.
    `sums_disjoint` (default True): at lambda 1 the merge of task vectors with disjoint row
    spaces is their sum, so lambda alone sets its strength (False for methods that normalise
    or flatten it: adapter_guard's 1/sqrt(N) cap and the adapter's LoRA warning do not apply to them).
    `adapter_guard` (default True): the YAML default of `adapter_guard` (guard.py: lambda capped
    at 1/(N+1) where the fine-tunes look like LoRA adapters trained from one seed, and at 1/sqrt(K)
    where K >= 2 of them look like adapters with a seed each and `sums_disjoint`).
    `task_sized`: the merge is about one task vector's size whatever N (doge; one-seed cap N/(N+1)).
    `by_kind` (default False): where adapter_guard's sample shows full fine-tunes beside LoRA
    adapters, the adapter gives the solver two `parts`, and the merge is the sum of the two
    kinds' merges, each calibrated as a set of its kind is (guard.kind_parts; Iso, whose flat
    spectrum would otherwise spread the adapters' few directions over the full fine-tunes' many).
    A solver given `parts` solves each part's task vectors on their own, calibrated by the part's
    rule, and returns the sum (every task vector in exactly one part; solve_parts); a by-kind
    subclass with its own `__init__` passes `parts` on.
    `density` (default 0.3, DOGE's value): the density of `density`'s YAML default for full fine-tunes merged
    with LoRA adapters (adapter.trim_densities; everything else: 1), the fraction of each task
    vector's entries kept by the magnitude trim before the solve (trim.py); None for a method
    that trims inside its own solve and declares `density` in its config (doge). A solver built
    directly trims only at the density it is given. `equalize`: equalize.equalized's shares, applied
    after the trim (adapter.equalize_shares gives them; None: none). `average`: the merge is the
    trimmed task vectors' sum (task-sized: mean), not `_solve` and `calibrate` (guard.py's one-seed rule).

    Input: any float dtype on any device; solved in float32 (float64 if given float64);
    returns (out, in) in that compute dtype on the input device. Zero or non-finite task
    vectors take no part; with none left the result is zero.
    """

    name: ClassVar[str] = ""
    pretty_name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    config_cls: ClassVar[type]
    one_thread: ClassVar[bool] = False
    calibration: ClassVar[str] = "none"
    sums_disjoint: ClassVar[bool] = True
    adapter_guard: ClassVar[bool] = True
    task_sized: ClassVar[bool] = False
    by_kind: ClassVar[bool] = False
    density: ClassVar[Optional[float]] = 0.3

    def __init_subclass__(cls, *, name: Optional[str] = None, pretty_name: Optional[str] = None,
                          paper: Optional[str] = None, config: Optional[type] = None, one_thread: Optional[bool] = None,
                          calibration: Optional[str] = None, sums_disjoint: Optional[bool] = None,
                          adapter_guard: Optional[bool] = None, task_sized: Optional[bool] = None,
                          by_kind: Optional[bool] = None, density: Optional[float] = None, trims_itself: bool = False,
                          **kwargs: Any):
        """`class XSolver(Solver, name=..., pretty_name=..., paper=..., config=XConfig)`; what a
        subclass does not give, it inherits."""
        super().__init_subclass__(**kwargs)
        given = {"name": name, "pretty_name": pretty_name, "paper": paper, "config_cls": config, "one_thread": one_thread,
                 "calibration": None if calibration is None else check_choice(*CALIBRATIONS)("calibration", calibration),
                 "sums_disjoint": sums_disjoint, "adapter_guard": adapter_guard, "task_sized": task_sized, "by_kind": by_kind,
                 "density": None if density is None else check_fraction("density", density)}
        for attribute, value in given.items():
            if value is not None:
                setattr(cls, attribute, value)
        if trims_itself:
            cls.density = None

    def __init__(self, config: Optional[Any] = None, calibration: str = "none",
                 density: Union[float, Sequence[float]] = 1.0, parts: Optional[Sequence[Part]] = None,
                 equalize: Optional[Sequence[float]] = None, average: bool = False):
        self.config = config or self.config_cls()
        self.average = bool(average)
        self.rule = check_choice(*CALIBRATIONS)("calibrate", calibration)
        self.parts = None if parts is None else tuple(map(checked_part, parts))  # `calibration` then unused
        if self.density is None and any(value != 1.0 for value in (density if isinstance(density, (list, tuple)) else [density])):
            raise ValueError(f"{self.name} trims inside its solve: give density in its config, not to the solver")
        self.trim = density  # one value, or one per task vector; checked in solve
        self.shares = equalize  # equalize.equalized's: one per task vector (0: as given), or None; checked in solve
        self.last_calibration: Optional[Calibration] = None  # what the last solve chose (the report shows it)
        self.last_equalization: Optional[Tuple[float, ...]] = None  # each task vector's factor (the report shows it)

    def solve(self, task_vectors: torch.Tensor, *, overwrite: bool = False, **per_model: Any) -> torch.Tensor:
        """task_vectors (N, out, in) -> t_m (out, in); per_model: one value per task vector
        for each per-model config field (an unknown keyword is a TypeError). overwrite: the
        caller gives task_vectors up, so the trim (a density under 1) may write into them
        instead of into a copy (N tensors fewer)."""
        count = task_vectors.shape[0] if isinstance(task_vectors, torch.Tensor) and task_vectors.ndim else 0
        values = per_model_values(self.config, per_model, count)
        densities = _per_vector("density", self.trim, count, check_fraction)
        shares = None if self.shares is None else _per_vector("equalize", self.shares, count, check_non_negative)
        self.last_equalization = None
        with solve_threads(task_vectors, whole=self.one_thread):
            prepared = prepare_task_vectors(task_vectors)
            if prepared.count == 0:
                return prepared.vectors.new_zeros(task_vectors.shape[1:])
            kept_density = [densities[i] for i in prepared.indices]
            if any(d < 1.0 for d in kept_density):
                prepared = trimmed(prepared, kept_density, overwrite=_owns(prepared, task_vectors, overwrite))
            if shares is not None:
                prepared, factors = equalized(prepared, [shares[i] for i in prepared.indices],
                                              overwrite=_owns(prepared, task_vectors, overwrite))
                by_caller = dict(zip(prepared.indices, factors))
                self.last_equalization = tuple(by_caller.get(i, 1.0) for i in range(count))  # 1: not usable
            if self.average:
                self.last_calibration = Calibration(1.0, 0.0, -1, "average")
                return _average(prepared.vectors, count if self.task_sized else None)
            kept = {name: tuple(given[i] for i in prepared.indices) for name, given in values.items()}
            if self.parts is not None:
                merged, self.last_calibration = solve_parts(self, self.parts, prepared, kept, count,
                                                            _owns(prepared, task_vectors, overwrite))
                return merged
            merged, self.last_calibration = solve_calibrated(self, prepared, kept, self.rule, count)
            return merged

    def _calibrated(self, calibration: Calibration, vectors: torch.Tensor) -> None:
        """Called after a calibrated solve with the task vectors that took part (N, out, in): a
        subclass may warn about what their ranks show."""

    def _solve(self, prepared: TaskVectors, **per_model: Tuple[Any, ...]) -> torch.Tensor:
        raise NotImplementedError


def _average(vectors: torch.Tensor, count: Optional[int]) -> torch.Tensor:
    """Solver(average=True)'s merge: the task vectors' sum, or their mean over `count` (a
    task-sized method: a zero task vector, dropped from `vectors`, still counts in N)."""
    merged = vectors.sum(dim=0)
    return merged if count is None else merged.div_(count)


def _owns(prepared: TaskVectors, task_vectors: torch.Tensor, overwrite: bool) -> bool:
    """Whether the solve may write into prepared.vectors: the caller gave task_vectors up, or
    prepared holds a copy of its own (a cast, a drop, a trim)."""
    return overwrite or prepared.vectors.untyped_storage().data_ptr() != task_vectors.untyped_storage().data_ptr()


def _per_vector(name: str, given: Any, count: int, check: Any) -> Tuple[float, ...]:
    """One checked value per task vector: `given` as one value or one per vector."""
    values = tuple(given) if isinstance(given, (list, tuple)) else (given,) * count
    if len(values) != count:
        raise ValueError(f"{name}: {len(values)} values for {count} task vectors")
    return tuple(check(name, value) for value in values)


def solve_calibrated(solver: Solver, prepared: TaskVectors, kept: Mapping[str, Tuple[Any, ...]], rule: str,
                     count: int) -> Tuple[torch.Tensor, Optional[Calibration]]:
    """(solver._solve's merge times `rule`'s c, what calibrate chose: None for "none")."""
    merged = solver._solve(prepared, **kept)
    if rule == "none":
        return merged, None
    chosen = calibrate(prepared.vectors, merged, rule, count)  # its task: an index among the kept ones
    chosen = dataclasses.replace(chosen, task=prepared.indices[chosen.task] if chosen.task >= 0 else -1)
    shares_input = merged.untyped_storage().data_ptr() == prepared.vectors.untyped_storage().data_ptr()
    merged = merged * chosen.scale if shares_input else merged.mul_(chosen.scale)
    solver._calibrated(chosen, prepared.vectors)
    return merged, chosen


def solve_parts(solver: Solver, parts: Sequence[Part], prepared: TaskVectors, kept: Mapping[str, Tuple[Any, ...]],
                count: int, own: bool) -> Tuple[torch.Tensor, Calibration]:
    """(sum over parts of c_part t_m(part), a Calibration with binding "parts"): each part solved and
    calibrated by solve_calibrated on a contiguous slice of the stack (reordered in place where the
    solve owns it, else in a copy); the last part's merge, with the others added, is returned."""
    positions = [index for part in parts for index in part.indices]
    if sorted(positions) != list(range(count)):
        raise ValueError(f"parts: {[list(part.indices) for part in parts]} do not cover the {count} task "
                         "vectors once each")
    row_of = {caller: row for row, caller in enumerate(prepared.indices)}  # usable vectors only
    order = [row_of[index] for part in parts for index in part.indices if index in row_of]
    vectors = permute_rows_(prepared.vectors, order) if own else prepared.vectors[order]  # ours either way
    held, chosen, start = None, [], 0  # held: the parts so far, summed, in a stack row no solve still reads
    for part in parts:
        rows = order[start : start + sum(index in row_of for index in part.indices)]
        end = start + len(rows)
        if rows:
            sub = TaskVectors(vectors[start:end], tuple(prepared.sq_norms[r] for r in rows),
                              tuple(prepared.indices[r] for r in rows))
            merged, calibration = solve_calibrated(
                solver, sub, {name: tuple(given[r] for r in rows) for name, given in kept.items()}, part.rule, len(part.indices))
            if held is not None:
                merged.add_(held)
            chosen.append((part.label, calibration))
            if end == len(order):  # the last part with task vectors: the sum is complete
                return merged, Calibration(1.0, 0.0, -1, "parts", parts=tuple(chosen))
            held = vectors[start].copy_(merged)  # this part's rows are read no more: one tensor fewer held
            del merged
        start = end
    raise AssertionError("solve_parts: no part holds a task vector")  # solve returns before, with none
