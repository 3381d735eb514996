"""Item-to-item neighbours (offline/item_neighbours.py) against an exact dense computation, and
the item2item channel (core.channels.ItemToItemChannel) against brute force, on seeded data."""
from __future__ import annotations

import numpy as np
import pytest

from core.blocked_items import BlockedItems
from core.channels import ItemToItemChannel
from core.types import RetrievalQuery
from offline import item_neighbours as neighbours_module
from offline.item_neighbours import NeighbourConfig, item_neighbours, user_sequences_sorted

N_ITEMS, N_USERS = 40, 30


def seeded_interactions(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    users, items, stamps = [], [], []
    for u in range(N_USERS):
        n = int(rng.integers(2, 15))
        # Skewed items, with a few repeats, and ties in time (the input order breaks them).
        chosen = np.minimum(rng.zipf(1.3, n) - 1, N_ITEMS - 1)
        users += [u] * n
        items += chosen.tolist()
        stamps += np.sort(rng.integers(0, 8, n)).tolist()
    return np.array(users, np.int64), np.array(items, np.int64), np.array(stamps, np.int64)


def dense_weights(users, items, stamps, config: NeighbourConfig) -> np.ndarray:
    """The exact [n, n] weight matrix, by a plain loop over every user's sequence."""
    seq_u, seq_i = user_sequences_sorted(users, items, stamps)
    s = np.zeros((N_ITEMS, N_ITEMS))
    for u in np.unique(seq_u):
        seq = seq_i[seq_u == u]
        for p, a in enumerate(seq):
            for q, b in enumerate(seq):
                if a == b:
                    continue
                if config.window is None:
                    s[a, b] += 1
                elif 0 < abs(q - p) <= config.window:
                    w = 1.0 / abs(q - p) ** config.decay
                    s[a, b] += w if q > p else config.backward * w
    c = np.maximum(np.bincount(seq_i, minlength=N_ITEMS), 1).astype(np.float64)
    return s / (c[:, None] ** (1 - config.alpha) * c[None, :] ** config.alpha)


def dense_top(weights: np.ndarray, top_n: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((N_ITEMS, top_n), -1, np.int32)
    out = np.zeros((N_ITEMS, top_n), np.float32)
    for i in range(N_ITEMS):
        nz = np.flatnonzero(weights[i] > 0)
        order = nz[np.lexsort((nz, -weights[i, nz]))][:top_n]
        ids[i, :len(order)] = order
        out[i, :len(order)] = weights[i, order]
    return ids, out


@pytest.mark.parametrize("config", [
    NeighbourConfig(top_n=5, method="cooccurrence", window=None, alpha=0.5),
    NeighbourConfig(top_n=7, method="cooccurrence", window=3, backward=0.5, decay=0.3, alpha=0.4),
    NeighbourConfig(top_n=50, method="cooccurrence", window=1, backward=0.0, decay=1.0, alpha=0.5),
], ids=["cosine", "window3", "next-only"])
@pytest.mark.parametrize("max_pairs", [10**7, 7])   # one block, and many tiny blocks
def test_neighbours_equal_the_exact_dense_computation(config, max_pairs, monkeypatch):
    monkeypatch.setattr(neighbours_module, "MAX_PAIRS", max_pairs)
    users, items, stamps = seeded_interactions()
    got = item_neighbours(users, items, stamps, N_ITEMS, config)
    ids, weights = dense_top(dense_weights(users, items, stamps, config), config.top_n)
    np.testing.assert_allclose(got.weights, weights, rtol=1e-5, atol=1e-7)
    # Ids must match wherever the weights are not tied with a neighbour (ties: the lower id first).
    assert (got.ids == ids).mean() > 0.99 and np.array_equal(got.ids >= 0, ids >= 0)
    assert got.ids.dtype == np.int32 and got.weights.dtype == np.float32
    assert not (got.ids == np.arange(N_ITEMS)[:, None]).any()   # never an item's own neighbour


def test_window_keeps_order_direction():
    """a then b for everyone: b is a's best neighbour forward; backward=0 gives b no neighbour."""
    users = np.repeat(np.arange(5), 2)
    items = np.tile([3, 8], 5)
    stamps = np.tile([0, 1], 5)
    got = item_neighbours(users, items, stamps, 10, NeighbourConfig(top_n=3, method="cooccurrence", window=2,
                                                                    backward=0.0))
    assert got.ids[3, 0] == 8 and (got.ids[8] == -1).all()


@pytest.mark.parametrize("method", ["ease", "cooccurrence"])
def test_empty_interactions_give_no_neighbours(method):
    got = item_neighbours(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), 4,
                          NeighbourConfig(top_n=2, method=method))
    assert got.ids.shape == (4, 2) and (got.ids == -1).all() and got.filled == 0.0


def dense_sequential_ease(users, items, stamps, config: NeighbourConfig) -> np.ndarray:
    """The sequential EASE weights [n, n] by the textbook formula: a plain-loop Gram matrix over the
    interacted items, numpy's inverse, B = I - P diag(1/diag P); zero rows for other items."""
    seq_u, seq_i = user_sequences_sorted(users, items, stamps)
    kept = np.unique(seq_i)
    at = {int(i): j for j, i in enumerate(kept)}
    g = np.zeros((len(kept), len(kept)))
    for u in np.unique(seq_u):
        seq = [at[int(i)] for i in seq_i[seq_u == u]]
        for p, a in enumerate(seq):
            for q, b in enumerate(seq):
                if p == q:
                    g[a, a] += 1
                elif abs(p - q) <= config.window:
                    g[a, b] += config.ease_gamma ** abs(p - q)
    p_inv = np.linalg.inv(g + config.ease_lambda * np.eye(len(kept)))
    b = -p_inv / np.diag(p_inv)[None, :]
    np.fill_diagonal(b, 0.0)
    out = np.zeros((N_ITEMS, N_ITEMS))
    out[np.ix_(kept, kept)] = b
    return out


@pytest.mark.parametrize("max_pairs", [10**7, 5])   # one flush, and many
def test_sequential_ease_equals_the_textbook_formula(max_pairs, monkeypatch):
    monkeypatch.setattr(neighbours_module, "MAX_PAIRS", max_pairs)
    users, items, stamps = seeded_interactions(4)
    config = NeighbourConfig(top_n=6, window=3, ease_lambda=2.0, ease_gamma=0.8)
    got = item_neighbours(users, items, stamps, N_ITEMS, config)
    assert got.method == "ease"
    ids, weights = dense_top(dense_sequential_ease(users, items, stamps, config), config.top_n)
    np.testing.assert_allclose(got.weights, weights, rtol=1e-4, atol=1e-6)
    assert (got.ids == ids).mean() > 0.99 and np.array_equal(got.ids >= 0, ids >= 0)
    assert got.ids.dtype == np.int32 and got.weights.dtype == np.float32
    assert not (got.ids == np.arange(N_ITEMS)[:, None]).any()


def test_sequential_ease_falls_back_to_cooccurrence_above_its_item_limit():
    users, items, stamps = seeded_interactions(5)
    config = NeighbourConfig(top_n=5, ease_max_items=3)
    got = item_neighbours(users, items, stamps, N_ITEMS, config)
    plain = item_neighbours(users, items, stamps, N_ITEMS, NeighbourConfig(top_n=5, method="cooccurrence"))
    assert got.method == "cooccurrence"
    assert np.array_equal(got.ids, plain.ids) and np.array_equal(got.weights, plain.weights)


def test_sequential_ease_ranks_the_item_that_follows_first():
    """Users pick 1, 2, 3 in this order (plus noise): the newest item's best neighbour is what comes
    next in the sequences, and items far apart in a sequence relate less than neighbours."""
    rng = np.random.default_rng(6)
    users, items, stamps = [], [], []
    for u in range(60):
        seq = [int(x) for x in rng.choice(np.arange(10, N_ITEMS), 3, replace=False)]
        seq = seq[:1] + [1, 2, 3] + seq[1:] if u % 2 else [1, 2, 3] + seq
        users += [u] * len(seq)
        items += seq
        stamps += list(range(len(seq)))
    got = item_neighbours(np.array(users), np.array(items), np.array(stamps), N_ITEMS,
                          NeighbourConfig(top_n=5, window=4, ease_lambda=5.0))
    assert got.ids[1, 0] == 2 and got.ids[2, 0] in (1, 3)


def test_an_unknown_recipe_is_refused():
    with pytest.raises(ValueError, match="method"):
        item_neighbours(np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1), 4, NeighbourConfig(method="knn"))


