"""Merge channel results into one candidate list with per-channel quotas, deduped.

Order: round-robin over channels by rank (bert #1, cf #1, popular #1, bert #2, ...), which is
also the order the gateway serves when ranking is down. A channel that under-delivers leaves
its unused quota to the others. Items without training interactions from the BERT list then take
the last places (core.fresh), so that new items can be ranked at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.fresh import FRESH_CHANNEL, FreshItems
from core.item_sets import isin
from core.types import ChannelResult


@dataclass(frozen=True)
class MergedCandidates:
    items: np.ndarray                                        # [N] int64, merged order
    columns: dict[str, tuple[np.ndarray, np.ndarray]]        # channel -> (scores [N] f32, ranks [N] i32)
    per_channel: dict[str, int]                              # candidates each channel contributed


class CandidateMerger:
    def __init__(self, fresh: FreshItems = FreshItems(), counts: np.ndarray | None = None) -> None:
        """fresh.candidates > 0: the BERT list's first untrained items always enter (core.fresh);
        counts [n_items]: training interactions per item, what "untrained" is read from."""
        self.fresh = fresh if counts is not None else FreshItems()
        self.counts = counts

    def merge(self, results: dict[str, ChannelResult], quotas: dict[str, int], total: int) -> MergedCandidates:
        """results hold each channel's list (already over-fetched); quotas are per-channel caps."""
        channels = list(results)
        chosen_items, chosen_which = self._choose(results, quotas, total)
        counts = np.bincount(chosen_which, minlength=len(channels)) if len(chosen_which) else [0] * len(channels)
        per_channel = {c: int(counts[j]) for j, c in enumerate(channels)}

        # Each channel item's row in the merged list (or none), by a sorted lookup: no per-item Python.
        order = np.argsort(chosen_items, kind="stable")
        ordered = chosen_items[order]
        columns = {}
        for channel, result in results.items():
            scores = np.zeros(len(chosen_items), np.float32)
            col_ranks = np.zeros(len(chosen_items), np.int32)
            rows, hit = _rows_in(ordered, order, np.asarray(result.items))
            scores[rows[hit]] = result.scores[hit]
            col_ranks[rows[hit]] = np.flatnonzero(hit) + 1
            columns[channel] = (scores, col_ranks)
        return MergedCandidates(chosen_items.astype(np.int64), columns, per_channel)

    def items(self, results: dict[str, ChannelResult], quotas: dict[str, int], total: int) -> np.ndarray:
        """merge(...).items without the columns (the build's quota search re-merges many times)."""
        return self._choose(results, quotas, total)[0].astype(np.int64)

    def _choose(self, results: dict[str, ChannelResult], quotas: dict[str, int],
                total: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (chosen items [N], the channel position in `results` that proposed each [N])."""
        channels = list(results)
        # Every (rank, channel) proposal in round-robin order, as flat arrays.
        ranks = np.concatenate([np.arange(len(results[c].items)) for c in channels] or [np.zeros(0, int)])
        which = np.concatenate([np.full(len(results[c].items), j) for j, c in enumerate(channels)]
                               or [np.zeros(0, int)])
        items = np.concatenate([results[c].items for c in channels] or [np.zeros(0, np.int64)])
        order = np.lexsort((which, ranks))
        ranks, which, items = ranks[order], which[order], items[order]
        caps = np.array([quotas.get(c, 0) for c in channels], np.int64)
        # Pass 1: each channel's fresh proposals up to its quota, where a proposal is fresh if no
        # channel with a quota proposed the item before it (a zero-quota channel must not claim an
        # item and so take it out of another channel's quota); pass 2: the rest fill up, in order.
        fresh = _first_proposals(items, caps[which] > 0 if len(which) else np.zeros(0, bool))
        nth = np.zeros(len(items), np.int64)
        for j in range(len(channels)):
            mask = fresh & (which == j)
            nth[mask] = np.arange(mask.sum())
        in_quota = fresh & (nth < caps[which] if len(which) else fresh)
        rest = _first_proposals(items, ~isin(items, items[in_quota]))
        chosen = np.concatenate([np.flatnonzero(in_quota), np.flatnonzero(rest)])[:total]
        if self.fresh.candidates and FRESH_CHANNEL in results:
            chosen = self.fresh.candidate_rows(items, which, channels.index(FRESH_CHANNEL), chosen, total, self.counts)
        return items[chosen], which[chosen]


def _first_proposals(items: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """Mask of the first eligible proposal of each item (proposals in merge order)."""
    fresh = np.zeros(len(items), bool)
    rows = np.flatnonzero(eligible)
    _, first = np.unique(items[rows], return_index=True)
    fresh[rows[first]] = True
    return fresh


def rows_in(merged: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row of each of `items` in `merged`, a list without repeats; hit mask), by a sorted lookup."""
    order = np.argsort(merged, kind="stable")
    return _rows_in(merged[order], order, items)


def _rows_in(ordered: np.ndarray, order: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row of each of `items` in the merged list, hit mask); ordered = merged items sorted, order =
    the argsort that sorted them (merged items are unique)."""
    if not len(ordered) or not len(items):
        return np.zeros(len(items), np.int64), np.zeros(len(items), bool)
    at = np.minimum(np.searchsorted(ordered, items), len(ordered) - 1)
    hit = ordered[at] == items
    return order[at], hit
