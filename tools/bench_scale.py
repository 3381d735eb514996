"""`make bench-scale` (`fusionrec bench-scale`): how build and serving scale with the catalog.

For each size (default 10k, 100k, 1M items; `--sizes` or the Makefile's SIZES=10000,100000):
  1. generate a synthetic catalog with embedding-like vectors (low-rank + noise: 32 latent factors
     mapped to 384 dims, offline/datasets/latent.py) and an interaction log whose users follow the
     same latent structure; cached under --work-dir by its parameters;
  2. build it with the real build (`python -m offline build --item-vectors ...`: brought vectors, the
     FAISS kind chosen by size as offline/index.py does) in a child process: wall time and the
     child's peak RSS;
  3. measure the text index's recall@300 against exact search on history-mean queries (what the
     BERT channel searches with), and its size on disk;
  4. serve it with the real stack (tools/stack.py) and drive the gateway open-loop at --rate with
     tools/bench.py's measurement: p50/p99, CPU core-ms per request, resident memory.
Writes one row per size to --out (reports/bench/scale.json, rewritten after every size) and a PNG of
latency vs catalog size beside it, and prints the table and the issue's targets. Asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
RECALL_K = 300          # the retrieval's candidate count
RECALL_QUERIES = 200
# Keys every row has (tests/unit/test_bench_scale.py); serving figures are None with --build-only.
ROW_KEYS = ("items", "users", "interactions", "build_s", "peak_rss_mib", "index_kind", "index_search",
            "recall_at_300", "index_mib", "p50_ms", "p99_ms", "core_ms_per_request")
TARGETS = {"p50_ratio": 1.3, "recall_at_300": 0.95, "resident_gib": 6.0, "build_min": 15.0}


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s.replace("_", "")) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes: comma-separated item counts, got {text!r}") from None
    if not sizes or min(sizes) < 100:
        raise argparse.ArgumentTypeError(f"--sizes: at least one size, each >= 100, got {text!r}")
    return sorted(set(sizes))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", type=parse_sizes, default=list(DEFAULT_SIZES),
                   help="catalog sizes, comma-separated (default: 10000,100000,1000000; env SIZES in make)")
    p.add_argument("--users", type=int, default=None,
                   help="users per catalog (default: items/500, clamped to 1000..2000)")
    p.add_argument("--work-dir", type=Path, default=Path(".cache/bench-scale"),
                   help="generated data, builds and process logs, one folder per size (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=2,
                   help="fused ranker epochs of each build (default: %(default)s; its quality is not measured here, "
                        "and its cost does not grow with the catalog)")
    p.add_argument("--rate", type=float, default=50.0, help="requests per second (default: %(default)s)")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per size (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first (default: %(default)s)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--deadline-ms", type=float, default=250.0)
    p.add_argument("--build-only", action="store_true", help="generate, build and measure the index; no stack")
    p.add_argument("--reuse-builds", action="store_true",
                   help="serve a size's previous build again when its data spec and epochs match (its build "
                        "figures are that build's, marked build_reused); default: build every size afresh")
    p.add_argument("--colocated", action="store_true",
                   help="serve each size with retrieval and ranking inside the gateway process (tools/colocated.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("reports/bench/scale.json"))


def run(args: argparse.Namespace) -> int:
    rows = run_scale(args)
    print("\n" + format_table(rows))
    print("\n" + format_targets(rows))
    print(f"written: {args.out}" + ("" if args.build_only else f" and {args.out.with_suffix('.png')}"))
    return 0


def run_scale(args: argparse.Namespace) -> list[dict]:
    rows: list[dict] = []
    for n in tqdm(args.sizes, desc="catalog sizes", unit="size", file=sys.stderr):
        rows.append(one_size(n, args))
        write_rows(args.out, rows)           # after every size: a long run keeps what it measured
        if not args.build_only:
            plot(args.out.with_suffix(".png"), rows)
    return rows


def one_size(n: int, args: argparse.Namespace) -> dict:
    from offline.datasets.latent import LatentSpec, default_users, write
    folder = args.work_dir / str(n)
    spec = LatentSpec(n_items=n, n_users=args.users or default_users(n), seed=args.seed)
    started = time.perf_counter()
    data = write(folder / "data", spec, progress=True)
    generate_s = time.perf_counter() - started
    artifacts, model_repo = folder / "artifacts", folder / "model_repository"
    record = folder / "build.json"   # this size's last finished build: its spec and figures
    wanted = {"spec": spec.stamp(), "epochs": args.epochs}
    previous = json.loads(record.read_text()) if record.exists() else {}
    reused = (args.reuse_builds and {k: previous.get(k) for k in wanted} == wanted
              and (artifacts / "LATEST").exists())
    if not reused:
        record.unlink(missing_ok=True)
        for old in (artifacts, model_repo):      # one version per size: the stack serves exactly this build
            shutil.rmtree(old, ignore_errors=True)
        build_s, peak_rss_mib = run_build(data, artifacts, model_repo, args.work_dir / "encoder-cache", args.epochs)
        previous = {**wanted, "build_s": round(build_s, 1), "peak_rss_mib": round(peak_rss_mib),
                    "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        record.write_text(json.dumps(previous))
    row = {"items": n, "users": spec.n_users, "epochs": args.epochs, "generate_s": round(generate_s, 1),
           "build_s": previous["build_s"], "peak_rss_mib": previous["peak_rss_mib"],
           "build_reused": bool(reused), "built": previous["built"]}
    row.update(index_figures(artifacts, args.seed))
    row.update(serve(artifacts, model_repo, folder / "run", args) if not args.build_only else
               {"p50_ms": None, "p99_ms": None, "core_ms_per_request": None})
    return {k: row.get(k) for k in ROW_KEYS} | row


def run_build(data: Path, artifacts: Path, model_repo: Path, cache: Path, epochs: int) -> tuple[float, float]:
    """The real build in a child process (its own peak RSS): (seconds, peak RSS MiB)."""
    argv = [sys.executable, "-m", "offline", "build", "--data", f"generic:{data}", "--artifacts", str(artifacts),
            "--model-repo", str(model_repo), "--cache-dir", str(cache), "--epochs", str(epochs),
            "--item-vectors", str(data / "vectors.npy")]
    started = time.perf_counter()
    # Passive OpenMP waits: on a shared, oversubscribed machine spinning torch/faiss threads can burn
    # the CPU their descheduled siblings need (a guess at why the ranker stage ran ~15x slower than
    # quiet at load 9 on 2 cores; not measured apart).
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    child = subprocess.Popen(argv, stdout=2, env=env)   # the build's table and bars go to our stderr
    _, status, usage = os.wait4(child.pid, 0)   # reaped here (for its rusage), so tell Popen the code
    child.returncode = code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"build of {data} failed with exit code {code}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024   # Linux: ru_maxrss in KiB


def history_queries(artifacts, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(queries, item vectors): unit mean vectors of sampled users' recent histories (the BERT
    channel's query, without its recency weights)."""
    vectors = artifacts.npy("item_text.npy")
    with np.load(artifacts.path("user_history.npz")) as npz:
        offsets, items = npz["offsets"], npz["items"]
    rng = np.random.default_rng(seed)
    users = rng.choice(len(offsets) - 1, min(count, len(offsets) - 1), replace=False)
    queries = np.stack([vectors[items[offsets[u]:offsets[u + 1]][-50:]].mean(0) for u in users])
    return (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32), vectors


