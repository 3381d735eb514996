"""Retrieval channels: each turns a query into a ranked list of item indices.

A channel is one class with a `name` and `retrieve(query, fetch) -> ChannelResult`: its best
`fetch` items, before filtering. The candidate generator asks for enough to survive the filters
(seen, excluded) and still fill the channel's quota. Deleted items are each channel's own
`blocked` set (core/blocked_items.py, set by the Retriever when the item log changes): the FAISS
channels skip them inside the search and popular masks them, so they cost no over-fetch. Adding a
channel is one class here, its build stage in offline/, and a line in common/components.py.
"""
from __future__ import annotations

from typing import Callable, Protocol

import faiss
import numpy as np

from core.blocked_items import NOTHING_BLOCKED, BlockedItems
from core.channel_names import ChannelName
from core.foldin import fold_in
from core.item_overlay import ItemOverlay
from core.item_sets import sum_by_item, top_by_score
from core.limits import BERT_HISTORY, ITEM2ITEM_DECAY, ITEM2ITEM_HISTORY
from core.types import EMPTY, ChannelResult, RetrievalQuery


class Channel(Protocol):
    name: str

    def retrieve(self, query: RetrievalQuery, fetch: int) -> ChannelResult: ...


def selector_params(index: faiss.Index, selector: faiss.IDSelector) -> faiss.SearchParameters:
    """Search parameters that filter by `selector` and keep the index's own efSearch / nprobe
    (a bare SearchParametersIVF would search with nprobe 1; IndexIVF refuses plain SearchParameters)."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexIDMap):   # IndexIDMap(2) translates the selector to external ids
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=int(inner.hnsw.efSearch))
    if isinstance(inner, faiss.IndexIVF):
        return faiss.SearchParametersIVF(sel=selector, nprobe=int(inner.nprobe))
    return faiss.SearchParameters(sel=selector)


def search(index: faiss.Index, query: np.ndarray, fetch: int, max_k: int | None = None,
           blocked: BlockedItems = NOTHING_BLOCKED, params: faiss.SearchParameters | None = None) -> ChannelResult:
    """query [d] -> the index's top `fetch` that are not blocked; max_k: the most one search may
    ask for (a GPU index refuses more than GPU_MAX_K); params: selector_params(index,
    blocked.selector), if the caller keeps it (building it costs more than a small search)."""
    fetch = min(index.ntotal, fetch, max_k or index.ntotal)
    if fetch <= 0:
        return EMPTY
    x = query.reshape(1, -1).astype(np.float32, copy=False)
    if blocked.selector is None:
        scores, ids = index.search(x, fetch)
    else:
        params = params if params is not None else selector_params(index, blocked.selector)
        try:
            scores, ids = index.search(x, fetch, params=params)
        except RuntimeError:   # an index kind without selector support (some GPU builds): over-fetch, drop
            scores, ids = index.search(x, min(index.ntotal, fetch + blocked.count, max_k or index.ntotal))
    found = ids[0] >= 0
    result = ChannelResult(ids[0, found].astype(np.int64), scores[0, found].astype(np.float32))
    return blocked.drop(result).head(fetch)


class _IndexChannel:
    """A channel over one FAISS index that skips its blocked items inside the search."""

    def __init__(self, index: faiss.Index, max_k: int | None) -> None:
        self.index = index
        self.max_k = max_k
        self._blocked, self._params = NOTHING_BLOCKED, None

    @property
    def blocked(self) -> BlockedItems:
        return self._blocked

    @blocked.setter
    def blocked(self, blocked: BlockedItems) -> None:
        # Built once per change of the set, not per query; swapped as a pair for concurrent readers.
        params = None if blocked.selector is None else selector_params(self.index, blocked.selector)
        self._blocked, self._params = blocked, params

    def search(self, vector: np.ndarray, fetch: int) -> ChannelResult:
        blocked, params = self._blocked, self._params
        return search(self.index, vector, fetch, self.max_k, blocked, params)


class ItemVectors:
    """BERT vectors of artifact items and of items added online (indices >= n_items)."""

    def __init__(self, table: np.ndarray, online: ItemOverlay | None = None) -> None:
        self.table = table       # [n_items, d] unit rows (an artifact item upserted online: its row rewritten)
        self.online = online     # its .vectors [M, d]: online item n_items + j is row j

    def __call__(self, items: np.ndarray) -> np.ndarray:
        """items [m] -> [m, d]."""
        n = len(self.table)
        if self.online is None or len(items) == 0 or items.max() < n:
            return self.table[items]
        known = items < n
        out = np.empty((len(items), self.table.shape[1]), np.float32)
        out[known] = self.table[items[known]]
        out[~known] = self.online.vectors[items[~known] - n]
        return out


class BertChannel(_IndexChannel):
    """Content channel: recency-weighted mean BERT vector of the recent history, searched in the text index."""
    name = ChannelName.BERT

    def __init__(self, index: faiss.Index, vectors: ItemVectors, max_k: int | None = None) -> None:
        super().__init__(index, max_k)
        self.vectors = vectors

    def add(self, indices: np.ndarray, vectors: np.ndarray) -> None:
        """Make items retrievable now (replacing any vector they had)."""
        try:
            self.index.remove_ids(indices)
        except RuntimeError:   # HNSW and GPU indexes cannot remove: the merge dedupes the stale twin
            pass
        self.index.add_with_ids(np.ascontiguousarray(vectors, np.float32), indices)

    def query_vector(self, history: np.ndarray) -> np.ndarray | None:
        if len(history) == 0:
            return None
        recent = history[-BERT_HISTORY:]
        # Recency weights: the latest item counts twice as much as the oldest one kept.
        weights = np.linspace(1.0, 2.0, len(recent), dtype=np.float32)
        query = weights @ self.vectors(recent)
        norm = np.linalg.norm(query)
        return None if norm == 0 else query / norm

    def retrieve(self, query: RetrievalQuery, fetch: int) -> ChannelResult:
        vector = self.query_vector(query.history)
        return EMPTY if vector is None else self.search(vector, fetch)


class CfChannel(_IndexChannel):
    """Collaborative channel: the ALS vector folded in from the request's recent history, for known
    users too (their trained row misses every event since the build: on ml-latest-small validation,
    fold-in from the newest 100 items gave nDCG@10 0.070 against the stale row's 0.058); the trained
    row only when no history item has a factor."""
    name = ChannelName.CF
    history = 100   # newest items folded in (a little ahead of the whole history on validation)

    def __init__(self, index: faiss.Index, user_ids: list[str], user_factors: np.ndarray,
                 item_factors: np.ndarray, gram: np.ndarray, alpha: float, regularization: float,
                 max_k: int | None = None) -> None:
        super().__init__(index, max_k)
        self.user_row = {u: i for i, u in enumerate(user_ids)}
        self.user_factors = user_factors
        self.item_factors = item_factors
        self.gram = gram
        self.alpha = alpha
        self.regularization = regularization

    def user_vector(self, user_id: str, history: np.ndarray) -> np.ndarray | None:
        folded = fold_in(self.item_factors, self.gram, history[-self.history:], self.alpha, self.regularization)
        if folded is not None:
            return folded
        row = self.user_row.get(user_id)
        return None if row is None else self.user_factors[row]

    def retrieve(self, query: RetrievalQuery, fetch: int) -> ChannelResult:
        vector = self.user_vector(query.user_id, query.history)
        return EMPTY if vector is None else self.search(vector, fetch)


class PopularChannel:
    """Most popular items (recent interactions): the cold-start and fallback channel."""
    name = ChannelName.POPULAR

    def __init__(self, ranked_items: np.ndarray, counts: np.ndarray) -> None:
        self.ranked_items = ranked_items.astype(np.int64)   # [n] best first
        # Score = log popularity, scaled to [0, 1] so it sits beside cosine scores.
        log_counts = np.log1p(counts[self.ranked_items].astype(np.float32))
        self.scores = log_counts / max(float(log_counts.max(initial=0.0)), 1e-6)
        self._blocked = NOTHING_BLOCKED
        self._live = ChannelResult(self.ranked_items, self.scores)

    @property
    def blocked(self) -> BlockedItems:
        return self._blocked

    @blocked.setter
    def blocked(self, blocked: BlockedItems) -> None:
        # The live ranking is masked once per change, so a query only slices it.
        self._live = blocked.drop(ChannelResult(self.ranked_items, self.scores))
        self._blocked = blocked

    def retrieve(self, query: RetrievalQuery, fetch: int) -> ChannelResult:
        return self._live.head(fetch)


class ItemToItemChannel:
    """Item-to-item channel: the neighbours (built offline, offline/item_neighbours.py) of the
    user's most recent items. score(j) = sum over the last `history` items h (the newest weighs 1,
    each older one `decay` times the next) of weight(h, j). Only the history's neighbour lists are
    read: the cost is history x N, whatever the catalog size. Items without neighbours (online
    items, or indices past the table) contribute nothing."""
    name = ChannelName.ITEM2ITEM

    def __init__(self, ids: np.ndarray, weights: np.ndarray, history: int = ITEM2ITEM_HISTORY,
                 decay: float = ITEM2ITEM_DECAY) -> None:
        self.ids = ids            # [n_items, N] int32, -1 = no neighbour
        self.weights = weights    # [n_items, N] float32
        self.history = history
        self.decay = decay
        self.blocked = NOTHING_BLOCKED

    def totals(self, history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """history [L] oldest first -> (every item reached [m] ascending, its score [m])."""
        recent = history[-self.history:]
        recent_w = np.power(self.decay, np.arange(len(recent) - 1, -1, -1, dtype=np.float32))
        known = (recent >= 0) & (recent < len(self.ids))
        if not known.any():
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        ids = self.ids[recent[known]].ravel()
        weights = (self.weights[recent[known]] * recent_w[known, None]).ravel()
        reached = ids >= 0
        return sum_by_item(ids[reached], weights[reached], len(self.ids))

    def scores(self, history: np.ndarray) -> ChannelResult:
        """history [L] oldest first -> every item reached, by score (best first, ties to the lower index)."""
        items, totals = self.totals(history)
        order = np.lexsort((items, -totals))
        return ChannelResult(items[order].astype(np.int64), totals[order])

    def retrieve(self, query: RetrievalQuery, fetch: int) -> ChannelResult:
        """The first `fetch` of scores(history) that are not blocked (only those are sorted)."""
        if len(query.history) == 0 or fetch <= 0:
            return EMPTY
        reached = self.blocked.drop(ChannelResult(*self.totals(query.history)))
        rows = top_by_score(reached.items, reached.scores, fetch)
        return ChannelResult(reached.items[rows].astype(np.int64), reached.scores[rows])


class SequentialChannel(_IndexChannel):
    """Next-item channel: a sequence encoder's user vector for the recent history (trained to predict
    the next item, offline/sequential.py), searched by inner product among the item vectors.

    The vector comes with the query when computed upstream (the seq_encoder Triton model fills
    query.encoded), else from the in-process `encoder` when there is one (offline build and
    evaluation); without either the channel proposes nothing. Online items get their vector from
    the content path alone (text vector @ seq_text_proj + bias: `content_vectors`) through `add`."""
    name = ChannelName.SEQUENTIAL

    def __init__(self, index: faiss.Index, encoder: Callable[[np.ndarray], np.ndarray | None] | None = None,
                 max_k: int | None = None, text_proj: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        super().__init__(index, max_k)
        self.encoder = encoder
        self.text_proj = text_proj   # (weight [Dt, D], bias [D]) of the item vectors' content path

    add = BertChannel.add   # replace-then-add, as for the text index

    def content_vectors(self, text: np.ndarray) -> np.ndarray | None:
        """BERT vectors [m, Dt] -> sequential item vectors [m, D] (None without seq_text_proj)."""
        if self.text_proj is None:
            return None
        weight, bias = self.text_proj
        return np.asarray(text, np.float32) @ weight + bias

    def query_vector(self, query: RetrievalQuery) -> np.ndarray | None:
        vector = query.encoded.get(self.name)
        if vector is None and self.encoder is not None and len(query.history):
            vector = self.encoder(query.history)
        return vector

    def retrieve(self, query: RetrievalQuery, fetch: int) -> ChannelResult:
        vector = self.query_vector(query)
        return EMPTY if vector is None or len(vector) == 0 else self.search(vector, fetch)
