"""The item catalog the gateway needs: id <-> index, titles, categories, popular fallback order."""
from __future__ import annotations

import numpy as np

from common.artifacts import ArtifactSet


class Catalog:
    def __init__(self, artifacts: ArtifactSet) -> None:
        data = artifacts.json("catalog.json")
        self.item_ids: list[str] = data["item_ids"]
        self.titles: list[str] = data["titles"]
        self.categories: list[str] = data["categories"]
        self.index = {item_id: j for j, item_id in enumerate(self.item_ids)}
        self.popular = artifacts.npy("popular.npy")   # [n] item indices, most popular first
        if len(self.item_ids) != artifacts.manifest["counts"]["items"]:
            raise ValueError("catalog.json: item count differs from the manifest")

    def to_indices(self, item_ids) -> np.ndarray:
        """Known ids -> [m] int64 indices in the same order; unknown ids are dropped."""
        return np.array([self.index[i] for i in item_ids if i in self.index], np.int64)

    def popular_excluding(self, k: int, exclude: set[int]) -> np.ndarray:
        out = []
        for item in self.popular:
            if int(item) not in exclude:
                out.append(int(item))
                if len(out) == k:
                    break
        return np.array(out, np.int64)
