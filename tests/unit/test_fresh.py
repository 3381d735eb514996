"""Fresh items (core.fresh, offline/fresh.py): untrained items get into the candidates and the slate."""
from __future__ import annotations

import numpy as np
import pytest

from core.fresh import MAX_FRESH_SLOTS, FreshItems
from core.merge import CandidateMerger
from core.rerank import DiversityReranker, NoCorrection
from core.types import ChannelResult
from offline.fresh import choose_fresh_slots

N_ITEMS = 40
# Items 30..39 have no training interaction; 40+ would be online items.
COUNTS = np.r_[np.arange(30, 0, -1), np.zeros(10)].astype(np.int64)


def result(items, scores=None) -> ChannelResult:
    items = np.asarray(items, np.int64)
    return ChannelResult(items, np.asarray(scores if scores is not None else np.linspace(1, 0.1, len(items)), np.float32))


def merged(fresh: FreshItems, quotas: dict[str, int], total: int, bert=None, cf=None):
    results = {"bert": result(bert if bert is not None else [41, 1, 30, 2, 31, 32, 3]),
               "cf": result(cf if cf is not None else list(range(10, 30)))}
    return CandidateMerger(fresh, COUNTS).merge(results, quotas, total)


def test_the_bert_lists_first_untrained_items_take_the_last_places_of_a_list_with_no_bert_quota():
    out = merged(FreshItems(candidates=2), {"bert": 0, "cf": 20}, total=20)
    plain = merged(FreshItems(), {"bert": 0, "cf": 20}, total=20).items.tolist()
    items = out.items.tolist()
    assert not {30, 41} & set(plain)
    assert len(items) == len(set(items)) == 20
    assert items[:18] == plain[:18] and items[18:] == [41, 30]   # the online item 41 first, 31 not
    scores, ranks = out.columns["bert"]
    assert ranks[items.index(30)] == 3 and scores[items.index(41)] > 0   # they carry their BERT rank
    assert out.per_channel == {"bert": 2, "cf": 18}


def test_fresh_items_already_merged_are_not_repeated_and_the_rule_is_bounded_by_total():
    # bert's quota already holds 41 and 30: nothing changes.
    out = merged(FreshItems(candidates=2), {"bert": 3, "cf": 17}, total=20)
    assert out.items.tolist() == merged(FreshItems(), {"bert": 3, "cf": 17}, total=20).items.tolist()
    # total // 10 bounds it: a list of 10 takes one fresh item at most.
    small = merged(FreshItems(candidates=3), {"bert": 0, "cf": 10}, total=10).items.tolist()
    assert len(small) == 10 and [i for i in small if i in (30, 31, 32, 41)] == [41]
    # No counts given (a set built before the rule): nothing changes.
    results = {"bert": result([30, 1]), "cf": result(list(range(10, 30)))}
    assert CandidateMerger(FreshItems(candidates=3)).merge(results, {"bert": 0, "cf": 20}, 20).items.tolist() == \
        CandidateMerger().merge(results, {"bert": 0, "cf": 20}, 20).items.tolist()


def slate_case():
    items = np.array([1, 2, 3, 4, 5, 30, 31, 32, 6, 7], np.int64)
    served = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.3, 0.45, 0.1, 0.2, 0.15], np.float32)
    return items, served


def test_fill_slate_gives_the_last_positions_to_the_best_untrained_candidates():
    items, served = slate_case()
    slate, scores = items[:5].copy(), served[:5].copy()
    out, out_scores, given, _ = FreshItems(slots=2).fill_slate(slate, scores, items, served, COUNTS)
    assert out.tolist() == [1, 2, 3, 31, 30] and given.tolist() == [3, 4]
    assert np.all(np.diff(out_scores) <= 0) and out_scores[3] == pytest.approx(0.45)
    # One untrained item already in the slate counts toward the slots.
    out, _, given, _ = FreshItems(slots=2).fill_slate(np.array([1, 30, 2, 3, 4]), scores, items, served, COUNTS)
    assert out.tolist() == [1, 30, 2, 3, 31] and given.tolist() == [4]
    # No slots, or no untrained candidate: the slate is untouched.
    assert FreshItems(slots=0).fill_slate(slate, scores, items, served, COUNTS)[0].tolist() == slate.tolist()
    trained = items[[0, 1, 2, 3, 4, 8, 9]]
    assert FreshItems(slots=2).fill_slate(slate, scores, trained, served[[0, 1, 2, 3, 4, 8, 9]],
                                          COUNTS)[0].tolist() == slate.tolist()


