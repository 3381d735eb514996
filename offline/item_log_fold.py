"""Fold the item log into a dataset before a build: online items become catalog items.

Records are replayed in log order: the latest upsert of an id becomes (or replaces) a catalog item
with its title, text and category (the build encodes its text like every item's; it needs no
interactions); an id deleted last is dropped from the catalog, with its interactions. The build
records the last seq folded as the manifest's `item_log_seq`, and services replay only the
records after it on that version.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from common.item_log import open_item_log
from core.item_records import ItemOp, ItemRecord
from offline.datasets.base import Dataset, Item


@dataclass(frozen=True)
class FoldReport:
    last_seq: int       # the last log position folded in (0: nothing)
    added: int          # catalog items that came from the log
    updated: int        # catalog items whose title, text or category the log replaced
    dropped: int        # catalog items deleted (their interactions went with them)
    interactions_dropped: int

    def figures(self) -> dict[str, str]:
        return {"item_log_seq": str(self.last_seq), "added": str(self.added), "updated": str(self.updated),
                "dropped": str(self.dropped), "interactions_dropped": str(self.interactions_dropped)}


def read_item_log(spec: str) -> list[ItemRecord]:
    """Every record of the log at `spec`, oldest first (ItemLogUnavailable when it is down)."""
    item_log = open_item_log(spec)
    try:
        return item_log.read_all_sync()
    finally:
        asyncio.run(item_log.close())


def fold_item_log(ds: Dataset, records: Sequence[ItemRecord]) -> tuple[Dataset, FoldReport]:
    """The dataset with the log's final item state applied (ds itself is not changed)."""
    originals = {it.item_id: it for it in ds.items}
    known = originals.keys()
    items: dict[str, Item] = dict(originals)
    new_ids: dict[str, None] = {}   # ids the catalog lacks, in the order the log first upserts them
    last_seq = 0
    for r in records:
        last_seq = max(last_seq, r.seq)
        if r.op == ItemOp.DELETE:
            items.pop(r.item_id, None)
        elif r.op == ItemOp.UPSERT:
            old = items.get(r.item_id) or originals.get(r.item_id)   # a revived item keeps its time
            if r.item_id not in known:
                new_ids.setdefault(r.item_id)
            items[r.item_id] = (replace(old, title=r.title, text=r.text, category=r.category) if old
                                else Item(r.item_id, r.title, r.text, r.category))
    # A catalog item keeps its place; items from the log follow in the order the online overlay
    # allocated their indices (first upsert), so ids read in the same order before and after.
    catalog = [items[it.item_id] for it in ds.items if it.item_id in items]
    catalog += [items[item_id] for item_id in new_ids if item_id in items]
    gone = known - items.keys()
    keep = ~np.isin(ds.item_ids, list(gone)) if gone else np.ones(len(ds), bool)
    updated = sum(1 for it in catalog if it.item_id in known and it != originals[it.item_id])
    folded = Dataset(ds.name, catalog, ds.users[keep], ds.item_ids[keep], ds.timestamps[keep], ds.values[keep],
                     ds.impressions, ds.report, None if ds.split_labels is None else ds.split_labels[keep])
    return folded, FoldReport(last_seq, len(catalog) - (len(known) - len(gone)), updated, len(gone),
                              int((~keep).sum()))
