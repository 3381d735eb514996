"""Start Triton, retrieval, ranking and gateway on 127.0.0.1 (ports chosen at run time), print
recommendations for a few sample users, then serve until Ctrl-C (`make run`)."""
from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path

from tools.stack_args import add_stack_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_stack_arguments(p, Path("run"), "process logs")
    p.add_argument("--samples", type=int, default=3, help="sample users to print (default: %(default)s)")
    p.add_argument("--k", type=int, default=5, help="items per sample (default: %(default)s)")
    p.add_argument("--insecure-dev", action="store_true",
                   help="no TLS, no tokens: every port plaintext and open (development only; logs a warning)")
    p.add_argument("--colocated", action="store_true",
                   help="retrieval and ranking inside the gateway process (tools/colocated.py): Triton + one process")


def run(args: argparse.Namespace) -> int:
    from common.artifacts import open_artifacts
    from gateway.user_state import ArtifactHistoryStore
    from protos import fusionrec_pb2 as pb
    from tools.client import format_response, recommend
    from tools.stack import Stack
    from tools.supervisor import Supervisor

    stack = Stack(args.artifacts, args.model_repo, args.run_dir, insecure_dev=args.insecure_dev,
                  colocated=args.colocated)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    what = "the gateway with retrieval and ranking in it" if args.colocated else "retrieval, ranking and gateway"
    print(f"starting Triton and {what} on 127.0.0.1 ...", flush=True)
    started = time.monotonic()
    stack.start()
    try:
        print(f"all SERVING after {time.monotonic() - started:.1f}s; logs in {args.run_dir}/")
        for name, proc in stack.processes.items():
            print(f"  {name:<10} pid {proc.popen.pid:<7} ports {proc.ports}")
        gateway = stack.addr("gateway")
        users = ArtifactHistoryStore(open_artifacts(args.artifacts)).users()[:args.samples]
        with stack.gateway_channel("recommend") as channel:
            for user in users:
                print(f"\nRecommend(user_id={user!r}, k={args.k}):")
                print(format_response(recommend(channel, pb.RecommendRequest(user_id=user, k=args.k))))
        if args.insecure_dev:
            print("\nWARNING: --insecure-dev: plaintext, no tokens")
            print(f"Gateway: {gateway}   try: .venv/bin/fusionrec recommend --insecure-dev --target {gateway} --user 1")
        else:
            print(f"\nGateway: {gateway} (TLS + tokens); credentials: {stack.credentials_path}")
            print(f"  try: .venv/bin/fusionrec recommend --credentials {stack.credentials_path} --user 1")
        print("Serving until Ctrl-C (a child that exits is restarted: tools/supervisor.py) ...", flush=True)
        Supervisor(stack).run(until=lambda: stop["now"])
    except KeyboardInterrupt:
        pass
    finally:
        print("\nstopping ...", flush=True)
        stack.stop()
        print("stopped.")
    return 0
