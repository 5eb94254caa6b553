"""Tiny stand-ins for the real datasets' archives, and a local HTTP server to download them from.

The archives have the real layouts and file formats (.tif sequences, MJPG .avi, MATLAB .mat and .m, .npy), only a
few frames of a few small videos. Each builder returns the archives it wrote plus the truth: the source frames as
OpenCV reads them (a video's frames as OpenCV decodes it) and the 0/1 label of every test frame.

Everything stays on this machine: the server listens on 127.0.0.1 on a free port, and `no_proxy_env` keeps urllib
from sending the tests' requests to a proxy.
"""
from __future__ import annotations

import hashlib
import http.server
import io
import re
import tarfile
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
import yaml

from pipeline.config import DEFAULT_PARAMS, Archive, ArchiveSource, Dataset, Profile

# ----------------------------------------------------------------------------------------------------------------
# Local HTTP server with Range support and a request log


class ArchiveServer:
    """Serves `files` (name -> bytes) at http://127.0.0.1:<port>/<name>.

    requests: (path, Range header or None) per request, in order.
    cut_first_request_after: name -> N: the first request for that name gets N bytes, then the connection closes.
    ignore_range: answer every request with 200 and the whole file, as servers without Range support do.
    """

    def __init__(self, files: dict[str, bytes] | None = None):
        self.files = dict(files or {})
        self.requests: list[tuple[str, str | None]] = []
        self.cut_first_request_after: dict[str, int] = {}
        self.ignore_range = False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                name = self.path.lstrip("/")
                range_header = self.headers.get("Range")
                server.requests.append((self.path, range_header))
                first_request = sum(1 for path, _ in server.requests if path == self.path) == 1
                if name not in server.files:
                    self.send_error(404, "Not Found")
                    return
                data = server.files[name]
                match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
                if match and not server.ignore_range:
                    start = int(match.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                    body = data[start:]
                else:
                    self.send_response(200)
                    body = data
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                cut = server.cut_first_request_after.get(name)
                if cut is not None and first_request:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):  # keep pytest output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def __enter__(self) -> "ArchiveServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch):
    """The tests talk to 127.0.0.1 only; a proxy from the environment must not see their requests."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def server():
    with ArchiveServer() as running:
        yield running


# ----------------------------------------------------------------------------------------------------------------
# Small helpers


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    return sha256_bytes(Path(path).read_bytes())


def tiny_profile(frame_size: int = 16, channels: int = 3) -> Profile:
    return Profile(frame_size=frame_size, channels=channels, width=0.125, epochs=1, batch_size=1, lr=1e-3,
                   max_train_clips=0, num_workers=0, log_steps=1, update_threshold="paper")


def make_dataset(kind: str, archives: list[Archive], *, fmt: str = "raw", frame_size: int = 16, channels: int = 3,
                 workers: int = 1, name: str | None = None) -> Dataset:
    return Dataset(name=name or kind, kind=kind, profile=tiny_profile(frame_size, channels),
                   source=ArchiveSource(format=fmt, extract_workers=workers, archives={fmt: tuple(archives)}))


def write_params(path: Path, *datasets: Dataset) -> Path:
    """A params.yaml: the repository's, with `datasets` added (or replacing those of the same name) in its layout
    datasets.<name>.{kind, profile, source}."""
    raw = yaml.safe_load(DEFAULT_PARAMS.read_text())
    for dataset in datasets:
        raw["datasets"][dataset.name] = dataset.model_dump(mode="json", exclude={"name"}, exclude_none=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def archive_entry(path: Path, urls: tuple[str, ...] = (), local: bool = False) -> Archive:
    return Archive(name=path.name, urls=urls, sha256=sha256_file(path), local_path=str(path) if local else None)


def moving_frames(n: int, height: int, width: int, colour: bool, seed: int) -> list[np.ndarray]:
    """n frames of a bright block moving over a textured background (enough detail for resizing to matter)."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 120, size=(height, width, 3) if colour else (height, width), dtype=np.uint8)
    frames = []
    for i in range(n):
        frame = background.copy()
        x = (3 * i) % max(1, width - 8)
        frame[4:12, x:x + 8] = 230 if not colour else (40 + 20 * i % 200, 230, 90)
        frames.append(frame)
    return frames


