"""FAISS index kinds, recall tuning, parameters through write/read and the retrieval load, GPU modes."""
from __future__ import annotations

import asyncio
import json

import faiss
import numpy as np
import pytest

import common.faiss_index as fi
from common.artifacts import open_artifacts, write_manifest
from common.config import RetrievalConfig, parse_config
from common.faiss_index import SEARCH_PARAM, index_info, inner_index, resolve_faiss_gpu, set_search_params
from tools import gpu_check
from tools.cli import main as fusionrec
from offline.index import build_index, choose_kind, ivf_nlist, recall_at_k, search_ladder, tune
from core.channels import search
from common.components import load_retriever

K = 100
TARGET = 0.95


def clustered(n: int, dim: int, seed: int, noise: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors [n, dim], tuning queries, held-out queries): unit vectors around 50 centers."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(50, dim)).astype(np.float32)
    x = centers[rng.integers(0, 50, n + 200)] + noise * rng.normal(size=(n + 200, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[:n], x[n:n + 100], x[n + 100:]


@pytest.fixture(scope="module")
def data():
    return clustered(4000, 64, seed=0, noise=1.0)


@pytest.fixture(scope="module")
def indexes(data):
    vectors, tune_q, _ = data
    return {"hnsw": build_index(vectors, exact_below=1000, queries=tune_q),
            "ivf": build_index(vectors, exact_below=1000, ivf_above=2000, queries=tune_q)}


def test_kind_by_catalog_size_and_device():
    kinds = {n: choose_kind(n, exact_below=100, ivf_above=1000) for n in (99, 100, 1000, 1001)}
    assert kinds == {99: "flat16", 100: "hnsw", 1000: "hnsw", 1001: "ivf"}
    # faiss has no GPU HNSW: with a GPU, IVF takes over right above the exact band.
    assert [choose_kind(n, gpu=True, exact_below=100, ivf_above=1000) for n in (99, 100)] == ["flat", "ivf"]
    assert choose_kind(49_999) == "flat16" and choose_kind(50_000) == "hnsw" and choose_kind(1_000_001) == "ivf"


@pytest.mark.parametrize("thresholds, kind, inner", [
    ({"exact_below": 1000}, "flat16", faiss.IndexScalarQuantizer),
    ({"exact_below": 100}, "hnsw", faiss.IndexHNSWFlat),
    ({"exact_below": 100, "ivf_above": 500}, "ivf", faiss.IndexIVFScalarQuantizer)])
def test_each_band_builds_its_kind_with_row_ids(thresholds, kind, inner):
    vectors, queries, _ = clustered(600, 16, seed=1)
    index = build_index(vectors, **thresholds, queries=queries)
    assert index_info(index).kind == kind and isinstance(inner_index(index), inner)
    _, ids = index.search(vectors[[5, 77, 599]], 1)
    assert ids.ravel().tolist() == [5, 77, 599]   # ids are the row numbers


def test_flat16_is_exhaustive_search_over_float16_rows():
    """The CPU's exact kind keeps its rows as float16 (half the bytes a query reads): every score
    is the float32 one to within float16 rounding, and the top 300 are the exact top 300 but for
    near-ties at the cut."""
    vectors, queries, _ = clustered(3000, 64, seed=2)
    index = build_index(vectors, queries=queries)
    assert index_info(index).kind == "flat16" and index_info(build_index(vectors, gpu=False)).kind == "flat16"
    scores, ids = index.search(queries, 300)
    exact = np.take_along_axis(queries @ vectors.T, ids, axis=1)
    np.testing.assert_allclose(scores, exact, atol=2e-3)
    assert recall_at_k(index, vectors, queries, 300) >= 0.99


def test_nlist_and_ladders():
    assert ivf_nlist(1_000_000) == 2000 and ivf_nlist(10**10) == 65_536
    assert ivf_nlist(3000) == 3000 // 39      # enough k-means points per list
    assert min(search_ladder("hnsw", 100)) == 100 and max(search_ladder("hnsw", 10)) == 1024
    assert search_ladder("ivf", 100, nlist=50)[-1] == 50 and search_ladder("flat", 100) == search_ladder("flat16", 100) == []


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_recall_target_met(kind, data, indexes):
    vectors, tune_q, held_out = data
    index = indexes[kind]
    assert index_info(index).kind == kind
    assert recall_at_k(index, vectors, tune_q, K) >= TARGET
    assert recall_at_k(index, vectors, held_out, K) >= TARGET - 0.02   # queries it was not tuned on


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_tuning_picks_the_smallest_ladder_value_reaching_the_target(kind, data, indexes):
    vectors, tune_q, _ = data
    index, param = indexes[kind], SEARCH_PARAM[kind]
    ladder = search_ladder(kind, K, index_info(index).build.get("nlist", 0))
    sweep = {}
    for value in ladder:
        set_search_params(index, {param: value})
        sweep[value] = recall_at_k(index, vectors, tune_q, K)
    picks = []
    for target in (0.99, 0.999, 1.01):
        reached = tune(index, vectors, tune_q, K, target)
        chosen = index_info(index).search[param]
        expected = next((v for v in ladder if sweep[v] >= target), ladder[-1])
        assert chosen == expected and reached == pytest.approx(sweep[chosen]), (target, sweep)
        picks.append(ladder.index(chosen))
    assert picks[1] > 0, sweep                    # the cheapest value missed 0.999: a real choice
    assert picks[-1] == len(ladder) - 1          # unreachable target: the largest value
    tune(index, vectors, tune_q, K, TARGET)      # leave the shared index as built


def _artifact_set(folder, text_index, cf_index, text, cf_items, cf_users):
    """A minimal artifact set the Retriever loads, with the manifest the build writes."""
    folder.mkdir()
    np.save(folder / "item_text.npy", text)
    np.save(folder / "item_cf.npy", cf_items)
    np.save(folder / "user_cf.npy", cf_users)
    np.save(folder / "cf_gram.npy", cf_items.T @ cf_items)
    np.save(folder / "item_counts.npy", np.ones(len(text), np.int64))
    np.save(folder / "popular.npy", np.arange(len(text), dtype=np.int64))
    (folder / "cf_users.json").write_text(json.dumps([f"u{i}" for i in range(len(cf_users))]))
    # The item log names items by id: the retriever maps them through the catalog.
    (folder / "catalog.json").write_text(json.dumps({"item_ids": [f"i{j}" for j in range(len(text))]}))
    np.savez(folder / "item_neighbours.npz", ids=np.full((len(text), 1), -1, np.int32),
             weights=np.zeros((len(text), 1), np.float32))   # no item2item neighbours
    indexes = {}
    for name, index in (("text", text_index), ("cf", cf_index)):
        faiss.write_index(index, str(folder / f"index_{name}.faiss"))
        indexes[name] = {"kind": index_info(index).kind, "search": index_info(index).search}
    write_manifest(folder, {"version": 1, "counts": {"items": len(text), "cf_users": len(cf_users)},
                            "dims": {"text": text.shape[1], "cf": cf_items.shape[1]},
                            "cf": {"alpha": 1.0, "regularization": 0.1}, "indexes": indexes,
                            "item2item": {"top_n": 1}})
    return open_artifacts(folder)


def test_tuned_params_survive_write_read_and_the_retrieval_load(tmp_path):
    text, text_q, _ = clustered(2000, 32, seed=2)
    cf_items, cf_q, _ = clustered(2000, 16, seed=3)
    text_index = build_index(text, exact_below=100, ivf_above=1000, queries=text_q)   # IVF
    cf_index = build_index(cf_items, exact_below=100, queries=cf_q)                   # HNSW
    built = {"text": index_info(text_index), "cf": index_info(cf_index)}
    assert built["text"].search["nprobe"] > 1 and built["cf"].search["efSearch"] >= K

    artifacts = _artifact_set(tmp_path / "set", text_index, cf_index, text, cf_items, cf_q[:50])
    read_back = {name: index_info(faiss.read_index(str(artifacts.path(f"index_{name}.faiss")))) for name in built}
    assert read_back == built   # faiss stores efSearch / nprobe in the file
    retriever = load_retriever(artifacts, gpu=resolve_faiss_gpu("off"))
    assert index_info(retriever.bert.index) == built["text"] and index_info(retriever.cf.index) == built["cf"]
    out = retriever.retrieve("u3", np.array([1, 2, 3], np.int64), np.zeros(0, np.int64), total=50)
    assert out.candidates.per_channel["bert"] > 0 and out.candidates.per_channel["cf"] > 0

    # The manifest is what retrieval applies, not just what the file happens to hold.
    manifest = dict(artifacts.manifest, indexes={"text": {"search": {"nprobe": 3}}, "cf": {"search": {"efSearch": 300}}})
    write_manifest(artifacts.folder, manifest)
    retriever = load_retriever(open_artifacts(artifacts.folder))
    assert inner_index(retriever.bert.index).nprobe == 3
    assert inner_index(retriever.cf.index).hnsw.efSearch == 300

    # Online update on IVF (ids stored by IVF itself): item 5 takes item 7's vector, once.
    retriever.bert.add(np.array([5], np.int64), text[[7]])
    _, ids = retriever.bert.index.search(text[[7]], 3)
    assert set(ids[0, :2].tolist()) == {5, 7} and ids[0].tolist().count(5) == 1


def test_search_never_asks_for_more_than_max_k():
    vectors, _, _ = clustered(200, 16, seed=4)
    index = build_index(vectors)
    assert len(search(index, vectors[0], 50).items) == 50
    assert len(search(index, vectors[0], 50, max_k=20).items) == 20   # a GPU index refuses more than max_k


def test_faiss_gpu_modes(monkeypatch):
    assert resolve_faiss_gpu("auto") == (fi.gpu_count() > 0) and resolve_faiss_gpu("off") is False
    monkeypatch.setattr(fi, "gpu_count", lambda: 0)
    with pytest.raises(RuntimeError, match="faiss_gpu=on but no GPU is visible to faiss"):
        resolve_faiss_gpu("on")
    assert resolve_faiss_gpu("auto") is False
    with pytest.raises(ValueError, match="auto|on|off"):
        resolve_faiss_gpu("yes")
    monkeypatch.setattr(fi, "gpu_count", lambda: 1)
    assert resolve_faiss_gpu("on") is True and resolve_faiss_gpu("auto") is True and resolve_faiss_gpu("off") is False


def test_faiss_gpu_setting(monkeypatch):
    assert parse_config(RetrievalConfig, ["--port", "1"]).faiss_gpu == "auto"
    assert parse_config(RetrievalConfig, ["--port", "1", "--faiss-gpu", "off"]).faiss_gpu == "off"
    monkeypatch.setenv("FUSIONREC_FAISS_GPU", "on")
    assert parse_config(RetrievalConfig, ["--port", "1"]).faiss_gpu == "on"
    for argv in (["--port", "1", "--faiss-gpu", "sometimes"], ["--port", "1"]):
        monkeypatch.setenv("FUSIONREC_FAISS_GPU", "maybe")
        with pytest.raises(SystemExit):
            parse_config(RetrievalConfig, argv)


def test_retrieval_with_faiss_gpu_on_fails_at_start_without_a_gpu(monkeypatch, tmp_path):
    from retrieval import server
    monkeypatch.setattr(fi, "gpu_count", lambda: 0)
    config = RetrievalConfig(port=1, artifacts=tmp_path / "none", faiss_gpu="on", insecure_dev=True)
    with pytest.raises(RuntimeError, match="no GPU is visible"):   # before any artifact is read
        asyncio.run(server.run(config))


def test_gpu_check_script(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "gpu_count", lambda: 0)
    assert fusionrec(["gpu-check"]) == gpu_check.NO_GPU == 2
    assert "no GPU visible to faiss" in capsys.readouterr().err
    # Its CPU half runs here: rows for both kinds, and the checks pass / fail as they should.
    vectors, tune_q, eval_q = clustered(3000, 32, seed=5)
    rows = [gpu_check.run_one(kind, False, vectors, tune_q, eval_q, K, TARGET, 0) for kind in ("flat", "ivf")]
    assert [(r["kind"], r["device"]) for r in rows] == [("flat16", "cpu"), ("ivf", "cpu")]
    assert rows[0]["recall"] >= 0.99 and "nprobe" in rows[1]["search"]
    assert gpu_check.failures(rows, TARGET) == []
    assert gpu_check.failures([dict(rows[1], recall=0.5)], TARGET) == ["ivf on cpu: recall 0.5000 < 0.9300"]


@pytest.mark.parametrize("n, kind", [(3000, "flat16"), (8000, "hnsw"), (20_000, "ivf")])
def test_kind_chosen_by_size_meets_the_recall_bound_on_a_latent_catalog(n, kind):
    """The bench-scale measure, small: the kind build_index picks for the size (thresholds scaled
    down), tuned as the build tunes it (item-vector queries, k=100), recalls >= 0.95 of the exact
    top 300 for history-mean queries it never saw (what the BERT channel searches with)."""
    from offline.datasets.latent import LatentSpec, generate
    cat = generate(LatentSpec(n_items=n, n_users=120, seed=7))
    vectors = cat.vectors
    rng = np.random.default_rng(0)
    # (Much smaller catalogs make the top 300 a large share of the items, a harder case than at scale.)
    index = build_index(vectors, exact_below=5000, ivf_above=10_000,
                        queries=vectors[rng.choice(n, 100, replace=False)], k=K)
    assert index_info(index).kind == kind
    queries = np.stack([vectors[cat.items[cat.users == u][-50:]].mean(0) for u in range(120)])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    assert recall_at_k(index, vectors, queries, 300) >= TARGET


def test_an_index_over_a_subset_of_rows_returns_their_row_numbers_and_measures_recall_over_them():
    """The CF index holds only items with training interactions: ids are the kept row numbers, the
    recall is measured against exact search over the same rows, and the kind follows their count."""
    vectors, queries, _ = clustered(3000, 32, seed=3)
    kept = np.sort(np.random.default_rng(3).choice(3000, 1200, replace=False))
    for thresholds, kind in (({}, "flat16"), ({"exact_below": 100, "ivf_above": 500}, "ivf")):
        index = build_index(vectors, queries=queries, ids=kept, **thresholds)
        assert index.ntotal == len(kept) and index_info(index).kind == kind
        found = index.search(queries, 20)[1]
        assert set(found.ravel().tolist()) <= set(kept.tolist())
        assert recall_at_k(index, vectors, queries, 20, kept) >= TARGET
        # Against every row, the subset cannot hold what the dropped rows would have been.
        assert recall_at_k(index, vectors, queries, 20) < 0.6
    with pytest.raises(ValueError, match="ids"):
        build_index(vectors, ids=np.array([5, 3]))
