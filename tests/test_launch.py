"""The preloaded interpreter (pipeline.launch): a stage handed to it runs in a forked child exactly as it would in
its own process: same streams, arguments, directory, environment and exit status; Ctrl-C reaches it; a killed
stage process takes its child along; the server goes away when idle; MEMVAD_PRELOAD=0 runs stages in place."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import REPO_ROOT

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the preloaded interpreter is Linux-only")

PROBES = {
    "probe_report.py": """
import json, os, sys
preloaded = sorted(name for name in sys.modules if name.split(".")[0] in ("pipeline", "models", "analysis"))
from mlflow.telemetry.client import get_telemetry_client
from pipeline import launch
print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "argv": sys.argv[1:], "cwd": os.getcwd(),
                  "probe": os.environ.get("PROBE"), "in_child": launch._in_child, "preloaded": preloaded,
                  "telemetry": repr(get_telemetry_client()), "torch": "torch" in sys.modules}))
print("to stderr", file=sys.stderr)
sys.exit(3)
""",
    "probe_raise.py": """
raise RuntimeError("boom in the stage")
""",
    "probe_sleep.py": """
import os, sys, time
from pathlib import Path
Path(sys.argv[1]).write_text(str(os.getpid()))
print("ready", flush=True)
try:
    time.sleep(60)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(5)
""",
    "probe_prelude.py": """
if __name__ == "__main__":
    from pipeline import launch
    launch.prelude()
import os
print(os.getpid())
""",
}


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    """A folder of probe modules (the working directory of every call) and the environment: a private temp dir,
    so these tests get their own server, which exits 3 s after its last stage."""
    root = tmp_path_factory.mktemp("launch")
    for name, text in PROBES.items():
        (root / name).write_text(text)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TMPDIR": str(root), "MEMVAD_PRELOAD_IDLE": "3"}
    env.pop("MEMVAD_PRELOAD", None)
    return root, env


def hand_off(probes, module, *args, **popen):
    root, env = probes
    code = f"import sys; from pipeline import launch; sys.exit(launch.hand_off({module!r}, {list(args)!r}))"
    return subprocess.Popen([sys.executable, "-c", code], cwd=root, env={**env, "PROBE": "from the caller"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_the_child_runs_with_the_callers_streams_arguments_directory_environment_and_status(probes):
    caller = hand_off(probes, "probe_report", "a", "b c")
    out, err = caller.communicate(timeout=180)
    assert caller.returncode == 3, err
    seen = json.loads(out)
    assert seen["argv"] == ["a", "b c"] and seen["cwd"] == str(probes[0]) and seen["probe"] == "from the caller"
    assert seen["in_child"] is True
    assert seen["torch"] is True and seen["telemetry"] == "None"   # preloaded, and MLflow loaded with telemetry off
    assert seen["preloaded"] == ["pipeline", "pipeline.launch"]   # the repository's other modules come from disk
    assert seen["pid"] != caller.pid and seen["ppid"] != caller.pid   # a child of the server, not of the caller
    assert err.strip() == "to stderr"


def test_an_exception_in_the_stage_gives_its_traceback_and_status_1(probes):
    caller = hand_off(probes, "probe_raise")
    _, err = caller.communicate(timeout=180)
    assert caller.returncode == 1
    assert "Traceback" in err and "RuntimeError: boom in the stage" in err


def test_ctrl_c_and_sigterm_reach_the_child(probes, tmp_path):
    caller = hand_off(probes, "probe_sleep", str(tmp_path / "pid"))
    assert caller.stdout.readline().strip() == "ready"
    caller.send_signal(signal.SIGINT)
    out, _ = caller.communicate(timeout=30)
    assert out.strip() == "interrupted" and caller.returncode == 5
    caller = hand_off(probes, "probe_sleep", str(tmp_path / "pid"))
    assert caller.stdout.readline().strip() == "ready"
    caller.send_signal(signal.SIGTERM)
    caller.communicate(timeout=30)
    assert caller.returncode == 128 + signal.SIGTERM   # what a shell reports for a process killed by SIGTERM


def test_a_killed_stage_process_takes_its_child_along(probes, tmp_path):
    caller = hand_off(probes, "probe_sleep", str(tmp_path / "pid"))
    assert caller.stdout.readline().strip() == "ready"
    child = int((tmp_path / "pid").read_text())
    caller.kill()
    caller.wait(timeout=30)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists()   # terminated and reaped by the server


def test_prelude_hands_off_by_default_and_runs_in_place_when_turned_off(probes):
    root, env = probes
    for switch, in_place in (("1", False), ("0", True)):
        caller = subprocess.Popen([sys.executable, "-m", "probe_prelude"], cwd=root,
                                  env={**env, "MEMVAD_PRELOAD": switch}, stdout=subprocess.PIPE, text=True)
        out, _ = caller.communicate(timeout=180)
        assert caller.returncode == 0
        assert (int(out) == caller.pid) is in_place


def test_the_server_exits_when_idle_and_removes_its_socket(probes):
    root, env = probes
    sockets = list((root / f"memvad-{os.getuid()}").glob("*[0-9a-f]"))
    assert len(sockets) == 1 and sockets[0].is_socket()
    deadline = time.monotonic() + 15
    while sockets[0].exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not sockets[0].exists()
    assert (sockets[0].parent / (sockets[0].name + ".log")).read_text() == ""   # nothing went wrong in it