def write_avi(path: Path, frames: list[np.ndarray]) -> list[np.ndarray]:
    """Write an MJPG .avi and return its frames as OpenCV decodes them (the extractor's input)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (width, height))
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()
    return decode_avi(path)


def decode_avi(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    assert frames, f"the test's own video {path} did not decode"
    return frames


def write_images(folder: Path, frames: list[np.ndarray], names: list[str]) -> list[np.ndarray]:
    """Write frames under the given file names; return them as OpenCV reads them back (JPEG is lossy)."""
    folder.mkdir(parents=True, exist_ok=True)
    read_back = []
    for frame, name in zip(frames, names):
        assert cv2.imwrite(str(folder / name), frame)
        read_back.append(cv2.imread(str(folder / name), cv2.IMREAD_ANYCOLOR))
    return read_back


def make_tar_gz(source_dir: Path, out_path: Path) -> Path:
    with tarfile.open(out_path, "w:gz") as tar:
        for path in sorted(source_dir.iterdir()):
            tar.add(path, arcname=path.name)
    return out_path


def make_zip(source_dir: Path, out_path: Path) -> Path:
    with zipfile.ZipFile(out_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(source_dir.rglob("*")):
            zf.write(path, path.relative_to(source_dir).as_posix())
    return out_path


def ranges_of(labels: np.ndarray) -> list[tuple[int, int]]:
    """1-based inclusive [start, end] runs of ones."""
    runs, start = [], None
    for i, value in enumerate(list(labels) + [0], 1):
        if value and start is None:
            start = i
        elif not value and start is not None:
            runs.append((start, i - 1))
            start = None
    return runs


# ----------------------------------------------------------------------------------------------------------------
# The datasets: truth + archives in the raw layouts


@dataclass
class Truth:
    """What the extractor must produce: source frames per (split, video) and labels per test video."""

    frames: dict[tuple[str, str], list[np.ndarray]] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Built:
    archives: list[Path]
    truth: Truth


PED2_TEST_LABELS = {"Test001": np.array([0, 0, 1, 1, 1, 0, 0, 0]),
                    "Test002": np.array([1, 1, 0, 0, 0, 1, 1])}


def build_ped2_raw(workdir: Path) -> Built:
    """UCSD_Anomaly_Dataset.tar.gz: grey .tif sequences, *_gt mask folders, Mac litter, UCSDped2.m."""
    top = workdir / "ped2_src"
    ped2 = top / "UCSD_Anomaly_Dataset.v1p2" / "UCSDped2"
    truth = Truth()
    for split, folder, videos in (("train", "Train", {"Train001": 6, "Train002": 5}),
                                  ("test", "Test", {name: len(v) for name, v in PED2_TEST_LABELS.items()})):
        for seed, (video, n) in enumerate(videos.items()):
            frames = moving_frames(n, 24, 36, colour=False, seed=seed + (10 if split == "test" else 0))
            truth.frames[(split, video)] = write_images(ped2 / folder / video, frames,
                                                        [f"{i:03d}.tif" for i in range(1, n + 1)])
            (ped2 / folder / video / "._001.tif").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        (ped2 / folder / ".DS_Store").write_bytes(b"Bud1")
    for video in PED2_TEST_LABELS:  # pixel masks, to be ignored
        write_images(ped2 / "Test" / f"{video}_gt", [np.zeros((24, 36), np.uint8)], ["001.bmp"])
    truth.labels = dict(PED2_TEST_LABELS)
    lines = ["TestVideoFile = {};", "% frame-level ground truth, 1-based"]
    for labels in PED2_TEST_LABELS.values():
        ranges = ", ".join(f"{s}:{e}" for s, e in ranges_of(labels))
        lines.append(f"TestVideoFile{{end+1}}.gt_frame = [{ranges}];")
    (ped2 / "Test" / "UCSDped2.m").write_text("\n".join(lines) + "\n")
    return Built([make_tar_gz(top, workdir / "UCSD_Anomaly_Dataset.tar.gz")], truth)


AVENUE_TEST_LABELS = {"01": np.array([0, 1, 1, 0, 0, 0]), "02": np.array([0, 0, 0, 0, 1, 1, 1])}


def write_vollabel_mat(path: Path, labels: np.ndarray, height: int = 24, width: int = 32, extra_frames: int = 0):
    """CUHK's <n>_label.mat: volLabel, a 1 x frames cell array of uint8 masks."""
    cells = np.empty((1, len(labels) + extra_frames), dtype=object)
    for i in range(cells.shape[1]):
        mask = np.zeros((height, width), np.uint8)
        if i < len(labels) and labels[i]:
            mask[3:6, 4:9] = 1
        cells[0, i] = mask
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"volLabel": cells})


