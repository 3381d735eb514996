"""`make bench` (`fusionrec bench`): start the whole stack, drive the gateway open-loop at a fixed rate with users
drawn from the data, and print + write the figures (it asserts nothing).

Reports achieved rate, latency percentiles, errors by code, degraded share, the per-stage
breakdown, and the resident memory of each process after the run.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from pathlib import Path

from common.artifacts import open_artifacts
from gateway.user_state import ArtifactHistoryStore
from protos import fusionrec_pb2 as pb
from tools import loadtest_report as report
from tools.loadtest import run_open_loop
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
    p.add_argument("--out", type=Path, default=Path("reports/bench/serving.json"))


def run(args: argparse.Namespace) -> int:
    run_bench(args)
    return 0


def run_bench(args: argparse.Namespace) -> dict:
    users = ArtifactHistoryStore(open_artifacts(args.artifacts)).users()
    rng = random.Random(0)
    picks = [rng.choice(users) for _ in range(int((args.warmup + args.duration) * args.rate) + 1)]

    def make_request(i: int) -> pb.RecommendRequest:
        return pb.RecommendRequest(user_id=picks[i % len(picks)], k=args.k, surface="bench")

    with Stack(args.artifacts, args.model_repo, args.run_dir) as stack:
        cpu_before = {name: tree_total(cpu_seconds, pid) for name, pid in stack.pids().items()}
        result = asyncio.run(run_open_loop(stack.addr("gateway"), args.rate, args.duration, make_request,
                                           warmup=args.warmup, deadline_s=args.deadline_ms / 1000.0,
                                           progress=sys.stderr))
        memory = {name: round(tree_total(rss_mib, pid), 1) for name, pid in stack.pids().items()}
        answered = max(len([x for x in result.samples if x.latency is not None]), 1)
        # Includes warm-up requests' CPU, so divide by everything sent.
        sent = answered + int(args.warmup * args.rate)
        cpu_ms = {name: round((tree_total(cpu_seconds, pid) - cpu_before[name]) * 1000 / sent, 2)
                  for name, pid in stack.pids().items()}
    summary = result.summary()
    summary["rss_mib"] = memory
    summary["rss_mib"]["services_total"] = round(sum(v for k, v in memory.items() if k != "triton"), 1)
    summary["cpu_ms_per_request"] = cpu_ms
    summary["config"] = {"rate": args.rate, "duration_s": args.duration, "k": args.k,
                         "deadline_ms": args.deadline_ms, "candidates": 300,
                         "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(report.format_summary(summary))
    print("CPU core-ms per request: " + ", ".join(f"{k}={v}" for k, v in cpu_ms.items())
          + f" (total {sum(cpu_ms.values()):.1f})")
    print("resident memory (MiB): " + ", ".join(f"{k}={v}" for k, v in summary["rss_mib"].items()))
    report.write_json(args.out, summary)
    report.plot_latency(args.out.with_suffix(".png"), result)
    print(f"written: {args.out} and {args.out.with_suffix('.png')}")
    return summary
