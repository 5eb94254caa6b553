"""Bad input, built here case by case: each gives one UserError naming the thing and the fix, a stage's CLI exits
non-zero without a traceback, and nothing already written is lost or corrupted (files keep their bytes)."""
from __future__ import annotations

import errno
import http.server
import os
import re
import shutil
import tarfile
import threading
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

import pipeline.distributed
import pipeline.paths
import pipeline.prepare
import pipeline.run
import pipeline.train
from params_files import params_file
from pipeline import checkpoint as ckpt
from pipeline import io
from pipeline.config import Archive, load_params
from pipeline.data import ClipDataset
from pipeline.download import fetch
from pipeline.errors import UserError
from pipeline.paths import frames_dir, run_dir
from pipeline.run import run

try:
    from tests import realdata_fixtures as fx
    from tests.realdata_fixtures import no_proxy_env  # noqa: F401 (an autouse fixture)
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    import realdata_fixtures as fx
    from realdata_fixtures import no_proxy_env  # noqa: F401 (an autouse fixture)

CPU = torch.device("cpu")
RUN_FILES = ("checkpoint.pt", "train_log.csv", "scores.csv", "roc.csv", "metrics.json")


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def stage(main, argv, capsys, monkeypatch, data_root: Path, runs_root: Path | None = None) -> str:
    """Run a stage's main() with its data (and runs, metrics) under the test's folders; it must fail cleanly:
    exit status 2, one `error: ` line on stderr, no traceback. Returns the message."""
    monkeypatch.setattr(pipeline.paths, "DATA_DIR", data_root)
    monkeypatch.setattr(pipeline.prepare, "DATA_DIR", data_root)
    if runs_root is not None:
        monkeypatch.setattr(pipeline.paths, "RUNS_DIR", runs_root)
        monkeypatch.setattr(pipeline.paths, "METRICS_DIR", runs_root.parent / "metrics")
    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("error: ")]
    return line[len("error: "):]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below `folder`, by relative path, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_frames(tiny_data: Path, root: Path) -> Path:
    """A data root of its own holding a copy of the tiny frames (the same manifest, so the same fingerprint)."""
    shutil.copytree(frames_dir("tiny", tiny_data), frames_dir("tiny", root))
    return root


@pytest.fixture(scope="module")
def finished(tiny_data, tmp_path_factory):
    """A runs root holding a finished, evaluated ae-recon seed 0 on the tiny profile (copy it before changing it)."""
    runs = tmp_path_factory.mktemp("finished") / "runs"
    run("tiny", "ae-recon", 0, data_root=tiny_data, runs_root=runs)
    return runs


def copy_runs(finished: Path, target: Path) -> Path:
    shutil.copytree(finished, target)
    return target


# ----------------------------------------------------------------------------------------------------------------
# 1. A NaN or inf loss stops training at once and keeps the last finished epoch's checkpoint


def nan_from(call: int, term: str, value: float = float("nan")):
    """compute_loss whose `term` (and so the total) turns `value` from its `call`-th call in this process on."""
    real = pipeline.train.compute_loss
    calls = []

    def compute_loss(result, target, variant):
        total, terms = real(result, target, variant)
        calls.append(1)
        if len(calls) >= call:
            terms = {**terms, term: terms[term] * value}
            total = total + terms[term]
        return total, terms
    return compute_loss


