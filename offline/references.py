"""Reference recommenders: the yardsticks `make eval` scores beside the pipeline (not channels).

Each is one class with `fit(X)` (X: binary users x items CSR of the interactions it trains on) and
`recommend(histories, excludes, k)`: a user is represented by a history (item indices), so that a
reference sees exactly what the pipeline sees; excluded (seen) items are never recommended, and
neither are items the reference cannot score (score -inf). Ties go to the lower item index.

  * EaseReference: EASE (Steck 2019), B = I - P diag(1/diag(P)), P = (XᵀX + λI)⁻¹; score = x·B.
    `tune_ease_lambda` picks λ on a validation split.
  * ItemKnnReference: cosine over item co-occurrence; item i keeps its top-N neighbours j;
    score(j) = Σ over history items i with j among i's neighbours of cos(i, j).
  * AlsReference: implicit ALS; the user vector folded in from the history by implicit's
    `recalculate_user` (exact least squares against the fixed item factors, confidence α per
    history item, as in training).
  * BprReference: implicit BPR; implicit has no fold-in for BPR (its `recalculate_user` raises), so the
    user vector is the mean of the history items' factors, and score = that · item factors + item bias.

EASE and ItemKNN are dense in the catalog: above `max_items` they keep the most popular items
(by interactions in X) and score only those. Float32 throughout; BLAS limited to BLAS_THREADS.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from offline.ease import ease_weights
from offline.metrics import ndcg_at_k

BLAS_THREADS = 2                      # the machine's cores; the evaluation shares them with nobody else
DEFAULT_MAX_ITEMS = 20_000            # EASE / ItemKNN: a 20k x 20k float32 matrix is 1.6 GB
EASE_LAMBDAS = (50.0, 200.0, 500.0, 1000.0, 3000.0)
KNN_NEIGHBOURS = 100
FACTORS = 64
BATCH = 256                           # users scored at once ([BATCH, n_items] float32)


def interaction_matrix(user_idx: np.ndarray, item_idx: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    """user_idx, item_idx [n] -> binary float32 CSR [n_users, n_items] (duplicates count once)."""
    x = sp.csr_matrix((np.ones(len(user_idx), np.float32), (np.asarray(user_idx), np.asarray(item_idx))),
                      shape=(n_users, n_items), dtype=np.float32)
    x.sum_duplicates()
    x.data[:] = 1.0
    return x


def history_rows(histories: Sequence[np.ndarray], n_items: int) -> sp.csr_matrix:
    """B histories (item indices) -> binary float32 CSR [B, n_items]."""
    rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
    items = np.concatenate([np.asarray(h, np.int64) for h in histories]) if histories else np.zeros(0, np.int64)
    return interaction_matrix(rows, items, len(histories), n_items)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """scores [n] -> the indices of the k best finite scores [<=k], best first, ties to the lower index."""
    finite = np.flatnonzero(np.isfinite(scores))
    if len(finite) > k:
        kth = np.partition(scores[finite], len(finite) - k)[len(finite) - k]
        finite = finite[scores[finite] >= kth]
    order = np.lexsort((finite, -scores[finite]))
    return finite[order][:k].astype(np.int64)


def popular_columns(x: sp.csr_matrix, max_items: int | None) -> np.ndarray | None:
    """The max_items most interacted-with columns of x (sorted), or None when x has no more than that."""
    if not max_items or x.shape[1] <= max_items:
        return None
    counts = np.asarray(x.sum(axis=0)).ravel()
    return np.sort(np.argsort(-counts, kind="stable")[:max_items])


class TopKReference:
    """Shared recommend(): score a batch of history rows, mask exclusions, take the top k."""
    name = "reference"
    n_items = 0

    def scores(self, rows: sp.csr_matrix) -> np.ndarray:   # rows [B, n_items] -> [B, n_items] float32
        raise NotImplementedError

    def recommend(self, histories: Sequence[np.ndarray], excludes: Sequence[np.ndarray], k: int = 10,
                  batch: int = BATCH) -> list[np.ndarray]:
        """histories[u], excludes[u]: item indices -> one ranked list [<=k] int64 per user."""
        if len(histories) != len(excludes):
            raise ValueError(f"{len(histories)} histories but {len(excludes)} exclusion lists")
        out: list[np.ndarray] = []
        with threadpool_limits(BLAS_THREADS, "blas"):
            for start in range(0, len(histories), batch):
                chunk = histories[start:start + batch]
                scores = np.array(self.scores(history_rows(chunk, self.n_items)), np.float32)   # a writable copy
                for b, exclude in enumerate(excludes[start:start + batch]):
                    scores[b, np.asarray(exclude, np.int64)] = -np.inf
                    out.append(top_k(scores[b], k))
        return out


class _SubsetReference(TopKReference):
    """A reference over the most popular `max_items` columns; the other items score -inf."""
    columns: np.ndarray | None = None

    def _sub_scores(self, rows: sp.csr_matrix) -> np.ndarray:
        raise NotImplementedError

    def scores(self, rows: sp.csr_matrix) -> np.ndarray:
        if self.columns is None:
            return self._sub_scores(rows)
        full = np.full((rows.shape[0], self.n_items), -np.inf, np.float32)
        full[:, self.columns] = self._sub_scores(rows[:, self.columns])
        return full

    @property
    def restricted_to(self) -> int | None:
        return None if self.columns is None else len(self.columns)


def gram(x: sp.csr_matrix) -> np.ndarray:
    """XᵀX as a dense float32 [n_items, n_items]."""
    return np.asarray((x.T @ x).toarray(), np.float32)


@dataclass
class EaseReference(_SubsetReference):
    lam: float = 200.0
    max_items: int | None = DEFAULT_MAX_ITEMS
    name = "ease"

    def fit(self, x: sp.csr_matrix, g: np.ndarray | None = None) -> "EaseReference":
        """x [U, n_items]; g: XᵀX over the kept columns, when the caller has it already."""
        self.n_items = x.shape[1]
        self.columns = popular_columns(x, self.max_items)
        with threadpool_limits(BLAS_THREADS, "blas"):
            if g is None:
                g = gram(x if self.columns is None else x[:, self.columns])
            self.b = ease_weights(g, self.lam)
        return self

    def _sub_scores(self, rows: sp.csr_matrix) -> np.ndarray:
        return np.asarray(rows @ self.b, np.float32)


@dataclass
class ItemKnnReference(_SubsetReference):
    neighbours: int = KNN_NEIGHBOURS
    max_items: int | None = DEFAULT_MAX_ITEMS
    block: int = 512
    name = "itemknn"

    def fit(self, x: sp.csr_matrix) -> "ItemKnnReference":
        """sim [n, n] sparse: row i holds cos(i, j) for i's top-`neighbours` j (j != i, cos > 0)."""
        self.n_items = x.shape[1]
        self.columns = popular_columns(x, self.max_items)
        xs = (x if self.columns is None else x[:, self.columns]).tocsc()
        n = xs.shape[1]
        norms = np.sqrt(np.asarray(xs.sum(axis=0)).ravel()).astype(np.float32)
        inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        xt = xs.T.tocsr()
        keep = min(self.neighbours, max(n - 1, 0))
        rows, cols, vals = [], [], []
        for s in range(0, n, self.block):
            e = min(s + self.block, n)
            sim = np.asarray((xt[s:e] @ xs).toarray(), np.float32) * inv[s:e, None] * inv[None, :]
            sim[np.arange(e - s), np.arange(s, e)] = 0.0
            if keep == 0:
                break
            top = np.argpartition(-sim, keep - 1, axis=1)[:, :keep]
            v = np.take_along_axis(sim, top, axis=1)
            r = np.repeat(np.arange(s, e), keep)
            mask = v.ravel() > 0
            rows.append(r[mask])
            cols.append(top.ravel()[mask])
            vals.append(v.ravel()[mask])
        cat = (lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype))
        self.sim = sp.csr_matrix((cat(vals, np.float32), (cat(rows, np.int64), cat(cols, np.int64))),
                                 shape=(n, n), dtype=np.float32)
        return self

    def _sub_scores(self, rows: sp.csr_matrix) -> np.ndarray:
        return np.asarray((rows @ self.sim).toarray(), np.float32)


