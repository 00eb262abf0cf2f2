"""mergekit-wudi: WUDI-Merging, its closed form and DOGE as mergekit merge methods.

Importing this package is cheap: the solvers (torch) and the registration (mergekit)
load on first use, because a `.pth` file imports `mergekit_wudi.registration` in every
Python process.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "register": "mergekit_wudi.registration",
    "DogeConfig": "mergekit_wudi.solvers",
    "DogeSolver": "mergekit_wudi.solvers",
    "WudiCfsConfig": "mergekit_wudi.solvers",
    "WudiCfsSolver": "mergekit_wudi.solvers",
    "WudiConfig": "mergekit_wudi.solvers",
    "WudiSolver": "mergekit_wudi.solvers",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mergekit_wudi' has no attribute {name!r}")