def test_nan_loss_stops_training_keeps_the_last_checkpoint_and_resumes_to_the_same_bytes(tiny_data, tmp_path,
                                                                                          monkeypatch, capsys):
    runs = tmp_path / "runs"
    run("tiny", "mnad-pred", 0, data_root=tiny_data, runs_root=runs, stop_after_epoch=1)   # epoch 1 of 2 finished
    folder = run_dir("tiny", "mnad-pred", 0, runs)
    before = snapshot(folder)
    with monkeypatch.context() as patch:
        # the resumed execution's 2nd step is step 6 of the training (epoch 2 holds steps 5..8)
        patch.setattr(pipeline.train, "compute_loss", nan_from(2, "compactness"))
        message = stage(pipeline.run.main, ["--dataset", "tiny", "--variant", "mnad-pred", "--seed", "0"], capsys,
                        patch, tiny_data, runs)
    assert message.startswith("training tiny mnad-pred seed 0: non-finite loss and compactness at epoch 2, step 6 (")
    assert re.search(r"mse = \d\.\d+,", message) and "compactness = nan" in message   # mse was finite: not named
    assert f"training stopped and {folder / 'checkpoint.pt'} keeps epoch 1, the last finished one, as it was" in message
    assert message.endswith("Lower the learning rate (datasets.tiny.profile.lr, now 0.001) or a loss weight of "
                            "variants.mnad-pred, then rerun")
    assert snapshot(folder) == before   # the checkpoint and the log of epoch 1, byte for byte; nothing else written

    # the kept checkpoint is a sound resume point: once the loss is finite again, the same bytes as never stopping
    run("tiny", "mnad-pred", 0, data_root=tiny_data, runs_root=runs)
    run("tiny", "mnad-pred", 0, data_root=tiny_data, runs_root=tmp_path / "whole")
    whole = run_dir("tiny", "mnad-pred", 0, tmp_path / "whole")
    for name in ("checkpoint.pt", "scores.csv", "metrics.json"):
        assert (folder / name).read_bytes() == (whole / name).read_bytes(), name


def test_inf_loss_in_the_first_epoch_names_the_step_inside_a_logging_interval(tiny_data, tmp_path, monkeypatch):
    def one_row_per_epoch(raw):
        raw["datasets"]["tiny"]["profile"]["log_steps"] = 4
    params = load_params(params_file(tmp_path, one_row_per_epoch))
    dataset, variant = params.dataset("tiny"), params.variant("ae-pred")
    monkeypatch.setattr(pipeline.train, "compute_loss", nan_from(3, "mse", float("inf")))
    out = tmp_path / "run"
    with pytest.raises(UserError) as info:
        pipeline.train.train(dataset, variant, 0, frames_dir("tiny", tiny_data), out, CPU)
    message = str(info.value)
    # the row after step 4 saw the sum; the step is the first of its interval whose loss was not finite
    assert "non-finite loss and mse at epoch 1, step 3 (loss = inf, mse = inf)" in message
    assert "no epoch finished, so no checkpoint of this training was written" in message
    assert not (out / "checkpoint.pt").exists() and not (out / "train_log.csv").exists()


def test_finite_losses_are_read_once_per_logged_row_not_once_per_step(tiny_data, tmp_path, monkeypatch):
    """The finiteness check rides on the row's read of the loss sums: no extra wait for the device per step."""
    def one_epoch(raw):
        raw["datasets"]["tiny"]["profile"].update(epochs=1, log_steps=4)
    params = load_params(params_file(tmp_path, one_epoch))
    dataset, variant = params.dataset("tiny"), params.variant("ae-pred")
    per_step, per_row, reads, kept = set(), set(), [], []   # kept alive: no other tensor reuses their memory
    real_step, real_mean = pipeline.train.training_step, pipeline.distributed.mean_over_ranks

    def step(*args, **kwargs):   # every step's loss and terms, as the loop keeps them
        loss, terms, result = real_step(*args, **kwargs)
        kept.extend((loss, *terms.values()))
        per_step.update(t.data_ptr() for t in (loss, *terms.values()))
        return loss, terms, result

    def row_sums(values):        # a row's stacked sums of the terms
        total = real_mean(values)
        kept.append(total)
        per_row.add(total.data_ptr())
        return total
    monkeypatch.setattr(pipeline.train, "training_step", step)
    monkeypatch.setattr(pipeline.distributed, "mean_over_ranks", row_sums)
    for read in ("__float__", "item", "tolist"):   # the ways a tensor's value reaches the host
        real = getattr(torch.Tensor, read)
        monkeypatch.setattr(torch.Tensor, read, lambda self, *a, real=real: reads.append(
            "step" if self.data_ptr() in per_step else "row" if self.data_ptr() in per_row else "other")
            or real(self, *a))
    training = pipeline.train.train(dataset, variant, 0, frames_dir("tiny", tiny_data), tmp_path / "run", CPU)
    assert [row["step"] for row in training.log] == [4] and {"loss", "mse"} <= set(training.log[0])
    assert len(per_step) == 4   # 4 steps (ae-pred's loss is its mse term): the spies saw the loop's tensors
    # one row of 4 steps: its sums of the loss and its term are read once together, no step's value ever
    assert reads.count("row") == 1 and reads.count("step") == 0


