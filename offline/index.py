"""FAISS index build: the kind chosen by catalog size (and device), its search parameter tuned to a
recall target against exact search on sample queries.

- exhaustive search below EXACT_BELOW vectors: over float16 rows on the CPU ("flat16",
  IndexScalarQuantizer QT_fp16), float32 rows on a GPU ("flat": faiss copies no flat scalar
  quantizer to a GPU);
- HNSW (M=32, efConstruction=200) up to IVF_ABOVE, efSearch tuned;
- IVF with float16 vectors (IndexIVFScalarQuantizer QT_fp16) above that (or above EXACT_BELOW when
  faiss sees a GPU: faiss has no GPU HNSW), nlist ~ 2*sqrt(n), k-means (10 iterations) on a seeded
  sample of 40 points per list, nprobe tuned with a margin (IVF_TUNE_MARGIN).
Ids are the row numbers (or the given subset of them, `ids=`: the CF index holds only items with
training interactions): flat, flat16 and HNSW sit in an IndexIDMap2 (they have no ids of their own); IVF
stores ids itself, and IndexIDMap2 would mis-map its ids after remove_ids.
"""
from __future__ import annotations

import math

import faiss
import numpy as np

from common.faiss_index import SEARCH_PARAM, gpu_count, index_info, set_search_params, to_gpu
from common.logs import get_logger

log = get_logger("offline.index")

EXACT_BELOW = 50_000   # exact inner-product search costs < 5 ms per query below this size
# Why float16 rows on the CPU: one query reads every row, and in a serving process the rows are out
# of cache by the next request. 9.7k x 384 float32 rows took 1.6 ms per query from memory (0.6 ms
# cached); float16 rows 0.3 ms, with scores within 1e-3 of the float32 ones (recall@300 vs exact
# is measured at build time like every kind's).
# HNSW construction (efConstruction 200) took 36 s for the 100k x 384 + 100k x 64 indexes on 2 shared
# cores and grows ~n log n (1M: ~8-10 min, over the 15 min build budget with the other stages), and
# its graph adds ~256 B per vector. IVF runs k-means on a sample and adds in one pass (both fast on a
# GPU), and with float16 vectors holds half the bytes of the float32 rows (+8 B of id per vector):
# measured on the 100k latent catalog, recall@300 of history-mean queries equal to IVF-Flat's at
# every nprobe (0.949 at 16, 1.000 at 32). So IVF takes over from 200k vectors.
IVF_ABOVE = 200_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
RECALL_K = 100
RECALL_TARGET = 0.95
TUNE_QUERIES = 200
# Powers of two: each step roughly doubles search cost. nprobe stays <= GPU_MAX_K (2048).
EF_SEARCH_LADDER = (16, 32, 64, 128, 256, 512, 1024)
NPROBE_LADDER = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
NLIST_BOUNDS = (16, 65_536)
MIN_PER_LIST = 39      # faiss k-means wants >= 39 training points per centroid
TRAIN_PER_LIST = 40    # k-means sample per list: k-means costs sample x nlist x iterations
KMEANS_ITERATIONS = 10
# The build tunes nprobe on item vectors at k=100; retrieval searches with history means at k=300,
# which recalled ~0.015 less at the same nprobe on the 100k latent catalog: tune IVF this much higher.
IVF_TUNE_MARGIN = 0.03
# Retrieval asks the text index for up to 300 candidates: build_index tunes at no smaller k (tuning
# at k=100 left recall@300 at 0.94 on an 8k-item latent catalog with HNSW).
TUNE_MIN_K = 300


def choose_kind(n: int, gpu: bool = False, exact_below: int = EXACT_BELOW, ivf_above: int = IVF_ABOVE) -> str:
    if n < exact_below:
        return "flat" if gpu else "flat16"
    return "ivf" if gpu or n > ivf_above else "hnsw"


def ivf_nlist(n: int) -> int:
    """~2*sqrt(n) lists (faiss' guideline is 4-16*sqrt(n); fewer lists keep k-means and the add
    within the build budget on 2 cores, at ~2x the vectors scanned per probe), clamped, and never so
    many that k-means starves."""
    lo, hi = NLIST_BOUNDS
    return max(1, min(int(np.clip(round(2 * math.sqrt(n)), lo, hi)), n // MIN_PER_LIST))


def search_ladder(kind: str, k: int, nlist: int = 0) -> list[int]:
    """Candidate values of the kind's search parameter, cheapest first."""
    if kind == "hnsw":   # HNSW returns fewer than k results when efSearch < k
        return sorted({max(v, k) for v in EF_SEARCH_LADDER})
    if kind == "ivf":    # nprobe = nlist is already exhaustive
        return sorted({min(v, nlist) for v in NPROBE_LADDER})
    return []


def _empty(kind: str, d: int, n: int) -> faiss.Index:
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    if kind == "flat16":
        return faiss.IndexIDMap2(faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16,
                                                            faiss.METRIC_INNER_PRODUCT))
    if kind == "hnsw":
        base = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return faiss.IndexIDMap2(base)
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(d), d, ivf_nlist(n), faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = KMEANS_ITERATIONS
    index.cp.seed = 1234
    return index


def _sample(vectors: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    if size >= len(vectors):
        return vectors
    return vectors[np.sort(rng.choice(len(vectors), size, replace=False))]


def _fill(index: faiss.Index, kind: str, vectors: np.ndarray, ids: np.ndarray, seed: int, gpu: bool) -> faiss.Index:
    """Train (IVF) and add the rows with their ids; on one GPU when asked."""
    train = _sample(vectors, TRAIN_PER_LIST * index.nlist, np.random.default_rng(seed)) if kind == "ivf" else None
    if gpu:
        index = to_gpu(index, ngpu=1)
    if train is not None:
        index.train(train)
    index.add_with_ids(vectors, ids)
    return faiss.index_gpu_to_cpu(index) if gpu else index


def _overlap(truth: np.ndarray, found: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(t) & set(f)) / k for t, f in zip(truth, found)]))


