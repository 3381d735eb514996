"""Offline metrics: hand-computed cases, ties, empty inputs, AUC against a brute-force reference."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from offline.metrics import (auc, catalog_coverage, category_coverage, group_auc, hit_rate_at_k,
                             impression_metrics, intra_list_diversity, mean_impression_metrics, mrr,
                             ndcg_at_k, novelty, popularity_ranks, recall_at_k)

L2, L3, L4 = math.log2(2), math.log2(3), math.log2(4)


def brute_auc(scores, labels) -> float:
    """Reference: share of (positive, negative) pairs ordered right, ties 0.5."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return float("nan")
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)) / (len(pos) * len(neg))


def test_recall_hit_rate_and_mrr():
    ranked = ["a", "b", "c", "d"]
    assert recall_at_k(ranked, {"b", "d", "z"}, 2) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, {"b", "d", "z"}, 10) == pytest.approx(2 / 3)
    assert recall_at_k(["b", "b", "b"], {"b", "c"}, 3) == 0.5               # repeats count once
    assert hit_rate_at_k(ranked, {"c"}, 2) == 0.0 and hit_rate_at_k(ranked, {"c"}, 3) == 1.0
    assert mrr(ranked, {"c", "d"}) == pytest.approx(1 / 3)
    assert mrr(ranked, {"z"}) == 0.0
    assert mrr(ranked, {"c"}, k=2) == 0.0
    for f in (recall_at_k, hit_rate_at_k, ndcg_at_k):
        assert f([], {"a"}, 5) == 0.0 and f(ranked, set(), 5) == 0.0
        with pytest.raises(ValueError):
            f(ranked, {"a"}, 0)
    assert mrr([], {"a"}) == 0.0 and mrr(ranked, set()) == 0.0


def test_ndcg_binary():
    # hits at positions 1 and 3 (1-based), 3 relevant, k = 3: ideal has 3 hits.
    assert ndcg_at_k(["a", "x", "b"], {"a", "b", "c"}, 3) == pytest.approx((1 / L2 + 1 / L4) / (1 / L2 + 1 / L3 + 1 / L4))
    # ideal is over min(|relevant|, k): one relevant found second.
    assert ndcg_at_k(["x", "a", "y"], {"a"}, 3) == pytest.approx(1 / L3)
    assert ndcg_at_k(["a", "b"], {"a", "b"}, 5) == pytest.approx(1.0)
    assert ndcg_at_k(["a", "a", "b"], {"a", "b"}, 3) == pytest.approx((1 / L2 + 1 / L4) / (1 / L2 + 1 / L3))
    assert ndcg_at_k(np.array([3, 1, 2]).tolist(), {1}, 2) == pytest.approx(1 / L3)


def test_auc_hand_cases_and_ties():
    assert auc([0.9, 0.1], [1, 0]) == 1.0
    assert auc([0.1, 0.9], [1, 0]) == 0.0
    assert auc([0.5, 0.5], [1, 0]) == 0.5
    # pos {0.8, 0.4}, neg {0.4, 0.2}: pairs 1 + 1 + 0.5 + 1 = 3.5 of 4.
    assert auc([0.8, 0.4, 0.4, 0.2], [True, True, False, False]) == pytest.approx(0.875)
    assert auc(np.zeros(5), [1, 0, 1, 0, 0]) == 0.5
    assert math.isnan(auc([0.1, 0.2], [1, 1])) and math.isnan(auc([0.1], [0])) and math.isnan(auc([], []))
    with pytest.raises(ValueError):
        auc([0.1, 0.2], [1])
    with pytest.raises(ValueError):
        auc([float("nan"), 0.2], [1, 0])


def test_auc_matches_brute_force_on_random_tied_scores():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 30))
        scores = rng.integers(0, 5, n).astype(np.float32)       # many ties
        labels = rng.random(n) < 0.3
        ref = brute_auc(scores.tolist(), labels.tolist())
        got = auc(scores, labels)
        assert (math.isnan(ref) and math.isnan(got)) or got == pytest.approx(ref)


def test_group_auc_is_mean_of_per_group_brute_force():
    rng = np.random.default_rng(1)
    groups = [(rng.normal(size=n), rng.random(n) < 0.4) for n in rng.integers(1, 20, 50)]
    groups.append(([0.3, 0.2], [1, 1]))                          # one class: skipped
    refs = [brute_auc(list(s), list(y)) for s, y in groups]
    expected = np.mean([r for r in refs if not math.isnan(r)])
    assert group_auc(groups) == pytest.approx(expected)
    assert math.isnan(group_auc([])) and math.isnan(group_auc([([1.0], [1])]))