# ----------------------------------------------------------------------------------------------------------------
# 2. A truncated or foreign checkpoint file


class NotATensor:
    """A class a checkpoint must never need (loading it would mean running code from the file)."""


@pytest.mark.parametrize("damage", ["half", "empty", "text", "foreign"])
def test_an_unreadable_checkpoint_is_named_with_its_fix(tmp_path, damage):
    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint(path, {"model": torch.nn.Linear(64, 64).state_dict(), "epoch": 1})
    assert ckpt.load_checkpoint(path)["epoch"] == 1
    data = path.read_bytes()
    if damage == "half":
        path.write_bytes(data[:len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "text":
        path.write_text("version https://git-lfs.github.com/spec/v1\n")   # e.g. a Git LFS pointer
    else:
        torch.save({"model": {}, "extra": NotATensor()}, path)
    with pytest.raises(UserError) as info:
        ckpt.load_checkpoint(path)
    message = str(info.value)
    if damage == "foreign":
        assert message.startswith(f"checkpoint {path} holds objects other than tensors and plain values")
    elif damage == "empty":
        assert message.startswith(f"checkpoint {path} is truncated or corrupt (the file is empty)")
    else:
        assert message.startswith(f"checkpoint {path} is truncated or corrupt (")
    assert message.endswith("delete it and rerun its run stage (`dvc repro`) to train it again")


def test_a_truncated_checkpoint_at_resume_is_reported_not_trained_over(tiny_data, finished, tmp_path, monkeypatch,
                                                                       capsys):
    runs = copy_runs(finished, tmp_path / "runs")
    path = run_dir("tiny", "ae-recon", 0, runs) / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:3000])   # a copy cut short
    before = snapshot(path.parent)
    message = stage(pipeline.run.main, ["--dataset", "tiny", "--variant", "ae-recon", "--seed", "0"], capsys,
                    monkeypatch, tiny_data, runs)
    assert message.startswith(f"checkpoint {path} is truncated or corrupt (RuntimeError: PytorchStreamReader failed "
                              f"reading zip archive: failed finding central directory); delete it and rerun its run "
                              f"stage (`dvc repro`) to train it again")
    assert snapshot(path.parent) == before


# ----------------------------------------------------------------------------------------------------------------
# 3. A checkpoint of another variant, profile, code version, seed, frames, or unfinished


def refusal(finished, tiny_data, variant="ae-recon", seed=0, params_path=None, frames=None, path=None) -> str:
    params = load_params(params_path)
    path = path or run_dir("tiny", "ae-recon", 0, finished) / "checkpoint.pt"
    with pytest.raises(UserError) as info:
        ckpt.load_trained_model(path, params.dataset("tiny"), params.variant(variant), seed,
                                frames or frames_dir("tiny", tiny_data), CPU)
    message = str(info.value)
    assert message.startswith(f"checkpoint {path} does not match params.yaml: ")
    return message


def test_a_checkpoint_of_another_variant_profile_code_seed_or_frames_says_what_differs(tiny_data, finished, tmp_path,
                                                                                       monkeypatch):
    path = run_dir("tiny", "ae-recon", 0, finished) / "checkpoint.pt"
    before = path.read_bytes()
    ckpt.load_trained_model(path, load_params().dataset("tiny"), load_params().variant("ae-recon"), 0,
                            frames_dir("tiny", tiny_data), CPU)   # the matching one loads

    message = refusal(finished, tiny_data, variant="ae-pred")
    assert "it was trained with other variant options (" in message
    assert "(checkpoint -> now: input_frames 1 -> 4, skips False -> True, task 'reconstruct' -> 'predict')" in message
    assert message.endswith("; rerun its run stage (`dvc repro`) to train it again")
    assert "profile" not in message and "code" not in message

    def wider(raw):
        raw["datasets"]["tiny"]["profile"]["width"] = 0.25
    message = refusal(finished, tiny_data, params_path=params_file(tmp_path, wider))
    assert ("it was trained with other profile datasets.tiny.profile (checkpoint -> now: width 0.125 -> 0.25); "
            "rerun") in message

    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "code_digest", lambda: "f" * 64)
        message = refusal(finished, tiny_data)
    assert ("it was trained with other training code (models, pipeline/train.py, pipeline/data.py, "
            "pipeline/distributed.py changed since it "
            "was trained); rerun") in message

    assert "it was trained with other seed (0 in the checkpoint, 1 now)" in refusal(finished, tiny_data, seed=1)

    moved = tmp_path / "frames" / "tiny"     # the frames prepared anew: another manifest
    moved.mkdir(parents=True)
    shutil.copy(frames_dir("tiny", tiny_data) / "labels.csv", moved)
    (moved / "manifest.json").write_text('{"files": 1, "sha256": "0"}\n')
    assert "other frames (tiny's frames were prepared anew since" in refusal(finished, tiny_data, frames=moved)

    unfinished = tmp_path / "unfinished.pt"
    ckpt.save_checkpoint(unfinished, {**ckpt.load_checkpoint(path), "epoch": 1})
    assert ("unfinished, it holds 1 of the 2 epochs (its training was interrupted); rerun its run stage (`dvc repro`) "
            "to finish it") in refusal(finished, tiny_data, path=unfinished)
    assert path.read_bytes() == before


