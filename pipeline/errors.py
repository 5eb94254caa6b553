"""Errors a user can cause and fix, and the one place they become a clean exit."""
from __future__ import annotations

import functools
import sys
import time
from typing import Callable


WORK_LINE = "stage work:"


class UserError(Exception):
    """Bad params, a missing or corrupt archive, a label/frame mismatch: the message names the thing and the fix."""


def exit_cleanly(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a stage's main(): a UserError prints one line to stderr and exits 2, without a traceback. A finished
    stage prints how long its work took (main() alone, after the imports), which benchmarks/stage_times.py reads
    to tell a stage's work from its start-up and DVC's bookkeeping."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        started = time.perf_counter()
        try:
            status = main(*args, **kwargs) or 0
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"{WORK_LINE} {time.perf_counter() - started:.2f} s", file=sys.stderr)
        return status

    return wrapper
