"""core.reasons.DegradedReason <-> the proto enum fusionrec.v1.DegradedReason (matched by name)."""
from __future__ import annotations

from typing import Iterable

from core.reasons import DegradedReason
from protos import fusionrec_pb2 as pb

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
