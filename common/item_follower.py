"""Keeps a service's loaded artifact versions at the head of the item log.

Each loaded version subscribes with its own apply function (it owns an ItemOverlay and mirrors
the changes in its FAISS index, tables or catalog). On start a service calls `sync()` before it
reports SERVING (replay); then `run()` tails the log every `interval_s`; a request that names a
newer log position than this replica has applied calls `sync(min_seq)` first (read-your-writes
across replicas). While the store cannot be read, `ok` is False and the last state keeps serving.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable

from common.item_log import ItemLog, ItemLogUnavailable
from common.logs import get_logger
from core.item_records import ItemRecord

log = get_logger("item_follower")


@dataclass
class _Subscriber:
    apply: Callable[[list[ItemRecord]], None]
    position: int


class ItemLogFollower:
    def __init__(self, item_log: ItemLog, interval_s: float = 0.1) -> None:
        self.item_log = item_log
        self.interval_s = interval_s
        self.subscribers: dict[str, _Subscriber] = {}
        self.ok = True
        self._lock = asyncio.Lock()   # one reader at a time: records are applied in order, once

    @property
    def applied_seq(self) -> int:
        """The position every subscriber has reached (0 with none)."""
        return min((s.position for s in self.subscribers.values()), default=0)

    def subscribe(self, key: str, apply: Callable[[list[ItemRecord]], None], from_seq: int) -> None:
        """`apply` gets every record after `from_seq` (the version's folded position), in order."""
        self.subscribers[key] = _Subscriber(apply, from_seq)

    def unsubscribe(self, key: str) -> None:
        self.subscribers.pop(key, None)

    async def sync(self, min_seq: int = 0) -> bool:
        """Read and apply everything up to the log's head; True when done (and at least min_seq
        reached), False when the store could not be read (ok is then False)."""
        if min_seq and self.applied_seq >= min_seq:
            return True
        async with self._lock:
            if min_seq and self.applied_seq >= min_seq:   # a sync queued ahead of us got there
                return True
            try:
                while True:
                    start = self.applied_seq
                    records = await self.item_log.read(start)
                    if not records:
                        break
                    for sub in list(self.subscribers.values()):
                        mine = [r for r in records if r.seq > sub.position]
                        if mine:
                            sub.apply(mine)
                            sub.position = mine[-1].seq
            except ItemLogUnavailable as e:
                if self.ok:
                    log.warning("item log unavailable; serving the last applied state", extra={"reason": str(e)})
                self.ok = False
                return False
            except Exception:   # a subscriber failed to apply: report not ok, retry on the next sync
                log.exception("applying item-log records failed; serving the last applied state")
                self.ok = False
                return False
        if not self.ok:
            log.info("item log readable again", extra={"seq": self.applied_seq})
        self.ok = True
        return self.applied_seq >= min_seq

    async def run(self) -> None:
        """Tail forever (cancel to stop)."""
        while True:
            await self.sync()
            await asyncio.sleep(self.interval_s)
