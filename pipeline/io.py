"""Atomic output helpers: a killed stage never leaves a half-written file or folder under its final name.

A write that fails because the disk is full or not writable (ENOSPC, EDQUOT, EACCES, EPERM, EROFS) becomes one
UserError naming the output and the fix; the temporary file or folder is removed and whatever was under the final
name before keeps its bytes (it is only ever replaced by a rename, after the new content is complete).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import UserError

# The write failures a user fixes on the machine, not in the code: what went wrong, and what to do.
DISK_ERRORS = {
    errno.ENOSPC: ("the disk is full", "free space on the disk that holds {folder}"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space or raise the quota for {folder}"),
    errno.EACCES: ("permission denied", "make {folder} writable for this user"),
    errno.EPERM: ("operation not permitted", "make {folder} writable for this user"),
    errno.EROFS: ("the file system is read-only", "write to a writable disk, or remount {folder} read-write"),
}


def disk_error(path: Path, exc: OSError, kind: str = "") -> UserError | None:
    """The UserError for a failed write of `path`, or None when `exc` is not a disk or permission problem."""
    if exc.errno not in DISK_ERRORS:
        return None
    path = Path(path)
    what, fix = DISK_ERRORS[exc.errno]
    # a temporary file beside `path` says nothing more; a folder above it (mkdir) or another file does
    culprit = Path(os.fsdecode(exc.filename)) if exc.filename is not None else None
    where = "" if culprit is None or culprit.parent == path.parent else f" (at {culprit})"
    return UserError(f"cannot write {path}: {what}{where}; {fix.format(folder=path.parent)}, then rerun (the "
                     f"previous {kind}{path.name}, if any, is unchanged)")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds. A writer killed by
    SIGKILL (which runs no cleanup) leaves its temporary (`.<name>.*.tmp`): see `remove_temporaries`."""
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp_path.chmod(0o666 & ~umask)  # mkstemp makes 0600; outputs should read like any other file
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:
        error = disk_error(path, exc)
        if error is None:
            raise
        raise error from exc
    finally:
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                tmp_path.unlink(missing_ok=True)


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that killed writers left in `folder` (`atomic_path`'s `.<name>.*.tmp`); returns them.
    Only for a folder whose one writer is the caller (a run's folder, written by its run alone), and which
    persists across stage executions: DVC would otherwise cache the leftovers with it."""
    removed = sorted(Path(folder).glob(".*.tmp"))
    for stale in removed:
        stale.unlink(missing_ok=True)
    return removed


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n")


def write_csv(path: str | os.PathLike, frame) -> None:
    """Write a pandas DataFrame atomically (no index column)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside `path`; if the block succeeds it replaces `path` (a previous folder is
    moved aside and deleted), else it is removed. Leftovers of a killed run are removed first (DVC never runs one
    stage twice at once)."""
    path = Path(path)
    staging = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in [*path.parent.glob(f".{path.name}.staging-*"), *path.parent.glob(f".{path.name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.staging-", dir=path.parent))
        staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
        yield staging
        if path.exists() or path.is_symlink():
            trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, trash / path.name)
            try:
                os.replace(staging, path)
            except OSError:   # put the previous folder back rather than leave nothing under the name
                os.replace(trash / path.name, path)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, path)
    except OSError as exc:
        error = disk_error(path, exc, "folder ")
        if error is None:
            raise
        raise error from exc
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
