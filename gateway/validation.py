"""Validation of public requests. Every error names the field and the limit."""
from __future__ import annotations

import uuid
from dataclasses import dataclass

from protos import fusionrec_pb2 as pb

MAX_K = 100
MAX_USER_ID = 256
MAX_EXCLUDE = 10_000
MAX_HISTORY = 1_000
MAX_SURFACE = 64
MAX_REQUEST_ID = 128
MAX_ITEM_ID = 256


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


def _check_ids(field: str, ids, limit: int) -> None:
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
