"""`make bench-batching` (`fusionrec bench-batching`): what Triton's dynamic batching buys the fused ranker (it asserts nothing).

Starts Triton alone on the latest artifact set, then for batching on and off (the same model
reloaded without `dynamic_batching`) and each concurrency, keeps that many one-user requests in
flight (history 50, 300 candidates: a serving-sized request) and prints throughput, latency and
the mean number of requests per model execution (from Triton's own statistics).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np
from tritonclient.grpc.aio import InferenceServerClient

from common.artifacts import open_artifacts
from core.features import FUSED_RANKER_NAME, RETRIEVAL_FEATURES
from ranking.triton_scorer import TritonScorer
from tools.stack import Stack
from tools.stack_args import add_stack_arguments


async def _executions(client: InferenceServerClient, version: str) -> tuple[int, int]:
    """(requests, executions) so far, from Triton's statistics."""
    stats = (await client.get_inference_statistics(FUSED_RANKER_NAME, version, as_json=True))["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


async def _set_batching(client: InferenceServerClient, version: str, enabled: bool, config: dict,
                        headers: dict[str, str] | None = None) -> None:
    config = dict(config, version_policy={"specific": {"versions": [int(version)]}})
    if not enabled:
        config.pop("dynamic_batching", None)
    await client.load_model(FUSED_RANKER_NAME, config=json.dumps(config), headers=headers)


async def _closed_loop(scorer: TritonScorer, requests: list[tuple[np.ndarray, ...]], concurrency: int,
                       seconds: float) -> list[float]:
    latencies: list[float] = []
    stop = time.monotonic() + seconds

    async def worker(offset: int) -> None:
        i = offset
        while time.monotonic() < stop:
            history, candidates, features = requests[i % len(requests)]
            start = time.perf_counter()
            await scorer.score(history, candidates, features, timeout_s=10.0)
            latencies.append(time.perf_counter() - start)
            i += concurrency

    await asyncio.gather(*(worker(j) for j in range(concurrency)))
    return latencies


async def _measure(args: argparse.Namespace, stack: Stack) -> list[dict]:
    artifacts = open_artifacts(args.artifacts)
    version = str(artifacts.manifest["models"][FUSED_RANKER_NAME])
    n_items = int(artifacts.manifest["counts"]["items"])
    rng = np.random.default_rng(0)
    requests = [(rng.choice(n_items, min(50, n_items), replace=False).astype(np.int64),
                 rng.choice(n_items, min(args.candidates, n_items), replace=False).astype(np.int64),
                 rng.random((min(args.candidates, n_items), len(RETRIEVAL_FEATURES)), dtype=np.float32))
                for _ in range(64)]
    client = stack.triton_client(aio=True)   # mTLS; model control needs the stack's admin header
    rows = []
    try:
        config = (await client.get_model_config(FUSED_RANKER_NAME, version, as_json=True))["config"]
        scorer = TritonScorer(client, version)
        for batching in (True, False):
            await _set_batching(client, version, batching, config, stack.triton_admin_headers())
            for concurrency in args.concurrency:
                await _closed_loop(scorer, requests, concurrency, 1.0)   # warm up
                before = await _executions(client, version)
                started = time.monotonic()
                latencies = await _closed_loop(scorer, requests, concurrency, args.seconds)
                elapsed = time.monotonic() - started
                after = await _executions(client, version)
                runs = max(after[1] - before[1], 1)
                ms = np.array(latencies) * 1000
                rows.append({"batching": batching, "concurrency": concurrency,
                             "requests_per_s": round(len(latencies) / elapsed, 1),
                             "p50_ms": round(float(np.percentile(ms, 50)), 2),
                             "p99_ms": round(float(np.percentile(ms, 99)), 2),
                             "requests_per_execution": round((after[0] - before[0]) / runs, 2)})
                print(_format_row(rows[-1]), flush=True)
    finally:
        await client.close()
    return rows


def _format_row(row: dict) -> str:
    return (f"batching={'on ' if row['batching'] else 'off'} concurrency={row['concurrency']:>3}  "
            f"{row['requests_per_s']:>7.1f} req/s  p50 {row['p50_ms']:>6.2f} ms  p99 {row['p99_ms']:>6.2f} ms  "
            f"{row['requests_per_execution']:>5.2f} requests/execution")


def measure_batching(args: argparse.Namespace) -> list[dict]:
    stack = Stack(args.artifacts, args.model_repo, args.run_dir)
    stack.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        stack.start_triton()
        rows = asyncio.run(_measure(args, stack))
    finally:
        stack.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                    "candidates": args.candidates, "seconds": args.seconds, "rows": rows}, indent=2))
    print(f"written: {args.out}")
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_stack_arguments(p, Path("run/bench-batching"), "Triton's log")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16],
                   help="requests in flight, one run each (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per run (default: %(default)s)")
    p.add_argument("--candidates", type=int, default=300, help="candidates per request (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("reports/bench/triton_batching.json"))


def run(args: argparse.Namespace) -> int:
    measure_batching(args)
    return 0
