"""A tiny synthetic artifact set, written in well under a second, and the fakes that serve it in
process (a Scorer in place of Triton, a grpc.aio servicer context), for unit tests.

It has the files and manifest keys offline/build.py writes (tests/unit/test_tiny_artifacts.py
checks both against it), so open_artifacts, common.components.load_retriever,
ranking.ranker.Ranker and gateway.serving_state.ServingState load it as they load a real one.
The data is seeded noise: unit-row embeddings, flat FAISS indexes, a LightGBM booster trained
for a few rounds on random rows. There is no Triton model: tests score with FakeScorer (a
core.scoring.Scorer).
"""
from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import faiss
import grpc
import lightgbm as lgb
import numpy as np

from common.artifacts import next_version, publish, write_manifest
from common.faiss_index import index_info
from core.features import FUSED_RANKER_NAME, RERANK_FEATURES, SEQ_ENCODER_NAME, TEXT_ENCODER_NAME
from core.fresh import FRESH_CANDIDATES, FreshItems
from core.rerank import FUSED_COLUMN
from core.scoring import ScorerUnavailable

N_CATEGORIES = 4
HISTORY = (3, 10)           # history length range per user (inclusive)
CF_USER_SHARE = 0.75        # the rest of the users have no trained CF vector: the cf channel folds them in
CF_ALPHA, CF_REGULARIZATION = 10.0, 0.05
RERANK_GROUPS, RERANK_ROWS, RERANK_ROUNDS = 20, 30, 3
NEIGHBOURS = 8               # item2item neighbours per item (the build keeps ~100)
SEQ_DIM = 8                  # the sequential channel's vector size (the build's is 64)


def item_id(j: int) -> str:
    return f"item{j:04d}"


def user_id(j: int) -> str:
    return f"user{j:04d}"


