"""The rows of a benchmark and the choices made on validation."""

from __future__ import annotations

from typing import Dict, Sequence

EXPERT_SETS = ("full", "lora", "lora_aggressive", "mixed")  # each gets the whole plan
REPLICATES = {"full_seed1": "full"}  # a second expert seed: the headline rows of its primary set again


MIXED_SETS = {"mixed": "", "mixed_seed1": "_seed1"}  # a mixed set and the suffix of its members' sets


def mixed_members(task_names: Sequence[str], suffix: str = "") -> Dict[str, str]:
    """Half full, half LoRA: full experts (seed 0; `full_seed1` with suffix "_seed1") on
    even-indexed tasks, conventional LoRA (`lora`, `lora_seed1`) on odd ones."""
    return {name: ("full" if index % 2 == 0 else "lora") + suffix for index, name in enumerate(task_names)}

LAMBDAS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5)  # issue 23: each method's own best lambda on 0.1..1.5
NORMALIZE = (True, False)
# mergekit's built-ins and the densities searched for them (`density` keeps that share of each task
# vector; breadcrumbs_ties also drops the top `gamma` = 0.01 by magnitude, so it keeps less).
BUILTINS = {
    "task_arithmetic": (),
    "ties": (0.2, 0.5, 0.8),
    "dare_ties": (0.2, 0.5, 0.8),
    "della": (0.2, 0.5, 0.8),  # epsilon 0.15 (its default): density ± epsilon stays in (0, 1)
    "breadcrumbs_ties": (0.5, 0.8, 0.9),
}
QUICK_LAMBDAS = (0.5, 1.0)
QUICK_METHODS = ("task_arithmetic", "ties", "wudi_cfs")


def ours() -> tuple:
    """The project's methods, from the one method table."""
    from mergekit_wudi.adapter import MERGE_METHODS

    return tuple(m.method_name for m in MERGE_METHODS)


def methods(quick: bool = False) -> tuple:
    every = (*BUILTINS, *ours())
    return tuple(m for m in every if m in QUICK_METHODS) if quick else every


# Not tried in stage one: for a merge the sum's size it is lambda about 1/N, which the lambda grid
# covers, and adapter_guard applies it where it is doge's rule (one-seed adapters).
GRID_COVERS = ("mean_cap",)


def other_calibrations(method: str) -> list:
    """A method of ours: the `calibrate` rules other than its default (issue 23), but GRID_COVERS."""
    from mergekit_wudi.solvers import SOLVERS
    from mergekit_wudi.solvers.calibrate import CALIBRATIONS

    default = next((s.calibration for s in SOLVERS if s.name == method), None)
    return [] if default is None else [c for c in CALIBRATIONS if c != default and c not in GRID_COVERS]


def other_trim(method: str) -> list:
    """A method of ours that trims before its solve: every fine-tune trimmed at `density` 0.3
    (issue 23; its default trims only full fine-tunes beside LoRA adapters)."""
    from mergekit_wudi.solvers import SOLVERS

    default = next((s.density for s in SOLVERS if s.name == method), None)
    return [] if default is None else [{"density": 0.3}]


def stage_one(method: str, quick: bool = False) -> list:
    """The configurations tried at lambda 1 before the lambda grid: the defaults ({}), then for
    a built-in with a density every (density, normalize) pair (normalize for task_arithmetic
    with equal weights is lambda / N, which the grid covers), for a method of ours its other
    `calibrate` rules and its other trim density."""
    densities = BUILTINS.get(method, ())
    if quick:
        densities = densities[1:2]
    ours = [] if quick else [{"calibrate": c} for c in other_calibrations(method)] + other_trim(method)
    return [{}] + [{"density": d, "normalize": n} for d in densities for n in (NORMALIZE[:1] if quick else NORMALIZE)] + ours


def stage_two(best: dict, quick: bool = False) -> list:
    """The lambda grid at the best stage-one configuration (lambda 1 is already in stage one)."""
    return [{**best, "lambda": lam} for lam in (QUICK_LAMBDAS if quick else LAMBDAS) if lam != best.get("lambda", 1.0)]


def better(candidate: float, incumbent) -> bool:
    """Strictly better on validation: ties keep the earlier (simpler) configuration."""
    return incumbent is None or candidate > incumbent + 1e-12