def index_figures(root: Path, seed: int) -> dict:
    """Recall@300 of the built text index (with the manifest's search parameters) against exact
    search, and the index files' sizes."""
    import faiss
    from common.artifacts import open_artifacts
    from common.faiss_index import index_info, load_index
    artifacts = open_artifacts(root)
    manifest = artifacts.manifest
    info = manifest["indexes"]["text"]
    queries, vectors = history_queries(artifacts, RECALL_QUERIES, seed)
    index, _ = load_index(artifacts.path("index_text.faiss"), info.get("search", {}), gpu=False)
    k = min(RECALL_K, len(vectors))
    found = index.search(queries, k)[1]
    truth = faiss.knn(queries, np.ascontiguousarray(vectors), k, metric=faiss.METRIC_INNER_PRODUCT)[1]
    recall = float(np.mean([len(set(t) & set(f)) / k for t, f in zip(truth, found)]))
    mib = {name: round(artifacts.path(f"index_{name}.faiss").stat().st_size / 2**20, 1) for name in ("text", "cf")}
    return {"interactions": manifest["counts"]["interactions"], "index_kind": index_info(index).kind,
            "index_search": info.get("search", {}), "index_build": info.get("build", {}),
            "recall_at_300": round(recall, 4), "index_mib": mib["text"], "index_cf_mib": mib["cf"],
            "build_recall_at_100": info.get("recall@100"), "text_space": manifest.get("text_space"),
            "build_stages": {s["stage"]: s["seconds"] for s in manifest.get("stages", [])}}


