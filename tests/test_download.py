"""pipeline.download.fetch against a local HTTP server: verify, resume, mirrors, and every failure's message."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from local_processes import free_port
from pipeline.config import Archive, ArchiveSource, load_params
from pipeline.download import fetch
from pipeline.errors import UserError

try:
    from tests.realdata_fixtures import no_proxy_env, server, sha256_bytes  # noqa: F401 (fixtures)
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from realdata_fixtures import no_proxy_env, server, sha256_bytes  # noqa: F401 (fixtures)

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, so a cut lands mid-stream
NAME = "UCSD_Anomaly_Dataset.tar.gz"
KEY = "datasets.ped2.source.archives.raw[0]"


def archive(urls, sha256=None, local_path=None) -> Archive:
    return Archive(name=NAME, urls=tuple(urls), sha256=sha256 or sha256_bytes(PAYLOAD), local_path=local_path)


def assert_tells_how_to_place_by_hand(message: str, raw_dir: Path) -> None:
    assert f"put {NAME} in {raw_dir}/" in message
    assert f"set {KEY}.local_path in params.yaml" in message


def test_downloads_and_verifies(server, tmp_path):
    server.files[NAME] = PAYLOAD
    raw_dir = tmp_path / "raw" / "ped2"
    path = fetch(archive([server.url(NAME)]), raw_dir, params_key=KEY)
    assert path == raw_dir / NAME and path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in raw_dir.iterdir()) == [NAME]  # no .part left behind
    assert server.requests == [(f"/{NAME}", None)]


def test_connection_cut_midway_resumes_with_range_request(server, tmp_path):
    server.files[NAME] = PAYLOAD
    server.cut_first_request_after[NAME] = 300_000
    path = fetch(archive([server.url(NAME)]), tmp_path, params_key=KEY)
    assert path.read_bytes() == PAYLOAD
    assert server.requests == [(f"/{NAME}", None), (f"/{NAME}", "bytes=300000-")]


def test_partial_file_from_an_earlier_run_is_resumed(server, tmp_path):
    server.files[NAME] = PAYLOAD
    (tmp_path / f"{NAME}.part").write_bytes(PAYLOAD[:123_457])
    path = fetch(archive([server.url(NAME)]), tmp_path, params_key=KEY)
    assert path.read_bytes() == PAYLOAD
    assert server.requests == [(f"/{NAME}", "bytes=123457-")]


def test_complete_partial_file_is_verified_after_range_not_satisfiable(server, tmp_path):
    server.files[NAME] = PAYLOAD
    (tmp_path / f"{NAME}.part").write_bytes(PAYLOAD)  # a run that died between the last byte and the rename
    assert fetch(archive([server.url(NAME)]), tmp_path, params_key=KEY).read_bytes() == PAYLOAD
    assert server.requests == [(f"/{NAME}", f"bytes={len(PAYLOAD)}-")]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.files[NAME] = PAYLOAD
    server.ignore_range = True
    (tmp_path / f"{NAME}.part").write_bytes(b"stale bytes that must not survive")
    path = fetch(archive([server.url(NAME)]), tmp_path, params_key=KEY)
    assert path.read_bytes() == PAYLOAD
    assert server.requests == [(f"/{NAME}", "bytes=33-")]


def test_checksum_mismatch_keeps_download_as_bad_and_explains(server, tmp_path):
    server.files[NAME] = PAYLOAD
    wrong = "0" * 64
    with pytest.raises(UserError) as info:
        fetch(archive([server.url(NAME)], sha256=wrong), tmp_path, params_key=KEY)
    message = str(info.value)
    assert server.url(NAME) in message and "checksum mismatch" in message
    assert f"expected sha256 {wrong}, got {sha256_bytes(PAYLOAD)}" in message
    assert f"kept as {tmp_path / (NAME + '.bad')}" in message
    assert_tells_how_to_place_by_hand(message, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{NAME}.bad"]


def test_http_404_names_url_and_status(server, tmp_path):
    with pytest.raises(UserError) as info:
        fetch(archive([server.url(NAME)]), tmp_path, params_key=KEY)
    message = str(info.value)
    assert f"{server.url(NAME)}: HTTP error 404" in message
    assert_tells_how_to_place_by_hand(message, tmp_path)
    assert not (tmp_path / NAME).exists()


def test_connection_refused_names_url(tmp_path):
    port = free_port()   # a port on 127.0.0.1 that nothing listens on
    url = f"http://127.0.0.1:{port}/{NAME}"
    with pytest.raises(UserError) as info:
        fetch(archive([url]), tmp_path, params_key=KEY)
    message = str(info.value)
    assert f"{url}: cannot reach the host (Connection refused)" in message
    assert_tells_how_to_place_by_hand(message, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_mirrors_are_tried_in_order(server, tmp_path):
    server.files["mirror/" + NAME] = PAYLOAD
    urls = [server.url("dead/" + NAME), server.url("mirror/" + NAME)]
    path = fetch(archive(urls), tmp_path, params_key=KEY)
    assert path.read_bytes() == PAYLOAD
    assert [p for p, _ in server.requests] == [f"/dead/{NAME}", f"/mirror/{NAME}"]


def test_every_mirror_failing_lists_each(server, tmp_path):
    server.files["bad/" + NAME] = b"<html>moved</html>"
    urls = [server.url("gone/" + NAME), server.url("bad/" + NAME)]
    with pytest.raises(UserError) as info:
        fetch(archive(urls), tmp_path, params_key=KEY)
    message = str(info.value)
    assert f"{urls[0]}: HTTP error 404" in message and f"{urls[1]}: checksum mismatch" in message
    assert not (tmp_path / NAME).exists()


def test_archive_already_in_raw_dir_is_only_verified(server, tmp_path):
    (tmp_path / NAME).write_bytes(PAYLOAD)
    assert fetch(archive([server.url(NAME)]), tmp_path, params_key=KEY) == tmp_path / NAME
    assert server.requests == []


def test_wrong_archive_in_raw_dir_is_set_aside(server, tmp_path):
    (tmp_path / NAME).write_bytes(b"not the dataset")
    with pytest.raises(UserError) as info:
        fetch(archive([server.url(NAME)]), tmp_path, params_key=KEY)
    message = str(info.value)
    assert "checksum mismatch" in message and f"moved to {tmp_path / (NAME + '.bad')}" in message
    assert_tells_how_to_place_by_hand(message, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{NAME}.bad"]
    assert server.requests == []


def test_local_path_is_verified_and_linked_without_download(server, tmp_path):
    mine = tmp_path / "downloads" / "my_copy.tar.gz"
    mine.parent.mkdir()
    mine.write_bytes(PAYLOAD)
    raw_dir = tmp_path / "raw"
    path = fetch(archive([server.url(NAME)], local_path=str(mine)), raw_dir, params_key=KEY)
    assert path == raw_dir / NAME and path.read_bytes() == PAYLOAD
    assert server.requests == []


def test_local_path_with_wrong_checksum_is_left_untouched(tmp_path):
    mine = tmp_path / "my_copy.tar.gz"
    mine.write_bytes(b"something else")
    raw_dir = tmp_path / "raw"
    with pytest.raises(UserError) as info:
        fetch(archive([], local_path=str(mine)), raw_dir, params_key=KEY)
    message = str(info.value)
    assert str(mine) in message and f"{KEY}.local_path" in message
    assert f"expected sha256 {sha256_bytes(PAYLOAD)}, got {sha256_bytes(b'something else')}" in message
    assert mine.read_bytes() == b"something else"
    assert list(raw_dir.iterdir()) == []


def test_missing_local_path_names_the_key(tmp_path):
    with pytest.raises(UserError, match=re.escape(f"{KEY}.local_path: {tmp_path / 'nope.tar.gz'} does not exist")):
        fetch(archive([], local_path=str(tmp_path / "nope.tar.gz")), tmp_path / "raw", params_key=KEY)


def test_bad_sha256_in_params_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"source.archives.raw\[0\].sha256: 'abc' is not a sha256"):
        fetch(Archive(name=NAME, urls=(), sha256="abc"), tmp_path, params_key=KEY)


# The real datasets in params.yaml: parsed by config.py, with the URLs and checksums of REFERENCE.md section 4


REAL_SOURCES = {
    "ped2": [("UCSD_Anomaly_Dataset.tar.gz",
              "http://www.svcl.ucsd.edu/projects/anomaly/UCSD_Anomaly_Dataset.tar.gz",
              "2329af326951f5097fdd114c50e853957d3e569493a49d22fc082a9fd791915b")],
    "avenue": [("Avenue_Dataset.zip",
                "http://www.cse.cuhk.edu.hk/leojia/projects/detectabnormal/Avenue_Dataset.zip",
                "fc9cb8432a11ca79c18aa180c72524011411b69d3b0ff27c8816e41c0de61531"),
               ("ground_truth_demo.zip",
                "http://www.cse.cuhk.edu.hk/leojia/projects/detectabnormal/ground_truth_demo.zip",
                "60fec1728ec8f73a58aad3aeb5729d70a805a47e0b8eb4bf91ab67ef06386d77")],
    "shanghaitech": [("shanghaitech.tar.gz", "http://101.32.75.151:8181/dataset/shanghaitech.tar.gz",
                      "c13a827043b259ccf8493c9d9130486872992153a9d714fe229e523cd4c94116")],
}


# MNAD's settings: 256x256 BGR, full width, batch 4, Adam 2e-4, every clip; 60 epochs, 10 on ShanghaiTech
PAPER_PROFILE = {"frame_size": 256, "channels": 3, "width": 1.0, "batch_size": 4, "lr": 2.0e-4, "max_train_clips": 0}


@pytest.mark.parametrize("name", sorted(REAL_SOURCES))
def test_params_yaml_lists_the_real_datasets(name):
    params = load_params()
    dataset = params.dataset(name)
    assert dataset.kind == name and isinstance(dataset.source, ArchiveSource)
    assert {key: getattr(dataset.profile, key) for key in PAPER_PROFILE} == PAPER_PROFILE
    assert dataset.profile.epochs == (10 if name == "shanghaitech" else 60)
    assert dataset.source.format == "raw" and dataset.source.extract_workers == 4
    listed = [(a.name, a.urls, a.sha256, a.local_path) for a in dataset.source.archives["raw"]]
    assert listed == [(file, (url,), sha, None) for file, url, sha in REAL_SOURCES[name]]
    assert name not in params.study.all_datasets  # the default study stays synthetic
