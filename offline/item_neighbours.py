"""Item-to-item neighbours: each item's top-N most related items, from the training interactions,
for the item-to-item retrieval channel (core.channels.ItemToItemChannel, which scores an item by
the recency-weighted sum of its weights from the user's recent items).

Two recipes (NeighbourConfig.method):

  * "ease" (default while at most `ease_max_items` items have interactions): sequential EASE.
    EASE's closed form (Steck 2019: B = I - P diag(1/diag P), P = (G + λI)⁻¹) on a Gram matrix that
    keeps the order of each user's time-ordered sequence: two items d steps apart (d <= window)
    add gamma^d to G[i, j] and G[j, i], each item adds 1 to G[i, i]. Row i's top-N positive B[i, j]
    are i's neighbours. Plain EASE (G = XᵀX) ignores the order the test split is made of (the newest
    items are the ones to find); on ml-latest-small validation users, scored as the channel scores
    (history 50, decay 0.9): see NeighbourConfig. The inverse is dense in the interacted items (m x m
    float32, 1.6 GB at 20k), so larger catalogs use the other recipe.
  * "cooccurrence": co-occurrence counts, a cosine-like normalisation, then top-N. window=None:
    plain cosine over user co-occurrence, S[i, j] = users who have both i and j; window=W:
    co-occurrence within W steps of each user's sequence, j at d steps after i adds 1/d^decay to
    S[i, j], j at d steps before i adds backward/d^decay. weight = S[i, j] / (c_i^(1-alpha) * c_j^alpha),
    c = users per item (alpha 0.5: cosine). Item rows are processed in blocks sized by how many pairs
    they generate (never a dense n x n, never more than MAX_PAIRS pairs at once): it scales to 1M items.

The output is [n_items, N]: int32 ids (-1 = no neighbour) and float32 weights (0 there), best first,
ties to the lower id.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

from core.channels import ItemToItemChannel
from offline.ease import ease_weights
from offline.metrics import ndcg_at_k

MAX_PAIRS = 2_000_000    # co-occurrence pairs generated per block (bounds the stage's memory)


@dataclass(frozen=True)
class NeighbourConfig:
    top_n: int = 100
    method: str = "ease"         # "ease" (sequential EASE) or "cooccurrence"; see the module docstring
    ease_lambda: float = 200.0   # EASE's ridge λ
    ease_gamma: float = 0.97     # a pair d steps apart adds gamma^d to the Gram matrix
    ease_max_items: int = 20_000  # interacted items above which "ease" falls back to "cooccurrence"
    # "cooccurrence", chosen on ml-latest-small validation users (channel alone, recall@300 / nDCG@10):
    # plain cosine 0.510 / 0.079; window 100, decay 0.3, alpha 0.4: 0.564 / 0.096 (order carries the signal).
    window: int | None = 100     # steps in each user's sequence; None = whole history (plain cosine); both recipes
    backward: float = 0.5        # weight of a neighbour that came before the item (window only)
    decay: float = 0.3           # a pair d steps apart counts 1/d^decay (window only)
    alpha: float = 0.4           # normalisation: c_i^(1-alpha) * c_j^alpha (0.5: cosine)

    def describe(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class ItemNeighbours:
    ids: np.ndarray       # [n_items, N] int32, -1 = none
    weights: np.ndarray   # [n_items, N] float32, best first, 0 where ids is -1
    method: str = "cooccurrence"   # the recipe that made them (NeighbourConfig.method, or its fallback)

    @property
    def filled(self) -> float:
        """Mean share of the N slots that hold a neighbour."""
        return float((self.ids >= 0).mean()) if self.ids.size else 0.0


def user_sequences_sorted(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """users, items [n] int64, timestamps [n] -> (users, items) in sequence order (by user, then
    time, then input order), each (user, item) pair once: its latest occurrence is kept."""
    order = np.lexsort((np.arange(len(users)), timestamps, users))
    u, i = users[order], items[order]
    # Latest occurrence of each (user, item): walk backwards, keep first seen.
    key = u.astype(np.int64) * (int(i.max(initial=0)) + 1) + i
    _, last_from_end = np.unique(key[::-1], return_index=True)
    keep = np.sort(len(key) - 1 - last_from_end)
    return u[keep], i[keep]


def _blocks(per_item_cost: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Consecutive item ranges whose summed cost stays within budget (an item over it alone)."""
    cum = np.cumsum(per_item_cost, dtype=np.int64)
    out, lo, base = [], 0, 0
    n = len(per_item_cost)
    while lo < n:
        hi = int(np.searchsorted(cum, base + budget, side="right"))
        hi = max(hi, lo + 1)
        out.append((lo, hi))
        base = int(cum[hi - 1])
        lo = hi
    return out


