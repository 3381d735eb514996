"""Items changed online, on top of one artifact version, derived from the item log alone.

Index allocation is a pure function of (artifact version, log records in order): an upserted id
the catalog does not know gets the next online index n_items, n_items + 1, ... in log order. Every
replica of every service replays the same log, so they all agree on every index without asking
each other, after a restart as well. Records at or before the version's `folded_seq` (the build
folded them into the catalog) are skipped.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from core.item_records import ItemOp, ItemRecord


@dataclass(frozen=True)
class AppliedRecords:
    """What one apply() changed, for the service to mirror in its own structures (FAISS, tables).
    Mirror `upserted` first, then `deleted`: an index may be in both (upserted, then deleted in the
    same batch); an upserted index not in `deleted` is live again. Every new online index appears
    in `upserted` in the apply that allocates it, so a mirror can grow its arrays in order."""
    upserted: np.ndarray                 # [u] int64 ascending: indices upserted by these records
    vectors: np.ndarray                  # [u, Dt] float32, their latest vectors
    categories: np.ndarray               # [u] int64, their category indices
    deleted: np.ndarray                  # [d] int64 ascending: indices deleted after these records
    last_seq: int                        # the overlay's position after the apply

    @property
    def empty(self) -> bool:
        return len(self.upserted) == 0 and len(self.deleted) == 0


@dataclass
class ItemOverlay:
    item_ids: list[str]                  # artifact items' ids, by index (never mutated)
    text_dim: int
    category_index: dict[str, int]       # category name -> index (0 = unknown)
    folded_seq: int = 0                  # log position the artifact version already contains
    applied_seq: int = 0
    online_ids: list[str] = field(default_factory=list)              # id of online index n_items + j
    titles: dict[int, str] = field(default_factory=dict)             # index -> title, items changed online
    categories: dict[int, str] = field(default_factory=dict)         # index -> category name
    replaced: dict[int, np.ndarray] = field(default_factory=dict)    # catalog index -> its online vector
    rejected: int = 0                    # malformed records skipped (every replica skips the same ones)
    vectors: np.ndarray = field(init=False)                          # [M, Dt] online items' vectors
    category_ids: np.ndarray = field(init=False)                     # [M] online items' category indices
    deleted_mask: np.ndarray = field(init=False)                     # [n_items + M] bool

    def __post_init__(self) -> None:
        self.n_items = len(self.item_ids)
        self.index = {item_id: j for j, item_id in enumerate(self.item_ids)}
        self.vectors = np.zeros((0, self.text_dim), np.float32)
        self.category_ids = np.zeros(0, np.int64)
        self.deleted_mask = np.zeros(self.n_items, bool)
        self.applied_seq = max(self.applied_seq, self.folded_seq)
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        """Item indices in use: artifact items plus online items."""
        return self.n_items + len(self.online_ids)

    def index_of(self, item_id: str) -> int | None:
        return self.index.get(item_id)

    def is_live(self, index: int) -> bool:
        mask = self.deleted_mask   # one read: apply() swaps the array whole
        return 0 <= index < len(mask) and not mask[index]

    def deleted_indices(self) -> np.ndarray:
        return np.flatnonzero(self.deleted_mask)

    def _vector_of(self, r: ItemRecord) -> np.ndarray | None:
        """The upsert's vector, or None when it is malformed (wrong size, not finite)."""
        if r.vector is None:
            return None
        vector = np.asarray(r.vector, np.float32).reshape(-1)
        return vector if vector.size == self.text_dim and np.isfinite(vector).all() else None

    def apply(self, records: Sequence[ItemRecord]) -> AppliedRecords:
        """Apply records in log order; records at or before applied_seq are skipped (idempotent).
        A malformed record (unknown op, no or wrong-sized vector) is skipped and counted, never
        raised: it would stop every replica at the same place for good."""
        with self._lock:
            upserted: dict[int, tuple[np.ndarray, int]] = {}
            deleted: set[int] = set()
            new_ids: dict[str, int] = {}
            for r in records:
                if r.seq <= self.applied_seq:
                    continue
                self.applied_seq = r.seq
                j = self.index.get(r.item_id, new_ids.get(r.item_id))
                if r.op == ItemOp.DELETE:
                    if j is not None:
                        deleted.add(j)
                    continue
                vector = self._vector_of(r) if r.op == ItemOp.UPSERT else None
                if vector is None or not isinstance(r.item_id, str) or not r.item_id:
                    self.rejected += 1
                    continue
                if j is None:
                    j = new_ids[r.item_id] = self.total + len(new_ids)
                upserted[j] = (vector, self.category_index.get(r.category, 0))
                self.titles[j], self.categories[j] = r.title, r.category
                if j < self.n_items:
                    self.replaced[j] = vector
                deleted.discard(j)
            # Grow whole arrays and swap them: readers on other threads see old or new, never half.
            m = len(self.online_ids) + len(new_ids)
            vectors = np.zeros((m, self.text_dim), np.float32)
            vectors[:len(self.vectors)] = self.vectors
            category_ids = np.zeros(m, np.int64)
            category_ids[:len(self.category_ids)] = self.category_ids
            mask = np.zeros(self.n_items + m, bool)
            mask[:len(self.deleted_mask)] = self.deleted_mask
            for j, (vector, category) in upserted.items():
                mask[j] = False
                if j >= self.n_items:
                    vectors[j - self.n_items] = vector
                    category_ids[j - self.n_items] = category
            mask[sorted(deleted)] = True
            self.vectors, self.category_ids, self.deleted_mask = vectors, category_ids, mask
            self.online_ids = self.online_ids + list(new_ids)
            self.index.update(new_ids)   # last: an id is findable only once its arrays are in place
            order = sorted(upserted)
            return AppliedRecords(
                np.array(order, np.int64),
                np.stack([upserted[j][0] for j in order]) if order else np.zeros((0, self.text_dim), np.float32),
                np.array([upserted[j][1] for j in order], np.int64),
                np.array(sorted(deleted), np.int64), self.applied_seq)