# ----------------------------------------------------------------------------------------------------------------
# 4. Frames: not an image, truncated, another size; a missing or empty folder; labels.csv out of step


def frame_layout(root: Path, counts: dict[tuple[str, str], int], size: int = 8) -> Path:
    """A frames folder: {(split, video): frames}; random 8x8 grey frames (incompressible, so a cut PNG is cut)."""
    rows, rng = [], np.random.default_rng(0)
    for (split, video), count in counts.items():
        (root / split / video).mkdir(parents=True)
        for t in range(count):
            cv2.imwrite(str(root / split / video / f"{t:06d}.png"), rng.integers(0, 256, (size, size), np.uint8))
            rows.append((split, video, t, 0, ""))
    pd.DataFrame(rows, columns=["split", "video", "frame", "label", "anomaly_type"]).to_csv(root / "labels.csv",
                                                                                          index=False)
    return root


def read_all(dataset: ClipDataset) -> None:
    for i in range(len(dataset)):
        dataset[i]


@pytest.fixture()
def frames(tmp_path):
    return frame_layout(tmp_path / "mine", {("train", "00"): 6, ("test", "01"): 5})


FIX = "re-run `dvc repro prepare@mine` to build them again"


def test_a_frame_that_is_not_an_image_or_is_truncated(frames):
    bad = frames / "train" / "00" / "000003.png"
    bad.write_text("not a picture\n")
    with pytest.raises(UserError, match=re.escape(f"frame {bad} is not a readable PNG image (truncated, corrupt or "
                                                  f"another kind of file); {FIX}")):
        read_all(ClipDataset(frames, "train", 5, 4))
    good = frames / "test" / "01" / "000002.png"
    good.write_bytes(good.read_bytes()[:60])   # the header and part of the data: a copy cut short
    with pytest.raises(UserError, match=re.escape(f"frame {good} is not a readable PNG image")):
        read_all(ClipDataset(frames, "test", 1, 0))


