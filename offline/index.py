"""FAISS index build: the kind chosen by catalog size (and device), its search parameter tuned to a
recall target against exact search on sample queries.

- exact IndexFlatIP below EXACT_BELOW vectors;
- HNSW (M=32, efConstruction=200) up to IVF_ABOVE, efSearch tuned;
- IVF with float16 vectors (IndexIVFScalarQuantizer QT_fp16) above that (or above EXACT_BELOW when
  faiss sees a GPU: faiss has no GPU HNSW), nlist ~ 2*sqrt(n), k-means (10 iterations) on a seeded
  sample of 40 points per list, nprobe tuned with a margin (IVF_TUNE_MARGIN).
Ids are the row numbers: flat and HNSW sit in an IndexIDMap2 (they have no ids of their own);
IVF stores ids itself, and IndexIDMap2 would mis-map its ids after remove_ids.
"""
from __future__ import annotations

import math

import faiss
import numpy as np

from common.faiss_index import SEARCH_PARAM, gpu_count, index_info, set_search_params, to_gpu
from common.logs import get_logger

log = get_logger("offline.index")

EXACT_BELOW = 50_000   # exact inner-product search costs < 5 ms per query below this size
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
        return "flat"
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


def _fill(index: faiss.Index, kind: str, vectors: np.ndarray, seed: int, gpu: bool) -> faiss.Index:
    """Train (IVF) and add the rows with their row numbers as ids; on one GPU when asked."""
    train = _sample(vectors, TRAIN_PER_LIST * index.nlist, np.random.default_rng(seed)) if kind == "ivf" else None
    if gpu:
        index = to_gpu(index, ngpu=1)
    if train is not None:
        index.train(train)
    index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    return faiss.index_gpu_to_cpu(index) if gpu else index


def _overlap(truth: np.ndarray, found: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(t) & set(f)) / k for t, f in zip(truth, found)]))


def _exact(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact inner-product top-k ids, without copying the vectors into an index."""
    queries, vectors = (np.ascontiguousarray(a, dtype=np.float32) for a in (queries, vectors))
    return faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)[1]


def tune(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, k: int = RECALL_K,
         target: float = RECALL_TARGET) -> float:
    """Set the smallest ladder value whose recall@k on queries reaches target (else the largest);
    returns the recall reached. Exact indexes have nothing to tune."""
    info = index_info(index)
    k = min(k, len(vectors))
    ladder = search_ladder(info.kind, k, info.build.get("nlist", 0))
    if not ladder:
        return 1.0
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    truth = _exact(vectors, queries, k)
    for value in ladder:
        set_search_params(index, {SEARCH_PARAM[info.kind]: value})
        recall = _overlap(truth, index.search(queries, k)[1], k)
        if recall >= target:
            break
    else:
        log.warning("recall target not reached", extra={"kind": info.kind, "target": target, "recall": recall})
    log.info("index tuned", extra={"kind": info.kind, SEARCH_PARAM[info.kind]: value, f"recall@{k}": recall})
    return recall


def build_index(vectors: np.ndarray, exact_below: int = EXACT_BELOW, ivf_above: int = IVF_ABOVE, *,
                queries: np.ndarray | None = None, k: int = RECALL_K, target: float = RECALL_TARGET,
                gpu: bool | None = None, seed: int = 0) -> faiss.Index:
    """vectors [n, d] -> an inner-product index whose ids are the row numbers, its search parameter
    tuned on queries [q, d] (default: a seeded sample of the vectors). gpu=None: use one if faiss
    sees it."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    gpu = gpu_count() > 0 if gpu is None else gpu
    kind = choose_kind(n, gpu, exact_below, ivf_above)
    index = _fill(_empty(kind, d, n), kind, vectors, seed, gpu)   # kind is never HNSW on a GPU
    if queries is None:
        queries = _sample(vectors, TUNE_QUERIES, np.random.default_rng(seed + 1))
    tune(index, vectors, queries, max(k, TUNE_MIN_K), min(target + IVF_TUNE_MARGIN, 1.0) if kind == "ivf" else target)
    return index


def recall_at_k(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Mean overlap of the index's top-k with exact top-k for queries [q, d]."""
    k = min(k, vectors.shape[0])
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    return _overlap(_exact(vectors, queries, k), index.search(queries, k)[1], k)
