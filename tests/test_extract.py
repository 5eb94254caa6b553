"""pipeline.datasets.prepare_real, run by the prepare stage (pipeline.prepare.prepare) on tiny archives with the real
layouts: frames, labels, the manifest, and every failure mode."""
from __future__ import annotations

import json
import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from pipeline.datasets.labels import read_range_mat
from pipeline.datasets.ped2 import parse_ucsd_ground_truth
from pipeline.errors import UserError
from pipeline.prepare import prepare

try:
    from tests import realdata_fixtures as fx
    from tests.realdata_fixtures import no_proxy_env, server  # noqa: F401 (fixtures)
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    import realdata_fixtures as fx
    from realdata_fixtures import no_proxy_env, server  # noqa: F401 (fixtures)


def serve(server: fx.ArchiveServer, archives: list[Path]) -> list:
    """Put the archives on the local server; return their params entries (URL + sha256)."""
    entries = []
    for path in archives:
        server.files[path.name] = path.read_bytes()
        entries.append(fx.archive_entry(path, urls=(server.url(path.name),)))
    return entries


def local(archives: list[Path]) -> list:
    return [fx.archive_entry(path, local=True) for path in archives]


def run_prepare(tmp_path: Path, dataset, tag: str = "out") -> tuple[dict, Path]:
    """The prepare stage for `dataset`, from a params.yaml listing it, with data root tmp_path/tag."""
    root = tmp_path / tag
    summary = prepare(dataset.name, fx.write_params(root / "params.yaml", dataset), data_root=root)
    return summary, root / "frames" / dataset.name


def assert_nothing_built(tmp_path: Path, dataset, tag: str = "out") -> None:
    """No output under the final name, and no temporary build folder left beside it."""
    frames_parent = tmp_path / tag / "frames"
    assert fx.leftovers(frames_parent) == []


# ----------------------------------------------------------------------------------------------------------------
# Download -> verify -> extract, checked frame by frame


def test_ped2_raw_end_to_end(server, tmp_path):
    built = fx.build_ped2_raw(tmp_path / "src")
    dataset = fx.make_dataset("ped2", serve(server, built.archives), frame_size=16, channels=3)
    summary, out_dir = run_prepare(tmp_path, dataset)
    fx.assert_matches_truth(out_dir, built.truth, frame_size=16, channels=3)  # grey tifs become BGR
    summary.pop("seconds")
    assert summary.pop("manifest") == json.loads((out_dir / "manifest.json").read_text())
    assert summary == {
        "dataset": "ped2", "kind": "ped2", "format": "raw", "archives": ["UCSD_Anomaly_Dataset.tar.gz"],
        "frame_size": 16, "channels": 3, "train_videos": 2, "train_frames": 11, "test_videos": 2,
        "test_frames": 15, "abnormal_test_frames": 7, "label_source": "UCSD_Anomaly_Dataset.tar.gz: "
        "UCSD_Anomaly_Dataset.v1p2/UCSDped2/Test/UCSDped2.m"}
    assert (tmp_path / "out" / "raw" / "ped2" / "UCSD_Anomaly_Dataset.tar.gz").is_file()
    assert fx.leftovers(out_dir.parent) == ["ped2"]  # the temporary build folder is gone


def test_avenue_raw_end_to_end_two_archives_grey(server, tmp_path):
    built = fx.build_avenue_raw(tmp_path / "src")
    dataset = fx.make_dataset("avenue", serve(server, built.archives), frame_size=24, channels=1)
    summary, out_dir = run_prepare(tmp_path, dataset)
    fx.assert_matches_truth(out_dir, built.truth, frame_size=24, channels=1)
    assert summary["test_frames"] == 13 and summary["abnormal_test_frames"] == 5


