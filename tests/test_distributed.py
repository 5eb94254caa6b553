"""Training on many processes (issue 16): `pipeline.train` under torchrun, 2 CPU processes with gloo on the tiny
profile, launched by the run stage through params.yaml `launcher`, resumed, and as two "hosts" meeting at a c10d
rendezvous on 127.0.0.1; compared with one process training the same global batch."""
import os
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from models.noise import salt_and_pepper
from params_files import params_file
from local_processes import free_port
from pipeline import distributed, train
from pipeline.checkpoint import load_checkpoint
from pipeline.config import ConfigError, REPO_ROOT, load_params
from pipeline.distributed import World
from pipeline.errors import UserError
from pipeline.launch import torchrun_command
from pipeline.paths import frames_dir, run_dir

CPU = torch.device("cpu")
SAME_RANKS = "the 2 ranks hold bit-identical weights, memory and optimiser state"


def torchrun_params(folder, launcher=None, epochs=None):
    """params.yaml in `folder` with the tiny profile at one thread per process, whatever torchrun's
    OMP_NUM_THREADS (1 with several processes on a host, unset with one): a thread count changes float sums."""
    def edit(raw):
        raw["datasets"]["tiny"]["profile"]["threads"] = 1
        if launcher is not None:
            raw["launcher"] = launcher
        if epochs is not None:
            raw["datasets"]["tiny"]["profile"]["epochs"] = epochs
    return params_file(folder, edit)


def python(code: str, store, timeout=600) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter at the repository root, logging to the MLflow store `store`."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    return subprocess.run([sys.executable, "-c", "from pathlib import Path; " + code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def checked(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def single_process(tiny_data, runs_root, params_path, variant="mnad-pred"):
    params = load_params(params_path)
    return train.train(params.dataset("tiny"), params.variant(variant), 0, frames_dir("tiny", tiny_data),
                       run_dir("tiny", variant, 0, runs_root), CPU)


@pytest.fixture(scope="module")
def torchrun_study(tiny_data, tmp_path_factory):
    """mnad-pred seed 0 trained by the run stage with launcher torchrun, 2 processes, then evaluated; and the same
    run trained in one process."""
    work = tmp_path_factory.mktemp("torchrun")
    two = torchrun_params(work / "two", {"kind": "torchrun", "nproc": 2})
    output = checked(python(f"from pipeline.run import run_seeds; run_seeds('tiny', 'mnad-pred', [0], "
                            f"Path({str(two)!r}), Path({str(tiny_data)!r}), Path({str(work / 'runs2')!r}), "
                            f"Path({str(work / 'metrics')!r}))", work / "mlflow.db"))
    one = single_process(tiny_data, work / "runs1", torchrun_params(work / "one"))
    return work, output, one


def test_two_processes_train_the_run_one_process_trains_with_the_global_batch(torchrun_study):
    work, output, one = torchrun_study
    assert "2 processes through torchrun" in output
    # after each epoch the ranks compare digests of their whole state: they never drift apart
    assert f"epoch 1: {SAME_RANKS}" in output and f"epoch 2: {SAME_RANKS}" in output
    two = load_checkpoint(run_dir("tiny", "mnad-pred", 0, work / "runs2") / "checkpoint.pt")
    single = load_checkpoint(one.checkpoint)
    assert (two["world_size"], single["world_size"], two["epoch"]) == (2, 1, 2)
    assert two["fingerprint"] == single["fingerprint"]   # the launch is not part of what the run is
    # Each rank holds half of every global batch of 4; with the gradients averaged, batch statistics over the
    # global batch and the memory updated from every rank's queries, step 1 is the same computation up to float
    # summation order: its loss, and the loss after its update, agree to float32's precision.
    for step in (0, 1):
        assert two["log"][step]["loss"] == pytest.approx(single["log"][step]["loss"], rel=1e-6)
    # Adam then amplifies those last-bit differences where a gradient is nearly zero (a convolution's bias before
    # BatchNorm has none at all), so later steps agree to a tolerance, not bit for bit.
    for a, b in zip(two["log"], single["log"]):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-3)
        assert a["memory_top_share"] == b["memory_top_share"]   # the memory chose the same items
    size = difference = 0.0
    for key, value in single["model"].items():
        if value.is_floating_point() and "running" not in key:
            difference += float(((value.double() - two["model"][key].double()) ** 2).sum())
            size += float((value.double() ** 2).sum())
    assert (difference / size) ** 0.5 < 1e-2   # the weights, relative to their size (measured: 2.5e-3)


def test_a_torchrun_training_is_one_mlflow_run_and_one_checkpoint_series(torchrun_study):
    work, _, _ = torchrun_study
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    [experiment] = [e for e in client.search_experiments() if e.name == "tiny"]
    runs = client.search_runs([experiment.experiment_id], "tags.`memvad.role` = 'run'")
    assert len(runs) == 1   # rank 0 logs the training into the run the stage started; rank 1 logs nothing
    [mlflow_run] = runs
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.params["world_size"] == "2"
    history = client.get_metric_history(mlflow_run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 9))   # each logged step once
    assert "auc_micro" in mlflow_run.data.metrics   # the stage's evaluation went into the same run
    folder = run_dir("tiny", "mnad-pred", 0, work / "runs2")
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.pt", "metrics.json", "roc.csv", "scores.csv",
                                                        "train_log.csv"]


