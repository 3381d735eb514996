"""ReportEvents: validate a batch, append it to the durable event log, update recent histories.

A batch is all or nothing: one bad event (unknown item, absurd timestamp, oversize batch) fails
it with INVALID_ARGUMENT naming the offending index, before anything is written. The log is
fsynced before the RPC returns OK, so an acknowledged event survives a crash.
"""
from __future__ import annotations

import asyncio
import time
from typing import Sequence

from common.metrics import EVENTS
from gateway.catalog import Catalog
from common.versions import VersionSet
from gateway.event_log import Event, EventLog
from gateway.serving_state import ServingState
from gateway.state_store import UserStateStore
from gateway.validation import InvalidArgument
from protos import fusionrec_pb2 as pb

MAX_BATCH = 1_000
EVENT_TYPES = ("impression", "click", "purchase", "add_to_cart", "like")
HISTORY_TYPES = frozenset({"click", "purchase", "add_to_cart", "like"})   # what a user chose
OLDEST = 946_684_800.0        # 2000-01-01: anything earlier is a unit mistake
FUTURE_SKEW_S = 60.0


def validate_batch(events: Sequence[pb.Event], catalog: Catalog, now: float) -> list[Event]:
    if len(events) > MAX_BATCH:
        raise InvalidArgument(f"events: {len(events)} events exceeds the limit of {MAX_BATCH}")
    out = []
    for i, e in enumerate(events):
        if not 1 <= len(e.user_id) <= 256:
            raise InvalidArgument(f"events[{i}].user_id: must be 1..256 characters")
        if any(c in e.user_id + e.item_id for c in "\r\n"):   # one log record per line
            raise InvalidArgument(f"events[{i}].user_id: must not contain line breaks")
        if not catalog.knows(e.item_id):
            raise InvalidArgument(f"events[{i}].item_id: unknown or deleted item")
        if e.type not in EVENT_TYPES:
            raise InvalidArgument(f"events[{i}].type: must be one of {', '.join(EVENT_TYPES)}")
        if not OLDEST <= e.timestamp <= now + FUTURE_SKEW_S:
            raise InvalidArgument(f"events[{i}].timestamp: must be unix seconds in [{OLDEST:.0f}, now + {FUTURE_SKEW_S:.0f}]")
        out.append(Event(e.user_id, e.item_id, e.type, float(e.timestamp), float(e.value or 1.0)))
    return out


class EventIngester:
    def __init__(self, states: VersionSet[ServingState], log: EventLog, store: UserStateStore) -> None:
        self.states = states
        self.log = log
        self.store = store
        self._log_lock = asyncio.Lock()

    async def ingest(self, batch: Sequence[pb.Event]) -> pb.ReportEventsResponse:
        try:
            events = validate_batch(batch, self.states.get().catalog, time.time())
        except InvalidArgument:
            EVENTS.labels("batch", "rejected").inc()
            raise
        async with self._log_lock:   # fsync off the event loop, one batch at a time
            await asyncio.to_thread(self.log.append, events)
        chosen = [(e.user_id, e.item_id, e.timestamp) for e in events if e.type in HISTORY_TYPES]
        if chosen:
            await self.store.add(chosen)
        for e in events:
            EVENTS.labels(e.type, "accepted").inc()
        return pb.ReportEventsResponse(accepted=len(events), history_updates=len(chosen))