def test_shanghaitech_raw_end_to_end_in_worker_processes(server, tmp_path):
    built = fx.build_shanghaitech_raw(tmp_path / "src")
    dataset = fx.make_dataset("shanghaitech", serve(server, built.archives), frame_size=16, channels=3, workers=2)
    summary, out_dir = run_prepare(tmp_path, dataset)
    # 1.jpg .. 12.jpg sort numerically (not 1, 10, 11, 12, 2, ...) and both 0- and 1-based names start at 000000
    fx.assert_matches_truth(out_dir, built.truth, frame_size=16, channels=3)
    assert summary["train_videos"] == 2 and summary["test_frames"] == 17


def test_rerun_replaces_previous_output_and_clears_a_killed_build(tmp_path):
    built = fx.build_ped2_raw(tmp_path / "src")
    dataset = fx.make_dataset("ped2", local(built.archives))
    _, out_dir = run_prepare(tmp_path, dataset)
    (out_dir / "stale.txt").write_text("from an older run")
    (out_dir.parent / ".ped2.staging-killed" / "train").mkdir(parents=True)  # what a SIGKILL leaves: mid-build,
    (out_dir.parent / ".ped2.old-killed" / "ped2").mkdir(parents=True)       # or mid-swap
    run_prepare(tmp_path, dataset)
    fx.assert_matches_truth(out_dir, built.truth, frame_size=16, channels=3)
    assert fx.leftovers(out_dir.parent) == ["ped2"]


# ----------------------------------------------------------------------------------------------------------------
# Both source formats give the same layout and labels


RAW_BUILDERS = {"ped2": fx.build_ped2_raw, "avenue": fx.build_avenue_raw, "shanghaitech": fx.build_shanghaitech_raw}


@pytest.mark.parametrize("kind,labels_as", [("ped2", "mat"), ("ped2", "npy"), ("avenue", "mat"),
                                            ("avenue", "npy"), ("shanghaitech", "npy")])
def test_preextracted_gives_same_layout_and_labels_as_raw(tmp_path, kind, labels_as):
    raw = RAW_BUILDERS[kind](tmp_path / "src")
    raw_dataset = fx.make_dataset(kind, local(raw.archives))
    _, raw_out = run_prepare(tmp_path, raw_dataset, tag="raw")

    pre = fx.build_preextracted(tmp_path / "src", kind, raw.truth, labels_as)
    pre_dataset = fx.make_dataset(kind, local(pre.archives), fmt="preextracted")
    summary, pre_out = run_prepare(tmp_path, pre_dataset, tag="pre")

    assert fx.tree(pre_out) == fx.tree(raw_out)
    assert fx.read_labels_csv(pre_out).equals(fx.read_labels_csv(raw_out))
    fx.assert_matches_truth(pre_out, pre.truth, frame_size=16, channels=3)  # the JPEGs, resized
    assert summary["format"] == "preextracted"
    assert summary["label_source"].endswith(".npy" if labels_as == "npy" else ".mat")


# ----------------------------------------------------------------------------------------------------------------
# Failures: one clear message each, and nothing under a final name


def test_download_failure_builds_nothing(server, tmp_path):
    built = fx.build_ped2_raw(tmp_path / "src")
    entry = fx.archive_entry(built.archives[0], urls=(server.url("missing.tar.gz"),))
    dataset = fx.make_dataset("ped2", [entry])
    with pytest.raises(UserError, match=r"HTTP error 404.*put UCSD_Anomaly_Dataset.tar.gz in .*raw/ped2/ or set "
                                        r"datasets.ped2.source.archives.raw\[0\].local_path"):
        run_prepare(tmp_path, dataset)
    assert_nothing_built(tmp_path, dataset)


UNSAFE_MEMBERS = {
    "dotdot": (lambda: tarfile.TarInfo("ped2/../../evil.txt"), "would be written outside the target folder"),
    "absolute": (lambda: tarfile.TarInfo("/tmp/evil.txt"), "has an absolute path"),
    "symlink_out": (lambda: _link(tarfile.SYMTYPE, "ped2/escape", "../../outside"), "outside the target folder"),
    "symlink_abs": (lambda: _link(tarfile.SYMTYPE, "ped2/passwd", "/etc/passwd"), "absolute path '/etc/passwd'"),
    "hardlink_out": (lambda: _link(tarfile.LNKTYPE, "ped2/hard", "../evil"), "outside the target folder"),
}