def test_a_frame_of_another_size(frames):
    odd = frames / "train" / "00" / "000004.png"
    cv2.imwrite(str(odd), np.zeros((16, 16), np.uint8))
    with pytest.raises(UserError, match=re.escape(
            f"frame {odd} has shape 1x16x16 (channels x height x width) but {frames / 'train' / '00' / '000000.png'} "
            f"has 1x8x8; frames of one dataset share one size: {FIX}")):
        read_all(ClipDataset(frames, "train", 5, 4))
    with pytest.raises(UserError, match=re.escape(
            f"frame {frames / 'test' / '01' / '000000.png'} is 8x8 pixels, but the profile's frame_size is 32; the "
            f"frames were prepared with another profile: {FIX}")):
        read_all(ClipDataset(frames, "test", 1, 0, frame_size=32))
    colour = frames / "test" / "01" / "000003.png"   # a colour frame among grey ones
    cv2.imwrite(str(colour), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(UserError, match=re.escape(f"frame {colour} has shape 3x8x8")):
        read_all(ClipDataset(frames, "test", 1, 0))


def test_a_missing_empty_or_unfinished_frames_folder(tmp_path):
    labels = tmp_path / "gone" / "labels.csv"
    with pytest.raises(UserError, match=re.escape(f"{labels} not found: the frames folder {labels.parent} does not "
                                                  f"exist; run `dvc repro prepare@gone`")):
        ClipDataset(labels.parent, "train", 1, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=re.escape(f"the frames folder {tmp_path / 'empty'} is empty; run "
                                                  f"`dvc repro prepare@empty`")):
        ClipDataset(tmp_path / "empty", "train", 1, 0)
    half = frame_layout(tmp_path / "half", {("train", "00"): 3})
    (half / "labels.csv").unlink()
    with pytest.raises(UserError, match=re.escape(f"the frames folder {half} has no labels table (its preparation "
                                                  f"did not finish); run `dvc repro prepare@half`")):
        ClipDataset(half, "train", 1, 0)


def test_labels_csv_out_of_step_with_the_frames(frames):
    (frames / "train" / "00" / "000002.png").unlink()   # listed, missing in the middle: named when read
    with pytest.raises(UserError, match=re.escape(f"frame {frames / 'train' / '00' / '000002.png'} is listed in "
                                                  f"labels.csv but missing; {FIX}")):
        read_all(ClipDataset(frames, "train", 1, 0))
    (frames / "test" / "01" / "000004.png").unlink()     # the last listed one: found before any read
    with pytest.raises(UserError, match=re.escape(f"{frames / 'test' / '01' / '000004.png'} missing but listed in "
                                                  f"labels.csv; {FIX}")):
        ClipDataset(frames, "test", 1, 0)
    cv2.imwrite(str(frames / "test" / "01" / "000004.png"), np.zeros((8, 8), np.uint8))
    cv2.imwrite(str(frames / "test" / "01" / "000005.png"), np.zeros((8, 8), np.uint8))   # one more than listed
    with pytest.raises(UserError, match=re.escape(f"{frames / 'test' / '01' / '000005.png'} exists but labels.csv "
                                                  f"lists 5 frames (0..4) for test video 01; {FIX}")):
        ClipDataset(frames, "test", 1, 0)
    (frames / "labels.csv").write_text("split,video,frame,label,anomaly_type\ntrain,00,zero,0,\n")
    with pytest.raises(UserError, match=re.escape(f"{frames / 'labels.csv'} is not a labels table (")):
        ClipDataset(frames, "train", 1, 0)


def test_a_corrupt_test_frame_fails_the_run_stage_and_keeps_its_earlier_outputs(tiny_data, finished, tmp_path,
                                                                                 monkeypatch, capsys):
    data = copy_frames(tiny_data, tmp_path / "data")
    runs = copy_runs(finished, tmp_path / "runs")
    folder = run_dir("tiny", "ae-recon", 0, runs)
    before = snapshot(folder)
    bad = sorted((frames_dir("tiny", data) / "test").glob("*/000007.png"))[0]
    bad.write_bytes(bad.read_bytes()[:40])
    message = stage(pipeline.run.main, ["--dataset", "tiny", "--variant", "ae-recon", "--seed", "0"], capsys,
                    monkeypatch, data, runs)
    assert message == (f"frame {bad} is not a readable PNG image (truncated, corrupt or another kind of file); "
                       f"re-run `dvc repro prepare@tiny` to build them again")
    assert snapshot(folder) == before   # the finished checkpoint, scores and metrics of before, unchanged


def test_a_bad_frame_found_in_a_loader_process_gives_the_message_alone(tiny_data, tmp_path):
    data = copy_frames(tiny_data, tmp_path / "data")
    for path in (frames_dir("tiny", data) / "train").rglob("*.png"):
        path.write_text("not a picture\n")

    def one_worker(raw):
        raw["datasets"]["tiny"]["profile"]["num_workers"] = 1
    params = load_params(params_file(tmp_path, one_worker))
    with pytest.raises(UserError) as info:
        pipeline.train.train(params.dataset("tiny"), params.variant("ae-recon"), 0, frames_dir("tiny", data),
                             tmp_path / "run", CPU)
    message = str(info.value)
    assert message.startswith(f"frame {frames_dir('tiny', data) / 'train'}") and "Traceback" not in message
    assert message.endswith("is not a readable PNG image (truncated, corrupt or another kind of file); re-run "
                            "`dvc repro prepare@tiny` to build them again")


# ----------------------------------------------------------------------------------------------------------------
# 5. A corrupt or truncated archive or video


def local(archives):
    return [fx.archive_entry(path, local=True) for path in archives]


def prepare_fails(tmp_path, dataset, tag="out") -> str:
    root = tmp_path / tag
    with pytest.raises(UserError) as info:
        pipeline.prepare.prepare(dataset.name, fx.write_params(root / "params.yaml", dataset), data_root=root)
    assert fx.leftovers(root / "frames") == []   # no frames, and no build folder left where they would be
    return str(info.value)


DAMAGED = ("delete it and rerun to download it again, and check that its sha256 in params.yaml is the one the "
           "dataset's authors publish (see docs/datasets.md)")


def cut(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


def test_a_truncated_tar_gz(tmp_path):
    built = fx.build_ped2_raw(tmp_path / "src")
    archive = cut(built.archives[0], 0.6)   # its sha256 in params is the cut file's: only the unpacking can tell
    message = prepare_fails(tmp_path, fx.make_dataset("ped2", local([archive])))
    raw = tmp_path / "out" / "raw" / "ped2" / archive.name
    assert message.startswith(f"{raw}: damaged or not a tar archive (") and message.endswith(DAMAGED)


def test_a_truncated_zip(tmp_path):
    built = fx.build_avenue_raw(tmp_path / "src")
    cut(built.archives[0], 0.7)
    message = prepare_fails(tmp_path, fx.make_dataset("avenue", local(built.archives)))
    raw = tmp_path / "out" / "raw" / "avenue" / "Avenue_Dataset.zip"
    assert message.startswith(f"{raw}: damaged or not a zip archive (") and message.endswith(DAMAGED)


def rezip_avenue(workdir: Path, video: str, damage) -> list[Path]:
    """The avenue archives with testing video `video` damaged by damage(path) before zipping."""
    built = fx.build_avenue_raw(workdir)
    damage(workdir / "avenue_src" / "Avenue Dataset" / "testing_videos" / f"{video}.avi")
    return [fx.make_zip(workdir / "avenue_src", workdir / "Avenue_Dataset.zip"), built.archives[1]]


def test_a_file_that_is_not_a_video(tmp_path):
    archives = rezip_avenue(tmp_path / "src", "01", lambda path: path.write_text("<html>Not Found</html>\n"))
    message = prepare_fails(tmp_path, fx.make_dataset("avenue", local(archives)))
    assert message.startswith("Avenue_Dataset.zip: Avenue Dataset/testing_videos/01.avi: OpenCV cannot open this "
                              "video (truncated or corrupt); delete the archive from data/raw/ and rerun")


def test_a_video_cut_short_after_its_header(tmp_path):
    archives = rezip_avenue(tmp_path / "src", "02", lambda path: cut(path, 0.5))
    message = prepare_fails(tmp_path, fx.make_dataset("avenue", local(archives)))
    assert message.startswith("Avenue_Dataset.zip: Avenue Dataset/testing_videos/02.avi: ")
    assert "truncated" in message and "delete the archive from data/raw/ and rerun" in message


def test_a_truncated_image_in_a_frame_sequence(tmp_path):
    built = fx.build_shanghaitech_raw(tmp_path / "src")
    unpacked = tmp_path / "unpacked"
    with tarfile.open(built.archives[0]) as tar:
        tar.extractall(unpacked, filter="data")
    cut(unpacked / "shanghaitech" / "testing" / "frames" / "01_0014" / "5.jpg", 0.3)
    archive = fx.make_tar_gz(unpacked, tmp_path / "shanghaitech.tar.gz")
    message = prepare_fails(tmp_path, fx.make_dataset("shanghaitech", local([archive])))
    assert message.startswith("shanghaitech.tar.gz: shanghaitech/testing/frames/01_0014/5.jpg: OpenCV cannot read "
                              "this image (truncated or corrupt); delete the archive from data/raw/ and rerun")


def test_the_prepare_stage_keeps_the_previous_frames_when_an_archive_is_damaged(tmp_path, monkeypatch, capsys):
    good = fx.build_avenue_raw(tmp_path / "good")
    root = tmp_path / "data"
    params = fx.write_params(tmp_path / "good.yaml", fx.make_dataset("avenue", local(good.archives)))
    monkeypatch.setattr(pipeline.prepare, "DATA_DIR", root)
    assert pipeline.prepare.main(["--dataset", "avenue", "--params", str(params)]) == 0
    before = snapshot(root / "frames" / "avenue")

    bad = fx.build_avenue_raw(tmp_path / "bad")
    cut(bad.archives[0], 0.5)
    params = fx.write_params(tmp_path / "bad.yaml", fx.make_dataset("avenue", local(bad.archives)))
    message = stage(pipeline.prepare.main, ["--dataset", "avenue", "--params", str(params)], capsys, monkeypatch,
                    root)
    assert message.startswith(f"{root / 'raw' / 'avenue' / 'Avenue_Dataset.zip'}: damaged or not a zip archive")
    assert snapshot(root / "frames" / "avenue") == before
    assert fx.leftovers(root / "frames") == ["avenue"]


# ----------------------------------------------------------------------------------------------------------------
# 6. An unwritable or full disk


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("code,words", [
    (errno.ENOSPC, "the disk is full; free space on the disk that holds {folder}, then rerun"),
    (errno.EACCES, "permission denied; make {folder} writable for this user, then rerun"),
    (errno.EROFS, "the file system is read-only; write to a writable disk, or remount {folder} read-write, then rerun"),
])
def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, code, words):
    path = tmp_path / "out" / "metrics.json"
    io.write_json(path, {"auc": 0.9})
    before = path.read_bytes()
    with pytest.raises(UserError) as info:
        with io.atomic_path(path) as tmp:
            tmp.write_text('{"auc": 0.')   # half written, then the disk says no
            raise OSError(code, os.strerror(code), str(tmp))
    assert str(info.value) == (f"cannot write {path}: {words.format(folder=path.parent)} (the previous metrics.json, "
                               f"if any, is unchanged)")
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]


