"""Fetch one archive of a real dataset into data/raw/<dataset>/, verified by sha256.

    fetch(archive, raw_dir) -> raw_dir/<archive.name>

The archive ends up under its final name only once its sha256 matched. In order:
1. `local_path` set: the user's file is verified and then hard-linked (or copied) into raw_dir; nothing is downloaded.
2. raw_dir/<name> already there (downloaded before, or dropped in by hand): verified; nothing is downloaded.
3. Otherwise each URL of `urls` is tried in order (mirrors). The bytes stream into raw_dir/<name>.part; a .part left by
   an earlier, interrupted run (or by a connection that broke a moment ago) is resumed with an HTTP Range request.
   A server that ignores Range (answers 200 instead of 206) makes us start the file again from byte 0.

A file whose checksum does not match is never left under the final name: it is renamed to raw_dir/<name>.bad (kept
for inspection; nothing reads it, and the next run downloads afresh). The user's own local_path is never touched.
Every failure ends in one UserError naming the URL or file, what went wrong (expected and actual sha256 for a
mismatch) and how to place the archive by hand.

Only the standard library's urllib is used, so proxies configured in the environment (http_proxy, ...) apply.
Downloads come only from the URLs in params.yaml and only over http or https: any other scheme (file:, ftp:,
data:, ...) is refused before anything is fetched, and so is a redirect to one.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from pipeline.config import Archive
from pipeline.errors import UserError

TIMEOUT_S = 30.0                # connect timeout, and the longest wait for any single read of the body
CHUNK_BYTES = 1 << 20
MAX_ATTEMPTS_PER_URL = 5        # a connection that breaks mid-way is resumed this often (each try must make progress)
USER_AGENT = "memvad-downloader/1.0 (python urllib)"
_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
ALLOWED_SCHEMES = ("http", "https")


class _DownloadFailed(Exception):
    """One URL did not deliver; the message says why. fetch() collects these into one UserError."""


def fetch(archive: Archive, raw_dir: Path, *, params_key: str | None = None) -> Path:
    """Return raw_dir/<archive.name>, downloaded (or adopted from local_path) and verified against archive.sha256.

    `params_key` is where the archive sits in params.yaml (e.g. "datasets.ped2.source.archives.raw[0]"), used in messages;
    by default it is derived from raw_dir's name, which is the dataset's name (data/raw/<dataset>/).
    """
    raw_dir = Path(raw_dir)
    params_key = params_key or f"datasets.{raw_dir.name}.source.archives.<format>[<i>]"
    _check_archive_entry(archive, params_key)
    raw_dir.mkdir(parents=True, exist_ok=True)
    final = raw_dir / archive.name
    expected = archive.sha256.lower()

    if archive.local_path:
        return _adopt_local_file(archive, final, params_key)

    if final.exists():
        actual = sha256_of(final)
        if actual != expected:
            bad = _set_aside(final)
            raise UserError(
                f"{final}: checksum mismatch: expected sha256 {expected}, got {actual}. The file was moved to {bad} "
                f"(kept for inspection, never used). Rerun to download it again, or "
                f"{_how_to_place_by_hand(archive, raw_dir, params_key)}")
        return final

    if not archive.urls:
        raise UserError(f"{params_key}: {archive.name} has no urls to download from; "
                        f"{_how_to_place_by_hand(archive, raw_dir, params_key)}")

    part = raw_dir / f"{archive.name}.part"
    failures = []
    for url in archive.urls:
        try:
            _download_with_resume(url, part)
        except _DownloadFailed as exc:
            failures.append(f"{url}: {exc}")
            continue
        actual = sha256_of(part)
        if actual == expected:
            os.replace(part, final)
            return final
        bad = _set_aside(part, final_name=archive.name)
        failures.append(f"{url}: checksum mismatch: expected sha256 {expected}, got {actual} "
                        f"(the download was kept as {bad} for inspection and is never used)")

    kept = f" The partial download {part} is kept; the next run resumes it." if part.exists() else ""
    raise UserError(f"could not download {archive.name} ({params_key}): " + "; ".join(failures) + "." + kept +
                    f" Or else {_how_to_place_by_hand(archive, raw_dir, params_key)}")


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, with a progress bar (the real archives are gigabytes)."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}",
                                     leave=False) as bar:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Messages and bookkeeping


def _check_archive_entry(archive: Archive, params_key: str) -> None:
    name = archive.name
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise UserError(f"params.yaml: {params_key}.name: {name!r} must be a plain file name (no folders)")
    if not _SHA256_PATTERN.match(archive.sha256.lower()):
        raise UserError(f"params.yaml: {params_key}.sha256: {archive.sha256!r} is not a sha256 (64 hex digits); "
                        f"compute it with `sha256sum {name}`")
    for i, url in enumerate(archive.urls):
        problem = url_problem(url)
        if problem:
            raise UserError(f"params.yaml: {params_key}.urls[{i}]: {url!r} {problem}; downloads come only over "
                            f"http or https: give an http(s) URL, or set {params_key}.local_path to a file you "
                            f"already have")


def url_problem(url: str) -> str | None:
    """Why `url` may not be downloaded from (None: an http or https URL with a host)."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        return f"has the scheme {parts.scheme + ':' if parts.scheme else '(none)'}"
    if not parts.hostname:
        return "names no host"
    return None


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http and https only (urllib's own handler also follows one to ftp:)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        problem = url_problem(newurl)
        if problem:
            raise _DownloadFailed(f"the server redirected to {newurl!r}, which {problem}; only http and https "
                                  f"are followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener() -> urllib.request.OpenerDirector:
    """urllib's default opener less its file:, ftp: and data: handlers, redirects within http(s); built per request,
    so that the proxies are the environment's at that moment."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), urllib.request.HTTPHandler(),
                    urllib.request.HTTPSHandler(), urllib.request.HTTPDefaultErrorHandler(), _HttpOnlyRedirects(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def _how_to_place_by_hand(archive: Archive, raw_dir: Path, params_key: str) -> str:
    return (f"get {archive.name} (sha256 {archive.sha256.lower()}) by other means, then put {archive.name} in "
            f"{raw_dir}/ or set {params_key}.local_path in params.yaml to its path (see docs/datasets.md).")


def _set_aside(path: Path, final_name: str | None = None) -> Path:
    """Rename a file that failed verification to <name>.bad (replacing an older .bad)."""
    bad = path.with_name(f"{final_name or path.name}.bad")
    os.replace(path, bad)
    return bad


def _adopt_local_file(archive: Archive, final: Path, params_key: str) -> Path:
    """Verify the user's archive, then hard-link it into raw_dir (copy when linking is impossible)."""
    source = Path(os.path.expanduser(archive.local_path))
    if not source.is_file():
        raise UserError(f"params.yaml: {params_key}.local_path: {source} does not exist or is not a file; "
                        f"fix the path, or remove local_path to download {archive.name} from {list(archive.urls)}")
    expected = archive.sha256.lower()
    actual = sha256_of(source)
    if actual != expected:
        raise UserError(f"{source} (from {params_key}.local_path): checksum mismatch: expected sha256 {expected}, "
                        f"got {actual}. The file was left untouched; point local_path at the right archive "
                        f"(or, if this is a different release on purpose, set {params_key}.sha256 to {actual}).")
    if final.exists() and os.path.samefile(source, final):
        return final
    staging = final.with_name(f"{final.name}.part")
    staging.unlink(missing_ok=True)
    try:
        os.link(source, staging)
    except OSError:  # another file system, or links not allowed: copy instead
        shutil.copyfile(source, staging)
    os.replace(staging, final)
    return final


# ----------------------------------------------------------------------------------------------------------------
# HTTP


def _download_with_resume(url: str, part: Path) -> None:
    """Stream `url` into `part`, resuming what is there. Returns when the server sent everything it announced."""
    for attempt in range(1, MAX_ATTEMPTS_PER_URL + 1):
        offset = part.stat().st_size if part.exists() else 0
        received = _one_request(url, part, offset)
        if received is None:
            return
        # The connection broke; resume if this try made progress (a stalled server is not worth hammering).
        if received == 0 or attempt == MAX_ATTEMPTS_PER_URL:
            size = part.stat().st_size if part.exists() else 0
            raise _DownloadFailed(f"the connection broke after {size} bytes and resuming did not help")


def _one_request(url: str, part: Path, offset: int) -> int | None:
    """One GET, resuming at `offset`. None: complete. An int: the connection broke after that many new bytes."""
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = _opener().open(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # Range not satisfiable: the .part is already whole (or longer than the file); the checksum decides.
            return None
        raise _DownloadFailed(f"HTTP error {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise _DownloadFailed(f"cannot reach the host ({_describe(exc.reason)})") from None
    except (socket.timeout, TimeoutError):
        raise _DownloadFailed(f"no answer within {TIMEOUT_S:.0f} s") from None
    except (http.client.HTTPException, OSError) as exc:
        raise _DownloadFailed(f"the connection failed ({_describe(exc)})") from None

    with response:
        if offset and response.status == 206:
            start = _content_range_start(response.headers.get("Content-Range", ""))
            if start != offset:
                part.unlink()  # resuming from this server cannot work; the next run starts the file over
                raise _DownloadFailed(f"asked to resume at byte {offset}, the server answered Content-Range "
                                      f"{response.headers.get('Content-Range')!r}; the partial download was "
                                      f"discarded, rerun to download it from the start")
        elif response.status == 200:
            offset = 0  # the server ignored Range (or there was nothing to resume): start the file again
        else:
            raise _DownloadFailed(f"unexpected HTTP status {response.status}")
        length = response.headers.get("Content-Length")
        remaining = int(length) if length and length.isdigit() else None
        total = offset + remaining if remaining is not None else None

        received = 0
        with open(part, "ab" if offset else "wb") as out, \
                tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=part.name[:-len(".part")]) as bar:
            while True:
                try:
                    chunk = response.read(CHUNK_BYTES)
                except (socket.timeout, TimeoutError, http.client.HTTPException, ConnectionError):
                    return received
                if not chunk:
                    break
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        # http.client returns b"" when the peer closes early, so compare against the announced length ourselves.
        if remaining is not None and received < remaining:
            return received
        return None


def _content_range_start(value: str) -> int | None:
    match = re.match(r"\s*bytes\s+(\d+)-", value)
    return int(match.group(1)) if match else None


def _describe(reason: object) -> str:
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return f"no answer within {TIMEOUT_S:.0f} s"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason)
