"""How much of a Recommend's remaining budget retrieval may use, from the hops' measured latency.

A fixed share is wrong for short deadlines: with 20 ms left, 40% (8 ms minus the reserve) is less
than retrieval's own tail, so nearly every answer was a popular fallback although the stack
answers in 12 ms. Instead each hop keeps a running estimate of its latency tail (mean + 2 mean
deviations, exponentially weighted, as TCP estimates its retransmission timeout), and:
  * enough time for both tails: retrieval may use everything except ranking's tail (ranking then
    gets whatever retrieval left, at least its tail);
  * not enough: the remaining time is split in proportion to the two tails;
  * before `min_samples` calls of each hop: the configured share (the old rule).
A call that timed out is recorded at the time it was given (a lower bound of what it needed), so
a hop that became slower gets more time on the next calls rather than failing forever.
"""
from __future__ import annotations

from common.latency import LatencyEstimate


class HopBudget:
    """Retrieval's timeout from the two hops' estimates (one event loop: no locking)."""

    def __init__(self, initial_share: float, min_samples: int = 20, alpha: float = 0.05) -> None:
        if not 0 < initial_share < 1:
            raise ValueError(f"--retrieval-share must be in (0, 1), got {initial_share}")
        self.initial_share = initial_share
        self.min_samples = min_samples
        self.retrieve = LatencyEstimate(alpha)
        self.rank = LatencyEstimate(alpha)

    @property
    def measured(self) -> bool:
        return min(self.retrieve.samples, self.rank.samples) >= self.min_samples

    def retrieval_timeout(self, remaining_s: float) -> float:
        """Seconds retrieval may take out of remaining_s (what is left after the gateway's reserve)."""
        if remaining_s <= 0:
            return 0.0
        if not self.measured:
            return remaining_s * self.initial_share
        need_retrieve, need_rank = self.retrieve.tail, self.rank.tail
        if remaining_s >= need_retrieve + need_rank:
            return remaining_s - need_rank
        return remaining_s * need_retrieve / max(need_retrieve + need_rank, 1e-9)