def test_full_disk_in_each_writer(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint(path, {"model": {"w": torch.ones(3)}, "epoch": 1})
    before = path.read_bytes()

    class FillsUp:
        """A file that takes 100 bytes, then reports a full disk: what torch.save writes into meets ENOSPC."""

        def __init__(self, path, mode):
            self.handle, self.room = open(path, mode), 100

        def write(self, data):
            if len(data) > self.room:
                self.handle.write(bytes(data[:self.room]))
                no_space()
            self.room -= len(data)
            return self.handle.write(data)

        def flush(self):
            self.handle.flush()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()
    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "open", FillsUp, raising=False)   # the checkpoint module's own `open` only
        with pytest.raises(UserError, match=re.escape(f"cannot write {path}: the disk is full")):
            ckpt.save_checkpoint(path, {"model": {"w": torch.zeros(1000)}, "epoch": 2})
    with monkeypatch.context() as patch:
        patch.setattr(pd.DataFrame, "to_csv", no_space)
        with pytest.raises(UserError, match=re.escape(f"cannot write {tmp_path / 'scores.csv'}: the disk is full")):
            io.write_csv(tmp_path / "scores.csv", pd.DataFrame({"a": [1]}))
    def denied(**kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(kwargs["dir"] / ".a.json.x.tmp"))
    with monkeypatch.context() as patch:
        patch.setattr(io.tempfile, "mkstemp", denied)
        with pytest.raises(UserError, match=re.escape(f"cannot write {tmp_path / 'a.json'}: permission denied; make "
                                                      f"{tmp_path} writable for this user")):
            io.write_json(tmp_path / "a.json", {})
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    with pytest.raises(FileNotFoundError):   # not a disk problem: not disguised as one
        with io.atomic_path(tmp_path / "b.txt"):
            open(tmp_path / "no" / "such" / "file")


