"""Conversions between proto messages and numpy arrays, shared by retrieval and ranking."""
from __future__ import annotations

import numpy as np

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
