"""Pure-torch solvers: stacked task vectors (N, out, in) in, merged task vector out.

No mergekit, click or logging configuration here, so the solvers can be tested,
benchmarked and reused on their own.
"""

from mergekit_wudi.solvers.doge import DogeConfig, DogeSolver
from mergekit_wudi.solvers.wudi import WudiConfig, WudiSolver
from mergekit_wudi.solvers.wudi_cfs import WudiCfsConfig, WudiCfsSolver

__all__ = [
    "DogeConfig",
    "DogeSolver",
    "WudiCfsConfig",
    "WudiCfsSolver",
    "WudiConfig",
    "WudiSolver",
]
