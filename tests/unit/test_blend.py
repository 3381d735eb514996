"""Score fusion (core.blend) and the build's choice of it (offline.blend.choose_blend)."""
from __future__ import annotations

import numpy as np
import pytest

from core.blend import Blend, BlendError
from core.features import CHANNELS, RETRIEVAL_FEATURES, retrieval_features
from offline.blend import choose_blend
from offline.ranker import RankingList

N = 40


def _features(channel_order: np.ndarray) -> np.ndarray:
    """The item2item channel ranks candidates in `channel_order` (its first 30 only: the rest it did not propose)."""
    ranks = np.zeros(N, np.int32)
    ranks[channel_order[:30]] = np.arange(1, 31)
    scores = np.where(ranks > 0, 1.0 / np.maximum(ranks, 1), 0.0).astype(np.float32)
    return retrieval_features({"item2item": (scores, ranks)}, N)


def test_no_blend_and_alpha_one_serve_the_fused_logits_unchanged():
    fused = np.random.default_rng(0).normal(size=N).astype(np.float32)
    features = _features(np.arange(N))
    assert np.array_equal(Blend().apply(fused, features), fused)
    assert np.array_equal(Blend("item2item", 1.0).apply(fused, features), fused)
    assert Blend.from_manifest({}) == Blend() and not Blend.from_manifest({"blend": None}).active


def test_alpha_zero_serves_the_channel_order_and_the_fused_order_breaks_its_ties():
    rng = np.random.default_rng(1)
    fused = rng.normal(size=N).astype(np.float32)
    channel_order = rng.permutation(N)
    served = Blend("item2item", 0.0).apply(fused, _features(channel_order))
    order = np.argsort(-served, kind="stable")
    assert np.array_equal(order[:30], channel_order[:30])
    rest = channel_order[30:]                       # not proposed by the channel: by fused score
    assert np.array_equal(order[30:], rest[np.argsort(-fused[rest], kind="stable")])


def test_a_half_blend_sits_between_the_two_orders():
    fused = np.linspace(1, -1, N).astype(np.float32)          # fused order 0, 1, 2, ...
    channel_order = np.arange(N)[::-1]                          # the channel's: the reverse
    served = Blend("item2item", 0.5).apply(fused, _features(channel_order))
    column = RETRIEVAL_FEATURES.index("item2item_rank_inv")
    by_fused = 1.0 / np.log2(np.arange(1, N + 1) + 1.0)
    expected = 0.5 * by_fused + 0.5 * _features(channel_order)[:, column] + 1e-4 * by_fused
    np.testing.assert_allclose(served, expected, rtol=1e-6)


@pytest.mark.parametrize("section, field", [({"channel": "knn", "alpha": 0.5}, "channel"),
                                            ({"channel": "cf", "alpha": 1.5}, "alpha"),
                                            ({"channel": "cf", "alpha": "x"}, "alpha")])
def test_a_bad_manifest_blend_is_refused_naming_the_field(section, field):
    with pytest.raises(BlendError, match=f"blend.{field}"):
        Blend.from_manifest({"blend": section})


def _lists(fused_is_right: bool, n_lists: int = 30, seed: int = 0):
    """The item2item channel ranks the relevant items first; the fused scores are either right too or noise."""
    rng = np.random.default_rng(seed)
    lists, fused = [], []
    for _ in range(n_lists):
        labels = np.zeros(N, np.float32)
        relevant = rng.choice(N, 3, replace=False)
        labels[relevant] = 1.0
        channel_order = np.r_[relevant, rng.permutation(np.setdiff1d(np.arange(N), relevant))]
        lists.append(RankingList(np.zeros(0, np.int64), np.arange(N, dtype=np.int64), _features(channel_order), labels))
        fused.append((labels + 0.01 * rng.random(N) if fused_is_right else rng.normal(size=N)).astype(np.float32))
    return lists, fused


def test_the_build_blends_in_the_channel_that_finds_what_the_fused_ranker_misses():
    lists, fused = _lists(fused_is_right=False)
    blend, rows = choose_blend(lists, fused)
    assert blend.channel == "item2item" and blend.alpha < 1.0
    assert rows[0]["channel"] is None and rows[0]["alpha"] == 1.0
    best = max(r["ndcg@10"] for r in rows)
    assert best == pytest.approx(1.0) and best > rows[0]["ndcg@10"]
    # Only channels that ranked something are tried.
    assert {r["channel"] for r in rows[1:]} == {"item2item"} and "item2item" in CHANNELS


def test_the_build_keeps_the_fused_order_when_it_is_already_right():
    lists, fused = _lists(fused_is_right=True)
    blend, rows = choose_blend(lists, fused)
    assert not blend.active and rows[0]["ndcg@10"] == pytest.approx(1.0)


def test_the_ranking_service_serves_the_manifest_blend(tmp_path):
    """Trees off, weight 0: without a blend the slate is the fused order (FakeScorer: lower index
    first); with the channel's whole share it is the channel's order; a bad section refuses the set."""
    import asyncio

    from common.artifacts import ArtifactError, open_artifacts
    from ranking.ranker import Ranker
    from tests.tiny_artifacts import FakeScorer, write_tiny_artifacts
    items = np.arange(30, dtype=np.int64)
    ranks = np.arange(30, 0, -1).astype(np.int32)               # item2item ranks item 29 first
    columns = {"item2item": ((1.0 / ranks).astype(np.float32), ranks)}

    popularity = {}

    def slate(blend):
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        artifacts = open_artifacts(write_tiny_artifacts(root, diversity_weight=0.0, rerank_trees=False, blend=blend))
        popularity["tiny"] = artifacts.npy("item_side.npy")[:, 0]
        ranker = Ranker(artifacts, FakeScorer())
        return asyncio.run(ranker.rank(np.array([40], np.int64), items, columns, 5, 1.0)).items.tolist()

    assert slate(None) == [0, 1, 2, 3, 4]
    served = slate({"channel": "item2item", "alpha": 0.0})
    # The channel's order (29 first), untrained items of the tiny set by their fused rank (FakeScorer: -j/1000).
    from core.blend import untrained
    cold = untrained(items, popularity["tiny"])
    expected = np.argsort(-Blend("item2item", 0.0).apply(-items / 1000.0, retrieval_features(columns, 30), cold),
                          kind="stable")[:5]
    assert served == expected.tolist() and served[0] == 29
    with pytest.raises(ArtifactError, match="blend.alpha"):
        slate({"channel": "item2item", "alpha": 2.0})


def test_an_item_without_training_interactions_is_judged_by_the_fused_rank_alone():
    """alpha 0 serves the channel's order, but an untrained item (an online one, or popularity 0)
    cannot have a behaviour rank: the fused rank stands in for it instead of sinking it."""
    from core.blend import untrained
    fused = np.linspace(0, 1, N).astype(np.float32)        # item 39 is the fused ranker's best
    features = _features(np.arange(N))                      # the channel ranks items 0..29
    popularity = np.ones(N - 1, np.float32)
    popularity[5] = 0.0                                     # item 5: no training interaction
    items = np.arange(N, dtype=np.int64)                    # item 39: past the table, an online item
    cold = untrained(items, popularity)
    assert cold.tolist() == [j in (5, 39) for j in range(N)]
    order = np.argsort(-Blend("item2item", 0.0).apply(fused, features, cold), kind="stable")
    assert order[0] == 39                                   # fused rank 1 stands in for its channel rank
    sunk = np.argsort(-Blend("item2item", 0.0).apply(fused, features), kind="stable")
    assert sunk.tolist().index(39) >= 30                    # without the mask: below every channel item
