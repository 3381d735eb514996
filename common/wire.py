"""Conversions between proto messages and core types (numpy arrays, item changes, degraded reasons)."""
from __future__ import annotations

from typing import Iterable

import numpy as np

from core.online_items import ItemChange
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
    for col in msg.channels:
        if len(col.scores) != len(items) or len(col.ranks) != len(items):
            raise ValueError(f"candidates.channels[{col.channel!r}]: scores/ranks must have "
                             f"{len(items)} entries like candidates.items")
        columns[col.channel] = (np.array(col.scores, np.float32), np.array(col.ranks, np.int32))
    return items, columns


def check_indices(field: str, ids: np.ndarray, n_items: int, limit: int) -> str | None:
    """An error message naming the field and the limit, or None when ids are acceptable."""
    if len(ids) > limit:
        return f"{field}: {len(ids)} entries exceeds the limit of {limit}"
    if len(ids) and (ids.min() < 0 or ids.max() >= n_items):
        return f"{field}: item indices must be in [0, {n_items})"
    return None


def item_change_from_proto(msg: pb.ItemUpdate, text_dim: int) -> ItemChange:
    """Raises ValueError naming the field when the sizes disagree (nothing is applied then)."""
    indices = np.array(msg.add_indices, np.int64)
    if len(msg.add_vectors) != len(indices) * text_dim or len(msg.add_categories) != len(indices):
        raise ValueError(f"add_vectors/add_categories: need {len(indices)} x {text_dim} floats and "
                         f"{len(indices)} categories")
    return ItemChange(indices, np.array(msg.add_vectors, np.float32).reshape(len(indices), text_dim),
                      np.array(msg.add_categories, np.int64), np.array(msg.remove_indices, np.int64))


def item_change_to_proto(change: ItemChange, artifact_version: str = "") -> pb.ItemUpdate:
    return pb.ItemUpdate(add_indices=change.add_indices.tolist(),
                         add_vectors=np.asarray(change.add_vectors, np.float32).ravel().tolist(),
                         add_categories=change.add_categories.tolist(),
                         remove_indices=np.asarray(change.remove_indices).tolist(),
                         artifact_version=artifact_version)


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
