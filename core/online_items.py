"""Items added while serving, on top of a loaded artifact set.

Online items get indices n_items, n_items + 1, ... (allocated by the gateway) and carry their
BERT vector and category index; deleted items (online or not) are remembered so that every
stage can drop them. A new artifact version that contains the items supersedes this overlay.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ItemChange:
    """One online change to the item set, as the services apply it (proto-free: see common.wire)."""
    add_indices: np.ndarray                      # [n] int64
    add_vectors: np.ndarray                      # [n, Dt] float32 text vectors, row per add_indices entry
    add_categories: np.ndarray                   # [n] int64 category indices (0 = unknown)
    remove_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))   # [r] int64

    def __post_init__(self) -> None:
        n = len(self.add_indices)
        if self.add_vectors.ndim != 2 or self.add_vectors.shape[0] != n:
            raise ValueError(f"add_vectors: need {n} rows, one per add_indices entry")
        if len(self.add_categories) != n:
            raise ValueError("add_categories: one per add_indices entry")

    def subset(self, rows: np.ndarray) -> "ItemChange":
        """The additions at `rows` (a mask or positions), with the same removals."""
        return ItemChange(self.add_indices[rows], self.add_vectors[rows], self.add_categories[rows],
                          self.remove_indices)


class OnlineItems:
    def __init__(self, n_items: int, text_dim: int) -> None:
        self.n_items = n_items
        self.text_dim = text_dim
        self.vectors = np.zeros((0, text_dim), np.float32)   # [M, Dt], row = index - n_items
        self.categories = np.zeros(0, np.int64)              # [M]
        self.removed: set[int] = set()
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        """Item indices in use: artifact items plus online items."""
        return self.n_items + len(self.vectors)

    def apply(self, change: ItemChange) -> None:
        """Add or replace online items and remove items; raises ValueError naming the field."""
        indices = np.asarray(change.add_indices, np.int64)
        if change.add_vectors.shape[1:] != (self.text_dim,) and len(indices):
            raise ValueError(f"add_vectors: need {len(indices)} x {self.text_dim} floats")
        with self._lock:
            rows = indices - self.n_items
            if len(rows) and (rows.min() < 0 or rows.max() > len(self.vectors) + len(rows)):
                raise ValueError(f"add_indices: online items are numbered from {self.n_items} without gaps")
            size = max(len(self.vectors), int(rows.max()) + 1 if len(rows) else 0)
            grown = np.zeros((size, self.text_dim), np.float32)
            grown[:len(self.vectors)] = self.vectors
            cats = np.zeros(size, np.int64)
            cats[:len(self.categories)] = self.categories
            grown[rows] = change.add_vectors
            cats[rows] = np.asarray(change.add_categories, np.int64)
            # Swap whole arrays: readers on other threads see the old or the new state, never half.
            self.vectors, self.categories = grown, cats
            self.removed = (self.removed - set(indices.tolist())) | set(np.asarray(change.remove_indices).tolist())
