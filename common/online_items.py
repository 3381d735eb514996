"""Items added while serving, on top of a loaded artifact set.

Online items get indices n_items, n_items + 1, ... (allocated by the gateway) and carry their
BERT vector and category index; deleted items (online or not) are remembered so that every
stage can drop them. A new artifact version that contains the items supersedes this overlay.
"""
from __future__ import annotations

import threading

import numpy as np

from protos import fusionrec_pb2 as pb


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

    def apply(self, update: pb.ItemUpdate) -> None:
        """Add or replace online items and remove items; raises ValueError naming the field."""
        indices = np.array(update.add_indices, np.int64)
        vectors = np.array(update.add_vectors, np.float32)
        if vectors.size != len(indices) * self.text_dim:
            raise ValueError(f"add_vectors: need {len(indices)} x {self.text_dim} floats, got {vectors.size}")
        if len(update.add_categories) != len(indices):
            raise ValueError("add_categories: one per add_indices entry")
        vectors = vectors.reshape(len(indices), self.text_dim)
        with self._lock:
            rows = indices - self.n_items
            if len(rows) and (rows.min() < 0 or rows.max() > len(self.vectors) + len(rows)):
                raise ValueError(f"add_indices: online items are numbered from {self.n_items} without gaps")
            size = max(len(self.vectors), int(rows.max()) + 1 if len(rows) else 0)
            grown = np.zeros((size, self.text_dim), np.float32)
            grown[:len(self.vectors)] = self.vectors
            cats = np.zeros(size, np.int64)
            cats[:len(self.categories)] = self.categories
            grown[rows] = vectors
            cats[rows] = np.array(update.add_categories, np.int64)
            # Swap whole arrays: readers on other threads see the old or the new state, never half.
            self.vectors, self.categories = grown, cats
            self.removed = (self.removed - set(indices.tolist())) | set(update.remove_indices)


def item_update(add_indices: list[int], vectors: np.ndarray, categories: list[int],
                remove_indices: list[int] | None = None) -> pb.ItemUpdate:
    return pb.ItemUpdate(add_indices=add_indices, add_vectors=vectors.astype(np.float32).ravel().tolist(),
                         add_categories=categories, remove_indices=remove_indices or [])