def _exact(vectors: np.ndarray, queries: np.ndarray, k: int, ids: np.ndarray | None = None) -> np.ndarray:
    """Exact inner-product top-k ids (row numbers, or ids[row]), without copying the vectors into an index."""
    queries, vectors = (np.ascontiguousarray(a, dtype=np.float32) for a in (queries, vectors))
    rows = faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)[1]
    return rows if ids is None else ids[rows]


def tune(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, k: int = RECALL_K,
         target: float = RECALL_TARGET, ids: np.ndarray | None = None) -> float:
    """Set the smallest ladder value whose recall@k on queries reaches target (else the largest);
    returns the recall reached. vectors: the indexed rows (ids[j] the id of row j; None: j).
    Exact indexes have nothing to tune."""
    info = index_info(index)
    k = min(k, len(vectors))
    ladder = search_ladder(info.kind, k, info.build.get("nlist", 0))
    if not ladder:
        return 1.0
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    truth = _exact(vectors, queries, k, ids)
    for value in ladder:
        set_search_params(index, {SEARCH_PARAM[info.kind]: value})
        recall = _overlap(truth, index.search(queries, k)[1], k)
        if recall >= target:
            break
    else:
        log.warning("recall target not reached", extra={"kind": info.kind, "target": target, "recall": recall})
    log.info("index tuned", extra={"kind": info.kind, SEARCH_PARAM[info.kind]: value, f"recall@{k}": recall})
    return recall


def cf_index_rows(counts: np.ndarray) -> np.ndarray | None:
    """The rows the CF index holds: items with training interactions (the others' ALS factors are
    their near-zero initialisation, which CF cannot rank); None: every item (all trained, or none)."""
    return np.flatnonzero(counts) if 0 < np.count_nonzero(counts) < len(counts) else None


def build_index(vectors: np.ndarray, exact_below: int = EXACT_BELOW, ivf_above: int = IVF_ABOVE, *,
                queries: np.ndarray | None = None, k: int = RECALL_K, target: float = RECALL_TARGET,
                gpu: bool | None = None, seed: int = 0, ids: np.ndarray | None = None) -> faiss.Index:
    """vectors [n, d] -> an inner-product index whose ids are the row numbers (ids: only these rows,
    under their row numbers), its search parameter tuned on queries [q, d] (default: a seeded sample
    of the indexed vectors). The kind follows the number of rows indexed. gpu=None: use one if faiss
    sees it."""
    ids, rows = _indexed_rows(vectors, ids)
    n, d = rows.shape
    gpu = gpu_count() > 0 if gpu is None else gpu
    kind = choose_kind(n, gpu, exact_below, ivf_above)
    index = _fill(_empty(kind, d, n), kind, rows, ids, seed, gpu)   # kind is never HNSW on a GPU
    if queries is None:
        queries = _sample(rows, TUNE_QUERIES, np.random.default_rng(seed + 1))
    tune(index, rows, queries, max(k, TUNE_MIN_K), min(target + IVF_TUNE_MARGIN, 1.0) if kind == "ivf" else target, ids)
    return index


def _indexed_rows(vectors: np.ndarray, ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, their rows as contiguous float32) for all rows (ids None) or the given ones."""
    if ids is None:
        return np.arange(len(vectors), dtype=np.int64), np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size == 0 or ids.min() < 0 or ids.max() >= len(vectors) or np.any(np.diff(ids) <= 0):
        raise ValueError(f"ids: a non-empty increasing subset of the row numbers 0..{len(vectors) - 1}")
    return ids, np.ascontiguousarray(vectors[ids], dtype=np.float32)


def recall_at_k(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, k: int,
                ids: np.ndarray | None = None) -> float:
    """Mean overlap of the index's top-k with exact top-k over the same rows (ids, as build_index
    took them) for queries [q, d]."""
    ids, rows = _indexed_rows(vectors, ids)
    k = min(k, len(rows))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    return _overlap(_exact(rows, queries, k, ids), index.search(queries, k)[1], k)
