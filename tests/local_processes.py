"""What several tests do with the processes they start on this machine: pick a free port on 127.0.0.1, run a
command (DVC's too) that must succeed, and wait for a DVC experiment queue to finish."""
from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def command(work: Path, env: dict, *args: str, timeout: float = 600) -> str:
    result = subprocess.run(list(args), cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} in {work}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result.stdout


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
