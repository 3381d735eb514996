"""`make bench` (`fusionrec bench`): start the whole stack, drive the gateway open-loop at a fixed rate with users
drawn from the data, and print + write the figures (it asserts nothing).

Reports achieved rate, latency percentiles, errors by code, degraded share, the per-stage
breakdown, and the resident memory of each process after the run. With --deleted/--online it then
seeds the store through the public API (UpsertItems in batches of 256, DeleteItems) and runs the
same load again on the same stack: both rows are printed side by side and written to one JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.artifacts import open_artifacts
from gateway.user_state import ArtifactHistoryStore
from protos import fusionrec_pb2 as pb
from tools import loadtest_report as report
from tools.loadtest_engine import run_open_loop
from tools.stack import Stack
from tools.stack_args import add_stack_arguments


def process_tree(pid: int) -> list[int]:
    """A process and its descendants (Triton's python-backend stubs are its children)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    kids = children.read_text().split() if children.exists() else []
    return [pid, *(p for child in kids for p in process_tree(int(child)))]


def rss_mib(pid: int) -> float:
    """Resident set size (VmRSS) of one process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pss_mib(pid: int) -> float:
    """Proportional set size of one process, in MiB: each resident page divided by the number of
    processes mapping it. Summed over a group of processes it counts a page they share once, where
    the VmRSS sum counts it once per process: retrieval and ranking both map item_text.npy, and on
    a kernel that caches files in large folios each row read maps up to its whole folio (at 1M
    items both map ~1.4 GiB of the same page cache)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return float("nan")
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_total(measure, pid: int) -> float:
    return sum(measure(p) for p in process_tree(pid))


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_stack_arguments(p, Path("run"), "process logs")
    p.add_argument("--rate", type=float, default=50.0, help="requests per second (default: %(default)s)")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first (default: %(default)s)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--deadline-ms", type=float, default=250.0)
    p.add_argument("--deleted", type=int, default=0,
                   help="then seed the store with this many DeleteItems and measure again (default: %(default)s)")
    p.add_argument("--online", type=int, default=0,
                   help="... and this many UpsertItems (generated items) (default: %(default)s)")
    p.add_argument("--keep-catalog", type=int, default=500,
                   help="catalog items never deleted; deletes beyond the rest go to extra online items "
                        "upserted for the purpose (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("reports/bench/serving.json"))
    p.add_argument("--insecure-dev", action="store_true",
                   help="start the stack without TLS and tokens (to measure what security costs)")
    p.add_argument("--colocated", action="store_true",
                   help="retrieval and ranking inside the gateway process (tools/colocated.py): "
                        "Triton + one process instead of Triton + three")


def run(args: argparse.Namespace) -> int:
    run_bench(args)
    return 0


def measure(stack: Stack, args: argparse.Namespace, make_request) -> tuple[dict, object]:
    """One open-loop run at args.rate: the summary with per-process CPU per request and memory."""
    cpu_before: dict[str, float] = {}

    def window_opens() -> None:   # CPU from the first measured send: warm-up and start-up spill excluded
        cpu_before.update({name: tree_total(cpu_seconds, pid) for name, pid in stack.pids().items()})

    result = asyncio.run(run_open_loop(stack.addr("gateway"), args.rate, args.duration, make_request,
                                       warmup=args.warmup, deadline_s=args.deadline_ms / 1000.0,
                                       progress=sys.stderr, on_window=window_opens,
                                       connect=lambda target: stack.gateway_channel("recommend", aio=True)))
    memory = {name: round(tree_total(rss_mib, pid), 1) for name, pid in stack.pids().items()}
    pss = {name: round(tree_total(pss_mib, pid), 1) for name, pid in stack.pids().items()}
    # Every request sent in the window, answered or not (a few warm-up calls may still finish in it).
    sent = max(len(result.samples), 1)
    cpu_ms = {name: round((tree_total(cpu_seconds, pid) - cpu_before[name]) * 1000 / sent, 2)
              for name, pid in stack.pids().items()}
    summary = report.summarize(result)
    summary["rss_mib"] = memory
    summary["rss_mib"]["services_total"] = round(sum(v for k, v in memory.items() if k != "triton"), 1)
    summary["pss_mib"] = {**pss, "total": round(sum(pss.values()), 1)}   # the stack's pages, each once
    summary["cpu_ms_per_request"] = cpu_ms
    return summary, result


@dataclass(frozen=True)
class SeedPlan:
    """What seeding writes through the public API: `online` items that stay, `extra` items upserted
    only to be deleted (when the catalog alone cannot give `deleted` deletions), catalog deletions."""
    online: list[str]
    extra: list[str]
    catalog_deleted: list[str]

    @property
    def deleted(self) -> list[str]:
        return self.catalog_deleted + self.extra

    def describe(self) -> dict:
        return {"online_items": len(self.online), "deleted_items": len(self.deleted),
                "deleted_catalog_items": len(self.catalog_deleted), "deleted_online_items": len(self.extra)}


def plan_seed(catalog_ids: list[str], deleted: int, online: int, keep_catalog: int, seed: int = 0) -> SeedPlan:
    from_catalog = min(deleted, max(len(catalog_ids) - keep_catalog, 0))
    doomed = random.Random(seed).sample(catalog_ids, from_catalog)
    return SeedPlan(online=[f"bench-online-{j}" for j in range(online)],
                    extra=[f"bench-gone-{j}" for j in range(deleted - from_catalog)], catalog_deleted=doomed)


def generated_item(item_id: str, j: int) -> pb.NewItem:
    words = ("storm", "harbour", "detective", "orchard", "comet", "violin", "desert", "robot", "winter", "heist")
    picked = " ".join(words[(j * 7 + i * 3) % len(words)] for i in range(4))
    return pb.NewItem(item_id=item_id, title=f"Generated {j}: the {picked}", category=("Drama", "Comedy")[j % 2],
                      text=f"A generated story about a {picked}, number {j}, for the store benchmark.")


def seed_store(stack: Stack, plan: SeedPlan, timeout_s: float = 120.0) -> dict:
    """Upsert then delete through the gateway, in the API's batch sizes; the seconds each took."""
    from core.limits import MAX_DELETE, MAX_UPSERT
    from protos import fusionrec_pb2_grpc as pb_grpc
    upserts = plan.online + plan.extra
    with stack.gateway_channel("items") as channel:
        stub = pb_grpc.RecommenderStub(channel)
        started = time.monotonic()
        for lo in range(0, len(upserts), MAX_UPSERT):
            items = [generated_item(i, lo + j) for j, i in enumerate(upserts[lo:lo + MAX_UPSERT])]
            stub.UpsertItems(pb.UpsertItemsRequest(items=items), timeout=timeout_s)
        upserted_s = time.monotonic() - started
        seq = 0
        for lo in range(0, len(plan.deleted), MAX_DELETE):
            seq = stub.DeleteItems(pb.DeleteItemsRequest(item_ids=plan.deleted[lo:lo + MAX_DELETE]),
                                   timeout=timeout_s).item_log_seq
    return {**plan.describe(), "upsert_s": round(upserted_s, 1),
            "delete_s": round(time.monotonic() - started - upserted_s, 1), "item_log_seq": seq}


def run_bench(args: argparse.Namespace) -> dict:
    artifacts = open_artifacts(args.artifacts)
    users = ArtifactHistoryStore(artifacts).users()
    rng = random.Random(0)
    picks = [rng.choice(users) for _ in range(int((args.warmup + args.duration) * args.rate) + 1)]

    def make_request(i: int) -> pb.RecommendRequest:
        return pb.RecommendRequest(user_id=picks[i % len(picks)], k=args.k, surface="bench")

    seeding = args.deleted > 0 or args.online > 0
    # A store of the bench's own, emptied first: the first row is an empty item log.
    store = args.run_dir.resolve() / "bench-state.db"
    for stale in (store, store.with_name(store.name + "-wal"), store.with_name(store.name + "-shm")):
        stale.unlink(missing_ok=True)
    with Stack(args.artifacts, args.model_repo, args.run_dir, store=f"sqlite:{store}",
               insecure_dev=args.insecure_dev, colocated=args.colocated) as stack:
        empty, result = measure(stack, args, make_request)
        rows = {"empty_store": empty}
        if seeding:
            plan = plan_seed(artifacts.json("catalog.json")["item_ids"], args.deleted, args.online,
                             args.keep_catalog)
            print(f"seeding the store through the API: {plan.describe()} ...", file=sys.stderr, flush=True)
            seeded_with = seed_store(stack, plan)
            rows["seeded_store"], result = measure(stack, args, make_request)
            rows["seeded_store"]["seed"] = seeded_with
    config = {"rate": args.rate, "duration_s": args.duration, "k": args.k, "deadline_ms": args.deadline_ms,
              "candidates": 300, "security": "off (--insecure-dev)" if args.insecure_dev else "TLS/mTLS + tokens",
              "processes": "colocated (gateway + Triton)" if args.colocated else "gateway, retrieval, ranking + Triton",
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for name, summary in rows.items():
        summary["config"] = config
        print(f"\n== {name.replace('_', ' ')}" + (f": {summary['seed']}" if "seed" in summary else ""))
        print(report.format_summary(summary))
        cpu_ms = summary["cpu_ms_per_request"]
        print("CPU core-ms per request: " + ", ".join(f"{k}={v}" for k, v in cpu_ms.items())
              + f" (total {sum(cpu_ms.values()):.1f})")
        print("resident memory (MiB): " + ", ".join(f"{k}={v}" for k, v in summary["rss_mib"].items()))
        print("proportional (PSS, shared pages once; MiB): " + ", ".join(f"{k}={v}" for k, v in summary["pss_mib"].items()))
    if seeding:
        print("\n" + format_comparison(rows["empty_store"], rows["seeded_store"]))
    doc = rows["empty_store"] if not seeding else {"rows": rows, "config": config}
    report.write_json(args.out, doc)
    report.plot_latency(args.out.with_suffix(".png"), result)
    print(f"written: {args.out} and {args.out.with_suffix('.png')}")
    return doc


def format_comparison(empty: dict, seeded: dict) -> str:
    """The two runs side by side: what the seeded store costs per request."""
    lines = [f"{'':<28}{'empty store':>14}{'seeded store':>14}"]
    for label, get in (("p50 ms", lambda s: s["latency_ms"]["p50"]), ("p99 ms", lambda s: s["latency_ms"]["p99"]),
                       ("achieved rps", lambda s: s["achieved_rps"]), ("error rate", lambda s: s["error_rate"]),
                       ("degraded share", lambda s: s["degraded_share"]),
                       ("core-ms per request", lambda s: round(sum(s["cpu_ms_per_request"].values()), 1)),
                       ("retrieval core-ms", lambda s: s["cpu_ms_per_request"].get("retrieval")),
                       ("gateway core-ms", lambda s: s["cpu_ms_per_request"].get("gateway"))):
        lines.append(f"{label:<28}{get(empty)!s:>14}{get(seeded)!s:>14}")
    return "\n".join(lines)
