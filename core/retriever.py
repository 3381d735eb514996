"""The retrieval side of one artifact version: its channels over the FAISS indexes, the item log
applied on top (core.item_overlay), and candidate generation (core.candidates) over both."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from core.blocked_items import BlockedItems
from core.candidates import CandidateGenerator, Retrieval
from core.channels import BertChannel, Channel, CfChannel, PopularChannel
from core.filters import retrieval_filters
from core.fresh import FreshItems
from core.item_overlay import AppliedRecords, ItemOverlay
from core.item_records import ItemRecord
from core.limits import DEFAULT_CANDIDATES
from core.merge import CandidateMerger
from core.types import RetrievalQuery


class Retriever:
    def __init__(self, version: str, bert: BertChannel, cf: CfChannel, popular: PopularChannel,
                 overlay: ItemOverlay, quotas: dict[str, int], extra: Sequence[Channel] = (),
                 fresh: FreshItems = FreshItems(), counts: np.ndarray | None = None) -> None:
        """extra: further channels (e.g. item2item), each with a settable `blocked` like popular's.
        fresh / counts: the merge's room for untrained items (core.fresh) and the training counts."""
        self.version = version
        self.overlay = overlay
        self.n_items = overlay.n_items
        self.text_dim = overlay.text_dim
        self.bert, self.cf, self.popular = bert, cf, popular
        self.blocked = BlockedItems(overlay.deleted_mask)
        self.channels: list[Channel] = [bert, cf, popular, *extra]
        self.generator = CandidateGenerator(self.channels, retrieval_filters(lambda: self.blocked), quotas,
                                            CandidateMerger(fresh, counts))
        self._set_blocked(self.blocked)

    @property
    def quotas(self) -> dict[str, int]:
        return self.generator.quotas

    @quotas.setter
    def quotas(self, quotas: dict[str, int]) -> None:
        self.generator.quotas = dict(quotas)

    @property
    def index_sizes(self) -> dict[str, int]:
        return {"text": self.bert.index.ntotal, "cf": self.cf.index.ntotal}

    @property
    def total(self) -> int:
        """Item indices this version knows: artifact items plus the online items applied so far."""
        return self.overlay.total

    def apply(self, records: Sequence[ItemRecord]) -> AppliedRecords:
        """Apply item-log records (in log order) and mirror them: upserted vectors into the text
        index and the bert channel's vectors, the deleted set into every channel's blocked set."""
        applied = self.overlay.apply(records)
        upserted = applied.upserted
        catalog = upserted < self.n_items
        if catalog.any():
            # Applied on the event loop between requests, so written in place (a copy of a large
            # catalog's table per upsert would cost seconds); a read-only table is copied once.
            table = self.bert.vectors.table
            table = table if table.flags.writeable else table.copy()
            table[upserted[catalog]] = applied.vectors[catalog]
            self.bert.vectors.table = table
        if len(upserted):
            self.bert.add(upserted, applied.vectors)
        self._add_sequential(upserted, applied.vectors)
        if len(applied.deleted) or self.blocked.hits(upserted).any():   # an upsert may bring a deleted item back
            self._set_blocked(BlockedItems(self.overlay.deleted_mask))
        return applied

    def _add_sequential(self, upserted: np.ndarray, vectors: np.ndarray) -> None:
        """Online items (index >= n_items) into the sequential channel's index, their vector from the
        content path alone (text @ seq_text_proj + bias); catalog items keep their learned vectors."""
        sequential = self.generator.channels.get("sequential")
        online = upserted >= self.n_items
        if sequential is None or not online.any():
            return
        content = sequential.content_vectors(vectors[online])
        if content is not None:
            sequential.add(upserted[online], content)

    def _set_blocked(self, blocked: BlockedItems) -> None:
        # Built once per change (packed bits + FAISS selector), never per query.
        self.blocked = blocked
        for channel in self.channels:
            channel.blocked = blocked

    def retrieve(self, user_id: str, history: np.ndarray, exclude: np.ndarray,
                 total: int = DEFAULT_CANDIDATES, quotas: dict[str, int] | None = None,
                 encoded: dict[str, np.ndarray] | None = None) -> Retrieval:
        """history [L] int64 oldest first; exclude [E] int64. Seen, excluded and deleted items never return.
        encoded: query vectors computed upstream, by channel name (the seq_encoder on Triton)."""
        return self.generator.retrieve(RetrievalQuery(user_id, history, exclude, dict(encoded or {})), total, quotas)

    async def retrieve_yielding(self, user_id: str, history: np.ndarray, exclude: np.ndarray,
                                total: int = DEFAULT_CANDIDATES, quotas: dict[str, int] | None = None,
                                encoded: dict[str, np.ndarray] | None = None) -> Retrieval:
        """retrieve(), yielding to the event loop between channels (the retrieval service)."""
        return await self.generator.retrieve_yielding(
            RetrievalQuery(user_id, history, exclude, dict(encoded or {})), total, quotas)

    def channel_results(self, user_id: str, history: np.ndarray, exclude: np.ndarray, want: int,
                        names: list[str] | None = None):
        return self.generator.channel_results(RetrievalQuery(user_id, history, exclude), want, names)
