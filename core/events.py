"""The event types the public API accepts (protos/fusionrec.proto, Event.type)."""
from __future__ import annotations

from enum import StrEnum, auto


class EventType(StrEnum):
    IMPRESSION = auto()
    CLICK = auto()
    PURCHASE = auto()
    ADD_TO_CART = auto()
    LIKE = auto()


EVENT_TYPES: tuple[str, ...] = tuple(t.value for t in EventType)
# What a user chose: these extend the user's recent history; an impression does not.
HISTORY_TYPES = frozenset({EventType.CLICK, EventType.PURCHASE, EventType.ADD_TO_CART, EventType.LIKE})
