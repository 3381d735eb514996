"""The build chooses the re-ranker's diversity weight on validation (offline.reranker.choose_reranking),
writes it into the manifest, and the ranking service serves it unless --diversity-weight overrides."""
from __future__ import annotations

import numpy as np
import pytest

from common.artifacts import open_artifacts
from common.config import RankingConfig, parse_config
from core.features import RETRIEVAL_FEATURES
from core.rerank import DiversityReranker, NoCorrection
from offline.ranker import RankingList
from offline.reranker import NDCG_TOLERANCE, SWEEP_WEIGHTS, choose_reranking, choose_weight, diversity_sweep
from ranking.ranker import LEGACY_DIVERSITY_WEIGHT, Ranker, served_reranking
from tests.tiny_artifacts import FakeScorer, write_tiny_artifacts


def rows(*triples: tuple[float, float, float]) -> list[dict[str, float]]:
    return [{"weight": w, "ndcg@10": n, "ild@10": d} for w, n, d in triples]


def test_largest_ild_gain_within_two_percent_of_the_best_ndcg():
    sweep = rows((0.0, 0.100, 0.50), (0.05, 0.101, 0.52), (0.1, 0.0995, 0.56), (0.2, 0.0990, 0.60),
                 (0.5, 0.0989, 0.70), (1.0, 0.080, 0.90))
    # best 0.101 -> floor 0.09898: 0.2 (0.0990) is in, 0.5 (0.0989) just out, 1.0 far out.
    assert choose_weight(sweep) == 0.2
    assert choose_weight(sweep, tolerance=0.5) == 1.0          # a looser rule takes the most diverse
    assert choose_weight(sweep, tolerance=0.0) == 0.05         # only the best nDCG row is eligible


def test_ties_and_a_sweep_where_diversity_only_falls_keep_the_smaller_weight():
    assert choose_weight(rows((0.2, 0.1, 0.6), (0.0, 0.1, 0.5), (0.1, 0.1, 0.6))) == 0.1
    assert choose_weight(rows((0.0, 0.1, 0.5), (0.1, 0.1, 0.4), (0.2, 0.1, 0.3))) == 0.0
    assert choose_weight(rows((0.0, 0.0, 0.5), (0.5, 0.0, 0.7))) == 0.5   # no signal: nDCG costs nothing
    with pytest.raises(ValueError):
        choose_weight([])


def test_trees_that_keep_validation_ndcg_are_served_with_the_weight_chosen_on_their_sweep():
    trees = rows((0.0, 0.110, 0.50), (0.1, 0.109, 0.58), (0.5, 0.090, 0.80))
    plain = rows((0.0, 0.100, 0.50), (0.1, 0.100, 0.70))
    chosen = choose_reranking(trees, plain, fused_ndcg=0.100)
    assert chosen["trees"] is True and chosen["diversity_weight"] == 0.1
    assert choose_reranking(trees, plain, fused_ndcg=0.110)["trees"] is True   # equal is not lower


def test_trees_whose_gain_is_inside_the_noise_are_switched_off():
    trees = rows((0.0, 0.110, 0.50), (0.1, 0.109, 0.58))
    plain = rows((0.0, 0.100, 0.50), (0.1, 0.100, 0.70))
    assert choose_reranking(trees, plain, fused_ndcg=0.100, gain_se=0.0049)["trees"] is True   # +0.010 >= 2 se
    off = choose_reranking(trees, plain, fused_ndcg=0.100, gain_se=0.0051)                     # +0.010 < 2 se
    assert off["trees"] is False and off["diversity_weight"] == 0.1 and "less than" in off["why"]


def test_trees_that_lower_validation_ndcg_are_switched_off_and_the_weight_comes_from_the_plain_sweep():
    trees = rows((0.0, 0.090, 0.50), (0.1, 0.089, 0.60), (0.5, 0.088, 0.65))
    plain = rows((0.0, 0.100, 0.48), (0.1, 0.099, 0.55), (0.5, 0.090, 0.75))
    chosen = choose_reranking(trees, plain, fused_ndcg=0.100)
    assert chosen["trees"] is False and chosen["diversity_weight"] == 0.1
    assert "less than" in chosen["why"]


