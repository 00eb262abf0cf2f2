"""Pure-torch solvers: stacked task vectors (N, out, in) in, merged task vector out.

Every solver is `Solver(config).solve(task_vectors, **per_model)`; per_model holds the
per-model fields of its config (doge: `density`), one value per task vector. No
mergekit, click or logging configuration here, so the solvers can be tested,
benchmarked and reused on their own.
"""

from mergekit_wudi.solvers.checks import per_model_values
from mergekit_wudi.solvers.doge import DogeConfig, DogeSolver
from mergekit_wudi.solvers.iso import IsoCConfig, IsoCSolver, IsoCtsConfig, IsoCtsSolver
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
from mergekit_wudi.solvers.tsv import TsvConfig, TsvSolver
from mergekit_wudi.solvers.wudi import WudiConfig, WudiSolver
from mergekit_wudi.solvers.wudi_cfs import WudiCfsConfig, WudiCfsSolver

__all__ = [
    "CHUNK_DIVISOR",
    "CHUNK_ELEMENTS",
    "MIN_CHUNK_ELEMENTS",
    "THREADED_LAPACK_ENV",
    "DogeConfig",
    "DogeSolver",
    "IsoCConfig",
    "IsoCSolver",
    "IsoCtsConfig",
    "IsoCtsSolver",
    "TsvConfig",
    "TsvSolver",
    "WudiCfsConfig",
    "WudiCfsSolver",
    "WudiConfig",
    "WudiSolver",
    "compute_dtype",
    "per_model_values",
    "one_cpu_thread",
    "solver_row_chunks",
    "task_arithmetic_objective",
    "wudi_objective",
]
