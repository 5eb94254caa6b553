"""Stage start-up without the imports: a preloaded interpreter that forks one child per stage.

Every DVC stage is a fresh `python -m` process, and before it computes anything it spends 4-5 s of one core
importing torch (and torch._dynamo, which the first optimiser pulls in), sklearn, pandas, matplotlib and MLflow:
about 7 of the default study's 24 minutes over its 95 stages. `prelude()`, the first statement of every stage
module, hands the command to a server process that has imported those libraries once. The server forks; the child
takes the stage process's standard streams, working directory, environment and arguments and runs the module as
`__main__`; the stage process waits, forwards Ctrl-C, SIGTERM and SIGHUP to the child, and exits with its status.

- The repository's own modules are never preloaded: every stage runs the code as it is on disk. The server holds
  third-party libraries only, and is keyed by the interpreter, the repository and the environment variables that
  those libraries read at import (thread counts, library paths), so a change there gets a new server.
- The server starts with the first stage that needs it (its output goes to <socket>.log), and exits after
  MEMVAD_PRELOAD_IDLE seconds (default 60) without a stage. A child whose stage process dies is terminated, and a
  child whose server dies gets SIGTERM.
- Linux only (forking after these imports is not safe on macOS). MEMVAD_PRELOAD=0 turns it off. When no server can
  be reached or started, the stage runs in its own process, as it would without this module.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PRELOAD = ("numpy", "pandas", "yaml", "cv2", "tqdm", "scipy.stats", "sklearn.metrics", "sklearn.manifold", "torch",
           "torch._dynamo", "torch.utils.data", "matplotlib.pyplot", "mlflow", "mlflow.tracking",
           "mlflow.store.tracking.sqlalchemy_store")
# Read by the preloaded libraries when they load (OpenMP/BLAS thread pools, backends, paths): part of the server key.
IMPORT_TIME_ENVIRONMENT = ("OMP_", "MKL_", "OPENBLAS_", "KMP_", "GOMP_", "TORCH", "PYTORCH_", "CUDA_", "MPL",
                           "PYTHON", "LD_", "MLFLOW_")
START_TIMEOUT_S = 120
MESSAGE_BYTES = 1 << 20

_in_child = False      # set in a server's child: the stage runs here, with MLflow in-process


def enabled() -> bool:
    return sys.platform == "linux" and os.environ.get("MEMVAD_PRELOAD", "1") != "0"


def socket_path() -> Path:
    """One server per interpreter, repository and import-time environment, in a private folder of the temp dir."""
    environment = sorted((k, v) for k, v in os.environ.items() if k.startswith(IMPORT_TIME_ENVIRONMENT))
    key = json.dumps([sys.executable, sys.version, str(REPO_ROOT), environment])
    return Path(tempfile.gettempdir()) / f"memvad-{os.getuid()}" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def prelude(mlflow_worker: bool = False) -> None:
    """The first statement of a stage module's entry point, before its heavy imports: run the stage in a preloaded
    child and exit with its status when possible; otherwise return, having started the MLflow worker if asked
    (see pipeline.tracking), and the stage runs here."""
    if _in_child:
        return
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if enabled() and spec is not None:   # `python -m module`; a script path runs here
        status = hand_off(spec.name, sys.argv[1:])
        if status is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    if mlflow_worker:
        from pipeline import tracking
        tracking.start_worker()


def hand_off(module: str, args: list[str]) -> int | None:
    """Run `python -m module args` in a preloaded child; its exit status, or None when nothing ran (no server)."""
    path = socket_path()
    try:
        connection = _connect(path) or _start_server(path)
    except OSError:
        return None
    if connection is None:
        return None
    with connection:
        request = {"module": module, "argv": args, "cwd": os.getcwd(), "env": dict(os.environ)}
        try:
            socket.send_fds(connection, [json.dumps(request).encode()], _standard_fds())
            pid = json.loads(connection.recv(MESSAGE_BYTES))["pid"]
        except (OSError, ValueError, KeyError):
            return None     # refused before a child existed: nothing ran
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, lambda received, frame: _signal(pid, received))
        try:
            reply = connection.recv(MESSAGE_BYTES)
        except OSError:
            reply = b""
    if not reply:
        print(f"error: the preloaded interpreter ({path}.log) ended before `python -m {module}` "
              f"reported its status; run again, or set MEMVAD_PRELOAD=0 to run stages in their own process",
              file=sys.stderr)
        return 1
    return int(json.loads(reply)["status"])


def _standard_fds() -> list[int]:
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:  # a closed standard stream: the child gets /dev/null there
            fds.append(os.open(os.devnull, os.O_RDWR))
    return fds


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _connect(path: Path) -> socket.socket | None:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        connection.connect(str(path))
        return connection
    except OSError:  # no server, or a stale socket file of one that died
        connection.close()
        return None


def _start_server(path: Path) -> socket.socket | None:
    """Start the server and wait for it to listen (it binds only after its imports). One starter at a time."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        connection = _connect(path)
        if connection is not None:
            return connection
        with open(path.with_suffix(".log"), "ab") as log:
            server = subprocess.Popen([sys.executable, "-m", "pipeline.launch", str(path)], cwd=REPO_ROOT,
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and server.poll() is None:
            connection = _connect(path)
            if connection is not None:
                return connection
            time.sleep(0.05)
    return None


def serve(path: Path) -> None:
    """The server: import PRELOAD, listen on `path`, fork a child per request, send each client its child's pid
    and then its exit status; exit when idle."""
    import importlib

    import matplotlib

    # pipeline.tracking first: its environment defaults (MLflow's telemetry off) must hold when MLflow loads.
    importlib.import_module("pipeline.tracking")
    matplotlib.use("Agg")
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    _forget_repository_modules()
    idle_limit = float(os.environ.get("MEMVAD_PRELOAD_IDLE", "60"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    staging = path.with_suffix(f".{os.getpid()}")
    listener.bind(str(staging))
    listener.listen(8)
    os.replace(staging, path)   # clients see the socket only once everything is imported
    inode = os.stat(path).st_ino
    jobs: dict[int, socket.socket] = {}
    abandoned: set[int] = set()    # children whose stage process is gone: terminated, waiting to be reaped
    idle_since = time.monotonic()
    while jobs or time.monotonic() - idle_since < idle_limit:
        watched = [listener, *(job for pid, job in jobs.items() if pid not in abandoned)]
        readable = _wait_readable(watched, 0.1)
        for ready in readable:
            if ready is listener:
                connection, _ = listener.accept()
                pid = _fork_child(connection, listener, jobs)
                if pid is not None:
                    jobs[pid] = connection
            elif not _receive(ready):   # the stage process is gone: so goes its child
                pid = next(pid for pid, job in jobs.items() if job is ready)
                abandoned.add(pid)
                _signal(pid, signal.SIGTERM)
        for pid in list(jobs):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                connection = jobs.pop(pid)
                try:
                    connection.send(json.dumps({"status": _exit_code(status)}).encode())
                except OSError:
                    pass
                connection.close()
                abandoned.discard(pid)
                idle_since = time.monotonic()
        try:
            if os.stat(path).st_ino != inode:
                break   # another server took the path over
        except FileNotFoundError:
            break
    listener.close()
    try:
        if os.stat(path).st_ino == inode:
            path.unlink()
    except FileNotFoundError:
        pass


def _forget_repository_modules() -> None:
    """Drop the repository's modules that preloading imported (all but this one and its package): the children
    import them from disk, as they are when the stage runs."""
    package = sys.modules["pipeline"]
    for name, module in list(sys.modules.items()):
        origin = getattr(module, "__file__", None) or ""
        if name not in ("pipeline", "__main__", __name__) and origin.startswith(str(REPO_ROOT) + os.sep):
            del sys.modules[name]
            if name.startswith("pipeline.") and name.count(".") == 1 and hasattr(package, name[9:]):
                delattr(package, name[9:])


def _wait_readable(sockets: list[socket.socket], timeout_s: float) -> list[socket.socket]:
    """select.select's readable list, without its 1024-descriptor ceiling."""
    poller = select.poll()
    by_fd = {sock.fileno(): sock for sock in sockets}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    return [by_fd[fd] for fd, _ in poller.poll(timeout_s * 1000)]


def _receive(connection: socket.socket) -> bytes:
    try:
        return connection.recv(MESSAGE_BYTES)
    except OSError:
        return b""


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code   # killed by signal N: the shell's 128 + N


def _fork_child(connection: socket.socket, listener: socket.socket, jobs: dict[int, socket.socket]) -> int | None:
    try:
        message, fds, _, _ = socket.recv_fds(connection, MESSAGE_BYTES, 3)
        request = json.loads(message)
    except (OSError, ValueError):
        connection.close()
        return None
    pid = os.fork()
    if pid == 0:
        listener.close()
        for job in jobs.values():
            job.close()
        connection.close()
        _run_child(request, fds)
    for fd in fds:
        os.close(fd)
    try:
        connection.send(json.dumps({"pid": pid}).encode())
    except OSError:
        _signal(pid, signal.SIGTERM)
    return pid


def _run_child(request: dict, fds: list[int]) -> None:
    """In the forked child: become the stage process (streams, directory, environment, argv), run the module as
    `__main__`, and exit with its status. Never returns."""
    import runpy
    import traceback

    global _in_child
    _in_child = True
    status = 1
    try:
        _die_with_parent()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # SIGTERM unwinds like Ctrl-C (a stage's MLflow run is marked FAILED on the way out), then exits as killed.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = open(0, encoding="utf-8", closefd=False)
        sys.stdout = open(1, "w", encoding="utf-8", buffering=1 if os.isatty(1) else 8192, closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.path[0] = request["cwd"]            # as `python -m` does
        sys.argv = [request["module"], *request["argv"]]
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        status = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            status = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status)


def _die_with_parent() -> None:
    """SIGTERM this child when the server dies (Linux prctl PR_SET_PDEATHSIG), so no stage outlives both."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    if os.getppid() == 1:   # the server died between fork and prctl
        os._exit(1)


if __name__ == "__main__":
    # Serve from the importable module, not from __main__: the children's stage modules import pipeline.launch and
    # must find _in_child set there.
    from pipeline import launch

    launch.serve(Path(sys.argv[1]))
