"""UpsertItems / DeleteItems through the item log, the one owner of online item state.

Upsert: the texts are embedded by the BERT `text_encoder` on Triton, then one atomic append puts
the ItemRecords (with their vectors and categories) in the log, and this gateway's follower
applies them at once (read-your-writes through this gateway). Retrieval and ranking replicas
tail the same log, and a request carries the gateway's log position so a replica that is behind
catches up first. Nothing is pushed to them: a restarted replica replays the log.

The store down: the append raises ItemLogUnavailable and nothing is written (the caller gets
UNAVAILABLE); an embedding failure happens before the append, so nothing is written either.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from tritonclient.grpc import InferInput
from tritonclient.grpc.aio import InferenceServerClient

from common.item_follower import ItemLogFollower
from common.item_log import ItemLog
from common.tracing import outgoing_headers
from common.versions import VersionSet
from core.features import TEXT_ENCODER_NAME
from core.item_records import ItemOp, ItemRecord
from core.item_text import item_text as compose_item_text
from gateway.serving_state import ServingState


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
    added: int          # ids this gateway did not know before the call
    updated: int
    item_log_seq: int   # position of the last record appended


@dataclass(frozen=True)
class DeleteResult:
    deleted: int        # ids that were live here and are now gone
    item_log_seq: int   # position of the last record appended (the log's head when none was needed)


class EncoderError(RuntimeError):
    """The text encoder answered with something unusable (nothing was appended)."""


class TextSpaceBrought(Exception):
    """The served catalog's vectors were brought to the build: the text_encoder cannot place new
    items in their space (UpsertItemsRequest carries no vectors), so items come by a rebuild."""
    MESSAGE = ("items: this catalog's item vectors were brought to the build (manifest text_space=brought) "
               "and UpsertItems has no vector field; add items by rebuilding with their vectors")


class ItemWriter:
    def __init__(self, states: VersionSet[ServingState], triton: InferenceServerClient,
                 item_log: ItemLog, follower: ItemLogFollower) -> None:
        self.states = states
        self.triton = triton
        self.item_log = item_log
        self.follower = follower

    async def embed(self, texts: list[str], encoder_version: str, text_dim: int, timeout_s: float) -> np.ndarray:
        """texts -> [n, Dt] unit vectors from Triton's text_encoder."""
        tensor = InferInput("text", [len(texts)], "BYTES")
        tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
        result = await self.triton.infer(TEXT_ENCODER_NAME, [tensor], model_version=encoder_version,
                                         client_timeout=timeout_s,
                                         headers=outgoing_headers())   # traceparent + x-request-id
        vectors = np.asarray(result.as_numpy("embedding"), np.float32)
        if vectors.shape != (len(texts), text_dim) or not np.isfinite(vectors).all():
            raise EncoderError(f"text_encoder: expected {len(texts)} x {text_dim} finite floats")
        return vectors

    async def upsert(self, items: Sequence[NewItem], timeout_s: float) -> UpsertResult:
        items = list(items)
        state = self.states.get()
        if state.text_space == "brought":
            raise TextSpaceBrought()
        catalog = state.catalog
        vectors = await self.embed([i.embedding_text() for i in items], state.encoder_version,
                                   catalog.overlay.text_dim, timeout_s)
        known = sum(catalog.index.get(i.item_id) is not None for i in items)
        records = [ItemRecord(ItemOp.UPSERT, i.item_id, i.title, i.text, i.category, vector)
                   for i, vector in zip(items, vectors)]
        seq = await self.item_log.append(records)   # atomic: all records or none (ItemLogUnavailable)
        await self.follower.sync(seq)               # applied here before the answer (a failure: the tail will)
        return UpsertResult(added=len(items) - known, updated=known, item_log_seq=seq)

    async def delete(self, item_ids: Sequence[str]) -> DeleteResult:
        """-> how many of the ids were live and are now gone. Only those are logged: a delete of
        ids nobody knows must not grow the log."""
        await self.follower.sync()   # another gateway may have just added one of them
        catalog = self.states.get().catalog
        live = [i for i in dict.fromkeys(item_ids) if catalog.knows(i)]
        if not live:
            return DeleteResult(0, await self.item_log.last_seq())
        seq = await self.item_log.append([ItemRecord(ItemOp.DELETE, i) for i in live])
        await self.follower.sync(seq)
        return DeleteResult(len(live), seq)
