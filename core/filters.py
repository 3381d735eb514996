"""Filters: each drops the items a user must not get from a ranked list and says which it removed
and why. One place enforces "seen, excluded and deleted never return", for every channel and for
the gateway's own fallbacks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Protocol

import numpy as np

from core.blocked_items import BlockedItems
from core.item_sets import isin
from core.types import ChannelResult, RetrievalQuery


@dataclass(frozen=True)
class FilterResult:
    kept: ChannelResult
    removed: np.ndarray   # [r] int64 item indices taken out
    reason: str           # the filter's name: why they were taken out


class Filter(Protocol):
    name: str

    def blocked(self, query: RetrievalQuery) -> Collection[int] | np.ndarray: ...

    def apply(self, result: ChannelResult, query: RetrievalQuery) -> FilterResult: ...


def _as_array(items: Collection[int] | np.ndarray) -> np.ndarray:
    if isinstance(items, np.ndarray):
        return items.astype(np.int64, copy=False)
    return np.fromiter(items, np.int64, len(items))


class _BlockListFilter:
    name = ""

    def blocked(self, query: RetrievalQuery) -> Collection[int] | np.ndarray:
        raise NotImplementedError

    def apply(self, result: ChannelResult, query: RetrievalQuery) -> FilterResult:
        blocked = _as_array(self.blocked(query))
        if len(blocked) == 0 or len(result) == 0:
            return FilterResult(result, np.zeros(0, np.int64), self.name)
        hit = isin(result.items, blocked)
        return FilterResult(result.where(~hit), result.items[hit], self.name)


class SeenItemsFilter(_BlockListFilter):
    """Items already in the user's history."""
    name = "seen"

    def blocked(self, query: RetrievalQuery) -> np.ndarray:
        return query.history


class ExcludedItemsFilter(_BlockListFilter):
    """Items the caller asked never to get."""
    name = "excluded"

    def blocked(self, query: RetrievalQuery) -> np.ndarray:
        return query.exclude


class BlockedItemsFilter:
    """Items the channels already skip inside their search (retrieval's deleted items, a
    core.blocked_items.BlockedItems read at each call): nothing to over-fetch for, and the check
    costs a mask lookup per returned item, however many are blocked. A last guard behind the
    channels, so a channel that ignores `blocked` still never returns a deleted item."""
    name = "deleted"

    def __init__(self, blocked: Callable[[], BlockedItems]) -> None:
        self.current = blocked

    def blocked(self, query: RetrievalQuery) -> np.ndarray:
        return np.zeros(0, np.int64)   # precomputed in the searches: no over-fetch

    def apply(self, result: ChannelResult, query: RetrievalQuery) -> FilterResult:
        hit = self.current().hits(result.items)
        return FilterResult(result.where(~hit), result.items[hit], self.name)


def blocked_count(filters: list[Filter], query: RetrievalQuery) -> int:
    """How many distinct items the filters may take out: channels over-fetch by this much (an item
    both seen and excluded counts once, so a search asks for the same k whatever the overlap)."""
    blocked = [_as_array(f.blocked(query)) for f in filters]
    return len(np.unique(np.concatenate(blocked))) if blocked else 0


def apply_filters(filters: list[Filter], result: ChannelResult, query: RetrievalQuery,
                  removed: dict[str, int] | None = None) -> ChannelResult:
    """Run every filter in order; `removed` (if given) counts what each took out."""
    for f in filters:
        out = f.apply(result, query)
        if removed is not None and len(out.removed):
            removed[f.name] = removed.get(f.name, 0) + len(out.removed)
        result = out.kept
    return result


def retrieval_filters(blocked: Callable[[], BlockedItems]) -> list[Filter]:
    """Seen, excluded, and deleted as the channels' precomputed blocked set (no over-fetch for it)."""
    return [SeenItemsFilter(), ExcludedItemsFilter(), BlockedItemsFilter(blocked)]
