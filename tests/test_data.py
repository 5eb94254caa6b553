"""The clip loader on a small hand-built layout: windows, label alignment, video boundaries, scaling."""
import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.data import ClipDataset, clip_dataset
from pipeline.config import load_params
from pipeline.errors import UserError


def write_layout(root, videos, channels=1):
    """videos: {(split, name): n_frames}; frame t of video v has constant value 10*v_index + t."""
    rows = []
    for index, ((split, name), count) in enumerate(videos.items()):
        folder = root / split / name
        folder.mkdir(parents=True)
        for t in range(count):
            value = 10 * index + t
            shape = (8, 8) if channels == 1 else (8, 8, 3)
            cv2.imwrite(str(folder / f"{t:06d}.png"), np.full(shape, value, np.uint8))
            label = int(split == "test" and t >= count - 2)
            rows.append((split, name, t, label, "temporal" if label else ""))
    pd.DataFrame(rows, columns=["split", "video", "frame", "label", "anomaly_type"]).to_csv(root / "labels.csv", index=False)


@pytest.fixture()
def layout(tmp_path):
    write_layout(tmp_path, {("train", "00"): 6, ("test", "01"): 7, ("test", "02"): 5})
    return tmp_path


def test_prediction_windows_never_cross_videos_and_score_the_target(layout):
    data = ClipDataset(layout, "test", window=5, scored_offset=4)
    # video 01 has 7 frames -> 3 windows, video 02 has 5 -> 1 window
    assert list(zip(data.windows["video"], data.windows["start"], data.windows["frame"])) == [
        ("01", 0, 4), ("01", 1, 5), ("01", 2, 6), ("02", 0, 4)]
    assert data.windows["label"].tolist() == [0, 1, 1, 1]
    assert data.windows["anomaly_type"].tolist() == ["", "temporal", "temporal", "temporal"]
    clip = data[3]["clip"]
    assert clip.shape == (5, 1, 8, 8) and clip.dtype == torch.float32
    values = ((clip[:, 0, 0, 0] + 1) * 127.5).round().tolist()
    assert values == [20.0, 21.0, 22.0, 23.0, 24.0]  # video index 2, frames 0..4


def test_reconstruction_and_memae_windows(layout):
    single = ClipDataset(layout, "test", window=1, scored_offset=0)
    assert len(single) == 12 and single.windows["frame"].tolist() == list(range(7)) + list(range(5))
    assert single.windows["label"].sum() == 4
    clips = ClipDataset(layout, "test", window=4, scored_offset=2)
    assert list(zip(clips.windows["video"], clips.windows["frame"])) == [("01", 2), ("01", 3), ("01", 4), ("01", 5), ("02", 2), ("02", 3)]
    short = ClipDataset(layout, "test", window=6, scored_offset=3)
    assert short.windows["video"].tolist() == ["01", "01"]  # video 02 is shorter than a window


def test_values_scaled_to_minus_one_one(tmp_path):
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    cv2.imwrite(str(folder / "000000.png"), np.array([[0, 255]], np.uint8))
    pd.DataFrame([("train", "a", 0, 0, "")], columns=["split", "video", "frame", "label", "anomaly_type"]).to_csv(tmp_path / "labels.csv", index=False)
    clip = ClipDataset(tmp_path, "train", 1, 0)[0]["clip"]
    assert clip.flatten().tolist() == [-1.0, 1.0]


def test_colour_frames_and_grayscale_conversion(tmp_path):
    write_layout(tmp_path, {("train", "00"): 3}, channels=3)
    assert ClipDataset(tmp_path, "train", 1, 0)[0]["clip"].shape == (1, 3, 8, 8)
    assert ClipDataset(tmp_path, "train", 1, 0, grayscale=True)[0]["clip"].shape == (1, 1, 8, 8)


def test_variant_decides_the_window(layout):
    params = load_params()
    assert clip_dataset(layout, "test", params.variant("mnad-pred")).window == 5
    assert clip_dataset(layout, "test", params.variant("mnad-recon")).window == 1


def test_missing_frames_and_labels_are_clear_errors(layout, tmp_path):
    (layout / "test" / "02" / "000004.png").unlink()
    with pytest.raises(UserError, match=r"02/000004.png missing but listed in labels.csv; re-run `dvc repro "
                                        r"prepare@test_missing_frames_and_la\w*` to build them again"):
        ClipDataset(layout, "test", 1, 0)
    with pytest.raises(UserError, match=r"labels.csv not found.*dvc repro prepare@"):
        ClipDataset(tmp_path / "nothing", "test", 1, 0)


def test_recent_frames_are_reused_but_never_mixed_up(layout, monkeypatch):
    import pipeline.data as data_module

    reads = []
    real_read = data_module.read_frame
    monkeypatch.setattr(data_module, "read_frame", lambda path, grayscale=False: reads.append(path) or
                        real_read(path, grayscale))
    data = ClipDataset(layout, "test", window=5, scored_offset=4)
    in_order = [data[i]["clip"] for i in range(len(data))]
    assert len(reads) == 7 + 5  # each frame of the two test videos decoded once, not once per window
    for i, clip in enumerate(in_order):  # frame t of test video v (layout index v) is 10 * v + t
        video, start = data.windows.loc[i, ["video", "start"]]
        expected = (10 * int(video) + start + torch.arange(5)) / 127.5 - 1
        torch.testing.assert_close(clip[:, 0, 0, 0], expected.float())
    backwards = [data[i]["clip"] for i in reversed(range(len(data)))]
    for clip, again in zip(in_order, reversed(backwards)):
        assert torch.equal(clip, again)
    assert len(data._recent) <= 2 * data.window
