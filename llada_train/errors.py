"""User-facing errors: one line naming what, where and the fix; entry points exit non-zero."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any


class LladaError(Exception):
    """A problem with the user's input or configuration (not a bug): printed as one line."""


def exit_on_error(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an entry point so a ``LladaError`` prints ``error: ...`` and exits with code 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LladaError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
