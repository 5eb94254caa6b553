"""Unpacking the downloaded archives (tar of any compression, zip), refusing any member that would land outside the
target folder: absolute paths, `..`, links pointing outside, devices and pipes."""
from __future__ import annotations

import gzip
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Iterator

from pipeline.errors import UserError


def unpack(archive: Path, dest: Path) -> None:
    """Unpack a tar (any compression) or zip into dest; a bare .npy/.mat/.m label file is linked in as it is."""
    dest.mkdir(parents=True, exist_ok=True)
    lower = archive.name.lower()
    if lower.endswith((".npy", ".mat", ".m")):
        _link_or_copy(archive, dest / archive.name)
    elif lower.endswith(".zip") or zipfile.is_zipfile(archive):
        _unpack_zip(archive, dest)
    elif ".tar" in lower or lower.endswith((".tgz", ".tbz2", ".txz")) or tarfile.is_tarfile(archive):
        _unpack_tar(archive, dest)
    else:
        raise UserError(f"{archive}: not a tar or zip archive, nor a .npy/.mat label file; "
                        f"check the archive names listed in params.yaml")


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _member_problem(dest: Path, name: str) -> str | None:
    """Why an archive member's path is unsafe to create under dest (None: it is safe)."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        return "has an absolute path"
    target = os.path.normpath(os.path.join(dest, posix))
    if os.path.commonpath([dest, target]) != str(dest):
        return "would be written outside the target folder"
    return None


def _link_problem(dest: Path, link_dir: str, link_target: str) -> str | None:
    """Why a link whose target is `link_target`, resolved from folder `link_dir` (inside dest), is unsafe."""
    posix = link_target.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        return f"is a link to the absolute path {link_target!r}"
    target = os.path.normpath(os.path.join(dest, link_dir, posix))
    if os.path.commonpath([dest, target]) != str(dest):
        return f"is a link to {link_target!r}, outside the target folder"
    return None


# Its sha256 matched params.yaml, so the file is what params.yaml names: a truncated copy whose checksum was
# written into params.yaml by hand, or the wrong release.
_DAMAGED = ("delete it and rerun to download it again, and check that its sha256 in params.yaml is the one the "
            "dataset's authors publish (see docs/datasets.md)")


def _refuse(archive: Path, member: str, problem: str) -> UserError:
    return UserError(f"{archive}: member {member!r} {problem}; refusing to unpack this archive. It is not the "
                     f"dataset's official archive: delete it and put the genuine file in its place "
                     f"(see docs/datasets.md)")


def _unpack_tar(archive: Path, dest: Path) -> None:
    dest = dest.resolve()

    def checked_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
        for member in tar:  # streams: one pass over a compressed archive
            problem = _member_problem(dest, member.name)
            if problem is None and member.issym():
                problem = _link_problem(dest, os.path.dirname(member.name.replace("\\", "/")), member.linkname)
            elif problem is None and member.islnk():
                problem = _link_problem(dest, "", member.linkname)  # hard links name a path from the archive root
            elif problem is None and not (member.isfile() or member.isdir()):
                problem = "is a device, pipe or other special file"
            if problem:
                raise _refuse(archive, member.name, problem)
            yield member

    try:
        with tarfile.open(archive) as tar:
            # The "data" filter repeats these checks inside tarfile and drops unsafe permission bits.
            tar.extractall(dest, members=checked_members(tar), filter="data")
    except tarfile.FilterError as exc:
        raise _refuse(archive, exc.tarinfo.name, str(exc)) from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        # OSError from writing (disk full, permissions) is not the archive's fault: pipeline.io words it
        raise UserError(f"{archive}: damaged or not a tar archive ({exc or type(exc).__name__}); {_DAMAGED}") from None


def _unpack_zip(archive: Path, dest: Path) -> None:
    dest = dest.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for info in members:
                problem = _member_problem(dest, info.filename)
                is_link = stat.S_ISLNK(info.external_attr >> 16)
                if problem is None and is_link:
                    link_target = zf.read(info).decode("utf-8", "replace")
                    problem = _link_problem(dest, os.path.dirname(info.filename.replace("\\", "/")), link_target)
                if problem:
                    raise _refuse(archive, info.filename, problem)
            zf.extractall(dest, members)
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise UserError(f"{archive}: damaged or not a zip archive ({exc or type(exc).__name__}); {_DAMAGED}") from None