def test_full_disk_while_building_a_folder_keeps_the_previous_one(tmp_path):
    final = tmp_path / "frames" / "tiny"
    with io.atomic_folder(final) as staging:
        (staging / "000000.png").write_bytes(b"old")
    with pytest.raises(UserError, match=re.escape(f"cannot write {final}: the disk is full; free space on the disk "
                                                  f"that holds {final.parent}")) as info:
        with io.atomic_folder(final) as staging:
            (staging / "000000.png").write_bytes(b"new")
            no_space()
    assert snapshot(final) == {"000000.png": b"old"} and fx.leftovers(final.parent) == ["tiny"]
    assert "(the previous folder tiny, if any, is unchanged)" in str(info.value)


def test_a_full_disk_fails_the_run_stage_and_keeps_its_earlier_outputs(tiny_data, finished, tmp_path, monkeypatch,
                                                                       capsys):
    runs = copy_runs(finished, tmp_path / "runs")
    folder = run_dir("tiny", "ae-recon", 0, runs)
    before = snapshot(folder)
    real = pd.DataFrame.to_csv

    def scores_fill_the_disk(frame, target=None, *args, **kwargs):
        if target is not None and Path(target).name.startswith(".scores.csv."):
            Path(target).write_text("video,frame\n01,")   # part of it, then the disk is full
            no_space()
        return real(frame, target, *args, **kwargs)
    monkeypatch.setattr(pd.DataFrame, "to_csv", scores_fill_the_disk)
    message = stage(pipeline.run.main, ["--dataset", "tiny", "--variant", "ae-recon", "--seed", "0"], capsys,
                    monkeypatch, tiny_data, runs)
    assert message == (f"cannot write {folder / 'scores.csv'}: the disk is full; free space on the disk that holds "
                       f"{folder}, then rerun (the previous scores.csv, if any, is unchanged)")
    assert snapshot(folder) == before   # and no temporary file beside them


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_a_read_only_output_folder(tmp_path):
    path = tmp_path / "out" / "metrics.json"
    io.write_json(path, {"auc": 0.9})
    before = path.read_bytes()
    path.parent.chmod(0o555)
    try:
        with pytest.raises(UserError, match=re.escape(f"cannot write {path}: permission denied; make {path.parent} "
                                                      f"writable for this user")):
            io.write_json(path, {"auc": 0.1})
    finally:
        path.parent.chmod(0o755)
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == ["metrics.json"]