def test_the_reranker_explains_a_fresh_position_by_its_served_score_alone():
    rng = np.random.default_rng(0)
    text = rng.normal(size=(N_ITEMS, 8)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    side = np.column_stack([np.log1p(COUNTS) / np.log1p(COUNTS).max(), np.zeros(N_ITEMS)]).astype(np.float32)
    reranker = DiversityReranker(NoCorrection(), text, np.zeros(N_ITEMS, np.int64), side, 0.0,
                                 fresh=FreshItems(slots=1))
    items, served = slate_case()
    features = np.zeros((len(items), 12), np.float32)
    slate, scores = reranker.rerank(items, served, features, 5)
    again, scores2, explained = reranker.rerank_explained(items, served, features, 5)
    assert slate.tolist() == again.tolist() == [1, 2, 3, 4, 31] and np.array_equal(scores, scores2)
    assert explained.fused[4] == pytest.approx(0.45) and explained.correction[4] == explained.penalty[4] == 0


@pytest.mark.parametrize("section, field", [({"candidates": -1}, "candidates"), ({"slots": MAX_FRESH_SLOTS + 1}, "slots"),
                                             ({"slots": "2"}, "slots"), ({"candidates": True}, "candidates")])
def test_a_malformed_manifest_section_is_refused_naming_the_field(section, field):
    with pytest.raises(ValueError, match=f"fresh.{field}"):
        FreshItems.from_manifest({"fresh": section})


def test_a_manifest_without_the_section_has_no_fresh_rule():
    assert FreshItems.from_manifest({}) == FreshItems() and FreshItems.from_manifest({"fresh": {"slots": 2}}).slots == 2


def choice_case(cheap: bool):
    """Four lists, slate = the first five candidates. Cheap: the one trained positive is on top and
    the best untrained candidate (30 + j) is the list's unseen positive. Dear: the trained positives
    fill positions 3 and 4, and an untrained non-positive (35) ranks above the unseen positive."""
    slates, candidates, targets = [], [], []
    for j in range(4):
        fresh = [30 + j] if cheap else [35, 30 + j]
        items = np.array([0, 1, 2, 3, 4, *fresh, 5], np.int64)
        served = np.linspace(0.9, 0.1, len(items)).astype(np.float32)
        slates.append((items[:5], served[:5]))
        candidates.append((items, served))
        targets.append(np.array([0, 30 + j] if cheap else [3, 4, 30 + j]))
    return slates, candidates, targets


def test_the_build_takes_the_fewest_slots_that_reach_berts_recall_of_unseen_positives():
    slates, candidates, targets = choice_case(cheap=True)
    bert_top = [np.array([30 + j, 9]) for j in range(2)] + [np.array([9, 8])] * 2   # BERT finds half
    fresh, report = choose_fresh_slots(FreshItems(candidates=10), slates, candidates, targets, bert_top, COUNTS, k=5)
    assert fresh == FreshItems(candidates=10, slots=1)
    assert report["bert_unseen_recall@10"] == 0.5 and report["valid"][1]["unseen_recall@10"] == 1.0
    assert report["lists_with_unseen"] == 4 and len(report["valid"]) == MAX_FRESH_SLOTS + 1


def test_the_build_takes_no_slot_that_costs_more_than_two_percent_of_ndcg():
    slates, candidates, targets = choice_case(cheap=False)
    bert_top = [np.array([30 + j]) for j in range(4)]
    fresh, report = choose_fresh_slots(FreshItems(candidates=10), slates, candidates, targets, bert_top, COUNTS, k=5)
    rows = {r["slots"]: r for r in report["valid"]}
    assert rows[2]["unseen_recall@10"] == 1.0 and rows[2]["ndcg@10"] < 0.98 * rows[0]["ndcg@10"]
    assert fresh.slots == 0


def test_a_slot_backed_by_one_hit_in_many_lists_is_noise_and_not_taken():
    """Eight lists with an unseen positive; a fresh slot finds it in one of them (the other seven
    unseen positives are in no list): a gain of 1/8 with a standard error as large. BERT finds none."""
    slates, candidates, _ = choice_case(cheap=True)
    slates, candidates = slates * 2, candidates * 2
    targets = [np.array([0, 30])] + [np.array([0, 39])] * 7   # 39: untrained, in no list
    bert_top = [np.array([9, 8])] * 8
    fresh, report = choose_fresh_slots(FreshItems(candidates=10), slates, candidates, targets, bert_top, COUNTS, k=5)
    assert report["valid"][1]["unseen_recall@10"] == 1 / 8 and not report["valid"][1]["measurable"]
    assert fresh.slots == 0 and report["min_z"] == 2.0


def test_no_unseen_positive_means_no_slots():
    slates, candidates, _ = choice_case(cheap=True)
    targets = [np.array([0])] * 4
    fresh, report = choose_fresh_slots(FreshItems(candidates=10), slates, candidates, targets,
                                       [np.array([30])] * 4, COUNTS, k=5)
    assert fresh.slots == 0 and report["lists_with_unseen"] == 0


def test_the_ranking_service_serves_the_builds_slots_unless_the_operator_sets_them(tmp_path):
    from common.artifacts import open_artifacts
    from common.config import RankingConfig, parse_config
    from ranking.ranker import Ranker, served_fresh
    from tests.tiny_artifacts import FakeScorer, write_tiny_artifacts
    artifacts = open_artifacts(write_tiny_artifacts(tmp_path / "a", fresh={"candidates": 10, "slots": 1}))
    assert Ranker(artifacts, FakeScorer()).reranker.fresh == FreshItems(10, 1)
    assert Ranker(artifacts, FakeScorer(), fresh_slots=-1).reranker.fresh == FreshItems(10, 1)
    assert Ranker(artifacts, FakeScorer(), fresh_slots=3).reranker.fresh == FreshItems(10, 3)
    assert served_fresh({}, 2) == FreshItems(0, 2) and served_fresh({}) == FreshItems()
    assert parse_config(RankingConfig, ["--port", "1", "--fresh-slots", "2"]).fresh_slots == 2
    with pytest.raises(SystemExit):   # bounded by MAX_FRESH_SLOTS, refused at start
        parse_config(RankingConfig, ["--port", "1", "--fresh-slots", str(MAX_FRESH_SLOTS + 1)])
