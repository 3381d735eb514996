"""GPU check of the FAISS index build: exact and IVF indexes built (and tuned) on the GPU and on the
CPU over seeded clustered random data, each then searched where it was built; prints recall@k
against exact search and the timings side by side. The exact kind is float32 rows on the GPU
("flat") and float16 rows on the CPU ("flat16", as the build chooses there).

Meant for a machine with faiss-gpu (e.g. `pip install faiss-gpu-cu12` in place of faiss-cpu):

    fusionrec gpu-check --n 200000 --dim 768

Exit status: 0 = checks passed (flat recall >= 0.99, IVF held-out recall >= target - 0.02, on
both devices); 1 = a check failed; 2 = no GPU visible to faiss, so nothing was checked (kept
apart from 0 so that a CPU-only run is never mistaken for a passed GPU check).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from common.faiss_index import gpu_count, index_info, to_gpu
from offline.index import RECALL_TARGET, build_index, recall_at_k

NO_GPU = 2


def clustered(n: int, dim: int, clusters: int, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors around random centers: embedding-like, with real neighbourhoods."""
    centers = rng.normal(size=(clusters, dim)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def run_one(kind: str, gpu: bool, vectors: np.ndarray, tune_q: np.ndarray, eval_q: np.ndarray,
            k: int, target: float, seed: int) -> dict[str, object]:
    # Thresholds that force the kind whatever n is (IVF on the CPU needs n > ivf_above).
    thresholds = {"flat": (len(vectors) + 1, len(vectors) + 1), "ivf": (0, 0)}[kind]
    start = time.perf_counter()
    index = build_index(vectors, *thresholds, queries=tune_q, k=k, target=target, gpu=gpu, seed=seed)
    built_s = time.perf_counter() - start
    info = index_info(index)
    served = to_gpu(index) if gpu else index   # as retrieval serves it
    start = time.perf_counter()
    served.search(eval_q, k)
    batch_ms = 1000 * (time.perf_counter() - start) / len(eval_q)
    start = time.perf_counter()
    for q in eval_q[:100]:
        served.search(q[None], k)
    single_ms = 1000 * (time.perf_counter() - start) / len(eval_q[:100])
    return {"kind": info.kind, "device": "gpu" if gpu else "cpu", "search": info.search, "build": info.build,
            "recall": recall_at_k(served, vectors, eval_q, k), "build_tune_s": built_s,
            "batch_ms_per_query": batch_ms, "single_ms_per_query": single_ms}


def failures(rows: list[dict[str, object]], target: float) -> list[str]:
    floor = {"flat": 0.99, "flat16": 0.99, "ivf": target - 0.02}   # flat16: the CPU's exact kind
    return [f"{r['kind']} on {r['device']}: recall {r['recall']:.4f} < {floor[r['kind']]:.4f}"
            for r in rows if r["recall"] < floor[r["kind"]]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=200_000, help="vectors in the index")
    parser.add_argument("--dim", type=int, default=128, help="vector dimension")
    parser.add_argument("--clusters", type=int, default=1000, help="cluster centers of the data")
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries for recall and timing")
    parser.add_argument("--k", type=int, default=100, help="recall@k and search depth")
    parser.add_argument("--target", type=float, default=RECALL_TARGET, help="recall target of the tuning")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    if gpu_count() == 0:
        print("no GPU visible to faiss (a faiss-cpu build, or no CUDA device): nothing checked", file=sys.stderr)
        return NO_GPU
    rng = np.random.default_rng(args.seed)
    vectors = clustered(args.n + 2 * args.queries, args.dim, args.clusters, rng)
    vectors, tune_q, eval_q = vectors[:args.n], vectors[args.n:-args.queries], vectors[-args.queries:]
    rows = [run_one(kind, gpu, vectors, tune_q, eval_q, args.k, args.target, args.seed)
            for kind in ("flat", "ivf") for gpu in (False, True)]
    print(f"{gpu_count()} GPU(s); n={args.n} dim={args.dim} k={args.k} target={args.target}")
    print(f"{'kind':5} {'device':6} {'params':22} {'recall':>7} {'build+tune s':>12} {'batch ms/q':>11} {'single ms/q':>11}")
    for r in rows:
        params = " ".join(f"{p}={v}" for p, v in {**r["build"], **r["search"]}.items()) or "-"
        print(f"{r['kind']:5} {r['device']:6} {params:22} {r['recall']:7.4f} {r['build_tune_s']:12.2f} "
              f"{r['batch_ms_per_query']:11.4f} {r['single_ms_per_query']:11.4f}")
    failed = failures(rows, args.target)
    for line in failed:
        print(f"FAIL {line}", file=sys.stderr)
    return 1 if failed else 0
