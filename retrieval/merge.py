"""Merge channel results into one candidate list with per-channel quotas, deduped.

Order: round-robin over channels by rank (bert #1, cf #1, popular #1, bert #2, ...), which is
also the order the gateway serves when ranking is down. A channel that under-delivers leaves
its unused quota to the others.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retrieval.channels import ChannelResult

DEFAULT_QUOTAS = {"bert": 120, "cf": 120, "popular": 60}
DEFAULT_CANDIDATES = 300


@dataclass(frozen=True)
class MergedCandidates:
    items: np.ndarray                                        # [N] int64, merged order
    columns: dict[str, tuple[np.ndarray, np.ndarray]]        # channel -> (scores [N] f32, ranks [N] i32)
    per_channel: dict[str, int]                              # candidates each channel contributed


class CandidateMerger:
    def merge(self, results: dict[str, ChannelResult], quotas: dict[str, int], total: int) -> MergedCandidates:
        """results hold each channel's list (already over-fetched); quotas are per-channel caps."""
        order: list[int] = []
        position: dict[int, int] = {}
        taken = {c: 0 for c in results}

        def take(channel: str, rank: int) -> None:
            item = int(results[channel].items[rank])
            if item not in position:
                position[item] = len(order)
                order.append(item)
                taken[channel] += 1

        # Pass 1: each channel up to its quota; pass 2: leftovers fill the unused quota.
        for limit in (quotas, None):
            depth = max((len(r.items) for r in results.values()), default=0)
            for rank in range(depth):
                for channel, result in results.items():
                    if len(order) >= total:
                        break
                    cap = limit.get(channel, 0) if limit is not None else len(result.items)
                    if rank < len(result.items) and (limit is None or taken[channel] < cap):
                        take(channel, rank)
            if len(order) >= total:
                break

        items = np.array(order, dtype=np.int64)
        columns = {}
        for channel, result in results.items():
            scores = np.zeros(len(items), np.float32)
            ranks = np.zeros(len(items), np.int32)
            for rank, (item, score) in enumerate(zip(result.items, result.scores), start=1):
                j = position.get(int(item))
                if j is not None and ranks[j] == 0:
                    scores[j], ranks[j] = score, rank
            columns[channel] = (scores, ranks)
        return MergedCandidates(items, columns, dict(taken))
