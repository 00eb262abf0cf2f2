"""Pure-torch solvers: stacked task vectors (N, out, in) in, merged task vector out.

Every method is a `Solver` subclass (base.py) in a module of this package, found here:
`SOLVERS` is the one list of methods, and everything else (the mergekit methods, the
CLI, the docs' tables, the tests) is built from it. No mergekit here.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Dict, Tuple

from mergekit_wudi.solvers.base import SOLVE_EXTRA_TENSORS, Solver
from mergekit_wudi.solvers.checks import per_model_values
from mergekit_wudi.solvers.numerics import (
    CHUNK_DIVISOR,
    CHUNK_ELEMENTS,
    MIN_CHUNK_ELEMENTS,
    THREADED_LAPACK_ENV,
    compute_dtype,
    one_cpu_thread,
    solver_row_chunks,
)
from mergekit_wudi.solvers.objective import task_arithmetic_objective, wudi_objective


def _discover() -> Tuple[type, ...]:
    """Every Solver subclass with a `name`, defined in a public module of this package,
    ordered by name."""
    found: Dict[str, type] = {}
    for module_info in pkgutil.iter_modules(__path__):
        if module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Solver) and value.name and value.__module__ == module.__name__:
                if value.name in found:
                    raise RuntimeError(f"two solvers are named {value.name!r}: {found[value.name]} and {value}")
                found[value.name] = value
    return tuple(found[name] for name in sorted(found))


SOLVERS: Tuple[type, ...] = _discover()
_EXPORTS = {cls.__name__: cls for solver in SOLVERS for cls in (solver, solver.config_cls)}
globals().update(_EXPORTS)

__all__ = [
    "CHUNK_DIVISOR",
    "CHUNK_ELEMENTS",
    "MIN_CHUNK_ELEMENTS",
    "SOLVERS",
    "SOLVE_EXTRA_TENSORS",
    "Solver",
    *sorted(_EXPORTS),
    "compute_dtype",
    "one_cpu_thread",
    "THREADED_LAPACK_ENV",
    "per_model_values",
    "solver_row_chunks",
    "task_arithmetic_objective",
    "wudi_objective",
]
