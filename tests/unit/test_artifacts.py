import json
import shutil

import pytest

from common.artifacts import ArtifactError, latest_dir, open_artifacts
from common.components import load_retriever


@pytest.fixture
def copy(built, tmp_path):
    src = latest_dir(built[0])
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_latest_set_opens_and_matches_manifest(artifacts):
    m = artifacts.manifest
    assert m["counts"]["items"] == 600
    assert m["dims"] == {"text": 384, "cf": 64}
    assert set(m["files"]) >= {"item_text.npy", "index_text.faiss", "index_cf.faiss", "reranker.txt", "catalog.json"}
    for key in ("index_text_recall@100", "index_cf_recall@100", "ranker_auc", "torchscript_max_abs_diff"):
        assert key in m["quality"]


def test_corrupted_file_is_refused(copy):
    with open(copy / "item_text.npy", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00corrupt")
    with pytest.raises(ArtifactError, match="checksum of item_text.npy"):
        open_artifacts(copy)


def test_missing_file_is_refused(copy):
    (copy / "reranker.txt").unlink()
    with pytest.raises(ArtifactError, match="reranker.txt .* missing"):
        open_artifacts(copy)


def test_other_feature_spec_is_refused(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["feature_spec_version"] = "0"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="feature_spec_version"):
        open_artifacts(copy)


def test_shape_mismatch_is_refused(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["counts"]["items"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        load_retriever(open_artifacts(copy))


def test_no_artifacts_says_how_to_build(tmp_path):
    with pytest.raises(ArtifactError, match="make artifacts"):
        open_artifacts(tmp_path)


def _rss_file_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.parametrize("advice", ["madvise", "fallback"])
def test_a_shared_table_is_mapped_in_full_at_load(tmp_path, monkeypatch, advice):
    """Its pages are mapped before the first request (no page fault per cold row while serving),
    by MADV_POPULATE_READ, or by reading a value per page where the kernel refuses that advice."""
    import numpy as np
    import common.artifacts as artifacts_module
    if advice == "fallback":
        monkeypatch.setattr(artifacts_module, "MADV_POPULATE_READ", 10_000)   # no such advice: EINVAL
    table = np.arange(48 * 2**20 // 4, dtype=np.float32).reshape(-1, 384)   # 48 MiB
    np.save(tmp_path / "table.npy", table)
    lazy = np.load(tmp_path / "table.npy", mmap_mode="r")
    before = _rss_file_mib()
    artifacts_module.populate(lazy)
    assert _rss_file_mib() - before > 40
    np.testing.assert_array_equal(lazy[[0, 5000, -1]], table[[0, 5000, -1]])   # still the same values


def test_a_shared_table_is_mapped_once_per_process_and_let_go_with_its_last_user(tmp_path):
    """Retrieval and ranking in one process (the colocated gateway) read the same mapping: its
    pages count once in the process's RSS. Once no version holds it, it is unmapped."""
    import gc
    import threading

    import numpy as np
    from common.artifacts import ArtifactSet, _shared_tables
    table = np.arange(10_000 * 384, dtype=np.float32).reshape(-1, 384)   # 15 MiB
    np.save(tmp_path / "item_text.npy", table)
    a_set, b_set = ArtifactSet(tmp_path, {}), ArtifactSet(tmp_path, {})
    got = []
    threads = [threading.Thread(target=lambda s=s: got.append(s.shared_table("item_text.npy"))) for s in (a_set, b_set)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got[0] is got[1] and not got[0].flags.writeable
    maps = [line for line in open("/proc/self/maps") if str(tmp_path / "item_text.npy") in line]
    assert len(maps) == 1, maps
    del got, threads, t
    gc.collect()
    assert (tmp_path / "item_text.npy").resolve() not in _shared_tables
    assert not [line for line in open("/proc/self/maps") if str(tmp_path / "item_text.npy") in line]
