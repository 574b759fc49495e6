"""Where user code is on the stack: warnings point at the user's line, not lrmult's or JAX's."""

from __future__ import annotations

import inspect


def _outside(frame) -> bool:
    module = frame.f_globals.get("__name__", "")
    return not (module.startswith("lrmult") or module.startswith("jax"))


def user_stacklevel() -> int:
    """The `warnings.warn` stack level of the first frame outside lrmult and JAX.

    Call it from the function that calls `warnings.warn`.
    """
    frame, level = inspect.currentframe().f_back, 1
    while frame is not None:
        if _outside(frame):
            return level
        frame, level = frame.f_back, level + 1
    return 1


def user_site() -> tuple[str, int]:
    """`(filename, line)` of the first frame outside lrmult and JAX."""
    frame = inspect.currentframe().f_back
    while frame is not None and not _outside(frame):
        frame = frame.f_back
    return ("?", 0) if frame is None else (frame.f_code.co_filename, frame.f_lineno)
