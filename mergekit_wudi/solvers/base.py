"""The solver template: every method is a `Solver` subclass with a config and a `_solve`.

`solve` does the prologue once for all methods: per-model values checked, task vectors
cast to the compute dtype with zero or non-finite ones dropped, the thread policy, and
the empty case. A subclass writes only `_solve(prepared, **per_model)`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar, Optional, Tuple

import torch

from mergekit_wudi.solvers.calibrate import CALIBRATIONS, Calibration, calibrate
from mergekit_wudi.solvers.checks import check_choice, per_model_values
from mergekit_wudi.solvers.numerics import SOLVE_EXTRA_TENSORS, TaskVectors, prepare_task_vectors, solve_threads

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
    `calibration`, the YAML default of `calibrate` for the method (calibrate.py: "none" or
    "input_space"). A solver built directly applies the rule it is given, "none" unless told.
    `sums_disjoint` (default True): at lambda 1 the merge of task vectors with disjoint row
    spaces is their sum, so lambda alone sets its strength (False for methods that normalise
    or flatten it: adapter_guard's 1/sqrt(N) cap and the adapter's LoRA warning do not apply to them).
    `adapter_guard` (default True): the YAML default of `adapter_guard` (guard.py: lambda capped
    at 1/N where the fine-tunes look like LoRA adapters trained from one seed, and at 1/sqrt(N)
    where they look like adapters with a seed each and `sums_disjoint`).

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

    def __init_subclass__(cls, *, name: Optional[str] = None, pretty_name: Optional[str] = None,
                          paper: Optional[str] = None, config: Optional[type] = None, one_thread: Optional[bool] = None,
                          calibration: Optional[str] = None, sums_disjoint: Optional[bool] = None,
                          adapter_guard: Optional[bool] = None, **kwargs: Any):
        """`class XSolver(Solver, name=..., pretty_name=..., paper=..., config=XConfig)`; what a
        subclass does not give, it inherits."""
        super().__init_subclass__(**kwargs)
        given = {"name": name, "pretty_name": pretty_name, "paper": paper, "config_cls": config, "one_thread": one_thread,
                 "calibration": None if calibration is None else check_choice(*CALIBRATIONS)("calibration", calibration),
                 "sums_disjoint": sums_disjoint, "adapter_guard": adapter_guard}
        for attribute, value in given.items():
            if value is not None:
                setattr(cls, attribute, value)

    def __init__(self, config: Optional[Any] = None, calibration: str = "none"):
        self.config = config or self.config_cls()
        self.rule = check_choice(*CALIBRATIONS)("calibrate", calibration)
        self.last_calibration: Optional[Calibration] = None  # what the last solve chose (the report shows it)

    def solve(self, task_vectors: torch.Tensor, **per_model: Any) -> torch.Tensor:
        """task_vectors (N, out, in) -> t_m (out, in); per_model: one value per task vector
        for each per-model config field (an unknown keyword is a TypeError)."""
        count = task_vectors.shape[0] if isinstance(task_vectors, torch.Tensor) and task_vectors.ndim else 0
        values = per_model_values(self.config, per_model, count)
        with solve_threads(task_vectors, whole=self.one_thread):
            prepared = prepare_task_vectors(task_vectors)
            if prepared.count == 0:
                return prepared.vectors.new_zeros(task_vectors.shape[1:])
            kept = {name: tuple(given[i] for i in prepared.indices) for name, given in values.items()}
            merged = self._solve(prepared, **kept)
            if self.rule != "none":
                chosen = calibrate(prepared.vectors, merged, self.rule)  # its task: an index among the kept ones
                self.last_calibration = dataclasses.replace(chosen, task=prepared.indices[chosen.task] if chosen.task >= 0 else -1)
                shares_input = merged.untyped_storage().data_ptr() == prepared.vectors.untyped_storage().data_ptr()
                merged = merged * self.last_calibration.scale if shares_input else merged.mul_(self.last_calibration.scale)
                self._calibrated(self.last_calibration, prepared.vectors)
            return merged

    def _calibrated(self, calibration: Calibration, vectors: torch.Tensor) -> None:
        """Called after a calibrated solve with the task vectors that took part (N, out, in): a
        subclass may warn about what their ranks show."""

    def _solve(self, prepared: TaskVectors, **per_model: Tuple[Any, ...]) -> torch.Tensor:
        raise NotImplementedError