@dataclass
class AlsReference(TopKReference):
    """ALS with the served CF channel's settings (offline/cf.py), users folded in from their history."""
    factors: int = FACTORS
    iterations: int = 15
    regularization: float = 0.05
    alpha: float = 10.0
    seed: int = 0
    name = "als"

    def fit(self, x: sp.csr_matrix) -> "AlsReference":
        from implicit.cpu.als import AlternatingLeastSquares
        self.n_items = x.shape[1]
        with threadpool_limits(1, "blas"):   # implicit runs its own threads; nested BLAS threads thrash
            self.model = AlternatingLeastSquares(factors=self.factors, iterations=self.iterations, alpha=self.alpha,
                                                 regularization=self.regularization, random_state=self.seed,
                                                 num_threads=BLAS_THREADS, calculate_training_loss=False)
            self.model.fit(sp.csr_matrix(x, dtype=np.float32), show_progress=False)
        return self

    def user_vectors(self, rows: sp.csr_matrix) -> np.ndarray:
        """rows [B, n_items] -> [B, factors]: implicit's recalculate_user (least squares, item factors fixed)."""
        with threadpool_limits(1, "blas"):
            return np.asarray(self.model.recalculate_user(np.arange(rows.shape[0]), sp.csr_matrix(rows)), np.float32)

    def scores(self, rows: sp.csr_matrix) -> np.ndarray:
        return self.user_vectors(rows) @ np.asarray(self.model.item_factors, np.float32).T