# ----------------------------------------------------------------------------------------------------------------
# 7. Downloads only from params.yaml's URLs, over http or https


KEY = "datasets.ped2.source.archives.raw[0]"


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/UCSD_Anomaly_Dataset.tar.gz",
                                 "data:,hello", "/data/UCSD_Anomaly_Dataset.tar.gz", "http:///no-host"])
def test_urls_other_than_http_or_https_are_refused(tmp_path, url):
    entry = Archive(name="UCSD_Anomaly_Dataset.tar.gz", urls=(url,), sha256="0" * 64)
    with pytest.raises(UserError) as info:
        fetch(entry, tmp_path / "raw", params_key=KEY)
    message = str(info.value)
    assert message.startswith(f"params.yaml: {KEY}.urls[0]: {url!r} ")
    assert message.endswith("; downloads come only over http or https: give an http(s) URL, or set "
                            f"{KEY}.local_path to a file you already have")
    assert not (tmp_path / "raw").exists()   # refused before anything was made


def test_a_redirect_to_another_scheme_is_not_followed(tmp_path):
    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1:9/UCSD_Anomaly_Dataset.tar.gz")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/UCSD_Anomaly_Dataset.tar.gz"
        entry = Archive(name="UCSD_Anomaly_Dataset.tar.gz", urls=(url,), sha256="0" * 64)
        with pytest.raises(UserError, match=re.escape(f"{url}: the server redirected to "
                                                      f"'ftp://127.0.0.1:9/UCSD_Anomaly_Dataset.tar.gz', which has "
                                                      f"the scheme ftp:; only http and https are followed")):
            fetch(entry, tmp_path, params_key=KEY)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert list(tmp_path.iterdir()) == []


def test_the_prepare_stage_refuses_a_file_url(tmp_path, monkeypatch, capsys):
    built = fx.build_ped2_raw(tmp_path / "src")
    entry = fx.archive_entry(built.archives[0], urls=(built.archives[0].as_uri(),))
    params = fx.write_params(tmp_path / "params.yaml", fx.make_dataset("ped2", [entry]))
    message = stage(pipeline.prepare.main, ["--dataset", "ped2", "--params", str(params)], capsys, monkeypatch,
                    tmp_path / "data")
    assert message.startswith(f"params.yaml: {KEY}.urls[0]: '{built.archives[0].as_uri()}' has the scheme file:")
    assert not (tmp_path / "data" / "raw" / "ped2" / "UCSD_Anomaly_Dataset.tar.gz").exists()
