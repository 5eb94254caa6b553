"""Errors a user can cause and fix, and the one place they become a clean exit."""
from __future__ import annotations

import functools
import sys
from typing import Callable


class UserError(Exception):
    """Bad params, a missing or corrupt archive, a label/frame mismatch: the message names the thing and the fix."""


def exit_cleanly(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a stage's main(): a UserError prints one line to stderr and exits 2, without a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return wrapper