@dataclass
class BprReference(TopKReference):
    factors: int = FACTORS
    iterations: int = 100
    learning_rate: float = 0.01
    regularization: float = 0.01
    seed: int = 0
    name = "bpr"

    def fit(self, x: sp.csr_matrix) -> "BprReference":
        from implicit.cpu.bpr import BayesianPersonalizedRanking
        self.n_items = x.shape[1]
        with threadpool_limits(1, "blas"):
            model = BayesianPersonalizedRanking(factors=self.factors, iterations=self.iterations,
                                                learning_rate=self.learning_rate, regularization=self.regularization,
                                                random_state=self.seed, num_threads=BLAS_THREADS)
            model.fit(sp.csr_matrix(x, dtype=np.float32), show_progress=False)
        # implicit appends the item bias as a last column (and a constant 1 to every user vector).
        self.item_factors = np.asarray(model.item_factors, np.float32)
        return self

    def scores(self, rows: sp.csr_matrix) -> np.ndarray:
        length = np.asarray(rows.sum(axis=1), np.float32)
        mean = np.asarray(rows @ self.item_factors[:, :-1], np.float32) / np.maximum(length, 1.0)
        return mean @ self.item_factors[:, :-1].T + self.item_factors[:, -1][None, :]


# ---------------------------------------------------------------- tuning and fitting all of them

def validation_cases(train: sp.csr_matrix, valid: sp.csr_matrix, max_users: int | None = 2000
                     ) -> tuple[list[np.ndarray], list[set[int]]]:
    """Users with a validation item not in their train row -> (train histories, validation positives)."""
    histories, positives = [], []
    for u in range(train.shape[0]):
        seen = train.indices[train.indptr[u]:train.indptr[u + 1]]
        target = set(valid.indices[valid.indptr[u]:valid.indptr[u + 1]].tolist()) - set(seen.tolist())
        if target:
            histories.append(seen.astype(np.int64))
            positives.append(target)
    if max_users and len(histories) > max_users:   # evenly spread, deterministic
        pick = np.linspace(0, len(histories) - 1, max_users).astype(int)
        histories, positives = [histories[j] for j in pick], [positives[j] for j in pick]
    return histories, positives


