"""The item log's records: the one history of online item changes that every replica of every
service applies in the same order (common/item_log.py stores it; core/item_overlay.py applies it)."""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum, auto

import numpy as np


class ItemOp(StrEnum):
    UPSERT = auto()   # add an item, or replace an existing one's text, title, category and vector
    DELETE = auto()   # the item never appears in a response again (until upserted again)


@dataclass(frozen=True, eq=False)
class ItemRecord:
    op: ItemOp
    item_id: str
    title: str = ""
    text: str = ""
    category: str = ""
    vector: np.ndarray | None = None   # [Dt] float32 unit text vector (upserts only)
    seq: int = 0                       # position in the log: set by the log on append, strictly increasing

    def __eq__(self, other: object) -> bool:
        # The generated __eq__ would compare vectors elementwise and fail on the truth of an array.
        if not isinstance(other, ItemRecord):
            return NotImplemented
        mine, theirs = self.vector, other.vector
        same_vector = (mine is None and theirs is None) or (
            mine is not None and theirs is not None and np.asarray(mine, np.float32).tobytes()
            == np.asarray(theirs, np.float32).tobytes() and np.shape(mine) == np.shape(theirs))
        return same_vector and (self.op, self.item_id, self.title, self.text, self.category, self.seq) == \
            (other.op, other.item_id, other.title, other.text, other.category, other.seq)

    __hash__ = None   # type: ignore[assignment]  # holds an array: not hashable
