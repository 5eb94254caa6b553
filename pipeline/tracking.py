"""MLflow conventions (DESIGN.md), logged in-process by the stage that does the work.

- One experiment per dataset, tagged as model development so that the UI opens it on its runs table.
- In each experiment, a parent run named `study` holds REPORT.md and the analysis figures; every run is nested
  under it. It stays RUNNING until the report stage writes REPORT.md into it and finishes it (the study's datasets'
  parent runs, and those of the collapse study's own datasets, which hold its figures).
- One run per (dataset, variant, seed) and workspace, named `<variant>/seed<S>`. Each execution of its `run@` stage
  starts the run afresh (the earlier one of the same workspace is deleted, after being closed as KILLED if a killed
  stage left it RUNNING), so the run's duration is that stage's own work and its curves describe the checkpoint that
  exists. Epochs trained by an earlier execution (a resume, or a finished checkpoint that made training a no-op) are
  logged again from the checkpoint's log. A queued DVC experiment runs in a workspace of its own: its runs stand
  beside the main workspace's (tag `dvc_exp` names the experiment) and log into the main repository's store. A
  workspace is a folder on a host (tags `memvad.workspace`, `memvad.host`): checkouts at the same path on two hosts
  that log to one tracking server are two workspaces. A run also records the GPUs it was given
  (`cuda_visible_devices`, when CUDA_VISIBLE_DEVICES is set: one queue worker per GPU, README "Scaling up").
- Headline metrics (`auc_micro`, `auc_macro`, `mean_psnr`) are logged under one name for every variant, so the runs
  table sorts by them; the scorings with and without test-time update are under `eval.<scoring>.*`.

The store is shared by every stage, by the seeds run side by side and by queued experiments. Every call to it goes
through `call`: a locked sqlite store is retried with backoff for MEMVAD_MLFLOW_RETRY_SECONDS (MLflow itself waits
20 s on each locked statement), then it and a corrupt store each become one StoreUnavailable (a UserError) that
names the store and the fix. A tracking server (MLFLOW_TRACKING_URI=http://...) that does not answer is retried by
MLflow's own client (MLFLOW_HTTP_REQUEST_MAX_RETRIES, with backoff), then becomes a StoreUnavailable too. DVC outputs
never depend on anything read back from here.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import sqlite3
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from pipeline import allocator, cpu_kernels
from pipeline.config import REPO_ROOT
from pipeline.errors import UserError
from pipeline.io import atomic_path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow 3 reports usage to a remote host by default; a reproducibility harness sends nothing anywhere.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

# MLflow reads the settings above when it is imported.
from mlflow.entities import Metric, Param, RunTag, ViewType  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

STUDY_RUN = "study"
ROLE_TAG = "memvad.role"           # "study" on the parent runs, "run" on the (variant, seed) runs
WORKSPACE_TAG = "memvad.workspace"  # the checkout whose outputs a run describes (a queued experiment has its own)
HOST_TAG = "memvad.host"            # the host of that checkout: one tracking server hears from many hosts
# MLflow 3's UI opens an experiment on its GenAI overview unless the experiment says it is model development.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
PARENT_TAG = "mlflow.parentRunId"
RETRY_ENV = "MEMVAD_MLFLOW_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 120.0
SQLITE_HEADER = b"SQLite format 3\x00"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the sqlite store at the repository root (absolute, so any cwd works). A
    queued DVC experiment runs in a temporary copy under .dvc/tmp/exps; DVC names the repository it belongs to in
    DVC_ROOT, and its store is the one that keeps the experiment's runs."""
    root = Path(os.environ.get("DVC_ROOT") or REPO_ROOT)
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').as_posix()}"


def sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///` store (None for any other store)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(urllib.parse.unquote(uri[len("sqlite:///"):].split("?", 1)[0]))


class StoreUnavailable(UserError):
    """The MLflow store stayed locked past the retry budget, is corrupt, or cannot be used: `what` happened and
    the `fix`. A stage writes its own outputs first and then reports this (pipeline.run)."""

    def __init__(self, what: str, fix: str):
        super().__init__(f"{what}: {fix}")
        self.what, self.fix = what, fix

    def __reduce__(self):   # crosses from a run's spawned process back to its stage
        return StoreUnavailable, (self.what, self.fix)


