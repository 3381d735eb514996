"""Validation of public requests, proto -> the gateway's domain objects. Every error names the
field and the limit (core.limits)."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Sequence

from core.limits import (MAX_CATEGORY, MAX_DELETE, MAX_EXCLUDE, MAX_HISTORY, MAX_ITEM_ID, MAX_K,
                         MAX_REQUEST_ID, MAX_SURFACE, MAX_TEXT, MAX_TITLE, MAX_UPSERT, MAX_USER_ID)
from gateway.event_log import Event
from gateway.items import NewItem
from protos import fusionrec_pb2 as pb


class InvalidArgument(ValueError):
    """Bad input: becomes INVALID_ARGUMENT with this message."""


@dataclass(frozen=True)
class RecommendQuery:
    user_id: str
    k: int
    exclude_item_ids: tuple[str, ...]
    history_item_ids: tuple[str, ...]
    surface: str
    request_id: str


def _check_ids(field: str, ids: Sequence[str], limit: int) -> None:
    if len(ids) > limit:
        raise InvalidArgument(f"{field}: {len(ids)} ids exceeds the limit of {limit}")
    for i, item in enumerate(ids):
        if not item or len(item) > MAX_ITEM_ID:
            raise InvalidArgument(f"{field}[{i}]: item ids must be 1..{MAX_ITEM_ID} characters")


def validate_recommend(req: pb.RecommendRequest) -> RecommendQuery:
    if not 1 <= req.k <= MAX_K:
        raise InvalidArgument(f"k: must be in 1..{MAX_K}, got {req.k}")
    if len(req.user_id) > MAX_USER_ID:
        raise InvalidArgument(f"user_id: {len(req.user_id)} characters exceeds the limit of {MAX_USER_ID}")
    if not req.user_id and not req.history_item_ids:
        raise InvalidArgument("user_id: required unless history_item_ids is given")
    _check_ids("exclude_item_ids", req.exclude_item_ids, MAX_EXCLUDE)
    _check_ids("history_item_ids", req.history_item_ids, MAX_HISTORY)
    if len(req.surface) > MAX_SURFACE:
        raise InvalidArgument(f"surface: {len(req.surface)} characters exceeds the limit of {MAX_SURFACE}")
    if len(req.request_id) > MAX_REQUEST_ID:
        raise InvalidArgument(f"request_id: {len(req.request_id)} characters exceeds the limit of {MAX_REQUEST_ID}")
    return RecommendQuery(req.user_id, req.k, tuple(req.exclude_item_ids), tuple(req.history_item_ids),
                          req.surface, req.request_id or uuid.uuid4().hex)


def validate_upsert(request: pb.UpsertItemsRequest) -> list[NewItem]:
    if not 1 <= len(request.items) <= MAX_UPSERT:
        raise InvalidArgument(f"items: {len(request.items)} items; must be 1..{MAX_UPSERT}")
    seen = set()
    for i, item in enumerate(request.items):
        if not 1 <= len(item.item_id) <= MAX_ITEM_ID:
            raise InvalidArgument(f"items[{i}].item_id: must be 1..{MAX_ITEM_ID} characters")
        if item.item_id in seen:
            raise InvalidArgument(f"items[{i}].item_id: duplicate of an earlier item in this request")
        seen.add(item.item_id)
        if not 1 <= len(item.title) <= MAX_TITLE:
            raise InvalidArgument(f"items[{i}].title: must be 1..{MAX_TITLE} characters")
        if len(item.text) > MAX_TEXT:
            raise InvalidArgument(f"items[{i}].text: {len(item.text)} characters exceeds the limit of {MAX_TEXT}")
        if len(item.category) > MAX_CATEGORY:
            raise InvalidArgument(f"items[{i}].category: exceeds the limit of {MAX_CATEGORY} characters")
    return [NewItem(i.item_id, i.title, i.text, i.category) for i in request.items]


def validate_delete(request: pb.DeleteItemsRequest) -> list[str]:
    if len(request.item_ids) > MAX_DELETE:
        raise InvalidArgument(f"item_ids: {len(request.item_ids)} ids exceeds the limit of {MAX_DELETE}")
    return list(request.item_ids)


def events_from_proto(events: Sequence[pb.Event]) -> list[Event]:
    """Translation only: the checks need the catalog and the clock (gateway.events.validate_batch)."""
    return [Event(e.user_id, e.item_id, e.type, float(e.timestamp), float(e.value)) for e in events]
