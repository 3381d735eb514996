"""The retrieval channels' names: the channel's `name`, its quota key, its candidate column, its
metric label and what RecommendedItem.channels lists."""
from __future__ import annotations

from enum import StrEnum, auto


class ChannelName(StrEnum):
    BERT = auto()       # content: the user's recent history against item text vectors
    CF = auto()         # collaborative filtering: ALS user vector against item factors
    POPULAR = auto()    # most popular items: cold start and the gateway's fallback
    ITEM2ITEM = auto()  # item-to-item: offline neighbours of the user's most recent items
    SEQUENTIAL = auto()  # next item: a trained sequence encoder's user vector against item vectors


CHANNEL_NAMES: tuple[str, ...] = tuple(c.value for c in ChannelName)
MERGED = "merged"       # metric label of the merged candidate list