def test_impression_metrics_official_definitions():
    # Order by score: labels [0, 1, 0, 1, 0].
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    labels = [0, 1, 0, 1, 0]
    m = impression_metrics(scores, labels)
    assert m["auc"] == pytest.approx(brute_auc(scores, labels))
    assert m["mrr"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    dcg = 1 / L3 + 1 / math.log2(5)
    assert m["ndcg@5"] == pytest.approx(dcg / (1 / L2 + 1 / L3))
    assert m["ndcg@10"] == pytest.approx(m["ndcg@5"])
    # Click at rank 6: outside the top 5.
    m = impression_metrics(np.arange(10, 0, -1), [0] * 5 + [1] + [0] * 4)
    assert m["ndcg@5"] == 0.0 and m["ndcg@10"] == pytest.approx(1 / math.log2(7))
    assert m["mrr"] == pytest.approx(1 / 6) and m["auc"] == pytest.approx(4 / 9)


def test_impression_metrics_ties_and_one_class():
    # Ties keep input order: the click listed first is ranked first.
    assert impression_metrics([0.5, 0.5], [1, 0])["mrr"] == 1.0
    assert impression_metrics([0.5, 0.5], [0, 1])["mrr"] == 0.5
    assert impression_metrics([0.5, 0.5], [0, 1])["auc"] == 0.5
    assert all(math.isnan(v) for v in impression_metrics([0.1, 0.2], [0, 0]).values())
    only = impression_metrics([0.1, 0.2], [1, 1])
    assert math.isnan(only["auc"]) and only["mrr"] == pytest.approx((1 + 0.5) / 2) and only["ndcg@5"] == 1.0
    assert all(math.isnan(v) for v in impression_metrics([], []).values())


def test_mean_impression_metrics_skips_nan():
    out = mean_impression_metrics([([0.9, 0.1], [1, 0]), ([0.9, 0.1], [0, 1]), ([0.3], [0])])
    assert out == pytest.approx({"auc": 0.5, "mrr": 0.75, "ndcg@5": (1 + 1 / L3) / 2,
                                 "ndcg@10": (1 + 1 / L3) / 2, "impressions": 3.0})
    empty = mean_impression_metrics([])
    assert empty["impressions"] == 0 and math.isnan(empty["auc"])


def test_intra_list_diversity():
    assert intra_list_diversity(np.array([[1.0, 0.0], [0.0, 2.0]])) == pytest.approx(1.0)
    assert intra_list_diversity(np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])) == pytest.approx(0.0)
    # pairs: (e1, -e1) -> 2, (e1, e2) -> 1, (-e1, e2) -> 1
    assert intra_list_diversity(np.array([[1.0, 0], [-1.0, 0], [0, 1.0]])) == pytest.approx(4 / 3)
    assert intra_list_diversity(np.array([[0.0, 0.0], [1.0, 0.0]])) == pytest.approx(1.0)
    assert intra_list_diversity(np.zeros((1, 4))) == 0.0 and intra_list_diversity(np.zeros((0, 4))) == 0.0
    with pytest.raises(ValueError):
        intra_list_diversity(np.zeros(4))


def test_coverage_novelty_and_popularity():
    assert category_coverage(["a", "b", "a", "c"]) == 0.75
    assert category_coverage([]) == 0.0
    assert catalog_coverage([["1", "2"], ["2", "3"], []], 10) == 0.3
    assert catalog_coverage([], 10) == 0.0 and catalog_coverage([["1"]], 0) == 0.0
    ranks = popularity_ranks(["b", "a", "b", "c", "a", "b"])
    assert ranks == {"b": 1, "a": 2, "c": 3}
    assert novelty(["b", "c"], ranks) == 2.0
    assert novelty(["zz"], ranks) == 4.0                     # unseen = least popular + 1
    assert novelty([], ranks) == 0.0


def _official_dcg(y_true, y_score, k):
    order = np.argsort(y_score)[::-1]
    y = np.take(y_true, order[:k])
    return np.sum((2 ** y - 1) / np.log2(np.arange(len(y)) + 2))


def test_impression_metrics_match_official_script_without_ties():
    """The MIND evaluation script's mrr/ndcg, restated, on random tie-free impressions."""
    rng = np.random.default_rng(2)
    for _ in range(100):
        n = int(rng.integers(2, 40))
        scores = rng.permutation(n).astype(np.float64)
        labels = (rng.random(n) < 0.2).astype(int)
        labels[rng.integers(n)] = 1
        order = np.argsort(scores)[::-1]
        m = impression_metrics(scores, labels)
        assert m["mrr"] == pytest.approx(np.sum(np.take(labels, order) / (np.arange(n) + 1)) / labels.sum())
        for k in (5, 10):
            ref = _official_dcg(labels, scores, k) / _official_dcg(labels, labels, k)
            assert m[f"ndcg@{k}"] == pytest.approx(ref)


def test_a_gain_is_measurable_only_beyond_its_standard_errors():
    from offline.metrics import measurable_gain, standard_error
    assert standard_error([1.0]) == 0.0 and standard_error([0.0, 2.0]) == pytest.approx(1.0)
    one_hit = [1.0] + [0.0] * 7                  # mean 1/8, standard error 1/8
    assert measurable_gain(one_hit, 0.5) and not measurable_gain(one_hit, 2.0)
    assert measurable_gain([0.1] * 5, 2.0)       # the same gain everywhere: no noise
    assert not measurable_gain([], 0.0) and not measurable_gain([0.0, 0.0], 0.0) and not measurable_gain([-1.0, 0.5], 0.0)
