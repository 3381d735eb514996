"""Why an answer was degraded: one vocabulary for every service.

The proto enum fusionrec.v1.DegradedReason has the same members, named DEGRADED_REASON_<NAME>
(tests/unit/test_reasons.py keeps them in step). A member's value, its lower-case name, is the only
string form: a metric label, and RecommendResponse.degraded_reasons, kept for existing callers.
"""
from __future__ import annotations

from enum import StrEnum, auto


class DegradedReason(StrEnum):
    UNSPECIFIED = auto()              # the proto default; never produced
    USER_STATE_UNAVAILABLE = auto()   # the recent-history store failed: the build's history is used
    RETRIEVAL_UNAVAILABLE = auto()    # retrieval down: popular items
    RETRIEVAL_TIMEOUT = auto()
    RETRIEVAL_ERROR = auto()
    RANKING_UNAVAILABLE = auto()      # ranking down: retrieval order
    RANKING_TIMEOUT = auto()
    RANKING_ERROR = auto()
    TRITON_UNAVAILABLE = auto()       # the fused ranker on Triton failed: retrieval order
    RERANKER_ERROR = auto()           # the slate re-ranker failed: fused order
    NO_CANDIDATES = auto()
    ITEM_STATE_UNAVAILABLE = auto()   # the item log could not be read: online items may be stale
    SEQUENTIAL_UNAVAILABLE = auto()   # the sequential channel's encoder on Triton failed: candidates without it


PRODUCED = frozenset(r for r in DegradedReason if r is not DegradedReason.UNSPECIFIED)