def build_avenue_raw(workdir: Path, *, truncate_test_video: str | None = None,
                     extra_label_frames: int = 0) -> Built:
    """Avenue_Dataset.zip (colour MJPG .avi) and ground_truth_demo.zip (volLabel masks)."""
    videos_top = workdir / "avenue_src"
    avenue = videos_top / "Avenue Dataset"
    truth = Truth()
    for split, folder, videos in (("train", "training_videos", {"01": 5, "02": 6}),
                                  ("test", "testing_videos", {n: len(v) for n, v in AVENUE_TEST_LABELS.items()})):
        for seed, (video, n) in enumerate(videos.items()):
            frames = moving_frames(n, 48, 64, colour=True, seed=20 + seed + (10 if split == "test" else 0))
            truth.frames[(split, video)] = write_avi(avenue / folder / f"{video}.avi", frames)
    if truncate_test_video:
        path = avenue / "testing_videos" / f"{truncate_test_video}.avi"
        path.write_bytes(path.read_bytes()[:200])
    truth.labels = dict(AVENUE_TEST_LABELS)
    labels_top = workdir / "avenue_labels_src"
    for video, labels in AVENUE_TEST_LABELS.items():
        write_vollabel_mat(labels_top / "ground_truth_demo" / "testing_label_mask" / f"{int(video)}_label.mat",
                           labels, extra_frames=extra_label_frames)
    return Built([make_zip(videos_top, workdir / "Avenue_Dataset.zip"),
                  make_zip(labels_top, workdir / "ground_truth_demo.zip")], truth)


SHANGHAI_TEST_LABELS = {"01_0014": np.array([0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1]),  # 12 frames: 1..12.jpg
                        "02_0161": np.array([1, 0, 0, 0, 0])}                        # 000.jpg .. 004.jpg


def build_shanghaitech_raw(workdir: Path) -> Built:
    """shanghaitech.tar.gz: training .avi, testing frame folders (unpadded 1-based and padded 0-based), .npy masks."""
    top = workdir / "shanghai_src"
    root = top / "shanghaitech"
    truth = Truth()
    for seed, (video, n) in enumerate({"01_001": 6, "02_001": 5}.items()):
        frames = moving_frames(n, 40, 56, colour=True, seed=40 + seed)
        truth.frames[("train", video)] = write_avi(root / "training" / "videos" / f"{video}.avi", frames)
    for seed, (video, labels) in enumerate(SHANGHAI_TEST_LABELS.items()):
        n = len(labels)
        names = [f"{i}.jpg" for i in range(1, n + 1)] if video == "01_0014" else [f"{i:03d}.jpg" for i in range(n)]
        frames = moving_frames(n, 40, 56, colour=True, seed=50 + seed)
        truth.frames[("test", video)] = write_images(root / "testing" / "frames" / video, frames, names)
        mask_dir = root / "testing" / "test_frame_mask"
        mask_dir.mkdir(parents=True, exist_ok=True)
        np.save(mask_dir / f"{video}.npy", labels.astype(np.int64))
    truth.labels = dict(SHANGHAI_TEST_LABELS)
    return Built([make_tar_gz(top, workdir / "shanghaitech.tar.gz")], truth)


