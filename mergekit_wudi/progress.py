"""One progress bar over the solved tensors of a merge, and per-tensor log lines.

mergekit tells a merge method neither its `--quiet` flag nor the plan, but it shows them
both in its own bar: `Executor` iterates `tqdm(list(enumerate(schedule.tasks)),
disable=quiet)`, and tqdm keeps only enabled bars in `tqdm._instances`. So the first
time a run reaches one of our tensors, we look for a live bar whose items are mergekit
`TaskHandle`s and whose tasks include this method's `ExecuteMergeMethodTask`s:

* none (`--quiet`, `merge_tensors`, the multi-GPU executor, whose bar has no items):
  no bar of ours either;
* found: a bar "wudi solve" below mergekit's, whose total counts the planned tasks of
  this method that will be solved: `tensor_kinds.will_solve` on the name (the shape is
  only known when the tensor arrives), and not counting names that say "norm" (1-D in
  every architecture). A tensor counted here that goes to the fallback is taken off the
  total, and a solved tensor not counted is added.
  tqdm gives the rate and the ETA.

A new mergekit bar (the next stage of `mergekit-multi`, the next `run_merge` call)
starts a new bar of ours. Log lines go through `logging` as mergekit's do: at INFO
(`mergekit-yaml -v`) one line per solved tensor with the WUDI interference loss of task
arithmetic's sum_i t_i and of the solved t_m (2N extra GEMMs each, computed only when
INFO is enabled); at DEBUG also the path of every tensor (see adapter.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from typing import Iterator, Optional, Set

import torch
import tqdm

logger = logging.getLogger(__name__)


class _RunBar:
    """Our bar for one mergekit executor bar (one merge run)."""

    def __init__(self, method_name: str, parent: tqdm.tqdm, planned: Optional[Set[str]]):
        self.parent = weakref.ref(parent)
        self.planned = planned  # names counted in the total and not yet seen; None: unknown
        self.bar = tqdm.tqdm(
            total=None if planned is None else len(planned),
            desc=f"{method_name} solve",
            unit="tensor",
            leave=True,
            dynamic_ncols=True,
        )

    def solved(self, name: str) -> None:
        if self.planned is not None:
            if name in self.planned:
                self.planned.discard(name)
            else:
                self.bar.total += 1
        self.bar.update(1)
        self.bar.set_postfix_str(name, refresh=False)
        self._close_when_done()

    def skipped(self, name: str) -> None:
        if self.planned is not None and name in self.planned:
            self.planned.discard(name)
            self.bar.total -= 1
            self.bar.refresh()
            self._close_when_done()

    def _close_when_done(self) -> None:
        if self.planned is not None and not self.planned:
            self.bar.close()


class SolveProgress:
    """Process-wide tracker: mergekit runs merges one after another in a process, and
    its multi-GPU executor calls merge methods from worker threads (hence the lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._run: Optional[_RunBar] = None
        self._not_ours: weakref.WeakSet[tqdm.tqdm] = weakref.WeakSet()

    @contextlib.contextmanager
    def solving(self, method_name: str, name: Optional[str]) -> Iterator[None]:
        """Wrap one tensor's solve: advances the bar when it returns."""
        yield
        with self._lock:
            run = self._current(method_name)
            if run is not None:
                run.solved(str(name))

    def skipped(self, method_name: str, name: Optional[str]) -> None:
        """A tensor of this method that goes to the fallback."""
        with self._lock:
            run = self._current(method_name)
            if run is not None:
                run.skipped(str(name))

    def _current(self, method_name: str) -> Optional[_RunBar]:
        run = self._run
        if run is not None and _is_live(run.parent()):
            return run
        if run is not None:
            run.bar.close()
            self._run = None
        for bar in list(getattr(tqdm.tqdm, "_instances", ())):
            if bar in self._not_ours or (run is not None and bar is run.bar) or not _is_live(bar):
                continue
            planned = _planned_solves(bar, method_name)
            if planned is None:
                self._not_ours.add(bar)
                continue
            self._run = _RunBar(method_name, bar, planned)
            return self._run
        return None


def _is_live(bar: Optional[tqdm.tqdm]) -> bool:
    return bar is not None and not bar.disable and bar in getattr(tqdm.tqdm, "_instances", ())


def _planned_solves(bar: tqdm.tqdm, method_name: str) -> Optional[Set[str]]:
    """Names of the tensors this method will solve in the schedule `bar` iterates; None
    when `bar` is not a mergekit executor bar running this method."""
    from mergekit.graph import TaskHandle
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

    from mergekit_wudi.tensor_kinds import will_solve

    items = bar.iterable
    if not isinstance(items, list) or not items:
        return None
    if not (isinstance(items[0], tuple) and len(items[0]) == 2 and isinstance(items[0][1], TaskHandle)):
        return None
    planned: Set[str] = set()
    ours = False
    for _index, handle in items:
        task = handle.task()
        if not isinstance(task, ExecuteMergeMethodTask) or task.method_name != method_name:
            continue
        ours = True
        weight = task.output_weight
        solve = task.parameters.get("solve", True)
        if will_solve(weight.name, None, weight.vocabulary_axis, solve=solve):
            planned.add(weight.name)
    return planned if ours else None


PROGRESS = SolveProgress()


def objective_logged() -> bool:
    """Whether log_objective logs (INFO enabled): then it reads the task vectors after the solve."""
    return logger.isEnabledFor(logging.INFO)


def log_objective(method_name: str, name: Optional[str], task_vectors: torch.Tensor, merged: torch.Tensor) -> None:
    """At INFO: the WUDI interference loss of task arithmetic's sum and of the solved t_m.

    task_vectors: (N, out, in) weighted task vectors; merged: (out, in) solved t_m,
    before lambda. Costs about 2N GEMMs of the tensor's size, so it runs only when INFO
    is enabled (`mergekit-yaml -v`).
    """
    if not objective_logged():
        return
    from mergekit_wudi.solvers import task_arithmetic_objective, wudi_objective

    before = task_arithmetic_objective(task_vectors)
    after = wudi_objective(task_vectors, merged)
    change = f"{100.0 * (after - before) / before:+.1f}%" if before > 0 else "n/a"
    logger.info(
        "%s: %s interference %.4e (task arithmetic) -> %.4e (solved), %s [N=%d, %dx%d]",
        method_name,
        name,
        before,
        after,
        change,
        task_vectors.shape[0],
        merged.shape[0],
        merged.shape[1],
    )