def brute_force(channel: ItemToItemChannel, history: np.ndarray, n_items: int) -> np.ndarray:
    """Dense scores over the catalog: sum over recent items of recency weight x neighbour weight."""
    recent = history[-channel.history:]
    scores = np.zeros(n_items, np.float64)
    for age, h in enumerate(recent[::-1]):
        if h >= len(channel.ids):
            continue
        for j, w in zip(channel.ids[h], channel.weights[h]):
            if j >= 0:
                scores[j] += channel.decay ** age * w
    return scores


def test_channel_returns_the_exact_top_by_brute_force():
    users, items, stamps = seeded_interactions(1)
    nb = item_neighbours(users, items, stamps, N_ITEMS, NeighbourConfig(top_n=10, window=4))
    channel = ItemToItemChannel(nb.ids, nb.weights, history=6, decay=0.8)
    rng = np.random.default_rng(2)
    for _ in range(20):
        history = rng.choice(N_ITEMS + 3, size=int(rng.integers(1, 12)), replace=False).astype(np.int64)  # +3: online items
        got = channel.retrieve(RetrievalQuery("u", history), 15)
        scores = brute_force(channel, history, N_ITEMS)
        reached = np.flatnonzero(scores > 0)
        expected = reached[np.lexsort((reached, -scores[reached]))][:15]
        np.testing.assert_allclose(got.scores, scores[got.items], rtol=1e-5)
        assert np.allclose(np.sort(scores[got.items]), np.sort(scores[expected]), rtol=1e-5)
        assert len(got) == len(expected) and (got.scores[:-1] >= got.scores[1:]).all()