def mean_ndcg(reference: TopKReference, histories: list[np.ndarray], positives: list[set[int]], k: int = 10) -> float:
    """Mean nDCG@k over users, seen (= history) items removed."""
    slates = reference.recommend(histories, histories, k)
    return float(np.mean([ndcg_at_k(s.tolist(), p, k) for s, p in zip(slates, positives)])) if slates else float("nan")


def tune_ease_lambda(train: sp.csr_matrix, valid: sp.csr_matrix, lambdas: Sequence[float] = EASE_LAMBDAS,
                     max_items: int | None = DEFAULT_MAX_ITEMS, k: int = 10, progress: bool = False
                     ) -> tuple[float, dict[float, float]]:
    """Fit EASE on train for each λ, score validation nDCG@k -> (best λ (smallest on a tie), λ -> nDCG)."""
    histories, positives = validation_cases(train, valid)
    columns = popular_columns(train, max_items)
    with threadpool_limits(BLAS_THREADS, "blas"):
        g = gram(train if columns is None else train[:, columns])
    found: dict[float, float] = {}
    for lam in tqdm(lambdas, desc="EASE λ on validation", unit="λ", disable=not progress):
        model = EaseReference(lam=float(lam), max_items=max_items).fit(train, g)
        found[float(lam)] = mean_ndcg(model, histories, positives, k)
        del model
    best = max(found, key=lambda lam: (found[lam], -lam))
    return best, found


REFERENCE_NAMES = ("ease", "itemknn", "als", "bpr")


@dataclass
class FittedReferences:
    models: dict[str, TopKReference]
    info: dict[str, dict[str, Any]] = field(default_factory=dict)   # name -> settings and fit seconds, for the report


def fit_references(train: sp.csr_matrix, valid: sp.csr_matrix, max_items: int | None = DEFAULT_MAX_ITEMS,
                   lambdas: Sequence[float] = EASE_LAMBDAS, progress: bool = True) -> FittedReferences:
    """Tune EASE's λ on (train, valid), then fit every reference on train + valid."""
    both = _union(train, valid)
    started = time.monotonic()
    lam, grid = tune_ease_lambda(train, valid, lambdas, max_items, progress=progress)
    tuning_s = round(time.monotonic() - started, 1)
    steps: list[tuple[str, Callable[[], TopKReference]]] = [
        ("ease", lambda: EaseReference(lam=lam, max_items=max_items).fit(both)),
        ("itemknn", lambda: ItemKnnReference(max_items=max_items).fit(both)),
        ("als", lambda: AlsReference().fit(both)),
        ("bpr", lambda: BprReference().fit(both))]
    out = FittedReferences({})
    for name, make in tqdm(steps, desc="reference recommenders", unit="model", disable=not progress):
        t = time.monotonic()
        out.models[name] = make()
        out.info[name] = {"fit_seconds": round(time.monotonic() - t, 1)}
    out.info["ease"].update({"lambda": lam, "validation_ndcg@10": {str(k): v for k, v in grid.items()},
                             "tuning_seconds": tuning_s})
    out.info["itemknn"]["neighbours"] = out.models["itemknn"].neighbours
    for name in ("ease", "itemknn"):
        out.info[name]["restricted_to_items"] = out.models[name].restricted_to   # None = the whole catalog
    for name in ("als", "bpr"):
        out.info[name]["factors"] = out.models[name].factors
    out.info["training"] = {"users": both.shape[0], "items": both.shape[1], "interactions": int(both.nnz)}
    return out


def _union(a: sp.csr_matrix, b: sp.csr_matrix) -> sp.csr_matrix:
    """Binary union of two binary matrices of one shape."""
    both = (a + b).tocsr()
    both.data[:] = 1.0
    return both.astype(np.float32)
