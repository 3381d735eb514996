"""ReportEvents: validate a batch, append it to the durable event log, update recent histories.

A batch is all or nothing: one bad event (unknown item, absurd timestamp, oversize batch) fails
it with INVALID_ARGUMENT naming the offending index, before anything is written. The log is
fsynced before the RPC returns OK, so an acknowledged event survives a crash.

The rule when the user-state store fails: the batch is still acknowledged (it is in the durable
log, which is what the next build reads), `history_updates` is 0 and the recent histories miss
it; the failure is counted (fusionrec_events_total{type="batch",outcome="history_unavailable"}).
Refusing instead would make a retrying client write the batch to the log twice.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from typing import Sequence

from common.logs import get_logger
from common.metrics import EVENTS
from common.versions import VersionSet
from core.events import EVENT_TYPES, HISTORY_TYPES
from core.limits import EVENT_FUTURE_SKEW_S, EVENT_OLDEST_S, MAX_EVENT_BATCH, MAX_USER_ID
from gateway.catalog import Catalog
from gateway.event_log import Event, EventLog
from gateway.serving_state import ServingState
from gateway.state_store import UserStateStore
from gateway.validation import InvalidArgument, check_event_fields


log = get_logger("gateway.events")
STORE_TIMEOUT_S = 2.0   # a hanging user-state store must not hold an acknowledged batch for long

@dataclass(frozen=True)
class IngestResult:
    accepted: int            # events durably logged
    history_updates: int     # events that changed a user's recent history


def validate_batch(events: Sequence[Event], catalog: Catalog, now: float) -> list[Event]:
    """The events as logged (a value of 0 means the default weight 1); raises InvalidArgument
    naming the first offending event."""
    if len(events) > MAX_EVENT_BATCH:
        raise InvalidArgument(f"events: {len(events)} events exceeds the limit of {MAX_EVENT_BATCH}")
    out = []
    for i, e in enumerate(events):
        if not 1 <= len(e.user_id) <= MAX_USER_ID:
            raise InvalidArgument(f"events[{i}].user_id: must be 1..{MAX_USER_ID} characters")
        check_event_fields(i, e)   # one log record per line, finite numbers
        if not catalog.knows(e.item_id):
            raise InvalidArgument(f"events[{i}].item_id: unknown or deleted item")
        if e.type not in EVENT_TYPES:
            raise InvalidArgument(f"events[{i}].type: must be one of {', '.join(EVENT_TYPES)}")
        if not EVENT_OLDEST_S <= e.timestamp <= now + EVENT_FUTURE_SKEW_S:
            raise InvalidArgument(f"events[{i}].timestamp: must be unix seconds in "
                                  f"[{EVENT_OLDEST_S:.0f}, now + {EVENT_FUTURE_SKEW_S:.0f}]")
        out.append(dataclasses.replace(e, value=float(e.value or 1.0)))
    return out


class EventIngester:
    def __init__(self, states: VersionSet[ServingState], log: EventLog, store: UserStateStore) -> None:
        self.states = states
        self.log = log
        self.store = store
        self.log_lock = asyncio.Lock()   # shared with gateway.erase: tombstones and batches in order

    async def ingest(self, batch: Sequence[Event]) -> IngestResult:
        try:
            events = validate_batch(batch, self.states.get().catalog, time.time())
        except InvalidArgument:
            EVENTS.labels("batch", "rejected").inc()
            raise
        async with self.log_lock:   # fsync off the event loop, one batch at a time
            await asyncio.to_thread(self.log.append, events)
        chosen = [(e.user_id, e.item_id, e.timestamp) for e in events if e.type in HISTORY_TYPES]
        if chosen:
            try:
                await asyncio.wait_for(self.store.add(chosen), timeout=STORE_TIMEOUT_S)
            except Exception:   # noqa: BLE001 - logged above; the histories miss this batch
                log.warning("user-state store failed; events logged, recent histories not updated",
                            extra={"events": len(chosen)})
                EVENTS.labels("batch", "history_unavailable").inc()
                chosen = []
        for e in events:
            EVENTS.labels(e.type, "accepted").inc()
        return IngestResult(accepted=len(events), history_updates=len(chosen))
