"""The arguments every command that starts its own stack takes: where the artifacts, the Triton
model repository and the process logs are."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_stack_arguments(p: argparse.ArgumentParser, run_dir: Path, run_dir_help: str, note: str = "") -> None:
    """`note` prefixes each help line (e.g. "with --stack: " where the stack is optional)."""
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"),
                   help=f"{note}artifact root (default: %(default)s)")
    p.add_argument("--model-repo", type=Path, default=Path("model_repository"),
                   help=f"{note}Triton model repository (default: %(default)s)")
    p.add_argument("--run-dir", type=Path, default=run_dir, help=f"{note}{run_dir_help} (default: %(default)s)")