def write_tiny_artifacts(root: Path, n_items: int = 60, n_users: int = 20, text_dim: int = 16,
                         cf_dim: int = 8, seed: int = 0, item_log_seq: int = 0, quotas: dict[str, int] | None = None,
                         diversity_weight: float = 0.1, rerank_trees: bool = True,
                         blend: dict | None = None, fresh: dict | None = None) -> Path:
    """Publish a new version under `root` (root/<v>/ and root/LATEST) and return its folder.

    Item j has id item_id(j), user j id user_id(j); users user_id(0..) up to CF_USER_SHARE have
    a trained CF vector. quotas default to a split that fits n_items (the build tunes them).
    diversity_weight / rerank_trees: the manifest's re-ranker choice (the build chooses it on validation);
    blend: its "blend" section (core.blend), no blend by default; fresh: its "fresh" section
    (core.fresh), by default a real build's candidates and no slots."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    version = next_version(root)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))

    item_text = _unit_rows(rng, n_items, text_dim)
    item_cf = _unit_rows(rng, n_items, cf_dim)
    users = [user_id(j) for j in range(n_users)]
    cf_users = users[:max(1, int(n_users * CF_USER_SHARE))]
    user_cf = _unit_rows(rng, len(cf_users), cf_dim)
    histories = [rng.choice(n_items, size=rng.integers(HISTORY[0], HISTORY[1] + 1), replace=False)
                 for _ in users]
    counts = np.bincount(np.concatenate(histories), minlength=n_items).astype(np.int64)
    popularity = (np.log1p(counts) / max(np.log1p(counts).max(), 1e-6)).astype(np.float32)
    categories = [f"category{c}" for c in range(N_CATEGORIES)]
    item_category = rng.integers(0, N_CATEGORIES + 1, size=n_items).astype(np.int64)   # 0 = unknown

    indexes = {}
    for name, vectors in (("text", item_text), ("cf", item_cf)):
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))   # the build's kind below 50k items
        index.add_with_ids(vectors, np.arange(n_items, dtype=np.int64))
        faiss.write_index(index, str(staging / f"index_{name}.faiss"))
        indexes[name] = {**asdict(index_info(index)), "recall@100": 1.0}

    _write_sequential(staging, rng, n_items, text_dim, indexes)

    np.save(staging / "item_text.npy", item_text)
    np.save(staging / "item_cf.npy", item_cf)
    np.save(staging / "user_cf.npy", user_cf)
    np.save(staging / "cf_gram.npy", (item_cf.T @ item_cf).astype(np.float32))
    np.save(staging / "item_counts.npy", counts)
    np.save(staging / "popular.npy", np.argsort(-counts, kind="stable").astype(np.int64))
    np.save(staging / "item_category.npy", item_category)
    np.save(staging / "item_side.npy", np.column_stack(
        [popularity, rng.random(n_items, dtype=np.float32)]).astype(np.float32))
    (staging / "cf_users.json").write_text(json.dumps(cf_users))
    (staging / "catalog.json").write_text(json.dumps({
        "item_ids": [item_id(j) for j in range(n_items)],
        "titles": [f"Tiny item {j}" for j in range(n_items)],
        "categories": [categories[c - 1] if c else "" for c in item_category.tolist()],
        "category_names": ["", *categories]}))
    np.savez(staging / "user_history.npz", users=np.array(users, dtype=str),
             offsets=np.r_[0, np.cumsum([len(h) for h in histories])].astype(np.int64),
             items=np.concatenate(histories).astype(np.int64))
    _train_booster(rng, seed).save_model(str(staging / "reranker.txt"))
    neighbour_ids, neighbour_weights = _neighbours(rng, n_items)
    np.savez(staging / "item_neighbours.npz", ids=neighbour_ids, weights=neighbour_weights)

    quotas = quotas or _default_quotas(n_items)
    write_manifest(staging, {
        "version": version, "dataset": "tiny", "data_spec": f"tiny:seed={seed}",
        "data_fingerprint": hashlib.sha256(f"tiny {n_items} {n_users} {seed}".encode()).hexdigest()[:16],
        "split": "none (synthetic)", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_options": {"max_items": n_items, "max_users": n_users, "epochs": 0, "seed": seed},
        "counts": {"items": n_items, "cf_users": len(cf_users), "users": n_users,
                   "interactions": int(counts.sum()), "categories": N_CATEGORIES},
        "dims": {"text": text_dim, "cf": cf_dim},
        "text_encoder": "tiny_random",
        "text_space": "encoder", "item_vectors": None,   # offline/build.py: vectors encoded, none brought
        "cf": {"alpha": CF_ALPHA, "regularization": CF_REGULARIZATION, "factors": cf_dim},
        "models": {FUSED_RANKER_NAME: str(version), "reranker": str(version), TEXT_ENCODER_NAME: "1",
                   SEQ_ENCODER_NAME: str(version)},
        "indexes": indexes,
        "item2item": {"top_n": NEIGHBOURS, "window": None, "filled": 1.0},
        "sequential": {"dim": SEQ_DIM, "steps": 0, "why": "tiny: untrained random vectors"},
        "ranker": {"lists": 0, "refit": False, "why": "tiny: no fused ranker"},
        "served_tables": {"fitted_on": "tiny: seeded noise"},
        "quality": {},
        "retrieval": {"quotas": quotas, "recall@300_valid": {}},
        "blend": blend if blend is not None else {"channel": None, "alpha": 1.0},
        "fresh": fresh if fresh is not None else FreshItems(FRESH_CANDIDATES, 0).describe(),
        "reranker": {"trees": rerank_trees, "diversity_weight": diversity_weight, "why": "tiny: fixed",
                     "ndcg_tolerance": 0.02, "lists": 0, "lists_source": "none", "fused_valid": {},
                     "sweep": [], "sweep_no_trees": []},
        "stages": [],
        "model_checksum": "",   # no Triton model is written
        "item_log_seq": item_log_seq,   # the item log folded into this set (services replay after it)
        "item_log_fold": {"added": 0, "updated": 0, "dropped": 0, "interactions_dropped": 0},
    })
    return publish(root, staging, version)


def _write_sequential(staging: Path, rng: np.random.Generator, n_items: int, text_dim: int, indexes: dict) -> None:
    """The sequential channel's files (offline/serving/seq_encoder.py names), untrained: random item
    vectors in a flat index, a random content projection, and a TorchScript encoder over them."""
    import torch
    from offline.serving.seq_encoder import (SEQ_ENCODER_WEIGHTS, SEQ_INDEX, SEQ_INDEX_NAME, SEQ_ITEM_VECTORS,
                                             SEQ_TEXT_BIAS, SEQ_TEXT_PROJ, SeqEncoder, script_encoder)
    item_seq = _unit_rows(rng, n_items, SEQ_DIM)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(SEQ_DIM))
    index.add_with_ids(item_seq, np.arange(n_items, dtype=np.int64))
    faiss.write_index(index, str(staging / SEQ_INDEX))
    indexes[SEQ_INDEX_NAME] = {**asdict(index_info(index)), "recall@100": 1.0}
    np.save(staging / SEQ_ITEM_VECTORS, item_seq)
    np.save(staging / SEQ_TEXT_PROJ, (rng.standard_normal((text_dim, SEQ_DIM)) / np.sqrt(text_dim)).astype(np.float32))
    np.save(staging / SEQ_TEXT_BIAS, np.zeros(SEQ_DIM, np.float32))
    torch.manual_seed(0)
    encoder = SeqEncoder(n_items, dim=SEQ_DIM, layers=1, heads=1, dropout=0.0)
    encoder.item_vectors.copy_(torch.from_numpy(item_seq))
    script_encoder(encoder, staging / SEQ_ENCODER_WEIGHTS)


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _default_quotas(n_items: int) -> dict[str, int]:
    third = max(1, n_items // 3)
    return {"bert": third, "cf": third, "popular": max(1, third // 2), "item2item": max(1, third // 2)}


def _neighbours(rng: np.random.Generator, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Random item2item neighbours: [n_items, NEIGHBOURS] int32 ids (never the item itself; the
    last slot of every other item empty, -1) and float32 weights, best first."""
    n = min(NEIGHBOURS, n_items - 1)
    ids = np.full((n_items, NEIGHBOURS), -1, np.int32)
    weights = np.zeros((n_items, NEIGHBOURS), np.float32)
    for j in range(n_items):
        others = rng.permutation(np.delete(np.arange(n_items), j))[:n]
        keep = n - (j % 2)
        ids[j, :keep] = others[:keep]
        weights[j, :keep] = np.sort(rng.random(keep, dtype=np.float32))[::-1]
    return ids, weights


