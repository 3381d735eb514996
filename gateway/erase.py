"""DeleteUserData: erase one user's data from what the gateway owns.

1. A tombstone in the durable event log (fsynced): the log's export, which the next offline build
   reads, drops every event of the user logged before it.
2. The user-state store removes the user's recent history and sets an erased marker (one atomic
   step in both backends); from then on Recommend treats the user as unknown: no history from
   the build's user_history.npz, no user id sent to retrieval (no trained CF vector).
Events the user sends after the erase are logged and count again (they postdate the tombstone).

Both steps are idempotent: a failure in either answers UNAVAILABLE and a retry completes the erase.
The tombstone goes first so that an erase that fails half-way still keeps the next build clean.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from gateway.event_log import EventLog
from gateway.state_store import UserStateStore


@dataclass(frozen=True)
class EraseResult:
    history_entries_removed: int
    events_tombstoned: bool


class UserDataUnavailable(RuntimeError):
    """A store the erase needs failed; nothing the caller must know beyond "retry"."""


class UserEraser:
    def __init__(self, store: UserStateStore, event_log: EventLog, log_lock: asyncio.Lock | None = None) -> None:
        self.store = store
        self.event_log = event_log
        # Shared with the event ingester: a batch and a tombstone never interleave in the log.
        self.log_lock = log_lock or asyncio.Lock()

    async def erase(self, user_id: str) -> EraseResult:
        when = time.time()
        try:
            async with self.log_lock:
                await asyncio.to_thread(self.event_log.append_tombstone, user_id, when)
        except OSError as e:
            raise UserDataUnavailable("event log") from e
        try:
            removed = await self.store.erase(user_id, when)
        except Exception as e:  # noqa: BLE001 - sqlite3 / redis errors: the store is unavailable
            raise UserDataUnavailable("user-state store") from e
        return EraseResult(history_entries_removed=removed, events_tombstoned=True)
