"""ConfigError: a mistake in the merge configuration, reported as one line that says what to change.

It is a RuntimeError, which pydantic passes through unwrapped (a ValueError would be
spread over a multi-line ValidationError ending with a URL), so the last line of a
traceback is our sentence; `install_excepthook` drops the traceback altogether.
"""

from __future__ import annotations

import sys


class ConfigError(RuntimeError):
    """A mistake in the merge configuration that the user fixes in the YAML.

    A RuntimeError, not a ValueError: pydantic wraps ValueError raised by a validator
    into a multi-line ValidationError, and passes any other exception through.
    """


def install_excepthook() -> None:
    """Print an uncaught ConfigError as one line (`error: ...`) instead of a traceback.

    mergekit-yaml lets a configuration mistake escape as an exception, so the user would
    read our sentence at the bottom of a 40-line traceback. The hook is chained: every
    other exception goes to the hook that was there before. Idempotent.
    """
    previous = sys.excepthook
    if getattr(previous, "_mergekit_wudi", False):
        return

    def hook(exc_type, exc, tb):
        if isinstance(exc, ConfigError):
            sys.stderr.write(f"error: {exc}\n")
            sys.stderr.flush()
        else:
            previous(exc_type, exc, tb)

    hook._mergekit_wudi = True
    sys.excepthook = hook
