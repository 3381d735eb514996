"""Validation of public requests, proto -> the gateway's domain objects. Every error names the
field and the limit (core.limits)."""
from __future__ import annotations

import unicodedata
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
    explain: bool = False            # per-item explanations (RecommendRequest.explain)


def has_control(text: str, allow_breaks: bool = False) -> bool:
    """Control characters (NUL, line breaks, tabs, ...; Unicode category Cc) or the Unicode line
    and paragraph separators: they would split a log record or a CSV row. Free text may keep
    tabs and line breaks (allow_breaks), never NUL or other controls."""
    for c in text:
        if c in "\u2028\u2029" and not allow_breaks:
            return True
        if unicodedata.category(c) == "Cc" and not (allow_breaks and c in "\t\n\r"):
            return True
    return False


def _check_plain(field: str, value: str, allow_breaks: bool = False) -> None:
    if has_control(value, allow_breaks):
        what = "NUL or control characters" if allow_breaks else "control characters, NUL or line breaks"
        raise InvalidArgument(f"{field}: must not contain {what}")


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
                          req.surface, req.request_id or uuid.uuid4().hex, req.explain)


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


def events_from_proto(events: Sequence[pb.Event]) -> list[Event]:
    """Translation only: the checks need the catalog and the clock (gateway.events.validate_batch)."""
    return [Event(e.user_id, e.item_id, e.type, float(e.timestamp), float(e.value)) for e in events]
