"""Open-loop load generator for the gateway's Recommender/Recommend.

Open loop: request i is sent at t0 + i/rate whatever the responses do, so a slow server shows up
as latency and errors instead of quietly lowering the offered rate (no coordinated omission).
The tool measures its own scheduling lag (send time minus scheduled time) so that a result from
an overloaded client can be recognised and discarded.

    fusionrec loadtest --target 127.0.0.1:50051 --rate 100 --duration 20 --warmup 3
    fusionrec loadtest --target ... --ramp --rate 50 --ramp-step 25 --ramp-max 300
    fusionrec loadtest --selfcheck      # can this process offer 500 rps on this machine?
    fusionrec loadtest --stack --ramp   # start Triton + services on loopback first (make loadtest)

With --stack the tool starts the whole system itself (tools.stack.Stack on the --artifacts and
--model-repo given, ports chosen at run time), draws users from the artifact's user histories
unless --users-file is given, drives it, and stops it.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Callable, Sequence, TextIO

import grpc

from tools import loadtest_overload as overload
from tools import loadtest_report as report
from tools.loadtest_engine import (Metadata, RecommendRequest, lean_connector, load_users, request_factory,
                                   run_open_loop, set_connector)
from tools.stack_args import add_stack_arguments



def _connector(args: argparse.Namespace) -> tuple[Callable[[str], grpc.aio.Channel], Metadata | None]:
    """TLS + the recommend token from --credentials (its gateway unless --target), or plaintext
    with --insecure-dev; sets args.target when the credentials name the gateway."""
    from common.security import Security
    from tools.credentials import Credentials, CredentialsError
    if args.insecure_dev:
        if not args.target:
            raise CredentialsError("--target is required with --insecure-dev")
        return lean_connector(Security.plaintext(), None)
    credentials = Credentials.load(args.credentials)
    args.target = args.target or credentials.gateway
    return lean_connector(credentials.security, credentials.token("recommend"))


# ---------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None, help="gateway host:port (default: the --credentials file's gateway)")
    p.add_argument("--credentials", type=Path, default=Path("run/credentials.json"),
                   help="CA, client cert and tokens written by `fusionrec run` (default: %(default)s)")
    p.add_argument("--insecure-dev", action="store_true",
                   help="plaintext, no token (a gateway run with --insecure-dev; with --stack: start it so)")
    p.add_argument("--colocated", action="store_true",
                   help="with --stack: retrieval and ranking inside the gateway process (tools/colocated.py)")
    p.add_argument("--rate", type=float, default=100.0, help="requests/s (ramp: start rate)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds (per ramp step)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds sent first and not counted")
    p.add_argument("--deadline-ms", type=float, default=None, help="per-request gRPC deadline")
    p.add_argument("--users-file", default=None, help="user ids, one per line (default 1..600)")
    p.add_argument("--k", type=int, default=10, help="items per request")
    p.add_argument("--surface", default="home")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--drain-s", type=float, default=10.0,
                   help="max wait for answers after the last send")
    p.add_argument("--out", default=None,
                   help="JSON report path (default reports/loadtest/<timestamp>.json; PNG beside it)")
    p.add_argument("--quiet", action="store_true", help="no live progress line on stderr")
    p.add_argument("--ramp", action="store_true",
                   help="step the rate from --rate by --ramp-step up to --ramp-max; report the "
                        "highest rate whose p99 and error rate hold")
    p.add_argument("--ramp-step", type=float, default=25.0)
    p.add_argument("--ramp-max", type=float, default=500.0)
    p.add_argument("--p99-target-ms", type=float, default=None,
                   help="p99 a ramp step must hold (default 40; with --overload 100)")
    p.add_argument("--max-error-rate", type=float, default=0.01,
                   help="largest share of non-OK answers a ramp step may have")
    p.add_argument("--selfcheck", action="store_true",
                   help="drive a trivial server in a subprocess at 500 rps and print the figures")
    p.add_argument("--stack", action="store_true",
                   help="start Triton, retrieval, ranking and gateway on loopback first (--target is "
                        "ignored); users come from the artifact's histories unless --users-file")
    overload.add_arguments(p)
    add_stack_arguments(p, Path("run/loadtest"), "process logs and user state", note="with --stack: ")


def run(args: argparse.Namespace) -> int:
    try:
        return _run_mode(args)
    except ConnectionError as e:
        print(f"loadtest: {e}", file=sys.stderr)
        return 2


def _run_mode(args: argparse.Namespace) -> int:
    if args.selfcheck:
        from tools.loadtest_selfcheck import selfcheck
        return selfcheck()
    if args.stack:
        return _on_fresh_stack(args)
    set_connector(*_connector(args))
    return _drive(args, load_users(args.users_file))


def _on_fresh_stack(args: argparse.Namespace) -> int:
    """Start the whole system, load-test its gateway, stop it (also on Ctrl-C or an error)."""
    from common.artifacts import open_artifacts
    from gateway.user_state import ArtifactHistoryStore
    from tools.stack import Stack

    users = (load_users(args.users_file) if args.users_file or args.overload
             else ArtifactHistoryStore(open_artifacts(args.artifacts)).users())
    if not users:
        raise SystemExit(f"{args.artifacts}: the artifact set has no users; pass --users-file")
    print(f"starting Triton, retrieval, ranking and gateway (logs in {args.run_dir}/) ...",
          file=sys.stderr, flush=True)
    with Stack(args.artifacts, args.model_repo, args.run_dir, insecure_dev=args.insecure_dev,
               colocated=args.colocated) as stack:
        args.target = stack.addr("gateway")
        # Not stack.gateway_channel: the lean channel (same certs and token) costs the client less.
        set_connector(*lean_connector(stack.security("client"),
                                      None if args.insecure_dev else stack.tokens["recommend"]))
        print(f"gateway at {args.target}; {len(users)} users from "
              f"{args.users_file or 'the artifact histories'}", file=sys.stderr, flush=True)
        return _drive(args, users, cpu_seconds=lambda: overload.processes_cpu_s(stack.pids().values()))


def _drive(args: argparse.Namespace, users: Sequence[str],
           cpu_seconds: Callable[[], float] | None = None) -> int:
    """cpu_seconds: CPU used so far by the system under test (with --stack), for core-ms per request."""
    if args.overload:   # its requests replay the build's test users (--artifacts), not `users`
        return overload.drive(args, cpu_seconds)
    if args.p99_target_ms is None:
        args.p99_target_ms = 40.0
    make = request_factory(users, args.k, args.surface, args.seed)
    deadline = args.deadline_ms / 1000.0 if args.deadline_ms else None
    progress = None if args.quiet else sys.stderr
    out = Path(args.out or f"reports/loadtest/{time.strftime('%Y%m%d-%H%M%S')}.json")

    if not args.ramp:
        result = asyncio.run(run_open_loop(args.target, args.rate, args.duration, make,
                                           args.warmup, deadline, drain_s=args.drain_s,
                                           progress=progress))
        summary = report.summarize(result)
        report.write_json(out, summary)
        report.plot_latency(out.with_suffix(".png"), result)
        print(report.format_summary(summary))
        print(f"wrote {out} and {out.with_suffix('.png')}")
        return 0

    steps = asyncio.run(_ramp(args, make, deadline, progress))
    best = report.best_rate(steps, args.p99_target_ms, args.max_error_rate)
    doc = {"mode": "ramp", "target": args.target, "p99_target_ms": args.p99_target_ms,
           "max_error_rate": args.max_error_rate, "max_sustained_rps": best, "steps": steps}
    report.write_json(out, doc)
    report.plot_ramp(out.with_suffix(".png"), steps, args.p99_target_ms)
    for s in steps:
        print(report.format_summary(s))
    print(f"highest rate holding p99 <= {args.p99_target_ms:g} ms and errors <= "
          f"{args.max_error_rate:.1%}: {best if best is not None else 'none'} rps")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


async def _ramp(args: argparse.Namespace, make: Callable[[int], RecommendRequest],
                deadline: float | None, progress: TextIO | None) -> list[dict]:
    """Run one step per rate; stop after the first step that misses the target."""
    steps: list[dict] = []
    rate = args.rate
    while rate <= args.ramp_max + 1e-9:
        if progress:
            progress.write(f"ramp step: {rate:g} rps\n")
        result = await run_open_loop(args.target, rate, args.duration, make, args.warmup,
                                     deadline, drain_s=args.drain_s, progress=progress)
        summary = report.summarize(result)
        summary["holds"] = report.step_holds(summary, args.p99_target_ms, args.max_error_rate)
        steps.append(summary)
        if not summary["holds"]:
            break
        rate += args.ramp_step
    return steps
