"""The retrieval side of one artifact version: its channels over the FAISS indexes, the items
added and deleted online, and candidate generation (core.candidates) over both."""
from __future__ import annotations

import numpy as np

from core.candidates import CandidateGenerator, Retrieval
from core.channels import BertChannel, CfChannel, ItemVectors, PopularChannel
from core.filters import standard_filters
from core.limits import DEFAULT_CANDIDATES
from core.online_items import ItemChange, OnlineItems
from core.types import RetrievalQuery


class Retriever:
    def __init__(self, version: str, bert: BertChannel, cf: CfChannel, popular: PopularChannel,
                 online: OnlineItems, quotas: dict[str, int]) -> None:
        self.version = version
        self.online = online
        self.n_items = online.n_items
        self.text_dim = online.text_dim
        self.bert, self.cf, self.popular = bert, cf, popular
        self.generator = CandidateGenerator([bert, cf, popular], standard_filters(lambda: self.online.removed),
                                            quotas)

    @property
    def quotas(self) -> dict[str, int]:
        return self.generator.quotas

    @quotas.setter
    def quotas(self, quotas: dict[str, int]) -> None:
        self.generator.quotas = dict(quotas)

    @property
    def index_sizes(self) -> dict[str, int]:
        return {"text": self.bert.index.ntotal, "cf": self.cf.index.ntotal}

    def update_items(self, change: ItemChange) -> int:
        """Apply online additions/removals (artifact items may get a new text vector); returns the
        number of online items held. Raises ValueError naming the field on a malformed change."""
        online = change.add_indices >= self.n_items
        self.online.apply(change.subset(online))
        vectors: ItemVectors = self.bert.vectors
        if (~online).any():   # copy on write: a concurrent reader keeps a consistent table
            table = vectors.table.copy()
            table[change.add_indices[~online]] = change.add_vectors[~online]
            vectors.table = table
        if len(change.add_indices):
            self.bert.add(change.add_indices, change.add_vectors)
        return len(self.online.vectors)

    def retrieve(self, user_id: str, history: np.ndarray, exclude: np.ndarray,
                 total: int = DEFAULT_CANDIDATES, quotas: dict[str, int] | None = None) -> Retrieval:
        """history [L] int64 oldest first; exclude [E] int64. Seen, excluded and deleted items never return."""
        return self.generator.retrieve(RetrievalQuery(user_id, history, exclude), total, quotas)

    def channel_results(self, user_id: str, history: np.ndarray, exclude: np.ndarray, want: int,
                        names: list[str] | None = None):
        return self.generator.channel_results(RetrievalQuery(user_id, history, exclude), want, names)
