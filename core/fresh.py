"""Fresh items: room for items without training interactions, in the candidates and in the slate.

Every behaviour channel (CF, item-to-item, popular, the sequential ids) can rank only what training
saw, and the build's quota search (merged recall@300 on validation) may give BERT, the one channel
that proposes new items, no slots at all: on ml-latest-small it did, and an item upserted online or
never touched in training could not reach a slate (recall@10 of test positives unseen in training
0.000 against BERT alone 0.022). So:

- candidates: the first `candidates` untrained items of the BERT channel's list always enter the
  merged list, in place of the merge's last proposals (`FreshItems.candidate_rows`);
- slate: up to `slots` of the last positions go to the best untrained candidates by served score
  when the slate holds fewer (`FreshItems.fill_slate`); the build chooses `slots` on validation
  (offline/fresh.py) and writes both to the manifest's "fresh" section.

"Untrained" is core.blend.untrained: no training interaction (count or popularity 0), or an online
item (index past the build's tables).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.blend import untrained
from core.channel_names import ChannelName
from core.item_sets import isin

FRESH_CANDIDATES = 10          # of the 300 merged candidates (DEFAULT_CANDIDATES)
FRESH_CHANNEL = ChannelName.BERT
MAX_FRESH_SLOTS = 3            # of the 10 positions a slate usually has


@dataclass(frozen=True)
class FreshItems:
    candidates: int = 0   # untrained BERT items every merged list carries
    slots: int = 0        # slate positions kept for untrained items (at the end of the slate)

    def candidate_rows(self, items: np.ndarray, channels: np.ndarray, fresh_channel: int,
                       chosen: np.ndarray, total: int, popularity: np.ndarray) -> np.ndarray:
        """The merge's chosen proposal rows with the fresh channel's first untrained proposals in:
        items/channels [P] every proposal in merge order, chosen [N] rows into them (distinct
        items), popularity [n_items] training counts or popularity -> rows [<= total]."""
        count = min(self.candidates, total // 10)
        if count <= 0 or not len(items):
            return chosen
        rows = np.flatnonzero(channels == fresh_channel)
        rows = rows[untrained(items[rows], popularity)]
        _, first = np.unique(items[rows], return_index=True)
        fresh = rows[np.sort(first)][:count]
        if not len(fresh):
            return chosen
        missing = fresh[~isin(items[fresh], items[chosen])]
        # Chosen rows keep their order and the missing fresh ones follow; the merge's last
        # non-fresh proposals make room when the list is full.
        drop = max(len(chosen) + len(missing) - total, 0)
        keep = np.ones(len(chosen), bool)
        if drop:
            droppable = np.flatnonzero(~isin(items[chosen], items[fresh]))
            keep[droppable[len(droppable) - drop:]] = False
        return np.concatenate([chosen[keep], missing])[:total]

    def fill_slate(self, slate: np.ndarray, scores: np.ndarray, items: np.ndarray, served: np.ndarray,
                   popularity: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """slate [k] and its scores, candidates items [N] with their served scores [N] ->
        (slate, scores, the positions given to fresh items [m], their candidate rows [m]). The
        slate's last positions that hold trained items go, from the end, to the best untrained
        candidates not in it, until it holds `slots` untrained items (or there are no more);
        scores stay non-increasing."""
        placed = np.zeros(0, np.int64)
        if self.slots <= 0 or not len(slate):
            return slate, scores, placed, placed
        fresh_in_slate = untrained(slate, popularity)
        need = min(self.slots, len(slate)) - int(fresh_in_slate.sum())
        if need <= 0:
            return slate, scores, placed, placed
        pool = np.flatnonzero(untrained(items, popularity) & ~isin(items, slate))
        pool = pool[np.argsort(-served[pool], kind="stable")][:need]
        if not len(pool):
            return slate, scores, placed, placed
        placed = np.flatnonzero(~fresh_in_slate)[::-1][:len(pool)][::-1]   # the last trained positions
        slate, scores = slate.copy(), np.asarray(scores, np.float32).copy()
        slate[placed] = items[pool]
        scores[placed] = served[pool]
        return slate, np.minimum.accumulate(scores), placed, pool

    def describe(self) -> dict[str, int]:
        return {"candidates": self.candidates, "slots": self.slots}

    @classmethod
    def from_manifest(cls, manifest: dict) -> "FreshItems":
        """The manifest's "fresh" section; none (sets built before it): no fresh rule."""
        section = manifest.get("fresh") or {}
        values = {}
        for key, limit in (("candidates", None), ("slots", MAX_FRESH_SLOTS)):
            v = section.get(key, 0)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or (limit is not None and v > limit):
                raise ValueError(f"manifest fresh.{key}: an integer in [0, {limit if limit is not None else 'inf'}], "
                                 f"got {v!r}")
            values[key] = v
        return cls(**values)
