"""The `fusionrec` command (also `python -m tools.cli`): one registry of subcommands, each with --help.

Every subcommand is declared once in COMMANDS: its name, its one-line help, and the module that
implements it. Such a module exposes `add_arguments(parser)` and `run(args) -> int` (its exit
status); its docstring is the subcommand's description. A module is imported only when its
command is used, so `fusionrec --help` does not load torch, faiss or Triton's client.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class CommandSpec:
    name: str
    help: str
    module: str   # dotted path of a module with add_arguments(parser) and run(args) -> int

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec("build", "build a new versioned artifact set from a dataset", "offline.__main__"),
    CommandSpec("eval", "offline quality report: replay held-out test users through a fresh stack",
                "tools.evaluate"),
    CommandSpec("eval-seeds", "N builds with different seeds, each evaluated: mean ± sd of nDCG@10 (build stability)",
                "tools.eval_seeds"),
    CommandSpec("run", "start the whole system on loopback and serve until Ctrl-C", "tools.run"),
    CommandSpec("bench", "open-loop benchmark of the gateway on a fresh stack", "tools.bench"),
    CommandSpec("bench-batching", "fused ranker on Triton, dynamic batching on vs off", "tools.bench_batching"),
    CommandSpec("bench-hop", "one bare gRPC hop, plaintext and mTLS: server and client core-ms per call",
                "tools.bench_hop"),
    CommandSpec("bench-scale", "build and serve synthetic 10k/100k/1M-item catalogs with brought embeddings",
                "tools.bench_scale"),
    CommandSpec("loadtest", "open-loop load test of a gateway, or of a fresh stack with --stack",
                "tools.loadtest"),
    CommandSpec("recommend", "call a running gateway's Recommend", "tools.client"),
    CommandSpec("export-events", "join the gateways' event logs into one interactions.csv, erased users left out",
                "tools.export_events"),
    CommandSpec("tokens", "mint a bearer token (hashed into the gateway's --tokens file) or list them",
                "tools.tokens"),
    CommandSpec("gpu-check", "FAISS index build and search on GPU vs CPU (needs faiss-gpu)", "tools.gpu_check"),
)
BY_NAME = {c.name: c for c in COMMANDS}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `fusionrec` parser; only `command`'s module is imported and gets its arguments."""
    parser = argparse.ArgumentParser(prog="fusionrec", description="FusionRec: BERT + CF two-stage recommender")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for spec in COMMANDS:
        if spec.name != command:
            sub.add_parser(spec.name, help=spec.help, description=spec.help)
            continue
        module = spec.load()
        p = sub.add_parser(spec.name, help=spec.help, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(handler=module.run)
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser(argv[0] if argv and argv[0] in BY_NAME else None).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
