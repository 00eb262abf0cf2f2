"""The solver template: every method is a `Solver` subclass with a config and a `_solve`.

`solve` does the prologue once for all methods: per-model values checked, task vectors
cast to the compute dtype with zero or non-finite ones dropped, the thread policy, and
the empty case. A subclass writes only `_solve(prepared, **per_model)`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar, Optional, Sequence, Tuple, Union

import torch

from mergekit_wudi.solvers.calibrate import CALIBRATIONS, Calibration, calibrate
from mergekit_wudi.solvers.checks import check_choice, check_fraction, per_model_values
from mergekit_wudi.solvers.numerics import SOLVE_EXTRA_TENSORS, TaskVectors, prepare_task_vectors, solve_threads
from mergekit_wudi.solvers.trim import trimmed

__all__ = ["SOLVE_EXTRA_TENSORS", "Solver", "warn_once"]

_WARNED = set()  # (topic, method) pairs already warned in this process


def warn_once(logger: logging.Logger, topic: str, method: str, message: str, *args: Any) -> None:
    """logger.warning(message, *args), the first time only for this topic and method in the process."""
    if (topic, method) in _WARNED:
        return
    _WARNED.add((topic, method))
    logger.warning(message, *args)


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
    at 1/N where the fine-tunes look like LoRA adapters trained from one seed, and at 1/sqrt(K)
    where K >= 2 of them look like adapters with a seed each and `sums_disjoint`).
    `task_sized` (default False): the merge at lambda 1 is about one task vector's size whatever
    N, not the sum's (doge: each t_i weighted eta / ||t_i||, and delta fitted to every task's own
    row dots), so adapter_guard's one-seed rule caps the merge at the task vectors' mean
    (`calibrate: none` becomes mean_cap) and lambda at 1, rather than lambda at 1/N.
    `density` (default 0.3, DOGE's value): the density of `density`'s YAML default for full fine-tunes merged
    with LoRA adapters (adapter.trim_densities; everything else: 1), the fraction of each task
    vector's entries kept by the magnitude trim before the solve (trim.py); None for a method
    that trims inside its own solve and declares `density` in its config (doge). A solver built
    directly trims only at the density it is given.

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
    density: ClassVar[Optional[float]] = 0.3

    def __init_subclass__(cls, *, name: Optional[str] = None, pretty_name: Optional[str] = None,
                          paper: Optional[str] = None, config: Optional[type] = None, one_thread: Optional[bool] = None,
                          calibration: Optional[str] = None, sums_disjoint: Optional[bool] = None,
                          adapter_guard: Optional[bool] = None, task_sized: Optional[bool] = None,
                          density: Optional[float] = None, trims_itself: bool = False, **kwargs: Any):
        """`class XSolver(Solver, name=..., pretty_name=..., paper=..., config=XConfig)`; what a
        subclass does not give, it inherits."""
        super().__init_subclass__(**kwargs)
        given = {"name": name, "pretty_name": pretty_name, "paper": paper, "config_cls": config, "one_thread": one_thread,
                 "calibration": None if calibration is None else check_choice(*CALIBRATIONS)("calibration", calibration),
                 "sums_disjoint": sums_disjoint, "adapter_guard": adapter_guard, "task_sized": task_sized,
                 "density": None if density is None else check_fraction("density", density)}
        for attribute, value in given.items():
            if value is not None:
                setattr(cls, attribute, value)
        if trims_itself:
            cls.density = None

    def __init__(self, config: Optional[Any] = None, calibration: str = "none",
                 density: Union[float, Sequence[float]] = 1.0):
        self.config = config or self.config_cls()
        self.rule = check_choice(*CALIBRATIONS)("calibrate", calibration)
        if self.density is None and any(value != 1.0 for value in (density if isinstance(density, (list, tuple)) else [density])):
            raise ValueError(f"{self.name} trims inside its solve: give density in its config, not to the solver")
        self.trim = density  # one value, or one per task vector; checked in solve
        self.last_calibration: Optional[Calibration] = None  # what the last solve chose (the report shows it)

    def solve(self, task_vectors: torch.Tensor, *, overwrite: bool = False, **per_model: Any) -> torch.Tensor:
        """task_vectors (N, out, in) -> t_m (out, in); per_model: one value per task vector
        for each per-model config field (an unknown keyword is a TypeError). overwrite: the
        caller gives task_vectors up, so the trim (a density under 1) may write into them
        instead of into a copy (N tensors fewer)."""
        count = task_vectors.shape[0] if isinstance(task_vectors, torch.Tensor) and task_vectors.ndim else 0
        values = per_model_values(self.config, per_model, count)
        densities = self._densities(count)
        with solve_threads(task_vectors, whole=self.one_thread):
            prepared = prepare_task_vectors(task_vectors)
            if prepared.count == 0:
                return prepared.vectors.new_zeros(task_vectors.shape[1:])
            kept_density = [densities[i] for i in prepared.indices]
            if any(d < 1.0 for d in kept_density):
                shares_input = prepared.vectors.untyped_storage().data_ptr() == task_vectors.untyped_storage().data_ptr()
                prepared = trimmed(prepared, kept_density, overwrite=overwrite or not shares_input)
            kept = {name: tuple(given[i] for i in prepared.indices) for name, given in values.items()}
            merged = self._solve(prepared, **kept)
            if self.rule != "none":
                chosen = calibrate(prepared.vectors, merged, self.rule, count)  # its task: an index among the kept ones
                self.last_calibration = dataclasses.replace(chosen, task=prepared.indices[chosen.task] if chosen.task >= 0 else -1)
                shares_input = merged.untyped_storage().data_ptr() == prepared.vectors.untyped_storage().data_ptr()
                merged = merged * self.last_calibration.scale if shares_input else merged.mul_(self.last_calibration.scale)
                self._calibrated(self.last_calibration, prepared.vectors)
            return merged

    def _densities(self, count: int) -> Tuple[float, ...]:
        """The trim's density for each of count task vectors, checked."""
        given = self.trim
        values = tuple(given) if isinstance(given, (list, tuple)) else (given,) * count
        if len(values) != count:
            raise ValueError(f"density: {len(values)} values for {count} task vectors")
        return tuple(check_fraction("density", value) for value in values)

    def _calibrated(self, calibration: Calibration, vectors: torch.Tensor) -> None:
        """Called after a calibrated solve with the task vectors that took part (N, out, in): a
        subclass may warn about what their ranks show."""

    def _solve(self, prepared: TaskVectors, **per_model: Tuple[Any, ...]) -> torch.Tensor:
        raise NotImplementedError
