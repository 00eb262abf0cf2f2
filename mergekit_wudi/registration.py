"""Registration of our merge methods with mergekit: the package's only import-time effects.

mergekit 0.1.5 finds merge methods only through `mergekit.merge_methods.registry`, and
has no entry-point discovery. So the wheel installs `mergekit_wudi.pth`, whose one line
calls `autoload()` at interpreter start-up. That installs a finder on `sys.meta_path`
which waits for `mergekit.merge_methods` to be imported and registers the methods right
after it has run. When one of our own modules imported mergekit first (`import
mergekit_wudi.adapter` in a fresh process), registering then would import it again
half-done: the finder also wraps the loaders of our modules, and registers as soon as
the last of them has finished. So no module of ours ends with a registration call.
Nothing heavy happens at start-up: this module imports only `os` and `sys` (no torch,
no mergekit), and `MERGEKIT_WUDI_NO_AUTOLOAD=1` turns the whole thing off. `register()`
does the same explicitly and is idempotent.
"""

import os
import sys

DISABLE_ENV = "MERGEKIT_WUDI_NO_AUTOLOAD"
_TARGET = "mergekit.merge_methods"
_PACKAGE = "mergekit_wudi"


def register(*, strict: bool = True) -> tuple:
    """Register our methods (adapter.MERGE_METHODS) with mergekit; return the names newly registered.

    Idempotent: a method that is already ours is left alone. A name already taken by
    another package's method is not overwritten: with strict=True that raises
    RuntimeError, otherwise it is logged as a warning.
    """
    from mergekit.merge_methods import registry

    from mergekit_wudi.adapter import MERGE_METHODS
    from mergekit_wudi.architectures import register_architectures
    from mergekit_wudi.tensor_kinds import is_ours

    register_architectures()
    registered = {method.spec.name: method for method in registry.registered_methods()}
    taken = [(method, registered[method.method_name]) for method in MERGE_METHODS
             if method.method_name in registered and not is_ours(registered[method.method_name])]
    for method, existing in taken:  # all checked before any is registered
        message = (
            f"mergekit-wudi: merge method {method.method_name!r} is already registered by "
            f"{type(existing).__module__}.{type(existing).__qualname__}; left in place, "
            f"so merge_method: {method.method_name} does not use mergekit-wudi"
        )
        if strict:
            raise RuntimeError(message)
        import logging

        logging.getLogger(__name__).warning(message)
    added = [method for method in MERGE_METHODS if method.method_name not in registered]
    for method in added:
        registry.register(method)
    return tuple(method.method_name for method in added)


def add_method(solver_cls: type):
    """Make a `Solver` subclass (solvers/base.py) one of our merge methods, and register
    it with mergekit: what a solver module of this package gets by being there."""
    from mergekit_wudi.adapter import append_method

    method = append_method(solver_cls)
    register()
    return method


def autoload_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def autoload() -> None:
    """Called by mergekit_wudi.pth at start-up: arrange registration, never raise."""
    try:
        if autoload_disabled():
            return
        if _TARGET in sys.modules:
            _register_quietly()
        elif not any(isinstance(finder, _ImportHook) for finder in sys.meta_path):
            sys.meta_path.insert(0, _ImportHook())
    except Exception as error:  # pragma: no cover - start-up must survive anything
        _report(error)


_pending = False  # mergekit is loaded, registration waits for our modules to finish


def _our_module_is_loading(finished: str = "") -> bool:
    """Whether a mergekit_wudi module other than `finished` is partway through its own import."""
    return any(
        name.partition(".")[0] == _PACKAGE
        and name != finished
        and getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
    )


def _module_finished(name: str) -> None:
    """One of our modules has run to its end: do a registration that waited for it."""
    if _pending and not _our_module_is_loading(finished=name):
        _register_quietly(finished=name)


def _register_quietly(finished: str = "") -> None:
    global _pending
    _pending = _our_module_is_loading(finished)
    if _pending:
        return
    _remove_import_hook()
    try:
        register(strict=False)
        from mergekit_wudi.config_error import install_excepthook

        install_excepthook()  # configuration mistakes print as one line in mergekit-yaml
    except Exception as error:
        _report(error)


def _report(error: BaseException) -> None:
    import logging

    logging.getLogger(__name__).warning(
        "mergekit-wudi: automatic registration failed (%s: %s); call mergekit_wudi.register() "
        "or use `mergekit-wudi run`",
        type(error).__name__,
        error,
    )


def _remove_import_hook() -> None:
    for finder in [finder for finder in sys.meta_path if isinstance(finder, _ImportHook)]:
        sys.meta_path.remove(finder)


class _ImportHook:
    """A meta-path finder that wraps the loaders of mergekit.merge_methods and of our modules."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET and not fullname.startswith(_PACKAGE + "."):
            return None
        for finder in list(sys.meta_path):
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader:
    """Runs the real loader, restores it on the module, then registers if the time has come."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        if module.__name__ == _TARGET:
            _register_quietly()
        else:
            _module_finished(module.__name__)