def _lists(n_lists: int = 12, n: int = 40, d: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(200, d)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    lists, scores = [], []
    for _ in range(n_lists):
        items = rng.choice(200, n, replace=False).astype(np.int64)
        labels = (rng.random(n) < 0.1).astype(np.float32)
        lists.append(RankingList(np.array([], np.int64), items, np.zeros((n, len(RETRIEVAL_FEATURES)), np.float32), labels))
        scores.append(rng.normal(size=n).astype(np.float32))
    return lists, scores, text


def test_the_sweep_at_weight_zero_with_no_correction_is_the_fused_order_and_diversity_rises():
    lists, scores, text = _lists()
    category, side = np.zeros(200, np.int64), np.zeros((200, 2), np.float32)
    reranker = DiversityReranker(NoCorrection(), text, category, side)
    fused, sweep = diversity_sweep(reranker, lists, scores, text, (0.0, 0.5, 5.0))
    assert [r["weight"] for r in sweep] == [0.0, 0.5, 5.0]
    assert sweep[0]["ndcg@10"] == pytest.approx(fused["ndcg@10"]) and sweep[0]["ild@10"] == pytest.approx(fused["ild@10"])
    assert sweep[2]["ild@10"] > sweep[0]["ild@10"]


def test_ranking_serves_the_manifest_weight_unless_the_flag_overrides(tmp_path):
    root = tmp_path / "artifacts"
    first = open_artifacts(write_tiny_artifacts(root, diversity_weight=0.2))
    second = open_artifacts(write_tiny_artifacts(root, diversity_weight=0.05, rerank_trees=False))
    assert Ranker(first, FakeScorer()).reranker.diversity_weight == 0.2
    assert not isinstance(Ranker(first, FakeScorer()).reranker.booster, NoCorrection)
    # A hot swap to a newer version brings that version's weight and its trees switch.
    swapped = Ranker(second, FakeScorer())
    assert swapped.reranker.diversity_weight == 0.05 and isinstance(swapped.reranker.booster, NoCorrection)
    # The service's default (negative) means "from the artifacts"; an explicit value wins for every version.
    default = parse_config(RankingConfig, argv=["--port", "50052"]).diversity_weight
    assert default < 0
    assert Ranker(first, FakeScorer(), diversity_weight=default).reranker.diversity_weight == 0.2
    flagged = parse_config(RankingConfig, argv=["--port", "50052", "--diversity-weight", "0.7"]).diversity_weight
    assert Ranker(first, FakeScorer(), diversity_weight=flagged).reranker.diversity_weight == 0.7
    assert Ranker(second, FakeScorer(), diversity_weight=0.0).reranker.diversity_weight == 0.0


def test_a_manifest_without_the_choice_serves_the_old_fixed_weight():
    assert served_reranking({}) == (True, LEGACY_DIVERSITY_WEIGHT)
    assert served_reranking({"reranker": {"trees": False, "diversity_weight": 0.3}}, 0.5) == (False, 0.5)


async def _ranked(ranker: Ranker):
    items = np.arange(30, dtype=np.int64)
    return await ranker.rank(np.array([0, 1], np.int64), items, {}, 10, 1.0, explain=True)


def test_trees_off_serves_no_correction(tmp_path):
    import asyncio
    off = open_artifacts(write_tiny_artifacts(tmp_path / "a", rerank_trees=False))
    ranked = asyncio.run(_ranked(Ranker(off, FakeScorer())))
    assert len(ranked.items) == 10 and not ranked.degraded_reasons
    assert np.all(ranked.explanation.correction == 0.0)


def test_a_real_build_writes_its_choice(artifacts):
    chosen = artifacts.manifest["reranker"]
    assert isinstance(chosen["trees"], bool) and chosen["diversity_weight"] in SWEEP_WEIGHTS
    assert [r["weight"] for r in chosen["sweep"]] == list(SWEEP_WEIGHTS)
    assert [r["weight"] for r in chosen["sweep_no_trees"]] == list(SWEEP_WEIGHTS)
    assert chosen["lists"] > 0 and chosen["ndcg_tolerance"] == NDCG_TOLERANCE
    # The recorded choice is the rule applied to the recorded sweeps.
    again = choose_reranking(chosen["sweep"], chosen["sweep_no_trees"], chosen["fused_valid"]["ndcg@10"],
                             gain_se=chosen["tree_gain_se"])
    assert (again["trees"], again["diversity_weight"]) == (chosen["trees"], chosen["diversity_weight"])
    assert served_reranking(artifacts.manifest) == (chosen["trees"], chosen["diversity_weight"])


def _learnable_lists(n_lists: int, fused_is_right: bool, seed: int = 0):
    """Lists whose relevance a retrieval feature reveals: the fused scores either agree with it or are noise."""
    rng = np.random.default_rng(seed)
    lists, scores, text = _lists(n_lists, seed=seed)
    out_lists, out_scores = [], []
    for lst in lists:
        features = np.zeros_like(lst.features)
        features[:, 0] = lst.labels + 0.1 * rng.random(len(lst.labels))   # the signal, as a channel score
        labels = lst.labels if lst.labels.any() else np.eye(len(lst.labels), dtype=np.float32)[0]
        features[:, 0] += labels - lst.labels
        out_lists.append(RankingList(lst.history, lst.candidates, features, labels))
        out_scores.append((labels + 0.01 * rng.random(len(labels))).astype(np.float32) if fused_is_right
                          else rng.normal(size=len(labels)).astype(np.float32))
    return out_lists, out_scores, text


def test_cross_validation_judges_every_list_once_and_serves_trees_that_help():
    from offline.reranker import cross_validated_choice
    lists, scores, text = _learnable_lists(60, fused_is_right=False)
    category, side = np.zeros(200, np.int64), np.zeros((200, 2), np.float32)
    booster, chosen = cross_validated_choice(lists, scores, text, category, side, folds=5, progress=False)
    assert chosen["folds"] == 5 and chosen["lists"] == 60 and len(chosen["fold_rounds"]) == 5
    # Every list judged once: the fold-weighted fused row is the plain mean over all lists.
    fused, _ = diversity_sweep(DiversityReranker(NoCorrection(), text, category, side), lists, scores, text, (0.0,))
    assert chosen["fused_valid"]["ndcg@10"] == pytest.approx(fused["ndcg@10"])
    assert [r["weight"] for r in chosen["sweep"]] == list(SWEEP_WEIGHTS)
    # The trees find the channel score the noisy fused order ignores, on lists they did not train on.
    assert chosen["trees"] is True and chosen["sweep"][0]["ndcg@10"] > fused["ndcg@10"] + 0.2
    assert booster.current_iteration() == chosen["rounds"] >= 1


def test_cross_validation_switches_trees_off_when_they_cannot_beat_a_right_fused_order():
    from offline.reranker import cross_validated_choice
    lists, scores, text = _learnable_lists(40, fused_is_right=True, seed=1)
    category, side = np.zeros(200, np.int64), np.zeros((200, 2), np.float32)
    _, chosen = cross_validated_choice(lists, scores, text, category, side, folds=4, progress=False)
    assert chosen["fused_valid"]["ndcg@10"] == pytest.approx(1.0)
    assert chosen["sweep"][0]["ndcg@10"] <= 1.0 and chosen["lists_source"] == "4-fold cross-validation"
    assert chosen["trees"] == (chosen["sweep"][0]["ndcg@10"] - 1.0 >= chosen["tree_gain_se"])


def test_cross_validation_with_no_relevant_item_in_any_pool_refuses_like_training_does():
    from offline.reranker import cross_validated_choice
    lists, _, text = _lists(10, n=40)
    # Relevant items only below the pool (the 30 best by fused score): nothing to learn from anywhere.
    lists = [RankingList(l.history, l.candidates, l.features, np.r_[np.zeros(35), np.ones(5)].astype(np.float32))
             for l in lists]
    scores = [np.linspace(1, 0, 40).astype(np.float32) for _ in lists]
    category, side = np.zeros(200, np.int64), np.zeros((200, 2), np.float32)
    with pytest.raises(ValueError, match="no re-ranker training list"):
        cross_validated_choice(lists, scores, text, category, side, folds=5, progress=False)
