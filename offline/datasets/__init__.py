"""Dataset loaders. `load("kind:path")` returns a Dataset; kinds: movielens, mind, generic, synthetic."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from offline.datasets.base import Dataset, Impression, Item, LoadReport
from offline.datasets.generic import load_generic
from offline.datasets.mind import load_mind
from offline.datasets.movielens import load_movielens
from offline.datasets.synthetic import load_synthetic

LOADERS: dict[str, Callable[[Path], Dataset]] = {
    "movielens": load_movielens, "mind": load_mind, "generic": load_generic, "synthetic": load_synthetic}


def register(kind: str, loader: Callable[[Path], Dataset]) -> None:
    LOADERS[kind] = loader


def load(spec: str) -> Dataset:
    """spec is '<kind>:<path>', e.g. 'movielens:data/ml-latest-small'."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in LOADERS:
        raise ValueError(f"DATA must be <kind>:<path> with kind in {sorted(LOADERS)}, got {spec!r}")
    return LOADERS[kind](Path(path))


__all__ = ["Dataset", "Impression", "Item", "LoadReport", "load", "register", "LOADERS"]
