"""The item catalog the gateway needs: id <-> index, titles, categories, popular fallback order,
plus items added and deleted while serving."""
from __future__ import annotations

import numpy as np

from common.artifacts import ArtifactSet


class Catalog:
    def __init__(self, artifacts: ArtifactSet) -> None:
        data = artifacts.json("catalog.json")
        self.item_ids: list[str] = list(data["item_ids"])
        self.titles: list[str] = list(data["titles"])
        self.categories: list[str] = list(data["categories"])
        self.category_index = {name: j for j, name in enumerate(data.get("category_names", [""]))}
        self.index = {item_id: j for j, item_id in enumerate(self.item_ids)}
        self.n_artifact_items = len(self.item_ids)
        self.popular = artifacts.npy("popular.npy")   # [n] item indices, most popular first
        self.deleted: set[int] = set()
        if len(self.item_ids) != artifacts.manifest["counts"]["items"]:
            raise ValueError("catalog.json: item count differs from the manifest")

    def to_indices(self, item_ids) -> np.ndarray:
        """Known, not deleted ids -> [m] int64 indices in the same order; the rest are dropped."""
        return np.array([j for j in (self.index.get(i) for i in item_ids)
                         if j is not None and j not in self.deleted], np.int64)

    def knows(self, item_id: str) -> bool:
        j = self.index.get(item_id)
        return j is not None and j not in self.deleted

    def plan_upsert(self, item_ids: list[str]) -> list[int]:
        """Index for each id: its existing index, or the next free online index (not yet added)."""
        out, next_index = [], len(self.item_ids)
        for item_id in item_ids:
            if item_id in self.index:
                out.append(self.index[item_id])
            else:
                out.append(next_index)
                next_index += 1
        return out

    def upsert(self, indices: list[int], item_ids: list[str], titles: list[str], categories: list[str]) -> None:
        for j, item_id, title, category in zip(indices, item_ids, titles, categories):
            if j == len(self.item_ids):
                self.item_ids.append(item_id)
                self.titles.append(title)
                self.categories.append(category)
            else:
                self.titles[j], self.categories[j] = title, category
            self.index[item_id] = j
            self.deleted.discard(j)

    def delete(self, item_ids) -> list[int]:
        """Mark ids deleted from now on; returns the indices that were live."""
        gone = [j for j in (self.index.get(i) for i in item_ids) if j is not None and j not in self.deleted]
        self.deleted.update(gone)
        return gone