def _top_n_rows(block: sp.coo_matrix, top_n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A block's weights (rows local) -> (row, rank, col, value) of each row's top_n, ties to the lower col."""
    rows, cols, vals = block.row.astype(np.int64), block.col.astype(np.int64), block.data
    order = np.lexsort((cols, -vals, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    starts = np.r_[0, np.flatnonzero(np.diff(rows)) + 1]
    rank = np.arange(len(rows)) - np.repeat(starts, np.diff(np.r_[starts, len(rows)]))
    keep = rank < top_n
    return rows[keep], rank[keep], cols[keep], vals[keep]


def item_neighbours(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, n_items: int,
                    config: NeighbourConfig = NeighbourConfig(), progress: bool = False) -> ItemNeighbours:
    """users [n] int64 (any dense ids), items [n] int64 in [0, n_items), timestamps [n] -> top-N
    neighbours of every item (see the module docstring for the recipes)."""
    if config.method not in ("ease", "cooccurrence"):
        raise ValueError(f"NeighbourConfig.method: 'ease' or 'cooccurrence', got {config.method!r}")
    if config.method == "ease" and len(items):
        found = sequential_ease_neighbours(users, items, timestamps, n_items, config)
        if found is not None:
            return found
    return cooccurrence_neighbours(users, items, timestamps, n_items, config, progress)


def sequential_ease_neighbours(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, n_items: int,
                               config: NeighbourConfig) -> ItemNeighbours | None:
    """The "ease" recipe; None when more than config.ease_max_items items have interactions."""
    seq_users, seq_items = user_sequences_sorted(np.asarray(users, np.int64), np.asarray(items, np.int64),
                                                 np.asarray(timestamps))
    kept = np.unique(seq_items)                 # the interacted items: the only rows B can fill
    m = len(kept)
    if m == 0 or m > config.ease_max_items:
        return None
    g = _sequence_gram(seq_users, np.searchsorted(kept, seq_items), m, config.window, config.ease_gamma)
    lam = config.ease_lambda
    for _ in range(4):   # a windowed Gram need not be positive semi-definite: raise λ until it is
        try:
            b = ease_weights(g, lam)
            break
        except np.linalg.LinAlgError:
            lam *= 4.0
    else:
        return None
    del g
    n_top = config.top_n
    ids = np.full((n_items, n_top), -1, np.int32)
    weights = np.zeros((n_items, n_top), np.float32)
    keep = min(n_top, m - 1)
    for lo in range(0, m if keep > 0 else 0, 1024):
        part = b[lo:lo + 1024]
        top = np.argpartition(-part, keep - 1, axis=1)[:, :keep]
        vals = np.take_along_axis(part, top, axis=1)
        cols = kept[top]
        order = np.lexsort((cols, -vals), axis=-1)   # best first, ties to the lower id
        vals, cols = np.take_along_axis(vals, order, axis=1), np.take_along_axis(cols, order, axis=1)
        positive = vals > 0                           # a negative weight is no neighbour
        rows = kept[lo:lo + len(part)]
        ids[rows, :keep] = np.where(positive, cols, -1)
        weights[rows, :keep] = np.where(positive, vals, 0.0)
    return ItemNeighbours(ids, weights, "ease")


def _sequence_gram(seq_users: np.ndarray, local: np.ndarray, m: int, window: int | None,
                   gamma: float) -> np.ndarray:
    """Sequences (users, item rows in [0, m), in sequence order) -> the windowed Gram matrix
    [m, m] float32: 1 per occurrence on the diagonal, gamma^d per pair d <= window steps apart."""
    g = np.zeros((m, m), np.float32)
    g[np.diag_indices(m)] = np.bincount(local, minlength=m)
    pending: list[tuple[np.ndarray, np.ndarray, float]] = []

    def flush() -> None:   # duplicates summed first, so the fancy-indexed += adds each pair once
        if not pending:
            return
        a = np.concatenate([p[0] for p in pending])
        b = np.concatenate([p[1] for p in pending])
        w = np.concatenate([np.full(len(p[0]), p[2], np.float32) for p in pending])
        block = sp.coo_matrix((w, (a, b)), shape=(m, m)).tocsr().tocoo()
        g[block.row, block.col] += block.data
        g[block.col, block.row] += block.data   # symmetric: EASE needs a positive definite G + λI
        pending.clear()

    count = 0
    for d in range(1, (window or len(local)) + 1):
        if d >= len(local):
            break
        same = seq_users[d:] == seq_users[:-d]
        if not same.any():
            break   # no user has d + 1 items: none has more
        pending.append((local[:-d][same], local[d:][same], float(gamma) ** d))
        count += int(same.sum())
        if count >= MAX_PAIRS:
            flush()
            count = 0
    flush()
    return g


def cooccurrence_neighbours(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, n_items: int,
                            config: NeighbourConfig, progress: bool = False) -> ItemNeighbours:
    """The "cooccurrence" recipe."""
    n_top = config.top_n
    ids = np.full((n_items, n_top), -1, np.int32)
    weights = np.zeros((n_items, n_top), np.float32)
    if len(items) == 0 or n_items == 0:
        return ItemNeighbours(ids, weights)
    seq_users, seq_items = user_sequences_sorted(np.asarray(users, np.int64), np.asarray(items, np.int64),
                                                 np.asarray(timestamps))
    counts = np.bincount(seq_items, minlength=n_items).astype(np.float64)
    left = np.power(np.maximum(counts, 1.0), 1.0 - config.alpha)    # row item's normaliser
    right = np.power(np.maximum(counts, 1.0), config.alpha)         # neighbour's normaliser
    by_item = np.argsort(seq_items, kind="stable")                  # positions grouped by item
    item_ptr = np.r_[0, np.cumsum(counts.astype(np.int64))]

    if config.window is None:
        _, user_rows = np.unique(seq_users, return_inverse=True)
        x = sp.csr_matrix((np.ones(len(seq_items), np.float32), (user_rows, seq_items)),
                          shape=(int(user_rows.max()) + 1, n_items))
        xt = x.T.tocsr()
        user_len = np.diff(x.indptr)
        # Pairs an item generates: the summed history lengths of its users.
        cost = np.bincount(seq_items, weights=user_len[user_rows], minlength=n_items).astype(np.int64)
    else:
        cost = counts.astype(np.int64) * 2 * config.window
        offsets = np.arange(1, config.window + 1)
        step_weight = 1.0 / np.power(offsets.astype(np.float64), config.decay)

    for lo, hi in tqdm(_blocks(cost, MAX_PAIRS), desc="item neighbours", unit="block", disable=not progress):
        if config.window is None:
            block = (xt[lo:hi] @ x).tocoo()   # [hi-lo, n_items] users in common
        else:
            pos = by_item[item_ptr[lo]:item_ptr[hi]]
            src_rows, dst_items, pair_w = [], [], []
            for d, w in zip(offsets, step_weight):
                for q, wd in ((pos + d, w), (pos - d, w * config.backward)):
                    if wd == 0:
                        continue
                    ok = (q >= 0) & (q < len(seq_items))
                    p_ok, q_ok = pos[ok], q[ok]
                    same = seq_users[q_ok] == seq_users[p_ok]
                    src_rows.append(seq_items[p_ok[same]] - lo)
                    dst_items.append(seq_items[q_ok[same]])
                    pair_w.append(np.full(int(same.sum()), wd, np.float64))
            block = sp.coo_matrix((np.concatenate(pair_w), (np.concatenate(src_rows), np.concatenate(dst_items))),
                                  shape=(hi - lo, n_items)).tocsr().tocoo()   # sums duplicates
        off_diagonal = block.row + lo != block.col
        block = sp.coo_matrix((block.data[off_diagonal], (block.row[off_diagonal], block.col[off_diagonal])),
                              shape=block.shape)
        if block.nnz == 0:
            continue
        block.data = (block.data / (left[block.row + lo] * right[block.col])).astype(np.float64)
        rows, rank, cols, vals = _top_n_rows(block, n_top)
        ids[rows + lo, rank] = cols
        weights[rows + lo, rank] = vals
    return ItemNeighbours(ids, weights)


def save_neighbours(path, neighbours: ItemNeighbours) -> None:
    np.savez(path, ids=neighbours.ids, weights=neighbours.weights)


DECAYS = (0.95, 0.9, 0.85)   # the item2item channel's recency decays the build chooses among


def choose_decay(neighbours: ItemNeighbours, histories: dict[str, np.ndarray], targets: dict[str, np.ndarray],
                 users: list[str], decays: tuple[float, ...] = DECAYS) -> tuple[float, dict[str, float]]:
    """The serving channel's recency decay (core.channels.ItemToItemChannel, scoring as served) with the best nDCG@10 of the
    channel alone on `users` (history -> targets, seen items removed); ties go to the first listed.
    -> (decay, {decay: nDCG@10})."""
    figures: dict[str, float] = {}
    for decay in decays:
        channel = ItemToItemChannel(neighbours.ids, neighbours.weights, decay=decay)
        values = []
        for u in users:
            history = histories.get(u, np.zeros(0, np.int64))
            seen = set(history.tolist())
            relevant = set(targets.get(u, np.zeros(0, np.int64)).tolist()) - seen
            if not relevant or not len(history):
                continue
            ranked = channel.scores(history).items
            ranked = ranked[~np.isin(ranked, history)][:10]
            values.append(ndcg_at_k(ranked.tolist(), relevant, 10))
        figures[f"{decay:g}"] = round(float(np.mean(values)), 5) if values else 0.0
    best = max(decays, key=lambda d: (figures[f"{d:g}"], -decays.index(d)))
    return best, figures
