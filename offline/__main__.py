"""Build a new versioned artifact set from a dataset (`fusionrec build`; also `python -m offline build`).

  fusionrec build --data movielens:data/ml-latest-small --artifacts artifacts --model-repo model_repository
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--data", default="movielens:data/ml-latest-small",
                   help="<kind>:<path>, kind in movielens, mind, generic, synthetic (default: %(default)s)")
    b.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="artifact root (default: %(default)s)")
    b.add_argument("--model-repo", type=Path, default=Path("model_repository"),
                   help="Triton model repository (default: %(default)s)")
    b.add_argument("--cache-dir", type=Path, default=Path(".cache"), help="embedding cache (default: %(default)s)")
    b.add_argument("--text-model-dir", type=Path, default=None,
                   help="local BERT-family model folder (default: packaged all-MiniLM-L6-v2)")
    b.add_argument("--max-items", type=int, default=None, help="keep only the N most popular items")
    b.add_argument("--max-users", type=int, default=None, help="keep only N users (deterministic sample)")
    b.add_argument("--epochs", type=int, default=6, help="fused ranker epochs (default: %(default)s)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--item-log", default=None, metavar="SPEC",
                   help="fold the online item log in: sqlite:<path> or redis://host:port/db (default: none)")
    b.add_argument("--item-vectors", type=Path, default=None, metavar="FILE",
                   help="bring your own item embeddings instead of encoding the texts: FILE.npy ([items, dim] "
                        "floats, ids in FILE.ids.txt) or FILE.parquet (item_id + one vector column; needs "
                        "pyarrow). dim must equal the text model's; rows are L2-normalised")
    b.add_argument("--item-vector-ids", type=Path, default=None, metavar="FILE",
                   help="ids of --item-vectors .npy rows, one per line (default: FILE.ids.txt beside it)")
    b.add_argument("--item-vectors-same-encoder", action="store_true",
                   help="the brought vectors were made by --text-model-dir's model with the build's recipe: "
                        "items without one are encoded, and online UpsertItems stays in the same space "
                        "(default: a catalog item without a vector fails the build; text_space=brought)")
    b.add_argument("--sequential", action="store_true",
                   help="also train the sequential next-item channel (served by Triton's seq_encoder; "
                        "off by default: it does not yet earn its cost, README 'Quality')")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from offline.build import BuildOptions, build
    from offline.item_vectors import ItemVectorsError
    opts = BuildOptions(
        data=args.data, artifacts=args.artifacts, model_repo=args.model_repo, cache_dir=args.cache_dir,
        text_model_dir=args.text_model_dir, max_items=args.max_items, max_users=args.max_users,
        epochs=args.epochs, seed=args.seed, progress=not args.no_progress,
        item_log=args.item_log, item_vectors=args.item_vectors, item_vector_ids=args.item_vector_ids,
        item_vectors_same_encoder=args.item_vectors_same_encoder, sequential=args.sequential)
    try:
        final = build(opts)
    except ItemVectorsError as e:   # a broken rule of the brought vectors: the message says which
        print(f"build refused: {e}", file=sys.stderr)
        return 2
    print(f"artifact set written: {final}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m offline build ...`: the same arguments and function as `fusionrec build`."""
    parser = argparse.ArgumentParser(prog="python -m offline", description="FusionRec offline build")
    sub = parser.add_subparsers(dest="command", required=True)
    add_arguments(sub.add_parser("build", help="build a new versioned artifact set from a dataset"))
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
