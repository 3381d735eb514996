"""gateway.budget: the retrieval timeout from the hops' measured latency (pure; no servers)."""
from __future__ import annotations

import pytest

from common.latency import LatencyEstimate
from gateway.budget import HopBudget


def measured(retrieve_s: float, rank_s: float, n: int = 50, jitter: float = 0.0) -> HopBudget:
    budget = HopBudget(0.4)
    for i in range(n):
        sign = 1 if i % 2 else -1
        budget.retrieve.observe(retrieve_s + sign * jitter)
        budget.rank.observe(rank_s + sign * jitter)
    return budget


def test_old_share_until_both_hops_are_measured():
    budget = HopBudget(0.4, min_samples=20)
    assert budget.retrieval_timeout(0.017) == pytest.approx(0.4 * 0.017)
    for _ in range(30):
        budget.retrieve.observe(0.004)
    assert not budget.measured and budget.retrieval_timeout(0.1) == pytest.approx(0.04)
    for _ in range(20):
        budget.rank.observe(0.005)
    assert budget.measured and budget.retrieval_timeout(0.1) != pytest.approx(0.04)


def test_short_deadline_on_a_healthy_stack_leaves_ranking_its_tail():
    """20 ms client deadline, 3 ms reserve: 17 ms for two hops of ~4 and ~5 ms. The fixed 40%
    gave retrieval 6.8 ms, below its tail; now retrieval may use all but ranking's tail."""
    budget = measured(0.004, 0.005, jitter=0.001)
    timeout = budget.retrieval_timeout(0.017)
    assert timeout == pytest.approx(0.017 - budget.rank.tail)
    assert budget.retrieve.tail < timeout < 0.017 - 0.005     # retrieval's tail fits, ranking keeps > its mean
    assert timeout > 0.4 * 0.017


def test_not_enough_for_both_splits_in_proportion_to_the_tails():
    budget = measured(0.006, 0.002)
    tails = budget.retrieve.tail + budget.rank.tail
    assert tails > 0.005
    assert budget.retrieval_timeout(0.005) == pytest.approx(0.005 * budget.retrieve.tail / tails)
    # continuous where both tails just fit
    assert budget.retrieval_timeout(tails) == pytest.approx(budget.retrieve.tail)
    assert budget.retrieval_timeout(0.0) == 0.0 and budget.retrieval_timeout(-1.0) == 0.0


def test_estimate_follows_a_slower_hop():
    e = LatencyEstimate()
    for _ in range(100):
        e.observe(0.004)
    assert e.mean == pytest.approx(0.004) and e.tail < 0.0045
    for _ in range(100):
        e.observe(0.020)
    assert e.mean > 0.019 and e.tail >= e.mean


def test_share_checked():
    with pytest.raises(ValueError, match="retrieval-share"):
        HopBudget(1.5)