def test_a_torchrun_training_resumes_on_two_hosts_to_the_same_checkpoint(torchrun_study, tiny_data, tmp_path):
    """Interrupted after epoch 1 on one host with 2 processes, resumed by two torchrun agents of one process each
    meeting at a c10d rendezvous on 127.0.0.1, as two hosts would: the checkpoint of the uninterrupted run, byte
    for byte (the same ranks, data and collectives)."""
    work, _, _ = torchrun_study
    params = torchrun_params(tmp_path / "params", {"kind": "torchrun", "nproc": 2})
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    one_host = torchrun_command(load_params(params).launcher, "tiny", "mnad-pred", 0, params, tiny_data,
                                tmp_path / "runs")
    checked(subprocess.run(one_host + ["--stop-after-epoch", "1"], cwd=REPO_ROOT, env=env, capture_output=True,
                           text=True, timeout=600))
    path = run_dir("tiny", "mnad-pred", 0, tmp_path / "runs") / "checkpoint.pt"
    assert load_checkpoint(path)["epoch"] == 1

    hosts = load_params(torchrun_params(tmp_path / "hosts", {"kind": "torchrun", "nproc": 1, "nnodes": 2,
                                                              "rdzv_endpoint": f"127.0.0.1:{free_port()}"})).launcher
    two_hosts = torchrun_command(hosts, "tiny", "mnad-pred", 0, params, tiny_data, tmp_path / "runs")
    agents = [subprocess.Popen(two_hosts, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True) for _ in range(2)]
    outputs = [agent.communicate(timeout=600)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert sum(f"epoch 2: {SAME_RANKS}" in output for output in outputs) == 1   # rank 0 is on one of them
    assert load_checkpoint(path)["epoch"] == 2
    uninterrupted = run_dir("tiny", "mnad-pred", 0, work / "runs2") / "checkpoint.pt"
    assert path.read_bytes() == uninterrupted.read_bytes()


def test_each_rank_applies_its_rows_of_the_global_batch_noise():
    """A denoising variant's input noise: rank r of N corrupts its rows exactly as one process corrupts rows r,
    r + N, ... of the global batch."""
    clean = torch.rand(8, 1, 2, 6, 6) * 2 - 1
    whole = salt_and_pepper(clean, 0.3, torch.Generator().manual_seed(5))
    for rank in range(2):
        share = salt_and_pepper(clean[rank::2], 0.3, torch.Generator().manual_seed(5), share=(rank, 2))
        assert torch.equal(share, whole[rank::2])
    assert not torch.equal(whole, clean)


def test_memae_trains_as_one_process(tiny_data, tmp_path):
    """MemAE (3D BatchNorm, a memory learnt by gradient): one epoch of 2 processes against one process."""
    variant = "memae"
    params = torchrun_params(tmp_path / "params", epochs=1)
    command = torchrun_command(load_params(torchrun_params(tmp_path / "t", {"kind": "torchrun", "nproc": 2},
                                                       epochs=1)).launcher,
                               "tiny", variant, 0, params, tiny_data, tmp_path / "runs2")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    checked(subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600))
    one = load_checkpoint(single_process(tiny_data, tmp_path / "runs1", params, variant).checkpoint)
    two = load_checkpoint(run_dir("tiny", variant, 0, tmp_path / "runs2") / "checkpoint.pt")
    for step in (0, 1):
        assert two["log"][step]["loss"] == pytest.approx(one["log"][step]["loss"], rel=1e-5)


def test_the_global_batch_must_divide_among_the_processes(tiny_data, tmp_path):
    params = load_params()
    with pytest.raises(UserError, match=r"datasets\.tiny\.profile\.batch_size 4 is the global batch, dealt out "
                                        r"evenly to the 3 processes .* make it a multiple of 3"):
        train.train(params.dataset("tiny"), params.variant("mnad-pred"), 0, frames_dir("tiny", tiny_data),
                    tmp_path / "run", CPU, world=World(0, 3, 0))
    assert not (tmp_path / "run").exists()


def test_launcher_options(tmp_path):
    assert load_params().launcher.kind == "local" and load_params().launcher.world_size == 1
    with pytest.raises(ConfigError, match=r"launcher\.rdzv_endpoint: nnodes 2 needs the host:port"):
        load_params(torchrun_params(tmp_path / "a", {"kind": "torchrun", "nnodes": 2}))
    with pytest.raises(ConfigError, match=r"launcher\.kind: unknown value 'slurm'; valid: \['local', 'torchrun'\]"):
        load_params(torchrun_params(tmp_path / "b", {"kind": "slurm"}))
    hosts = load_params(torchrun_params(tmp_path / "c", {"kind": "torchrun", "nproc": 4, "nnodes": 2,
                                                          "rdzv_endpoint": "10.0.0.1:29400"})).launcher
    assert hosts.world_size == 8
    command = torchrun_command(hosts, "ped2", "mnad-pred", 1)
    assert command[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=4" in command
    assert {"--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=10.0.0.1:29400",
            "--rdzv_id=memvad-ped2-mnad-pred-s1"} <= set(command) and "--standalone" not in command
    assert command[-8:] == ["-m", "pipeline.train", "--dataset", "ped2", "--variant", "mnad-pred", "--seed", "1"]
    assert "--standalone" in torchrun_command(load_params(torchrun_params(tmp_path / "d", {
        "kind": "torchrun", "nproc": 2})).launcher, "ped2", "mnad-pred", 1)


def test_a_rank_whose_state_differs_is_named():
    assert distributed.ranks_differing([b"a", b"a", b"a"]) == []
    assert distributed.ranks_differing([b"a", b"b", b"a", b"c"]) == [1, 3]
