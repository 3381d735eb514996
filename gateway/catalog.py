"""The item catalog the gateway needs for one artifact version: id <-> index, titles, categories,
the popular fallback order, and the items changed online since the build.

The online part is an ItemOverlay (core/item_overlay.py) fed by the item log: every replica
derives the same indices from the same log, so an index from retrieval or ranking means the same
item here (or one this gateway has not applied yet: `resolvable` says which). Deletes are the
overlay's bitmap: checking a list of items costs O(len(list)), never O(deleted items).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from common.artifacts import ArtifactSet
from common.components import item_overlay
from core.item_records import ItemRecord


class Catalog:
    def __init__(self, artifacts: ArtifactSet) -> None:
        data = artifacts.json("catalog.json")
        self.artifact_ids: list[str] = data["item_ids"]   # the same strings as the overlay's index keys
        # Held compactly (1M items: ~20 MB instead of ~120 MB of str objects): titles as one UTF-8
        # blob + offsets, categories as codes into category_names.
        self.artifact_titles = PackedStrings(data.pop("titles"))
        names = list(data.get("category_names") or [""])
        code = {name: j for j, name in enumerate(names)}
        for name in data["categories"]:
            if name not in code:
                code[name] = len(names)
                names.append(name)
        self.category_names = names
        self.category_codes = np.array([code[c] for c in data.pop("categories")], np.int32)
        self.n_artifact_items = len(self.artifact_ids)
        self.popular = artifacts.npy("popular.npy").astype(np.int64)   # [n] item indices, most popular first
        self.overlay = item_overlay(artifacts, data)   # checks the count against the manifest
        self.category_index = self.overlay.category_index

    # -- the log

    @property
    def folded_seq(self) -> int:
        return self.overlay.folded_seq

    @property
    def applied_seq(self) -> int:
        """The item-log position this version has applied (at least the folded one)."""
        return self.overlay.applied_seq

    def apply(self, records: Sequence[ItemRecord]) -> None:
        """The follower's callback: records in log order (idempotent)."""
        self.overlay.apply(records)

    # -- lookups

    @property
    def index(self) -> dict[str, int]:
        """item id -> index, artifact and online items (deleted ones included)."""
        return self.overlay.index

    @property
    def total(self) -> int:
        """Indices this gateway can resolve: [0, total)."""
        return self.overlay.total

    def item_id(self, j: int) -> str:
        return self.artifact_ids[j] if j < self.n_artifact_items else self.overlay.online_ids[j - self.n_artifact_items]

    def title(self, j: int) -> str:
        changed = self.overlay.titles.get(j)
        return changed if changed is not None else self.artifact_titles[j]

    def category(self, j: int) -> str:
        changed = self.overlay.categories.get(j)
        return changed if changed is not None else self.category_names[self.category_codes[j]]

    def resolvable(self, items: np.ndarray) -> np.ndarray:
        """[m] bool: the index names an item this gateway knows (a replica ahead of it may send
        one it has not applied yet)."""
        items = np.asarray(items, np.int64)
        return (items >= 0) & (items < self.total)

    def live(self, items: np.ndarray) -> np.ndarray:
        """[m] bool: known and not deleted. O(m): one lookup in the deleted bitmap per item."""
        items = np.asarray(items, np.int64)
        mask = self.overlay.deleted_mask   # read once: apply() swaps in a new array
        ok = (items >= 0) & (items < len(mask))
        out = np.zeros(len(items), bool)
        out[ok] = ~mask[items[ok]]
        return out

    def to_indices(self, item_ids: Iterable[str]) -> np.ndarray:
        """Known, not deleted ids -> [m] int64 indices in the same order; the rest are dropped."""
        found = np.array([j for j in (self.index.get(i) for i in item_ids) if j is not None], np.int64)
        return found[self.live(found)]

    def knows(self, item_id: str) -> bool:
        j = self.index.get(item_id)
        return j is not None and bool(self.live(np.array([j]))[0])


class PackedStrings:
    """A read-only list of strings as one UTF-8 blob + offsets: len() and [j] only."""

    def __init__(self, strings: Sequence[str]) -> None:
        encoded = [t.encode("utf-8") for t in strings]
        self.offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.blob = b"".join(encoded)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, j: int) -> str:
        if not 0 <= j < len(self):
            raise IndexError(j)
        return self.blob[self.offsets[j]:self.offsets[j + 1]].decode("utf-8")