def _link(kind: bytes, name: str, target: str) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type, member.linkname = kind, target
    return member


@pytest.mark.parametrize("case", sorted(UNSAFE_MEMBERS))
def test_tar_member_escaping_the_target_is_refused(tmp_path, case):
    make_member, problem = UNSAFE_MEMBERS[case]
    member = make_member()
    archive = fx.tar_with_member(tmp_path / "ped2.tar.gz", member, b"pwned")
    dataset = fx.make_dataset("ped2", local([archive]), fmt="preextracted")
    with pytest.raises(UserError) as info:
        run_prepare(tmp_path, dataset)
    message = str(info.value)
    assert f"member {member.name!r}" in message and problem in message and "refusing to unpack" in message
    assert_nothing_built(tmp_path, dataset)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "evil.txt").exists()


def test_zip_member_with_dotdot_is_refused(tmp_path):
    archive = tmp_path / "Avenue_Dataset.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("Avenue Dataset/readme.txt", "ok")
        zf.writestr("../evil.txt", "pwned")
    dataset = fx.make_dataset("avenue", local([archive]))
    with pytest.raises(UserError, match=re.escape("member '../evil.txt' would be written outside the target folder")):
        run_prepare(tmp_path, dataset)
    assert_nothing_built(tmp_path, dataset)
    assert not (tmp_path / "out" / "evil.txt").exists()


def test_truncated_video_is_named(tmp_path):
    built = fx.build_avenue_raw(tmp_path / "src", truncate_test_video="02")
    dataset = fx.make_dataset("avenue", local(built.archives), workers=2)
    with pytest.raises(UserError) as info:
        run_prepare(tmp_path, dataset)
    message = str(info.value)
    assert message.startswith("Avenue_Dataset.zip: Avenue Dataset/testing_videos/02.avi: OpenCV cannot open")
    assert "delete the archive from data/raw/" in message
    assert_nothing_built(tmp_path, dataset)


def test_label_count_mismatch_names_video_and_counts(tmp_path):
    built = fx.build_avenue_raw(tmp_path / "src", extra_label_frames=1)
    dataset = fx.make_dataset("avenue", local(built.archives))
    with pytest.raises(UserError, match=re.escape(
            "test video 01: 6 decoded frames but 7 labels in "
            "ground_truth_demo.zip: ground_truth_demo/testing_label_mask/1_label.mat")):
        run_prepare(tmp_path, dataset)
    assert_nothing_built(tmp_path, dataset)


def test_failed_rebuild_keeps_the_previous_output(tmp_path):
    good = fx.build_avenue_raw(tmp_path / "good")
    _, out_dir = run_prepare(tmp_path, fx.make_dataset("avenue", local(good.archives)))
    before = {name: (out_dir / name).read_bytes() for name in fx.tree(out_dir)}
    bad = fx.build_avenue_raw(tmp_path / "bad", extra_label_frames=2)
    with pytest.raises(UserError, match="labels in"):
        run_prepare(tmp_path, fx.make_dataset("avenue", local(bad.archives)))
    assert {name: (out_dir / name).read_bytes() for name in fx.tree(out_dir)} == before
    assert fx.leftovers(out_dir.parent) == ["avenue"]


def test_ped2_ground_truth_beyond_the_video_is_a_mismatch(tmp_path):
    built = fx.build_ped2_raw(tmp_path / "src")
    with tarfile.open(built.archives[0]) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    gt = tmp_path / "unpacked" / "UCSD_Anomaly_Dataset.v1p2" / "UCSDped2" / "Test" / "UCSDped2.m"
    gt.write_text(gt.read_text().replace("[1:2, 6:7]", "[1:2, 6:9]"))
    archive = fx.make_tar_gz(tmp_path / "unpacked", tmp_path / "UCSD_Anomaly_Dataset.tar.gz")
    with pytest.raises(UserError, match=re.escape("test video Test002: 7 decoded frames, but UCSD_Anomaly_Dataset"
                                                  ".tar.gz: UCSD_Anomaly_Dataset.v1p2/UCSDped2/Test/UCSDped2.m marks "
                                                  "frames 6..9 abnormal")):
        run_prepare(tmp_path, fx.make_dataset("ped2", local([archive])))
    assert_nothing_built(tmp_path, None)


