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
