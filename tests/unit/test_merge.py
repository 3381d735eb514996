import numpy as np

from core.types import ChannelResult
from core.merge import CandidateMerger


def result(items):
    items = np.array(items, np.int64)
    return ChannelResult(items, np.linspace(1, 0.5, len(items)).astype(np.float32))


def test_quotas_dedupe_and_round_robin_order():
    merged = CandidateMerger().merge(
        {"bert": result([1, 2, 3, 4]), "cf": result([2, 5, 6]), "popular": result([7, 1, 8])},
        {"bert": 2, "cf": 2, "popular": 1}, total=5)
    # rank 1 of each channel, then rank 2 (bert's 2 is a duplicate, popular is at quota), then rank 3
    assert merged.items.tolist() == [1, 2, 7, 5, 3]
    # item 2 was found by bert (rank 2) and cf (rank 1): both columns say so
    j = merged.items.tolist().index(2)
    assert merged.columns["bert"][1][j] == 2 and merged.columns["cf"][1][j] == 1
    assert merged.columns["popular"][1][j] == 0


def test_unused_quota_is_filled_by_other_channels():
    merged = CandidateMerger().merge({"bert": result(range(10)), "cf": result([]), "popular": result([])},
                                     {"bert": 3, "cf": 3, "popular": 3}, total=6)
    assert merged.items.tolist() == [0, 1, 2, 3, 4, 5]
    assert merged.per_channel == {"bert": 6, "cf": 0, "popular": 0}


def test_total_caps_the_list():
    merged = CandidateMerger().merge({"bert": result(range(100)), "cf": result(range(100, 200))},
                                     {"bert": 50, "cf": 50}, total=30)
    assert len(merged.items) == 30


def test_a_zero_quota_channel_does_not_claim_items_from_another_channels_quota():
    # "a" has no quota but proposes first (round-robin order) the same items as "b": b's quota
    # must still count them as b's, and the zero-quota channel only fills what is left.
    results = {"a": ChannelResult(np.array([1, 2, 3, 9], np.int64), np.ones(4, np.float32)),
               "b": ChannelResult(np.array([1, 2, 3], np.int64), np.ones(3, np.float32)),
               "c": ChannelResult(np.array([7, 8], np.int64), np.ones(2, np.float32))}
    merged = CandidateMerger().merge(results, {"a": 0, "b": 2, "c": 1}, 5)
    # Pass 1: b's 1 and 2, c's 7; pass 2 fills in round-robin order: c's 8 (rank 2), then a's 3.
    assert merged.items.tolist() == [1, 7, 2, 8, 3]
    assert merged.per_channel == {"a": 1, "b": 2, "c": 2}