def _train_booster(rng: np.random.Generator, seed: int) -> lgb.Booster:
    """A LambdaRank booster over the RERANK_FEATURES columns, boosted from the fused score like the
    real one (offline/reranker.py), trained for a few rounds on random rows."""
    rows = RERANK_GROUPS * RERANK_ROWS
    x = rng.random((rows, len(RERANK_FEATURES))).astype(np.float32)
    y = (rng.random(rows) < 0.2).astype(np.float32)
    data = lgb.Dataset(x, y, group=[RERANK_ROWS] * RERANK_GROUPS, init_score=x[:, FUSED_COLUMN],
                       feature_name=list(RERANK_FEATURES))
    params = {"objective": "lambdarank", "num_leaves": 4, "min_data_in_leaf": 5, "num_threads": 1,
              "seed": seed, "deterministic": True, "verbose": -1}
    return lgb.train(params, data, num_boost_round=RERANK_ROUNDS)


class FakeScorer:
    """core.scoring.Scorer without Triton: item j scores -j / 1000 (lower indices first), or every
    call raises `fail` (e.g. ScorerUnavailable) when set. Records the calls it got."""

    def __init__(self, model_version: str = "1", fail: Exception | None = None) -> None:
        self.model_version = model_version
        self.fail = fail
        self.calls: list[dict[str, np.ndarray | None]] = []

    async def score(self, history: np.ndarray, candidates: np.ndarray, features: np.ndarray,
                    timeout_s: float, extra_text: np.ndarray | None = None,
                    extra_category: np.ndarray | None = None) -> np.ndarray:
        self.calls.append({"history": history, "candidates": candidates, "features": features,
                           "extra_text": extra_text, "extra_category": extra_category})
        if self.fail is not None:
            raise self.fail
        return (-np.asarray(candidates, np.float32) / 1000.0).astype(np.float32)


def unavailable(reason: str = "triton_unavailable") -> ScorerUnavailable:
    return ScorerUnavailable(reason, "fake scorer: down")


class FakeServicerContext:
    """The part of grpc.aio.ServicerContext the servicers use: abort records the status and raises
    grpc.aio.AbortError, as the real one does."""

    def __init__(self, time_remaining_s: float | None = None) -> None:
        self._code: grpc.StatusCode | None = None
        self.details = ""
        self._time_remaining = time_remaining_s

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()) -> None:
        self._code, self.details = code, details
        raise grpc.aio.AbortError(f"{code.name}: {details}")

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def time_remaining(self) -> float | None:
        return self._time_remaining


def ranking_servicer(artifacts, scorer: "FakeScorer", item_log):
    """-> (RankingServicer, Ranker): a ranking replica whose only version followed `item_log`
    before it was offered (as ranking/server.py does at start)."""
    import asyncio

    from common.followed_versions import offer_followed
    from common.item_follower import ItemLogFollower
    from common.versions import VersionSet
    from ranking.ranker import Ranker
    from ranking.server import RankingServicer
    ranker = Ranker(artifacts, scorer)
    versions: VersionSet[Ranker] = VersionSet()
    follower = ItemLogFollower(item_log)
    asyncio.run(offer_followed(versions, follower, ranker.version, ranker, ranker.apply, ranker.overlay.folded_seq))
    return RankingServicer(versions, follower, 0.5), ranker
