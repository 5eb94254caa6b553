"""A copy of the repository whose study is the tiny profile, and `dvc repro` in it: what the end-to-end test runs,
and the end-to-end part of the GPU check (benchmarks/gpu_check.py).

    python benchmarks/tiny_study.py [--work DIR]

Copies the repository's tracked and unignored files (not the default study's results) into DIR (default a
temporary folder), sets params.yaml's study to the tiny dataset with one seed, eight of the ten variants and a
two-setting collapse study, commits the copy to a fresh git repository and runs `dvc repro` there, logging to the
copy's own mlflow.db.
Prints the wall time and the device the stages computed on.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def repository_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    return [name for name in listed if (REPO / name).is_file()]


def tiny_study_copy(work: Path) -> dict[str, str]:
    """Fill `work` with the tiny-study copy, committed; returns the environment its stages run in."""
    for name in repository_files():
        if name.startswith(("runs/", "metrics/")) or name == "REPORT.md":
            continue  # results of the default study: the copy must make its own
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, work / name)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["study"]["datasets"] = ["tiny"]
    params["study"]["complex_datasets"] = []  # the *_complex twins are the same definitions
    params["study"]["seeds"] = [0]
    # one skip-denoising variant of the three: the other two differ only in their noise level (the same code, and
    # each of C4's and C8's comparisons still has its variant), and two stages fewer on every run of this study
    params["study"]["variants"] = [v for v in params["study"]["variants"]
                                   if v not in ("mnad-recon-skip-sp05", "mnad-recon-skip-sp40")]
    # the collapse study, two settings on a copy of the tiny dataset; the second's variant is not in study.variants
    # (it trains only here), so an option of a study variant changes no collapse stage
    # a copy, not the same object: yaml would write it as an alias of tiny's, and `dvc exp run -S` on a key inside
    # an aliased mapping is silently lost
    params["datasets"]["tiny-collapse"] = copy.deepcopy(params["datasets"]["tiny"])
    params["collapse"] = {"seeds": 1, "datasets": ["tiny-collapse"],
                          "settings": {"base": {"dataset": "tiny-collapse", "variant": "mnad-pred"},
                                       "pred-no-skips": {"dataset": "tiny-collapse", "variant": "mnad-pred-noskip"}}}
    # the analyses at the tiny study's size: a t-SNE of 1000 queries alone was 75 s of a 2-core CI machine's repro
    params["analysis"].update({"tsne_queries": 120, "tsne_perplexity": 10, "usage_test_windows": 40,
                               "usage_train_windows": 8, "replacement_windows": 24, "bootstrap_samples": 200})
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(command, cwd=work, check=True, env=env)
    return env


def repro(work: Path, env: dict[str, str], timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=timeout)


def study_results(work: Path) -> dict[str, str]:
    """What a finished study wrote that must not depend on how it got there: every metrics file and REPORT.md (text),
    and every run's checkpoint.pt, scores.csv and metrics.json (sha256), by path relative to `work`."""
    results = {path.relative_to(work).as_posix(): path.read_text()
               for path in [*sorted((work / "metrics").rglob("*.json")), work / "REPORT.md"]}
    for path in sorted((work / "runs").rglob("*")):
        if path.name in ("checkpoint.pt", "scores.csv", "metrics.json"):
            results[path.relative_to(work).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="memvad-tiny-"))
    work.mkdir(parents=True, exist_ok=True)
    env = tiny_study_copy(work)
    started = time.perf_counter()
    result = repro(work, env)
    print(result.stdout[-3000:], result.stderr[-3000:])
    import torch
    print(f"tiny-profile dvc repro in {work}: exit {result.returncode}, {time.perf_counter() - started:.0f} s, "
          f"on {'cuda: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