def test_channel_skips_blocked_items_and_empty_histories():
    users, items, stamps = seeded_interactions(3)
    nb = item_neighbours(users, items, stamps, N_ITEMS, NeighbourConfig(top_n=10))
    channel = ItemToItemChannel(nb.ids, nb.weights)
    history = np.array([0, 1, 2], np.int64)
    full = channel.retrieve(RetrievalQuery("u", history), 50)
    assert len(full) > 2
    mask = np.zeros(N_ITEMS, bool)
    mask[full.items[:2]] = True
    channel.blocked = BlockedItems(mask)
    assert np.array_equal(channel.retrieve(RetrievalQuery("u", history), 50).items, full.items[2:])
    assert len(channel.retrieve(RetrievalQuery("u"), 50)) == 0
    assert len(channel.retrieve(RetrievalQuery("u", np.array([N_ITEMS + 5], np.int64)), 50)) == 0


def test_retriever_loads_the_item2item_channel_from_the_tiny_set(tiny_artifacts):
    from common.components import load_retriever
    retriever = load_retriever(tiny_artifacts)
    assert "item2item" in retriever.generator.channels
    out = retriever.retrieve("user0000", np.array([1, 2, 3], np.int64), np.zeros(0, np.int64), total=30)
    assert "item2item" in out.candidates.columns and out.candidates.per_channel["item2item"] > 0
    assert not set(out.candidates.items.tolist()) & {1, 2, 3}


def test_a_neighbour_table_of_the_wrong_shape_is_refused(tiny_artifacts, tmp_path):
    import shutil

    from common.artifacts import ArtifactError, open_artifacts
    from common.components import load_retriever
    copy = tmp_path / "set"
    shutil.copytree(tiny_artifacts.folder, copy)
    with np.load(copy / "item_neighbours.npz") as z:
        ids, weights = z["ids"], z["weights"]
    np.savez(copy / "item_neighbours.npz", ids=ids[:-1], weights=weights[:-1])
    from common.artifacts import write_manifest
    write_manifest(copy, tiny_artifacts.manifest)
    with pytest.raises(ArtifactError, match="item_neighbours.npz"):
        load_retriever(open_artifacts(copy))
