"""The domain's value types: what a retrieval query carries and what a channel returns."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class RetrievalQuery:
    """One user's request as the retrieval channels see it (internal item indices)."""
    user_id: str                                                     # looks up a trained CF vector
    history: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))   # [L] int64, oldest first
    exclude: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))   # [E] int64, never returned
    # Query vectors computed upstream (e.g. the seq_encoder on Triton), keyed by channel name.
    encoded: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class ChannelResult:
    """A ranked list of item indices with their scores, best first."""
    items: np.ndarray    # [m] int64
    scores: np.ndarray   # [m] float32

    def __len__(self) -> int:
        return len(self.items)

    def head(self, n: int) -> "ChannelResult":
        return ChannelResult(self.items[:n], self.scores[:n])

    def where(self, mask: np.ndarray) -> "ChannelResult":
        return ChannelResult(self.items[mask], self.scores[mask])


EMPTY = ChannelResult(np.zeros(0, np.int64), np.zeros(0, np.float32))