def retry_seconds() -> float:
    raw = os.environ.get(RETRY_ENV)
    if raw is None:
        return DEFAULT_RETRY_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise UserError(f"environment variable {RETRY_ENV}={raw!r}: expected seconds (a number >= 0); unset it "
                        f"for the default {DEFAULT_RETRY_SECONDS:g}")
    return value


def _store_problem(exc: BaseException) -> str | None:
    """"locked", "corrupt", "schema" or "unreachable" when `exc` (or what caused it) says the store is at fault; None
    otherwise (a bug, or a request the store refused: raised as it is)."""
    seen = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    text = " ".join(str(e) for e in seen).lower()
    if "database is locked" in text or "database table is locked" in text or "database is busy" in text:
        return "locked"
    if "file is not a database" in text or "disk image is malformed" in text or "not an sqlite database" in text:
        return "corrupt"
    if "out-of-date database schema" in text:
        return "schema"
    # MLflow's REST client, once its own retries are spent: no connection, no answer in time, or 5xx answers
    if "api request to" in text and ("failed with exception" in text or "failed with timeout exception" in text):
        return "unreachable"
    return None


def _unavailable(kind: str, uri: str, waited: float, exc: BaseException | None = None) -> StoreUnavailable:
    path = sqlite_path(uri)
    if kind == "locked":
        return StoreUnavailable(
            f"MLflow store {uri} stayed locked for {waited:.1f} s (another process held it; {RETRY_ENV} sets how "
            f"long to wait)",
            "rerun the stage (dvc repro) once the store is free, or put an MLflow server in front of the store for "
            "many writers (README, Reliability)")
    if kind == "corrupt":
        where = path or uri
        reason = str(exc).splitlines()[0] if exc is not None else "it does not start with SQLite's header"
        return StoreUnavailable(
            f"MLflow store {where} is not a readable SQLite database ({reason})",
            f"move it aside (mv {where} {where}.corrupt; MLflow then starts a new, empty store there) or set "
            f"MLFLOW_TRACKING_URI to another store, and rerun the stage (dvc repro)")
    if kind == "unreachable":
        reason = str(exc).splitlines()[0] if exc is not None else "no answer"
        return StoreUnavailable(
            f"MLflow tracking server {uri} did not answer ({reason[:300]}; MLflow retried it "
            f"MLFLOW_HTTP_REQUEST_MAX_RETRIES times with backoff)",
            "start the server or fix MLFLOW_TRACKING_URI, and rerun the stage (dvc repro)")
    return StoreUnavailable(f"MLflow store {uri} has an older schema than this MLflow",
                            f"back it up, run `mlflow db upgrade {uri}`, and rerun the stage (dvc repro)")


def call(function: Callable, *args, uri: str | None = None, **kwargs):
    """function(*args, **kwargs) against the MLflow store: retried with backoff while the store is locked, for at
    most retry_seconds(); a store that stays locked or is corrupt raises StoreUnavailable; any other error is
    raised as it is. Every store operation here is one transaction, so a retry never repeats a half-done one."""
    uri = uri or tracking_uri()
    budget, started, pause = retry_seconds(), time.monotonic(), 0.05
    while True:
        try:
            return function(*args, **kwargs)
        except (MlflowException, sqlite3.Error, OSError) as exc:
            raised = exc
        except Exception as exc:   # sqlalchemy's errors, without importing sqlalchemy here
            if type(exc).__module__.split(".")[0] != "sqlalchemy":
                raise
            raised = exc
        kind = _store_problem(raised)
        if kind is None:
            raise raised
        waited = time.monotonic() - started
        if kind != "locked" or waited + pause > budget:
            raise _unavailable(kind, uri, waited, raised) from None
        time.sleep(pause)
        pause = min(2 * pause, 5.0)


