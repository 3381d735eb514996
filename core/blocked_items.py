"""Items no retrieval channel may return (deleted online), precomputed once per change.

The set is kept two ways, both built when it changes and never per query: a bool mask (list
channels such as popular, and a cheap last check) and a FAISS selector that the index searches
take (`faiss.IDSelectorNot(IDSelectorBitmap(blocked bits))`), so FAISS skips blocked items
inside the search and a query asks for k, not k + the number of deleted items.

faiss semantics: IDSelectorBitmap(n_bytes, bits) selects id i when bit (i & 7) of byte i >> 3 is
set (little-endian bit order) and i < 8 * n_bytes; ids past the bitmap are not selected. Wrapping
the *blocked* bitmap in IDSelectorNot therefore keeps every id the mask does not cover (an online
item newer than the mask), where a bitmap of the kept set would silently drop them.
"""
from __future__ import annotations

import faiss
import numpy as np

from core.types import ChannelResult


class BlockedItems:
    def __init__(self, mask: np.ndarray) -> None:
        """mask [n] bool: True = never returned. Copied: the caller may keep mutating its own."""
        self.mask = np.array(mask, bool)
        self.count = int(self.mask.sum())
        self.selector: faiss.IDSelector | None = None
        if self.count:
            # faiss keeps raw pointers: the bits and the inner selector must live as long as this object.
            self._bits = np.packbits(self.mask, bitorder="little")
            self._blocked = faiss.IDSelectorBitmap(len(self._bits), faiss.swig_ptr(self._bits))
            self.selector = faiss.IDSelectorNot(self._blocked)

    def __len__(self) -> int:
        return self.count

    def hits(self, items: np.ndarray) -> np.ndarray:
        """items [m] int64 -> [m] bool, True where blocked (indices past the mask are not)."""
        if not self.count or len(items) == 0:
            return np.zeros(len(items), bool)
        inside = (items >= 0) & (items < len(self.mask))
        out = np.zeros(len(items), bool)
        out[inside] = self.mask[items[inside]]
        return out

    def drop(self, result: ChannelResult) -> ChannelResult:
        """The result without blocked items, order kept."""
        return result if not self.count else result.where(~self.hits(result.items))


NOTHING_BLOCKED = BlockedItems(np.zeros(0, bool))
