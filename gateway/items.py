"""UpsertItems / DeleteItems: new items become retrievable and rankable within a second.

Upsert: the texts are embedded by the BERT `text_encoder` model on Triton, the vectors are pushed
to ranking first (so anything retrievable is rankable) and then to retrieval (FAISS add), and the
catalog is updated last. Delete: the catalog drops the items at once (the gateway filters every
response with it), then retrieval is told to stop proposing them.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Sequence

import grpc
import numpy as np
from tritonclient.grpc import InferInput
from tritonclient.grpc.aio import InferenceServerClient

from common.versions import VersionSet
from common.wire import item_change_to_proto
from core.features import TEXT_ENCODER_NAME
from core.item_text import item_text as compose_item_text
from core.online_items import ItemChange
from gateway.serving_state import ServingState
from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class NewItem:
    """An item to add or change, as UpsertItems gives it (checked by gateway.validation)."""
    item_id: str
    title: str
    text: str = ""
    category: str = ""

    def embedding_text(self) -> str:
        """The same text the offline build encodes (core.item_text)."""
        return compose_item_text(self.title, self.text, self.category)


@dataclass(frozen=True)
class UpsertResult:
    added: int
    updated: int


class ItemUpdater:
    """Applies upserts and deletes to the serving version, and remembers them so that a new
    artifact version can be brought up to date before it is swapped in."""

    def __init__(self, states: VersionSet[ServingState], triton: InferenceServerClient,
                 retrieval: pb_grpc.RetrievalStub, ranking: pb_grpc.RankingStub) -> None:
        self.states = states
        self.triton = triton
        self.retrieval = retrieval
        self.ranking = ranking
        self.upserted: dict[str, tuple[NewItem, np.ndarray]] = {}
        self.deleted: set[str] = set()
        self.lock = asyncio.Lock()   # one change at a time: indices are allocated in order

    async def embed(self, texts: list[str], encoder_version: str, timeout_s: float) -> np.ndarray:
        """texts -> [n, Dt] unit vectors from Triton's text_encoder."""
        tensor = InferInput("text", [len(texts)], "BYTES")
        tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
        result = await self.triton.infer(TEXT_ENCODER_NAME, [tensor], model_version=encoder_version,
                                         client_timeout=timeout_s)
        return result.as_numpy("embedding")

    async def upsert(self, items: Sequence[NewItem], timeout_s: float) -> UpsertResult:
        items = list(items)
        async with self.lock:
            state = self.states.get()
            vectors = await self.embed([i.embedding_text() for i in items], state.encoder_version, timeout_s)
            added = await self._apply(state, items, vectors, timeout_s)
            for item, vector in zip(items, vectors):
                self.upserted[item.item_id] = (item, vector)
                self.deleted.discard(item.item_id)
        return UpsertResult(added=added, updated=len(items) - added)

    async def _apply(self, state: ServingState, items: list[NewItem], vectors: np.ndarray,
                     timeout_s: float) -> int:
        catalog = state.catalog
        ids = [i.item_id for i in items]
        indices = catalog.plan_upsert(ids)
        # Artifact items keep their trained rows for ranking; only their text vector changes.
        online = [(j, k) for k, j in enumerate(indices) if j >= catalog.n_artifact_items]
        categories = [catalog.category_index.get(i.category, 0) for i in items]
        if online:   # ranking first: anything retrievable must already be rankable
            rows = [k for _, k in online]
            change = ItemChange(np.array([j for j, _ in online], np.int64), vectors[rows],
                                np.array([categories[k] for k in rows], np.int64))
            await self.ranking.UpdateItems(item_change_to_proto(change, state.version), timeout=timeout_s)
        change = ItemChange(np.array(indices, np.int64), vectors, np.array(categories, np.int64))
        await self.retrieval.UpdateItems(item_change_to_proto(change, state.version), timeout=timeout_s)
        added = sum(j >= len(catalog.item_ids) for j in indices)
        catalog.upsert(indices, ids, [i.title for i in items], [i.category for i in items])
        return added

    async def delete(self, item_ids: Sequence[str], timeout_s: float) -> int:
        """-> how many of the ids were known and are now gone."""
        async with self.lock:
            state = self.states.get()
            gone = state.catalog.delete(item_ids)
            self.deleted.update(item_ids)
            await self._remove(state, gone, timeout_s)
        return len(gone)

    async def _remove(self, state: ServingState, indices: list[int], timeout_s: float) -> None:
        if not indices:
            return
        # Best effort: responses are already filtered by the catalog; this frees retrieval slots.
        try:
            await self.retrieval.UpdateItems(pb.ItemUpdate(remove_indices=indices, artifact_version=state.version),
                                             timeout=timeout_s)
        except grpc.aio.AioRpcError:
            pass

    async def replay(self, state: ServingState, timeout_s: float = 10.0) -> None:
        """Bring a freshly loaded version up to date with the upserts and deletes made so far."""
        async with self.lock:
            fresh = [(item, vector) for item, vector in self.upserted.values()]
            if fresh:
                await self._apply(state, [i for i, _ in fresh], np.stack([v for _, v in fresh]), timeout_s)
            await self._remove(state, state.catalog.delete(sorted(self.deleted)), timeout_s)