def check_store(uri: str | None = None) -> None:
    """Fail fast and clearly on a sqlite store that is not SQLite or stays locked (another connection writing or
    holding an exclusive transaction), before MLflow's own slower retries on opening it: a probe that takes the
    write lock and lets it go, retried within retry_seconds()."""
    uri = uri or tracking_uri()
    path = sqlite_path(uri)
    if path is None or not path.exists() or path.stat().st_size == 0:
        return   # another store, or none yet: MLflow creates it
    with open(path, "rb") as handle:
        header = handle.read(100)
    if header[:len(SQLITE_HEADER)] != SQLITE_HEADER:
        raise _unavailable("corrupt", uri, 0.0)
    # A store cut short (a killed copy, a full disk) is shorter than its header says; MLflow would retry opening it
    # for minutes before failing. (The page count is valid when its version number matches the change counter.)
    size, page = path.stat().st_size, int.from_bytes(header[16:18], "big")
    expected = (65536 if page == 1 else page) * int.from_bytes(header[28:32], "big")
    if len(header) < 100 or (header[92:96] == header[24:28] and size < expected):
        raise _unavailable("corrupt", uri, 0.0, ValueError(f"{size} bytes where its header says {expected}: "
                                                           "it was cut short"))
    budget = retry_seconds()
    deadline = time.monotonic() + budget

    def probe() -> None:
        connection = sqlite3.connect(path, timeout=max(0.0, min(5.0, deadline - time.monotonic())))
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
            connection.rollback()
        finally:
            connection.close()
    try:
        call(probe, uri=uri)
    except sqlite3.Error as exc:   # e.g. a read-only file: a store this stage cannot write
        raise StoreUnavailable(f"MLflow store {path} cannot be written ({exc})",
                               "make it writable or set MLFLOW_TRACKING_URI to another store, and rerun the stage "
                               "(dvc repro)") from None


class _Guarded:
    """An MlflowClient whose every method call goes through `call`."""

    def __init__(self, inner: MlflowClient, uri: str):
        self._inner, self._uri = inner, uri

    def __getattr__(self, name: str):
        attribute = getattr(self._inner, name)
        if not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def guarded(*args, **kwargs):
            return call(attribute, *args, uri=self._uri, **kwargs)
        return guarded


def client():
    """An MlflowClient on tracking_uri(), guarded by `call`, after check_store(). A sqlite store that does not
    exist yet is created under a file lock: MLflow's table creation is not safe against a second process doing
    the same (runs side by side, queued experiments)."""
    # alembic prints every schema migration at INFO when a new store is created; that is noise in a stage log.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # MLflow logs a locked store's error with its traceback before raising it; `call` retries it, then reports it
    # in one line.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    uri = tracking_uri()
    check_store(uri)
    path = sqlite_path(uri)
    if path is not None and uri not in _OPENED:
        with _creation_lock(path):   # MlflowClient opens the store, and creates its tables where there are none
            inner = call(MlflowClient, tracking_uri=uri, uri=uri)
        _OPENED.add(uri)
    else:
        inner = call(MlflowClient, tracking_uri=uri, uri=uri)
    return _Guarded(inner, uri)


_OPENED: set[str] = set()


@contextlib.contextmanager
def _creation_lock(path: Path):
    """An exclusive lock on the store's name, held while MLflow opens it (a file in the temporary folder)."""
    key = hashlib.sha256(str(path.absolute()).encode()).hexdigest()[:16]
    try:
        import fcntl

        handle = open(Path(tempfile.gettempdir()) / f"memvad-mlflow-open-{key}.lock", "a")
    except (ImportError, OSError):   # no flock (Windows), or another user's lock file: open it unguarded
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def experiment_id(mlflow_client, dataset: str) -> str:
    """The dataset's experiment (created, or restored if deleted), tagged so the UI opens on its runs."""
    experiment = mlflow_client.get_experiment_by_name(dataset)
    if experiment is None:
        artifacts = None
        path = sqlite_path(tracking_uri())
        if path is not None:
            artifacts = (path.absolute().parent / "mlartifacts" / dataset).as_uri()
        try:
            return mlflow_client.create_experiment(dataset, artifact_location=artifacts, tags=EXPERIMENT_KIND)
        except MlflowException as exc:   # another process created it first
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = mlflow_client.get_experiment_by_name(dataset)
    if experiment.lifecycle_stage == "deleted":
        mlflow_client.restore_experiment(experiment.experiment_id)
    if experiment.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND["mlflow.experimentKind"]:
        for key, value in EXPERIMENT_KIND.items():
            mlflow_client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# What the numbers depend on beyond params.yaml: the packages that compute them (each run's tags, REPORT.md).
VERSIONED = ("torch", "numpy", "scipy", "pandas", "scikit-learn", "opencv-python-headless", "dvc", "mlflow")