def test_preextracted_npy_of_the_wrong_length(tmp_path):
    raw = fx.build_avenue_raw(tmp_path / "src")
    pre = fx.build_preextracted(tmp_path / "src", "avenue", raw.truth, "npy")
    np.save(pre.archives[1], np.zeros((1, 20), dtype=np.int64))
    with pytest.raises(UserError, match=re.escape("frame_labels_avenue.npy: 20 labels, but the test videos have 13 "
                                                  "decoded frames (01: 6, 02: 7)")):
        run_prepare(tmp_path, fx.make_dataset("avenue", local(pre.archives), fmt="preextracted"))
    assert_nothing_built(tmp_path, None)


def test_missing_label_archive_says_which_file(tmp_path):
    built = fx.build_avenue_raw(tmp_path / "src")
    dataset = fx.make_dataset("avenue", local(built.archives[:1]))
    with pytest.raises(UserError, match=r"expected the folder ground_truth_demo/testing_label_mask/ \(from "
                                        r"ground_truth_demo.zip"):
        run_prepare(tmp_path, dataset)
    assert_nothing_built(tmp_path, dataset)


def test_wrong_archive_layout_is_explained(tmp_path):
    built = fx.build_shanghaitech_raw(tmp_path / "src")
    dataset = fx.make_dataset("ped2", local(built.archives))  # the ShanghaiTech archive listed for ped2
    with pytest.raises(UserError, match=r"expected the folder UCSD_Anomaly_Dataset.v1p2/UCSDped2/ with Train/ and "
                                        r"Test/ in the archives \['shanghaitech.tar.gz'\], found no folder"):
        run_prepare(tmp_path, dataset)


# ----------------------------------------------------------------------------------------------------------------
# Ground-truth parsers


def test_parse_ucsd_ground_truth_ranges_and_comments():
    text = """TestVideoFile = {};
    % TestVideoFile{end+1}.gt_frame = [1:2];   commented out
    TestVideoFile{end+1}.gt_frame = [61:180];
    TestVideoFile{end+1}.gt_frame = [1:5, 10:20];
    TestVideoFile{end+1}.gt_frame = [7];
    """
    assert parse_ucsd_ground_truth(text, "UCSDped2.m") == [[(61, 180)], [(1, 5), (10, 20)], [(7, 7)]]


def test_parse_ucsd_ground_truth_rejects_other_syntax():
    with pytest.raises(UserError, match=r"UCSDped2.m, line 1: cannot read '1:2:9'"):
        parse_ucsd_ground_truth("TestVideoFile{end+1}.gt_frame = [1:2:9];", "UCSDped2.m")


def test_read_range_mat_forms(tmp_path):
    cells = np.empty((1, 3), dtype=object)
    cells[0, 0] = np.array([[61.0], [180.0]])                  # one event, 2 x 1
    cells[0, 1] = np.array([[1.0, 10.0], [5.0, 20.0]])          # two events, 2 x 2
    cells[0, 2] = np.zeros((2, 0))                              # no event
    scipy.io.savemat(tmp_path / "ped2.mat", {"gt": cells})
    assert read_range_mat(tmp_path / "ped2.mat", "ped2.mat") == [[(61, 180)], [(1, 5), (10, 20)], []]

    scipy.io.savemat(tmp_path / "bad.mat", {"gt": np.ones((3, 4))})
    with pytest.raises(UserError, match=r"bad.mat: variable gt is a float64 array of shape \(3, 4\)"):
        read_range_mat(tmp_path / "bad.mat", "bad.mat")
