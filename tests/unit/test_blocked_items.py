"""Deleted items as a precomputed FAISS filter (core/blocked_items.py, core.channels.search):
checked against exact search on seeded data, for every index kind the build writes."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from core.blocked_items import NOTHING_BLOCKED, BlockedItems
from core.channels import PopularChannel, search, selector_params
from core.types import ChannelResult, RetrievalQuery

N, D, K = 3000, 16, 50


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def index_of(kind: str, vectors: np.ndarray) -> faiss.Index:
    if kind == "flat":
        inner = faiss.IndexFlatIP(D)
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(D, 32, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efSearch = 400
    else:
        inner = faiss.IndexIVFFlat(faiss.IndexFlatIP(D), D, 16, faiss.METRIC_INNER_PRODUCT)
        inner.train(vectors)
        inner.nprobe = 16   # all lists: exact; a selector's params must keep it (faiss defaults to 1)
    index = faiss.IndexIDMap2(inner)
    index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    return index


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_search_skips_blocked_items_like_exact_search_over_the_kept_ones(kind):
    rng = np.random.default_rng(0)
    vectors = unit_rows(rng, N)
    index = index_of(kind, vectors)
    mask = rng.random(N) < 0.5
    blocked = BlockedItems(mask)
    for q in unit_rows(rng, 5):
        got = search(index, q, K, blocked=blocked, params=selector_params(index, blocked.selector))
        scores = vectors @ q
        scores[mask] = -np.inf
        exact = np.argsort(-scores, kind="stable")[:K]
        assert len(got) == K and not mask[got.items].any()
        assert len(set(got.items.tolist()) & set(exact.tolist())) >= (K if kind != "hnsw" else K - 3)


def test_selector_params_keep_the_index_search_parameters():
    rng = np.random.default_rng(1)
    vectors = unit_rows(rng, 500)
    selector = BlockedItems(np.ones(3, bool)).selector
    hnsw, ivf = index_of("hnsw", vectors), index_of("ivf", vectors)
    assert selector_params(hnsw, selector).efSearch == 400
    assert selector_params(ivf, selector).nprobe == 16
    assert type(selector_params(index_of("flat", vectors), selector)) is faiss.SearchParameters


def test_ids_past_the_mask_are_kept_and_replaced_ids_stay_blocked():
    """Online items newer than the mask are searchable; an IndexIDMap2 remove/re-add (online
    vector replaced) reorders internal ids, and the selector still works on the external ids."""
    rng = np.random.default_rng(2)
    vectors = unit_rows(rng, 200)
    index = index_of("flat", vectors)
    index.remove_ids(np.array([7], np.int64))
    index.add_with_ids(vectors[[7]], np.array([7], np.int64))
    index.add_with_ids(vectors[[3]], np.array([5000], np.int64))   # an online item far past the mask
    mask = np.zeros(200, bool)
    mask[[3, 7]] = True
    got = search(index, vectors[3], 5, blocked=BlockedItems(mask)).items.tolist()
    assert got[0] == 5000 and 3 not in got
    assert 7 not in search(index, vectors[7], 5, blocked=BlockedItems(mask)).items.tolist()
    assert search(index, vectors[7], 1).items.tolist() == [7]   # nothing blocked: a plain search


def test_an_index_that_refuses_selectors_falls_back_to_over_fetch_and_drop():
    class NoSelectors:
        """A stand-in for an index kind (some GPU builds) that refuses search parameters."""
        def __init__(self, index):
            self.inner, self.ntotal, self.asked = index, index.ntotal, []

        def search(self, x, k, params=None):
            if params is not None:
                raise RuntimeError("params not supported")
            self.asked.append(k)
            return self.inner.search(x, k)
    rng = np.random.default_rng(3)
    vectors = unit_rows(rng, 300)
    index = NoSelectors(index_of("flat", vectors))
    mask = np.zeros(300, bool)
    mask[:100] = True
    blocked = BlockedItems(mask)
    got = search(index, vectors[5], 20, blocked=blocked, params=faiss.SearchParameters(sel=blocked.selector))
    assert len(got) == 20 and got.items.min() >= 100 and index.asked == [120]


def test_popular_channel_masks_once_per_change():
    counts = np.arange(100, 0, -1)
    channel = PopularChannel(np.arange(100), counts)
    assert channel.retrieve(RetrievalQuery("u"), 5).items.tolist() == [0, 1, 2, 3, 4]
    mask = np.zeros(100, bool)
    mask[[0, 2]] = True
    channel.blocked = BlockedItems(mask)
    mask[:] = True   # the set copied its mask: a caller mutating its own changes nothing
    assert channel.retrieve(RetrievalQuery("u"), 5).items.tolist() == [1, 3, 4, 5, 6]
    channel.blocked = NOTHING_BLOCKED
    assert channel.retrieve(RetrievalQuery("u"), 3).items.tolist() == [0, 1, 2]


def test_hits_and_drop():
    blocked = BlockedItems(np.array([False, True, False, True]))
    assert blocked.hits(np.array([0, 1, 3, 9], np.int64)).tolist() == [False, True, True, False]
    kept = blocked.drop(ChannelResult(np.array([3, 0, 1, 2], np.int64), np.arange(4, dtype=np.float32)))
    assert kept.items.tolist() == [0, 2] and kept.scores.tolist() == [1.0, 3.0] and len(blocked) == 2
