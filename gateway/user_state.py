"""User state: recent history per user. This store is read-only, loaded from the artifact set's
user_history.npz; the durable event-fed store arrives with the events API."""
from __future__ import annotations

import numpy as np

from common.artifacts import ArtifactSet


class ArtifactHistoryStore:
    def __init__(self, artifacts: ArtifactSet) -> None:
        with np.load(artifacts.path("user_history.npz")) as npz:
            users, offsets, items = npz["users"], npz["offsets"], npz["items"]
        self._items = items.astype(np.int64)
        self._span = {str(u): (int(offsets[j]), int(offsets[j + 1])) for j, u in enumerate(users)}

    def history(self, user_id: str) -> np.ndarray:
        """[L] int64 item indices, oldest first; empty for an unknown user."""
        span = self._span.get(user_id)
        return self._items[span[0]:span[1]] if span else np.zeros(0, np.int64)

    def users(self) -> list[str]:
        return list(self._span)
