"""The `fusionrec` command: build, eval, run, recommend, bench, loadtest. Each subcommand has --help."""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path


def _stack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="artifact root (default: %(default)s)")
    p.add_argument("--model-repo", type=Path, default=Path("model_repository"),
                   help="Triton model repository (default: %(default)s)")
    p.add_argument("--run-dir", type=Path, default=Path("run"), help="process logs (default: %(default)s)")


def cmd_run(args: argparse.Namespace) -> int:
    from common.artifacts import open_artifacts
    from common.stack import Stack
    from gateway.client import format_response, recommend
    from gateway.user_state import ArtifactHistoryStore
    from protos import fusionrec_pb2 as pb

    stack = Stack(args.artifacts, args.model_repo, args.run_dir)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    print("starting Triton, retrieval, ranking and gateway on 127.0.0.1 ...", flush=True)
    started = time.monotonic()
    stack.start()
    try:
        print(f"all SERVING after {time.monotonic() - started:.1f}s; logs in {args.run_dir}/")
        for name, proc in stack.processes.items():
            print(f"  {name:<10} pid {proc.popen.pid:<7} ports {proc.ports}")
        gateway = stack.addr("gateway")
        users = ArtifactHistoryStore(open_artifacts(args.artifacts)).users()[:args.samples]
        for user in users:
            print(f"\nRecommend(user_id={user!r}, k={args.k}):")
            print(format_response(recommend(gateway, pb.RecommendRequest(user_id=user, k=args.k))))
        print(f"\nGateway: {gateway}   try: .venv/bin/python -m gateway.client --target {gateway} --user 1")
        print("Serving until Ctrl-C ...", flush=True)
        while not stop["now"]:
            for name, proc in stack.processes.items():
                if proc.popen.poll() is not None:
                    print(f"{name} exited ({proc.popen.returncode}); stopping. Last lines:\n{proc.tail()}")
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        print("\nstopping ...", flush=True)
        stack.stop()
        print("stopped.")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from gateway.bench import run_bench
    run_bench(args)
    return 0


def cmd_build(argv: list[str]) -> int:
    from offline.__main__ import main as offline_main
    return offline_main(["build", *argv])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["build"]:
        return cmd_build(argv[1:])
    if argv[:1] == ["eval"]:
        from offline.evaluate import main as evaluate_main
        return evaluate_main(argv[1:])
    parser = argparse.ArgumentParser(prog="fusionrec", description="FusionRec: BERT + CF two-stage recommender")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build artifacts (see `fusionrec build --help`)", add_help=False)
    sub.add_parser("eval", help="offline quality report (see `fusionrec eval --help`)", add_help=False)
    run = sub.add_parser("run", help="start the whole system on loopback and serve until Ctrl-C")
    _stack_args(run)
    run.add_argument("--samples", type=int, default=3, help="sample users to print (default: %(default)s)")
    run.add_argument("--k", type=int, default=5, help="items per sample (default: %(default)s)")
    run.set_defaults(fn=cmd_run)
    bench = sub.add_parser("bench", help="open-loop benchmark of the gateway on a fresh stack")
    _stack_args(bench)
    bench.add_argument("--rate", type=float, default=50.0, help="requests per second (default: %(default)s)")
    bench.add_argument("--duration", type=float, default=20.0, help="measured seconds (default: %(default)s)")
    bench.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first (default: %(default)s)")
    bench.add_argument("--k", type=int, default=10)
    bench.add_argument("--deadline-ms", type=float, default=250.0)
    bench.add_argument("--out", type=Path, default=Path("reports/bench/serving.json"))
    bench.set_defaults(fn=cmd_bench)
    load = sub.add_parser("loadtest", help="open-loop load test of a gateway, or of a fresh stack with --stack "
                                           "(same as python -m gateway.loadtest)", add_help=False)
    load.set_defaults(fn=None)
    rec = sub.add_parser("recommend", help="call a running gateway (same as python -m gateway.client)",
                         add_help=False)
    rec.set_defaults(fn=None)
    args, rest = parser.parse_known_args(argv)
    if args.command == "recommend":
        from gateway.client import main as client_main
        return client_main(rest)
    if args.command == "loadtest":
        from gateway.loadtest import main as loadtest_main
        return loadtest_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
