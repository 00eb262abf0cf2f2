"""mergekit-wudi: data-free merge methods for mergekit (`mergekit-wudi methods` lists them).

Importing this package is cheap: the solvers (torch) and the registration (mergekit)
load on first use, because a `.pth` file imports `mergekit_wudi.registration` in every
Python process. Every solver and config class (`WudiCfsSolver`, `WudiCfsConfig`, ...)
is an attribute of this package, taken from `mergekit_wudi.solvers.SOLVERS`.
"""

from importlib import import_module

__version__ = "0.1.0"

_REGISTRATION = ("register", "add_method")
__all__ = ["__version__", *_REGISTRATION]


def __getattr__(name: str):
    if name in _REGISTRATION:
        return getattr(import_module("mergekit_wudi.registration"), name)
    if name.endswith(("Solver", "Config")):
        solvers = import_module("mergekit_wudi.solvers")
        if name in solvers.__all__:
            return getattr(solvers, name)
    raise AttributeError(f"module 'mergekit_wudi' has no attribute {name!r}")