def package_versions() -> dict[str, str]:
    """The installed version of each VERSIONED package, from its metadata (nothing is imported)."""
    return {name: metadata.version(name) for name in VERSIONED}


def environment_tags(device: str) -> dict[str, str]:
    """What a run computed with beyond its params: commit, Python, device, torch's CPU kernels, the allocator and the
    VERSIONED packages' versions."""
    tags = {"git_commit": git_commit(), "python_version": platform.python_version(), "device": device,
            "cpu_kernels": cpu_kernels(), "allocator": allocator(),
            **{f"version.{name}": version for name, version in package_versions().items()}}
    if "CUDA_VISIBLE_DEVICES" in os.environ:   # the GPUs this process was given (one queue worker per GPU)
        tags["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    return tags


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a nested mapping."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """{"with_update": {"auc_micro": .9}} -> {"with_update.auc_micro": .9} (numbers only: MLflow metrics)."""
    return {key: float(value) for key, value in _leaves(metrics, prefix)
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def flatten_params(options: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"variant": {"task": "predict"}} -> {"variant.task": "predict"}: every option as an MLflow param."""
    return {key: str(value) for key, value in _leaves(options, prefix)}


class Logged:
    """Logging calls on one MLflow run (thin wrappers over MlflowClient). With `keep_going`, a store that becomes
    unavailable turns the logging off instead of raising: `problem` keeps the StoreUnavailable, for the caller to
    report once its own outputs are written. As a context manager, a block that raises marks the run FAILED (KILLED
    for Ctrl-C)."""

    def __init__(self, mlflow_client, run_id: str | None, keep_going: bool = False):
        self.client, self.run_id, self.keep_going = mlflow_client, run_id, keep_going
        self.problem: StoreUnavailable | None = None
        self._artifacts: Path | None | bool = False   # the run's local artifact folder, once looked up

    def _log(self, function: Callable, *args, **kwargs) -> None:
        if self.run_id is None or self.problem is not None:
            return   # no run (the store was unavailable when it would have started), or the store failed since
        try:
            function(*args, **kwargs)
        except StoreUnavailable as exc:
            if not self.keep_going:
                raise
            self.problem = exc

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._log(self._log_batch, 100, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._log(self._log_batch, 100, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def log_metrics(self, metrics: Mapping[str, float | None], step: int = 0) -> None:
        self.log_history([(step, metrics)])

    def log_history(self, rows: Iterable[tuple[int, Mapping[str, float | None]]]) -> None:
        """Many steps of metrics at once: [(step, {name: value}), ...]; None and NaN values are left out."""
        now = int(time.time() * 1000)
        self._log(self._log_batch, 1000, metrics=[Metric(k, float(v), now, step) for step, metrics in rows
                                                  for k, v in metrics.items()
                                                  if v is not None and not (isinstance(v, float) and math.isnan(v))])

    def _log_batch(self, size: int, **entities: list) -> None:
        """One kind of entity in calls of at most `size` (MLflow takes 100 params or tags, 1000 metrics a call)."""
        [(kind, items)] = entities.items()
        for start in range(0, len(items), size):
            self.client.log_batch(self.run_id, **{kind: items[start:start + size]})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._log(self._put_artifacts, [(Path(path), Path(path).name)], artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        folder = Path(folder)
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        self._log(self._put_artifacts, [(p, p.relative_to(folder).as_posix()) for p in files], artifact_path)

    def _put_artifacts(self, files: list[tuple[Path, str]], artifact_path: str | None) -> None:
        """Into a local artifact folder (the default: mlartifacts/ beside a sqlite store) each file is copied to a
        temporary name and renamed, so a killed stage never leaves a partial artifact under its name; any other
        artifact store gets MLflow's own upload."""
        if self._artifacts is False:
            self._artifacts = _local_folder(self.client.get_run(self.run_id).info.artifact_uri)
        for source, name in files:
            if self._artifacts is None:
                folder = "/".join(part for part in (artifact_path, os.path.dirname(name)) if part)
                self.client.log_artifact(self.run_id, str(source), folder or None)
            else:
                with atomic_path(self._artifacts / (artifact_path or "") / name) as partial:
                    shutil.copyfile(source, partial)

    def finish(self, status: str = "FINISHED") -> None:
        self._log(lambda: self.client.set_terminated(self.run_id, status=status))

    def __enter__(self) -> "Logged":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:  # say so on the run, and let the stage's own error through
            try:
                self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
            except StoreUnavailable:
                pass   # the stage's error is the one to report


def _local_folder(artifact_uri: str) -> Path | None:
    parsed = urllib.parse.urlparse(artifact_uri)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "" and artifact_uri:
        return Path(artifact_uri).absolute()
    return None


def offline(problem: StoreUnavailable | None = None) -> Logged:
    """A run that logs nothing: the stage found the store unavailable (`problem`) before its runs started."""
    run = Logged(None, None, keep_going=True)
    run.problem = problem
    return run


def study_run(dataset: str, mlflow_client=None) -> Logged:
    """The parent run of a dataset's experiment (created on first use); it stays RUNNING until the report is
    written into it."""
    mlflow_client = mlflow_client or client()
    experiment = experiment_id(mlflow_client, dataset)

    def parents() -> list:
        found = mlflow_client.search_runs([experiment], filter_string=f"tags.`{ROLE_TAG}` = '{STUDY_RUN}'")
        return sorted(found, key=lambda run: (run.info.start_time, run.info.run_id))
    found = parents()
    if not found:
        created = mlflow_client.create_run(experiment, run_name=STUDY_RUN,
                                           tags={ROLE_TAG: STUDY_RUN, "dataset": dataset})
        found = parents()   # another process (a queued experiment) may have made one too: the earliest is the study's
        if found[0].info.run_id != created.info.run_id:
            mlflow_client.delete_run(created.info.run_id)
    return Logged(mlflow_client, found[0].info.run_id)


class Run(Logged):
    """The MLflow run of one (dataset, variant, seed), started afresh and nested under the dataset's study run.
    The earlier run it replaces (the same workspace's) is deleted; one that a killed stage left RUNNING is closed as
    KILLED first, also in the trash. With `keep_going`, a store unavailable at the start gives a run that logs
    nothing and holds the `problem`."""

    def __init__(self, dataset: str, variant: str, seed: int, mlflow_client=None, *, keep_going: bool = False):
        super().__init__(None, None, keep_going)
        try:
            self.client, self.run_id = self._start(dataset, variant, seed, mlflow_client or client())
        except StoreUnavailable as exc:
            if not keep_going:
                raise
            self.problem = exc

    @staticmethod
    def _start(dataset: str, variant: str, seed: int, mlflow_client) -> tuple[Any, str]:
        parent = study_run(dataset, mlflow_client)
        if mlflow_client.get_run(parent.run_id).info.status != "RUNNING":
            mlflow_client.update_run(parent.run_id, status="RUNNING")   # a new execution of the study
        experiment = experiment_id(mlflow_client, dataset)
        workspace, host = REPO_ROOT.as_posix(), platform.node()
        earlier = mlflow_client.search_runs(
            [experiment], filter_string=f"tags.variant = '{variant}' and tags.seed = '{seed}' and "
                                        f"tags.`{ROLE_TAG}` = 'run'", run_view_type=ViewType.ALL)
        for run in earlier:   # its curves and scores describe an execution that this one replaces
            if run.data.tags.get(WORKSPACE_TAG, workspace) != workspace or run.data.tags.get(HOST_TAG, host) != host:
                continue   # another workspace's (a queued experiment's, another host's): outputs of its own
            deleted = run.info.lifecycle_stage == "deleted"
            if run.info.status == "RUNNING":   # its stage was killed: nothing will ever finish it
                if deleted:
                    mlflow_client.restore_run(run.info.run_id)
                mlflow_client.set_terminated(run.info.run_id, status="KILLED")
                deleted = False
            if not deleted:
                mlflow_client.delete_run(run.info.run_id)
        tags = {"dataset": dataset, "variant": variant, "seed": str(seed), ROLE_TAG: "run", PARENT_TAG: parent.run_id,
                WORKSPACE_TAG: workspace, HOST_TAG: host}
        if os.environ.get("DVC_EXP_NAME"):
            tags["dvc_exp"] = os.environ["DVC_EXP_NAME"]   # the DVC experiment whose outputs it describes
        created = mlflow_client.create_run(experiment, run_name=f"{variant}/seed{seed}", tags=tags)
        return mlflow_client, created.info.run_id
