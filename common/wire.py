"""Conversions between proto messages and core types (numpy arrays, item indices, degraded reasons)."""
from __future__ import annotations

from typing import Iterable

import numpy as np

from core.reasons import DegradedReason
from protos import fusionrec_pb2 as pb


def candidates_to_proto(items: np.ndarray, columns: dict[str, tuple[np.ndarray, np.ndarray]]) -> pb.Candidates:
    msg = pb.Candidates(items=items.tolist())
    for channel, (scores, ranks) in columns.items():
        msg.channels.add(channel=channel, scores=scores.tolist(), ranks=ranks.tolist())
    return msg


def candidates_from_proto(msg: pb.Candidates) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """-> (items [N] int64, channel -> (scores [N] float32, ranks [N] int32)).

    Raises ValueError naming the field when a column's length disagrees with items.
    """
    items = np.array(msg.items, dtype=np.int64)
    columns = {}
    for c, col in enumerate(msg.channels):
        if len(col.scores) != len(items) or len(col.ranks) != len(items):   # by index: the name is the caller's
            raise ValueError(f"candidates.channels[{c}]: scores/ranks must have "
                             f"{len(items)} entries like candidates.items")
        columns[col.channel] = (np.array(col.scores, np.float32), np.array(col.ranks, np.int32))
    return items, columns


# An index this far past what a replica knows cannot come from a caller that is merely ahead of
# it in the item log (online items are allocated one by one): it is a bad request.
MAX_INDICES_AHEAD = 1 << 24


def known_indices(field: str, ids: np.ndarray, known: int, limit: int) -> tuple[np.ndarray, str | None]:
    """(the entries < known, in order; an error naming the field and the limit, or None).

    Indices in [known, known + MAX_INDICES_AHEAD) are online items this replica has not applied
    yet (the caller is ahead of it in the item log): dropped, not an error. Negative ones, absurd
    ones and too many entries are."""
    if len(ids) > limit:
        return ids, f"{field}: {len(ids)} entries exceeds the limit of {limit}"
    if len(ids) and (ids.min() < 0 or ids.max() >= known + MAX_INDICES_AHEAD):
        return ids, f"{field}: item indices must be in [0, {known + MAX_INDICES_AHEAD})"
    return (ids if not len(ids) or ids.max() < known else ids[ids < known]), None


# -- degraded reasons: core.reasons.DegradedReason <-> the proto enum (matched by name)
PREFIX = "DEGRADED_REASON_"


def reason_to_proto(reason: DegradedReason) -> int:
    return pb.DegradedReason.Value(PREFIX + DegradedReason(reason).name)


def reasons_to_proto(reasons: Iterable[DegradedReason]) -> list[int]:
    return [reason_to_proto(r) for r in reasons]


def reasons_from_proto(numbers: Iterable[int]) -> list[DegradedReason]:
    """A number this build does not know (a newer peer) reads as UNSPECIFIED."""
    out = []
    for n in numbers:
        try:
            out.append(DegradedReason[pb.DegradedReason.Name(n).removeprefix(PREFIX)])
        except (ValueError, KeyError):
            out.append(DegradedReason.UNSPECIFIED)
    return out
