"""The tiny synthetic artifact set: it has what a real build writes, the loaders accept it, and
it is written in well under a few seconds."""
from __future__ import annotations

import ast
import asyncio
import re
import time
from pathlib import Path

import numpy as np
import pytest

from common.artifacts import ArtifactError, open_artifacts
from common.components import load_retriever
from core.features import TEXT_ENCODER_NAME
from gateway.serving_state import ServingState
from ranking.ranker import Ranker
from tests.tiny_artifacts import FakeScorer, item_id, unavailable, user_id, write_tiny_artifacts

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "offline" / "build.py"


def build_file_names() -> set[str]:
    """Files offline/build.py writes into the staging folder (the model folder leaves before publish)."""
    source = BUILD.read_text()
    names = set(re.findall(r'staging / "([\w.]+)"', source)) - {"model"}
    if 'staging / f"index_{name}.faiss"' in source:
        names |= {"index_text.faiss", "index_cf.faiss"}
    # Files named by a constant of offline/serving/seq_encoder.py (staging / SEQ_...).
    from offline.serving import seq_encoder
    names |= {getattr(seq_encoder, c) for c in re.findall(r"staging / (SEQ_[A-Z_]+)", source)}
    return names


def build_manifest_keys() -> set[str]:
    """Top-level manifest keys offline/build.py sets: the `manifest = {...}` literal plus every
    `manifest["key"] = ...`, plus the two write_manifest adds."""
    keys = {"feature_spec_version", "files"}
    for node in ast.walk(ast.parse(BUILD.read_text())):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            if isinstance(target, ast.Name) and target.id == "manifest" and isinstance(node.value, ast.Dict):
                keys |= {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
            if (isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name)
                    and target.value.id == "manifest" and isinstance(target.slice, ast.Constant)):
                keys.add(target.slice.value)
    return keys


def test_same_files_and_manifest_keys_as_a_real_build(tiny_artifacts):
    expected_files = build_file_names()
    assert len(expected_files) >= 14, f"could not read the file names offline/build.py writes: {expected_files}"
    written = {p.name for p in tiny_artifacts.folder.iterdir()} - {"manifest.json"}
    assert written == expected_files, "update tests/tiny_artifacts.py to write what offline/build.py writes"
    assert set(tiny_artifacts.manifest["files"]) == expected_files
    expected_keys = build_manifest_keys()
    assert {"version", "counts", "dims", "models", "indexes", "retrieval"} <= expected_keys
    assert set(tiny_artifacts.manifest) == expected_keys


def test_written_in_well_under_a_few_seconds(tmp_path):
    start = time.perf_counter()
    first = write_tiny_artifacts(tmp_path)
    second = write_tiny_artifacts(tmp_path, seed=1)
    assert time.perf_counter() - start < 3.0
    # Each call publishes the next version and moves LATEST, as a build does (hot-swap tests).
    assert (first.name, second.name) == ("1", "2")
    assert open_artifacts(tmp_path).version == "2"


def test_open_artifacts_verifies_it(tmp_path):
    folder = write_tiny_artifacts(tmp_path, n_items=30, n_users=8, text_dim=8, cf_dim=4)
    artifacts = open_artifacts(tmp_path)
    assert artifacts.folder == folder
    assert artifacts.manifest["counts"]["items"] == 30 and artifacts.manifest["dims"] == {"text": 8, "cf": 4}
    (folder / "popular.npy").write_bytes(b"corrupt")
    with pytest.raises(ArtifactError, match="popular.npy"):
        open_artifacts(tmp_path)


def test_seeded(tmp_path):
    a = open_artifacts(write_tiny_artifacts(tmp_path / "a", seed=3))
    b = open_artifacts(write_tiny_artifacts(tmp_path / "b", seed=3))
    assert a.manifest["files"] == b.manifest["files"]   # same checksums: byte-identical files
    c = open_artifacts(write_tiny_artifacts(tmp_path / "c", seed=4))
    assert not np.array_equal(a.npy("item_text.npy"), c.npy("item_text.npy"))
    assert np.allclose(np.linalg.norm(a.npy("item_text.npy"), axis=1), 1.0, atol=1e-5)


def test_load_retriever_retrieves(tiny_artifacts):
    from offline.serving.seq_encoder import in_process_encoder
    retriever = load_retriever(tiny_artifacts, seq_encoder=in_process_encoder(tiny_artifacts))
    n = tiny_artifacts.manifest["counts"]["items"]
    assert retriever.index_sizes == {"text": n, "cf": n}
    assert retriever.quotas == tiny_artifacts.manifest["retrieval"]["quotas"]
    history, exclude = np.array([1, 2, 3]), np.array([4, 5])
    # A user with a trained CF vector, and one the cf channel folds in from the history.
    for user in (user_id(0), user_id(tiny_artifacts.manifest["counts"]["users"] - 1)):
        result = retriever.retrieve(user, history, exclude, 20)
        items = result.candidates.items
        assert len(items) == 20 and len(set(items.tolist())) == 20
        assert not set(items.tolist()) & {1, 2, 3, 4, 5}
        assert result.failed == [] and result.skipped == []
        assert set(result.candidates.columns) == {"bert", "cf", "popular", "item2item", "sequential"}


def test_ranker_loads_and_ranks(tiny_artifacts):
    ranker = Ranker(tiny_artifacts, FakeScorer())
    candidates = np.arange(10, 40, dtype=np.int64)
    columns = {"bert": (np.ones(30, np.float32), np.arange(1, 31, dtype=np.int32))}
    ranked = asyncio.run(ranker.rank(np.array([1, 2]), candidates, columns, 5, 1.0))
    assert len(ranked.items) == 5 and set(ranked.items.tolist()) <= set(candidates.tolist())
    assert not ranked.degraded_reasons
    down = Ranker(tiny_artifacts, FakeScorer(fail=unavailable()))
    fallback = asyncio.run(down.rank(np.array([1, 2]), candidates, columns, 5, 1.0))
    assert fallback.items.tolist() == candidates[:5].tolist() and fallback.degraded_reasons


def test_serving_state_loads(tiny_artifacts):
    state = ServingState.load(tiny_artifacts)
    m = tiny_artifacts.manifest
    assert state.version == tiny_artifacts.version
    assert state.encoder_version == str(m["models"][TEXT_ENCODER_NAME])
    assert state.catalog.n_artifact_items == m["counts"]["items"]
    assert state.catalog.index[item_id(7)] == 7
    assert sorted(state.catalog.popular.tolist()) == list(range(m["counts"]["items"]))
    users = state.base_history.users()
    assert len(users) == m["counts"]["users"] and users[0] == user_id(0)
    history = state.base_history.history(user_id(0))
    assert 3 <= len(history) <= 10 and history.max() < m["counts"]["items"]