def build_preextracted(workdir: Path, kind: str, truth: Truth, labels_as: str) -> Built:
    """The MNAD-style archive of the same content: <dataset>/{training,testing}/frames/<video>/<NNNN>.jpg + labels.

    labels_as: "npy" (frame_labels_<dataset>.npy, shape (1, N) for ped2/avenue, (N,) for shanghai, in its own
    archive file) or "mat" (<dataset>.mat, variable gt: 1 x videos cell array of 2 x K ranges, inside the archive).
    """
    folder = {"ped2": "ped2", "avenue": "avenue", "shanghaitech": "shanghai"}[kind]
    top = workdir / f"{kind}_pre_src"
    new_truth = Truth(labels={})
    for (split, video), frames in truth.frames.items():
        # MNAD names Ped2's folders 01, 02, ...; the extractor must give them UCSD's names again
        mnad_name = video[-2:] if kind == "ped2" else video
        target = top / folder / ("training" if split == "train" else "testing") / "frames" / mnad_name
        names = [f"{i:04d}.jpg" for i in range(len(frames))]
        new_truth.frames[(split, video)] = write_images(target, frames, names)
    test_videos = sorted(truth.labels)
    new_truth.labels = {video: truth.labels[video] for video in test_videos}
    archives = []
    if labels_as == "npy":
        concatenated = np.concatenate([truth.labels[v] for v in test_videos]).astype(np.int64)
        npy_name = f"frame_labels_{'shanghai' if kind == 'shanghaitech' else kind}.npy"
        npy_path = workdir / npy_name
        np.save(npy_path, concatenated if kind == "shanghaitech" else concatenated.reshape(1, -1))
        archives.append(npy_path)
    else:
        cells = np.empty((1, len(test_videos)), dtype=object)
        for i, video in enumerate(test_videos):
            runs = ranges_of(truth.labels[video])
            cells[0, i] = np.array(runs, dtype=np.float64).T.reshape(2, -1) if runs else np.zeros((2, 0))
        scipy.io.savemat(top / f"{folder}.mat", {"gt": cells})
    archives.insert(0, make_tar_gz(top, workdir / f"{folder}.tar.gz"))
    return Built(archives, new_truth)


# ----------------------------------------------------------------------------------------------------------------
# Checking an extraction against the truth


def expected_frame(source: np.ndarray, frame_size: int, channels: int) -> np.ndarray:
    """The harness's convention: colour conversion (grey <-> BGR), then one INTER_AREA resize."""
    if channels == 3 and source.ndim == 2:
        source = cv2.cvtColor(source, cv2.COLOR_GRAY2BGR)
    if channels == 1 and source.ndim == 3:
        source = cv2.cvtColor(source, cv2.COLOR_BGR2GRAY)
    return cv2.resize(source, (frame_size, frame_size), interpolation=cv2.INTER_AREA)


def tree(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def read_labels_csv(out_dir: Path):
    import pandas as pd

    return pd.read_csv(out_dir / "labels.csv", dtype={"video": str, "anomaly_type": str}, keep_default_na=False)


def assert_matches_truth(out_dir: Path, truth: Truth, frame_size: int, channels: int) -> None:
    """out_dir as pipeline.prepare leaves it: the frames, labels.csv and the manifest."""
    expected_files = ["labels.csv", "manifest.json"]
    for (split, video), frames in truth.frames.items():
        expected_files += [f"{split}/{video}/{i:06d}.png" for i in range(len(frames))]
    assert tree(out_dir) == sorted(expected_files)

    for (split, video), frames in truth.frames.items():
        for i, source in enumerate(frames):
            written = cv2.imread(str(out_dir / split / video / f"{i:06d}.png"), cv2.IMREAD_UNCHANGED)
            want = expected_frame(source, frame_size, channels)
            assert written.shape == want.shape, (split, video, i)
            assert np.array_equal(written, want), f"{split}/{video} frame {i} differs from the resized source"

    table = read_labels_csv(out_dir)
    assert list(table.columns) == ["split", "video", "frame", "label", "anomaly_type"]
    assert (table["anomaly_type"] == "").all()
    for (split, video), frames in truth.frames.items():
        rows = table[(table["split"] == split) & (table["video"] == video)]
        assert rows["frame"].tolist() == list(range(len(frames)))
        want = truth.labels[video].tolist() if split == "test" else [0] * len(frames)
        assert rows["label"].tolist() == want, f"{split}/{video} labels"
    assert len(table) == sum(len(f) for f in truth.frames.values())


def leftovers(folder: Path) -> list[str]:
    """Entries of a folder (temporary build folders must not survive a failure)."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def tar_with_member(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    """A tar.gz holding one ordinary file plus `member` (an unsafe path or link)."""
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("ped2/readme.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        member.size = len(data) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path
