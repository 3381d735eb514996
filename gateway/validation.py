"""Validation of public requests, proto -> the gateway's domain objects. Every error names the
field and the limit (core.limits)."""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Sequence

from common.logs import current_request_id   # the call's id (common.tracing): the one its log lines carry
from core.limits import (MAX_CATEGORY, MAX_DELETE, MAX_EXCLUDE, MAX_HISTORY, MAX_ITEM_ID, MAX_K,
                         MAX_REQUEST_ID, MAX_SURFACE, MAX_TEXT, MAX_TITLE, MAX_UPSERT, MAX_USER_ID)
from core.text_rules import FINITE, plain_error, plain_ids_error
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
    explain: bool = False            # per-item explanations (RecommendRequest.explain)


def _check_plain(field: str, value: str, allow_breaks: bool = False) -> None:
    error = plain_error(field, value, allow_breaks)
    if error:
        raise InvalidArgument(error)


def _check_ids(field: str, ids: Sequence[str], limit: int) -> None:
    if len(ids) > limit:
        raise InvalidArgument(f"{field}: {len(ids)} ids exceeds the limit of {limit}")
    for i, item in enumerate(ids):
        if not item or len(item) > MAX_ITEM_ID:
            raise InvalidArgument(f"{field}[{i}]: item ids must be 1..{MAX_ITEM_ID} characters")
    error = plain_ids_error(field, ids)
    if error:
        raise InvalidArgument(error)


def validate_recommend(req: pb.RecommendRequest) -> RecommendQuery:
    if not 1 <= req.k <= MAX_K:
        raise InvalidArgument(f"k: must be in 1..{MAX_K}, got {req.k}")
    if len(req.user_id) > MAX_USER_ID:
        raise InvalidArgument(f"user_id: {len(req.user_id)} characters exceeds the limit of {MAX_USER_ID}")
    if not req.user_id and not req.history_item_ids:
        raise InvalidArgument("user_id: required unless history_item_ids is given")
    _check_plain("user_id", req.user_id)
    _check_ids("exclude_item_ids", req.exclude_item_ids, MAX_EXCLUDE)
    _check_ids("history_item_ids", req.history_item_ids, MAX_HISTORY)
    if len(req.surface) > MAX_SURFACE:
        raise InvalidArgument(f"surface: {len(req.surface)} characters exceeds the limit of {MAX_SURFACE}")
    _check_plain("surface", req.surface)
    if len(req.request_id) > MAX_REQUEST_ID:
        raise InvalidArgument(f"request_id: {len(req.request_id)} characters exceeds the limit of {MAX_REQUEST_ID}")
    _check_plain("request_id", req.request_id)
    return RecommendQuery(req.user_id, req.k, tuple(req.exclude_item_ids), tuple(req.history_item_ids),
                          req.surface, req.request_id or current_request_id() or uuid.uuid4().hex, req.explain)


def validate_upsert(request: pb.UpsertItemsRequest) -> list[NewItem]:
    if not 1 <= len(request.items) <= MAX_UPSERT:
        raise InvalidArgument(f"items: {len(request.items)} items; must be 1..{MAX_UPSERT}")
    seen = set()
    for i, item in enumerate(request.items):
        if not 1 <= len(item.item_id) <= MAX_ITEM_ID:
            raise InvalidArgument(f"items[{i}].item_id: must be 1..{MAX_ITEM_ID} characters")
        _check_plain(f"items[{i}].item_id", item.item_id)
        if item.item_id in seen:
            raise InvalidArgument(f"items[{i}].item_id: duplicate of an earlier item in this request")
        seen.add(item.item_id)
        if not 1 <= len(item.title) <= MAX_TITLE:
            raise InvalidArgument(f"items[{i}].title: must be 1..{MAX_TITLE} characters")
        _check_plain(f"items[{i}].title", item.title)
        if len(item.text) > MAX_TEXT:
            raise InvalidArgument(f"items[{i}].text: {len(item.text)} characters exceeds the limit of {MAX_TEXT}")
        _check_plain(f"items[{i}].text", item.text, allow_breaks=True)
        if len(item.category) > MAX_CATEGORY:
            raise InvalidArgument(f"items[{i}].category: exceeds the limit of {MAX_CATEGORY} characters")
        _check_plain(f"items[{i}].category", item.category)
    return [NewItem(i.item_id, i.title, i.text, i.category) for i in request.items]


def validate_delete(request: pb.DeleteItemsRequest) -> list[str]:
    if len(request.item_ids) > MAX_DELETE:
        raise InvalidArgument(f"item_ids: {len(request.item_ids)} ids exceeds the limit of {MAX_DELETE}")
    for i, item in enumerate(request.item_ids):
        if not 1 <= len(item) <= MAX_ITEM_ID:
            raise InvalidArgument(f"item_ids[{i}]: item ids must be 1..{MAX_ITEM_ID} characters")
        _check_plain(f"item_ids[{i}]", item)
    return list(dict.fromkeys(request.item_ids))


def validate_user_id(user_id: str, field: str = "user_id") -> str:
    """A user id the stores and the event log can hold: 1..MAX_USER_ID characters, no controls."""
    if not 1 <= len(user_id) <= MAX_USER_ID:
        raise InvalidArgument(f"{field}: must be 1..{MAX_USER_ID} characters, got {len(user_id)}")
    _check_plain(field, user_id)
    return user_id


def validate_delete_user(request: pb.DeleteUserDataRequest) -> str:
    return validate_user_id(request.user_id)


def check_event_fields(i: int, event: Event) -> None:
    """What an event must be before anything else is asked of it (gateway.events.validate_batch
    adds the catalog and the clock): ids that fit on one log line and numbers that are numbers.
    A NaN or infinite value or timestamp would poison the event log and every build that reads it."""
    _check_plain(f"events[{i}].user_id", event.user_id)
    _check_plain(f"events[{i}].item_id", event.item_id)
    if not math.isfinite(event.timestamp):
        raise InvalidArgument(f"events[{i}].timestamp: {FINITE}")
    if not math.isfinite(event.value):
        raise InvalidArgument(f"events[{i}].value: {FINITE}")


def events_from_proto(events: Sequence[pb.Event]) -> list[Event]:
    """Translation only: the checks need the catalog and the clock (gateway.events.validate_batch)."""
    return [Event(e.user_id, e.item_id, e.type, float(e.timestamp), float(e.value)) for e in events]
