"""What several tests do with the processes they start on this machine: pick a free port on 127.0.0.1, run a
command (DVC's too) that must succeed, run Python code in a fresh interpreter free of the process-level settings, and
start, wait for and stop a DVC experiment queue's workers."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pipeline

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def command(work: Path, env: dict, *args: str, timeout: float = 600) -> str:
    result = subprocess.run(list(args), cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} in {work}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result.stdout


def fresh_python(code: str, **env_changes: str | None) -> subprocess.CompletedProcess:
    """`code` in a new interpreter at the repository root. Its environment holds none of the settings a process reads
    once, at its start (the CPU kernel pins, MEMVAD_CPU_KERNELS, glibc's malloc tunables) beyond `env_changes`
    (None removes a variable)."""
    read_at_start = {*pipeline.CPU_KERNEL_PINS, pipeline.CPU_KERNELS_VARIABLE, "GLIBC_TUNABLES"}
    env = {k: v for k, v in os.environ.items() if k not in read_at_start and not k.startswith("MALLOC_")}
    for name, value in env_changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def reported(code: str, **env_changes: str | None):
    """What `code`, run by fresh_python, printed as JSON on its last line (it must succeed)."""
    done = fresh_python(code, **env_changes)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def dvc(work: Path, env: dict, *args: str, timeout: float = 600) -> str:
    return command(work, env, sys.executable, "-m", "dvc", *args, timeout=timeout)


def wait_for_the_queue(work: Path, env: dict, names: list[str], timeout: float) -> dict[str, str]:
    """Poll until every named experiment succeeded or failed: {name: "Success" | "Failed"}. A finished experiment
    gets its git ref (cheap to poll); a failed one shows in `dvc queue status`."""
    deadline, polls, status = time.monotonic() + timeout, 0, ""
    pattern = re.compile(rf"\b({'|'.join(map(re.escape, names))})\b.*\b(Queued|Running|Success|Failed)\b")
    while True:
        refs = command(work, env, "git", "for-each-ref", "--format=%(refname)", "refs/exps").split()
        polls += 1
        if {ref.rsplit("/", 1)[-1] for ref in refs} >= set(names) or polls % 15 == 0:
            status = dvc(work, env, "queue", "status")
            states = dict(pattern.findall(status))
            if len(states) == len(names) and set(states.values()) <= {"Success", "Failed"}:
                return states
        assert time.monotonic() < deadline, f"the queue did not finish within {timeout:.0f} s:\n{status}"
        time.sleep(2)


def start_queue_workers(work: Path, env: dict, workers: int) -> None:
    """`dvc queue start -j workers`, its output into a file: the workers it starts inherit its descriptors, and a
    pipe would keep the command waiting until every worker exits."""
    with tempfile.TemporaryFile("w+") as output:
        started = subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", str(workers)], cwd=work,
                                 env=env, stdout=output, stderr=subprocess.STDOUT, timeout=300)
        output.seek(0)
        assert started.returncode == 0, output.read()[-3000:]


def stop_queue_workers(work: Path, env: dict, grace: float = 20) -> None:
    """`dvc queue stop --kill`, then SIGKILL to any worker still alive after `grace` seconds. DVC's worker can miss
    its shutdown: one whose monitor saw the queue empty while its own experiment still ran stayed, idle, after that
    experiment succeeded, and ignored `dvc queue stop` (seen in this suite)."""
    subprocess.run([sys.executable, "-m", "dvc", "queue", "stop", "--kill"], cwd=work, env=env, capture_output=True,
                   timeout=120)
    deadline = time.monotonic() + grace
    for pid_file in (work / ".dvc" / "tmp" / "exps" / "celery").glob("dvc-exp-worker-*.pid"):
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            continue
        while _is_queue_worker(pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        if _is_queue_worker(pid):
            os.kill(pid, signal.SIGKILL)


def _is_queue_worker(pid: int) -> bool:
    """Whether `pid` is alive and a DVC queue worker (not a process that reused the number)."""
    try:
        return b"queue-worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