def serve(root: Path, model_repo: Path, run_dir: Path, args: argparse.Namespace) -> dict:
    """The real stack on this build, measured open-loop by tools/bench.py's measure()."""
    from common.artifacts import open_artifacts
    from gateway.user_state import ArtifactHistoryStore
    from protos import fusionrec_pb2 as pb
    from tools.bench import measure
    from tools.stack import Stack
    users = ArtifactHistoryStore(open_artifacts(root)).users()
    rng = random.Random(args.seed)
    picks = [rng.choice(users) for _ in range(int((args.warmup + args.duration) * args.rate) + 1)]

    def make_request(i: int) -> pb.RecommendRequest:
        return pb.RecommendRequest(user_id=picks[i % len(picks)], k=args.k, surface="bench-scale")

    shutil.rmtree(run_dir, ignore_errors=True)    # a fresh item log and user state per size
    stack = Stack(root, model_repo, run_dir, colocated=args.colocated)
    started = time.perf_counter()
    stack.start(timeout_s=900)
    try:
        start_s = time.perf_counter() - started
        summary, _ = measure(stack, args, make_request)
    finally:
        stack.stop()
    lat, cpu = summary["latency_ms"], summary["cpu_ms_per_request"]
    rss = summary["rss_mib"]
    return {"p50_ms": lat.get("p50"), "p99_ms": lat.get("p99"), "core_ms_per_request": round(sum(cpu.values()), 2),
            "cpu_ms_per_request": cpu, "achieved_rps": summary.get("achieved_rps"),
            "error_rate": summary.get("error_rate"), "errors": summary.get("errors"),
            "degraded_share": summary.get("degraded_share"),
            "rss_mib": rss, "resident_mib": round(rss.get("services_total", 0) + rss.get("triton", 0), 1),
            "pss_mib": summary["pss_mib"], "resident_pss_mib": summary["pss_mib"]["total"],
            "stack_start_s": round(start_s, 1), "processes": "colocated" if args.colocated else "three",
            "rate": args.rate, "duration_s": args.duration,
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=2) + "\n")
    os.replace(tmp, path)


def _fmt(v, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: list[dict]) -> str:
    head = (f"{'items':>9} {'users':>6} {'build s':>8} {'peak MiB':>9} {'index':>6} {'recall@300':>10} "
            f"{'index MiB':>9} {'p50 ms':>7} {'p99 ms':>7} {'core-ms':>8} {'resident MiB':>12} {'PSS MiB':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['items']:>9} {r['users']:>6} {r['build_s']:>8.1f} {r['peak_rss_mib']:>9} "
                     f"{r['index_kind']:>6} {r['recall_at_300']:>10.3f} {r['index_mib']:>9.1f} "
                     f"{_fmt(r['p50_ms'], '.1f'):>7} {_fmt(r['p99_ms'], '.1f'):>7} "
                     f"{_fmt(r['core_ms_per_request'], '.1f'):>8} {_fmt(r.get('resident_mib'), '.0f'):>12} "
                     f"{_fmt(r.get('resident_pss_mib'), '.0f'):>8}")
    return "\n".join(lines)


def format_targets(rows: list[dict]) -> str:
    """The issue's targets against this run (the largest size against the smallest)."""
    small, large = rows[0], rows[-1]
    lines = [f"targets (issue 14), {large['items']} items vs {small['items']} in this run:"]
    if small["p50_ms"] and large["p50_ms"] and len(rows) > 1:
        ratio = large["p50_ms"] / small["p50_ms"]
        lines.append(f"  p50 ratio {ratio:.2f} (target <= {TARGETS['p50_ratio']})")
    lines.append(f"  recall@300 {large['recall_at_300']:.3f} (target >= {TARGETS['recall_at_300']})")
    if large.get("resident_mib") is not None:
        lines.append(f"  services + Triton resident {large['resident_mib'] / 1024:.2f} GiB as the VmRSS sum "
                     f"(a page two processes map counts twice), {large['resident_pss_mib'] / 1024:.2f} GiB as "
                     f"the PSS sum (each page once) (target <= {TARGETS['resident_gib']})")
    lines.append(f"  build {large['build_s'] / 60:.1f} min (target <= {TARGETS['build_min']:.0f}, at 1M items)")
    return "\n".join(lines)


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    served = [r for r in rows if r["p50_ms"] is not None]
    if not served:
        return
    items = [r["items"] for r in served]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(items, [r["p50_ms"] for r in served], "o-", label="p50")
    ax.plot(items, [r["p99_ms"] for r in served], "s-", label="p99")
    for r in served:
        ax.annotate(f"{r['core_ms_per_request']:.1f} core-ms\nrecall@300 {r['recall_at_300']:.3f}",
                    (r["items"], r["p99_ms"]), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.2, y=0.25)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("catalog items")
    ax.set_ylabel(f"end-to-end latency ms at {served[0].get('rate', 50):g} rps")
    ax.set_title("FusionRec: latency vs catalog size (brought embeddings)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
