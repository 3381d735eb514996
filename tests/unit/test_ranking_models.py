import lightgbm as lgb
import numpy as np
import torch

from tritonclient.grpc import model_config_pb2 as mc

from core.features import RERANK_FEATURES, RETRIEVAL_FEATURES

F = len(RETRIEVAL_FEATURES)   # retrieval features per candidate
from core.rerank import DiversityReranker
from offline.serving.export import load_ranker
from offline.serving.triton_config import fused_ranker_config


def test_exported_torchscript_equals_eager(built, artifacts):
    m = artifacts.manifest
    assert m["quality"]["torchscript_max_abs_diff"] < 1e-5
    scripted = load_ranker(built[1], m["version"])
    history = torch.tensor([1, 2, 3])
    candidates = torch.arange(100, 160)
    features = torch.rand(60, F)
    no_text, no_cat = torch.zeros(0, 384), torch.zeros(0, dtype=torch.int64)
    with torch.inference_mode():
        scores = scripted(history, candidates, features, no_text, no_cat)
        empty = scripted(torch.zeros(0, dtype=torch.int64), candidates, features, no_text, no_cat)
        # Online items (indices past the table) go through the content-only path.
        n = scripted.item_text.shape[0]
        online = scripted(torch.tensor([1, n]), torch.tensor([n, n + 1, 5]), torch.rand(3, F),
                          torch.nn.functional.normalize(torch.rand(2, 384), dim=-1), torch.tensor([1, 2]))
    assert scores.shape == (60,) and torch.isfinite(scores).all()
    assert empty.shape == (60,) and torch.isfinite(empty).all()   # anonymous user, no history
    assert online.shape == (3,) and torch.isfinite(online).all()


def test_config_pbtxt_comes_from_the_feature_spec():
    config = fused_ranker_config()
    tensors = {t.name: t for t in [*config.input, *config.output]}
    for name in ("history", "candidates", "features", "scores"):
        assert name in tensors
    assert list(tensors["features"].dims) == [-1, F] and tensors["features"].allow_ragged_batch
    assert config.max_batch_size == 16 and config.HasField("dynamic_batching")
    extra = tensors["extra_text"]
    assert (extra.data_type, list(extra.dims), extra.optional, extra.allow_ragged_batch) == (
        mc.TYPE_FP32, [-1, -1], True, True)


def test_forward_batch_equals_one_user_at_a_time(built, artifacts):
    """Triton hands the model several users at once: the batched path must score each user exactly
    as the one-user path does (padding, history truncation, ALS fold-in, online items)."""
    scripted = load_ranker(built[1], artifacts.manifest["version"])
    n = int(scripted.item_text.shape[0])
    rng = np.random.default_rng(0)
    extra_text = torch.nn.functional.normalize(torch.rand(4, 384), dim=-1)
    extra_category = torch.tensor([1, 0, 2, 1])
    users = []
    for length in (0, 3, 80, 1, 50):   # 80 > MAX_HISTORY: only the last 50 count
        history = torch.from_numpy(rng.integers(0, n, length))
        if length == 3:
            history = torch.tensor([4, n + 1, 4])   # repeated item, an online item
        candidates = torch.from_numpy(rng.integers(0, n + 4, int(rng.integers(1, 40))))
        users.append((history, candidates, torch.rand(len(candidates), F)))
    with torch.inference_mode():
        single = [scripted(h, c, f, extra_text, extra_category) for h, c, f in users]
        batched = scripted.forward_batch(
            torch.cat([u[0] for u in users]), torch.tensor([len(u[0]) for u in users]),
            torch.cat([u[1] for u in users]), torch.tensor([len(u[1]) for u in users]),
            torch.cat([u[2] for u in users]), extra_text, extra_category)
    torch.testing.assert_close(batched, torch.cat(single), atol=1e-5, rtol=1e-5)
    h, c, f = users[2]
    with torch.inference_mode():
        torch.testing.assert_close(scripted(h[-50:], c, f, extra_text, extra_category), single[2])


def _reranker(weight: float) -> tuple[DiversityReranker, np.ndarray]:
    rng = np.random.default_rng(0)
    n = 200
    # Two tight clusters: items 0..99 nearly identical vectors, 100..199 another direction.
    base = np.zeros((n, 8), np.float32)
    base[:100, 0] = 1
    base[100:, 1] = 1
    vectors = base + 0.01 * rng.normal(size=(n, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    x = rng.normal(size=(500, len(RERANK_FEATURES))).astype(np.float32)
    y = (x[:, 0] > 0).astype(float)   # relevance follows the fused score
    booster = lgb.train({"objective": "lambdarank", "verbose": -1, "num_threads": 1, "min_data_in_leaf": 5},
                        lgb.Dataset(x, y, group=[50] * 10), num_boost_round=20)
    category = np.where(np.arange(n) < 100, 1, 2)
    side = np.zeros((n, 2), np.float32)
    return DiversityReranker(booster, vectors, category, side, weight), vectors


def test_slate_is_k_distinct_candidates():
    reranker, _ = _reranker(0.0)
    items = np.arange(200, dtype=np.int64)
    fused = np.linspace(1, 0, 200).astype(np.float32)
    slate, scores = reranker.rerank(items, fused, np.zeros((200, F), np.float32), 10)
    assert len(slate) == 10 == len(set(slate.tolist()))
    assert set(slate.tolist()) <= set(items.tolist())
    assert len(scores) == 10


def test_diversity_weight_mixes_clusters():
    items = np.arange(200, dtype=np.int64)
    # The fused model prefers cluster A (0..99) for its top 10; the pool (top 50) holds both.
    fused = np.r_[np.linspace(1, 0.5, 100), np.linspace(0.95, 0.45, 100)].astype(np.float32)
    plain, _ = _reranker(0.0)[0].rerank(items, fused, np.zeros((200, F), np.float32), 10)
    diverse, _ = _reranker(50.0)[0].rerank(items, fused, np.zeros((200, F), np.float32), 10)
    assert (plain >= 100).sum() < (diverse >= 100).sum()


def test_gather_equals_advanced_indexing_for_any_index_shape():
    import torch
    from offline.serving.fused_ranker import gather
    table = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    for index in (torch.tensor([3, 0, 9]), torch.tensor([[1, 2], [9, 9], [0, 5]]), torch.zeros(0, dtype=torch.int64)):
        assert torch.equal(gather(table, index), table[index])
    flat = torch.arange(10)
    assert torch.equal(gather(flat, torch.tensor([[4, 1]])), flat[torch.tensor([[4, 1]])])
