"""Pure parts of the offline evaluation: baselines, aggregation, verdicts, markdown, on hand-made cases."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from offline import eval_aggregate as agg
from offline.eval_testset import sample, resolve_data_spec
from offline.report import _json_safe, fmt, pct, render_markdown, table
from tools.cli import parse
from tools.evaluate import options_from


# ---------------------------------------------------------------- fixtures: 6 items, 2 users

@pytest.fixture()
def tables() -> agg.ItemTables:
    text = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [1, 1], [1, -1]], np.float32)
    return agg.ItemTables(item_text=text, item_category=np.array([1, 1, 2, 2, 3, 0]),
                          train_counts=np.array([50, 40, 30, 20, 10, 0]))


def _result(relevant: set[int], slates: dict[str, list[int]], n_train: int = 10,
            cold: set[int] | None = None) -> agg.UserResult:
    lists = {"bert": np.array([2, 3, 4]), "cf": np.array([0, 1, 2]), "popular": np.array([0, 1, 2, 3]),
             "merged": np.array([2, 0, 3, 1])}
    full = {name: np.array(slates.get(name, [0, 1]), np.int64) for name in agg.SYSTEMS}
    return agg.UserResult(relevant, cold or set(), n_train, lists, full)


# ---------------------------------------------------------------- baselines

def test_top_k_by_score_orders_by_score_and_keeps_input_order_on_ties() -> None:
    items = np.array([7, 8, 9, 10])
    assert agg.top_k_by_score(items, np.array([0.1, 0.9, 0.5, 0.9]), 3).tolist() == [8, 10, 9]
    assert agg.top_k_by_score(items, np.zeros(4), 2).tolist() == [7, 8]
    assert agg.top_k_by_score(items[:0], np.zeros(0), 3).tolist() == []
    with pytest.raises(ValueError, match="differ in length"):
        agg.top_k_by_score(items, np.zeros(3), 2)


def test_first_k_is_the_list_prefix() -> None:
    assert agg.first_k(np.array([3, 1, 2]), 2).tolist() == [3, 1]
    assert agg.first_k(np.array([3]), 10).tolist() == [3]


# ---------------------------------------------------------------- slate metrics

def test_popularity_rank_leaves_out_items_never_seen(tables: agg.ItemTables) -> None:
    assert tables.popularity_rank() == {0: 1, 1: 2, 2: 3, 3: 4, 4: 5}


def test_slate_values_on_a_hand_made_slate(tables: agg.ItemTables) -> None:
    values = agg.slate_values(np.array([4, 2]), {2}, tables, tables.popularity_rank())
    assert values["hr@10"] == 1.0
    assert values["mrr@10"] == 0.5
    assert values["ndcg@10"] == pytest.approx(1 / math.log2(3))
    assert values["recall@10"] == 1.0
    assert values["ild@10"] == pytest.approx(1 - 1 / math.sqrt(2))   # [1,1] vs [0,1]
    assert values["category_coverage@10"] == 1.0
    assert values["novelty"] == 4.0                                  # ranks 5 and 3
    assert values["novelty_norm"] == pytest.approx(4.0 / 6)


def test_system_table_means_over_users_and_covers_the_catalog(tables: agg.ItemTables) -> None:
    results = [_result({0}, {"full_pipeline": [0, 1]}), _result({5}, {"full_pipeline": [2, 3]}),
               _result(set(), {"full_pipeline": [4]})]   # no positive: skipped in means
    summary, per_user = agg.system_table(results, tables)
    full = summary["full_pipeline"]
    assert full["users"] == 2
    assert full["hr@10"] == 0.5 and full["mrr@10"] == 0.5
    assert full["catalog_coverage"] == pytest.approx(5 / 6)        # items 0-4 shown to someone
    assert per_user["full_pipeline"]["ndcg@10"].tolist() == [1.0, 0.0]
    assert full["ndcg@10_ci95"] == pytest.approx(1.96 * np.std([1.0, 0.0], ddof=1) / math.sqrt(2))
    assert set(summary) == set(agg.SYSTEMS)


def test_cold_item_table_only_counts_users_with_cold_positives() -> None:
    results = [_result({5, 0}, {"full_pipeline": [5]}, cold={5}), _result({0}, {"full_pipeline": [0]})]
    table_ = agg.cold_item_table(results)
    assert table_["users"] == 1 and table_["positives"] == 1
    assert table_["systems"]["full_pipeline"] == 1.0
    assert table_["systems"]["popular"] == 0.0
    assert table_["retrieval"]["bert"] == 0.0


# ---------------------------------------------------------------- retrieval

def test_recall_curve_counts_hits_once_and_skips_users_without_positives() -> None:
    curve = agg.recall_curve([np.array([5, 1, 1, 2]), np.array([9]), np.array([3])], [{1, 2}, {9}, set()], 4)
    # user 1: hits at positions 1 and 3 (the repeat at 2 does not count); user 2: hit at 0.
    assert curve.tolist() == pytest.approx([0.5, 0.75, 0.75, 1.0])
    assert agg.recall_curve([], [], 3).tolist() == [0, 0, 0]


def test_retrieval_table_recall_and_unretrieved_shares() -> None:
    results = [_result({2, 5}, {}), _result({0}, {})]
    table_, curves = agg.retrieval_table(results, depths=(1, 2))
    assert table_["bert"] == {"recall@1": 0.25, "recall@2": 0.25}   # user 1 finds 2 of {2,5} at 1
    assert table_["cf"]["recall@1"] == 0.5                          # user 2 finds 0 at 1
    assert table_["merged"]["recall@2"] == 0.75
    # Item 5 is in no channel list, item 2 and 0 are: 1 of 3 positives unretrieved.
    assert table_["unretrieved"]["no_channel@2"] == pytest.approx(1 / 3)
    assert table_["unretrieved"]["not_in_merged"] == pytest.approx(1 / 3)
    assert curves["merged"].shape == (2,)


# ---------------------------------------------------------------- sweep, impressions, verdicts

def test_sweep_table_one_row_per_weight_sorted(tables: agg.ItemTables) -> None:
    a, b = _result({0}, {}), _result({2}, {})
    a.sweep = {0.5: np.array([1, 0]), 0.0: np.array([0, 1])}
    b.sweep = {0.5: np.array([2, 4]), 0.0: np.array([3, 2])}
    rows = agg.sweep_table([a, b], tables)
    assert [r["weight"] for r in rows] == [0.0, 0.5]
    assert rows[0]["hr@10"] == 1.0
    assert rows[1]["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1.0) / 2)


def test_impression_table_averages_per_impression() -> None:
    cases = [({"fused": np.array([0.9, 0.1]), "pop": np.array([0.1, 0.9])}, np.array([1, 0])),
             ({"fused": np.array([0.2, 0.8, 0.5]), "pop": np.array([3, 2, 1])}, np.array([0, 1, 0]))]
    out = agg.impression_table(cases)
    assert out["fused"]["auc"] == 1.0 and out["fused"]["mrr"] == 1.0 and out["fused"]["impressions"] == 2
    assert out["pop"]["auc"] == 0.25   # 0 on the first, 0.5 on the second


def test_paired_interval_brackets_the_mean_difference() -> None:
    a, b = np.array([1.0, 1.0, 0.0, 1.0]), np.zeros(4)
    d = agg.paired_interval(a, b)
    assert d["delta"] == 0.75 and d["lo"] <= 0.75 <= d["hi"]
    assert math.isnan(agg.paired_interval(np.zeros(0), np.zeros(0))["delta"])


def test_best_system_and_reranker_verdicts() -> None:
    summaries = {"popular": {"ndcg@10": 0.1}, "fused_ranker": {"ndcg@10": 0.3}, "full_pipeline": {"ndcg@10": 0.3}}
    assert agg.best_system(summaries) == "fused_ranker"   # first on a tie

    def per_user(full_ndcg, fused_ndcg, full_ild, fused_ild):
        return {"full_pipeline": {"ndcg@10": np.array(full_ndcg), "ild@10": np.array(full_ild)},
                "fused_ranker": {"ndcg@10": np.array(fused_ndcg), "ild@10": np.array(fused_ild)}}
    n = 50
    better = agg.reranker_verdict(per_user([1.0] * n, [0.0] * n, [0.5] * n, [0.5] * n))
    assert better["earns_its_place"] and "raises nDCG" in better["why"]
    diverse = agg.reranker_verdict(per_user([0.5] * n, [0.5] * n, [0.8] * n, [0.5] * n))
    assert diverse["earns_its_place"] and "diversity" in diverse["why"]
    worse = agg.reranker_verdict(per_user([0.0] * n, [1.0] * n, [0.9] * n, [0.5] * n))
    assert not worse["earns_its_place"] and "lowers" in worse["why"]
    same = agg.reranker_verdict(per_user([0.5] * n, [0.5] * n, [0.5] * n, [0.5] * n))
    assert not same["earns_its_place"]


def test_winner_verdict_names_the_runner_up_and_whether_the_gap_is_measurable() -> None:
    summaries = {"popular": {"ndcg@10": 0.1}, "cf_only": {"ndcg@10": 0.2}, "fused_ranker": {"ndcg@10": 0.6}}
    per_user = {"popular": {"ndcg@10": np.full(40, 0.1)}, "cf_only": {"ndcg@10": np.full(40, 0.2)},
                "fused_ranker": {"ndcg@10": np.full(40, 0.6)}}
    clear = agg.winner_verdict(summaries, per_user)
    assert clear["best"] == "fused_ranker" and clear["runner_up"] == "cf_only" and clear["clear"]
    assert clear["delta"]["delta"] == pytest.approx(0.4)
    per_user["cf_only"]["ndcg@10"] = np.tile([1.0, 0.2], 20)   # mean 0.6, noisy: a tie in effect
    summaries["cf_only"]["ndcg@10"] = 0.59
    assert not agg.winner_verdict(summaries, per_user)["clear"]


def test_reference_verdict_compares_the_pipeline_with_the_best_reference() -> None:
    n = 40
    summaries = {"popular": {"ndcg@10": 0.1}, "ease": {"ndcg@10": 0.3}, "itemknn": {"ndcg@10": 0.2},
                 "fused_ranker": {"ndcg@10": 0.9}, "full_pipeline": {"ndcg@10": 0.6}}
    per_user = {name: {"ndcg@10": np.full(n, s["ndcg@10"])} for name, s in summaries.items()}
    v = agg.reference_verdict(summaries, per_user)
    # The best reference, not the best system (fused_ranker is the pipeline's own part).
    assert v["best_reference"] == "ease" and v["outcome"] == "beats" and v["beats"]
    assert v["delta"]["delta"] == pytest.approx(0.3) and v["ratio"] == pytest.approx(2.0)
    per_user["full_pipeline"]["ndcg@10"] = np.full(n, 0.1)
    summaries["full_pipeline"]["ndcg@10"] = 0.1
    assert agg.reference_verdict(summaries, per_user)["outcome"] == "loses"
    per_user["full_pipeline"]["ndcg@10"] = np.tile([0.0, 0.6], n // 2)   # mean 0.3, noisy
    summaries["full_pipeline"]["ndcg@10"] = 0.3
    tie = agg.reference_verdict(summaries, per_user)
    assert tie["outcome"] == "ties" and not tie["beats"]
    assert agg.reference_verdict({"full_pipeline": {"ndcg@10": 0.1}}, per_user)["best_reference"] is None


def test_reference_slates_see_the_served_history_and_exclude_the_whole_history() -> None:
    from offline.eval_testset import TestUser, served_history
    from offline.references import FittedReferences
    from tools.evaluate import add_reference_slates

    class Recorder:
        def recommend(self, histories, excludes, k):
            self.seen = (histories, excludes, k)
            return [np.array([9]) for _ in histories]
    full = np.arange(1500)
    recorder = Recorder()
    results = [_result({1}, {})]
    add_reference_slates(FittedReferences({"ease": recorder}), [TestUser("u", full, np.array([1]), 10)],
                         results, history_len=None)
    histories, excludes, k = recorder.seen
    assert histories[0].tolist() == full[-1000:].tolist() == served_history(full)[0].tolist()
    assert excludes[0].tolist() == full.tolist() and k == agg.SLATE_K
    assert results[0].slates["ease"].tolist() == [9]
    add_reference_slates(FittedReferences({"ease": recorder}), [TestUser("u", full, np.array([1]), 10)],
                         results, history_len=5)
    assert recorder.seen[0][0].tolist() == [1495, 1496, 1497, 1498, 1499]
    assert served_history(np.arange(3), 5)[0].tolist() == [0, 1, 2] and len(served_history(np.arange(3), 5)[1]) == 0


# ---------------------------------------------------------------- report rendering

def _tiny_report() -> dict:
    system = {m: 0.25 for m in (*agg.SLATE_METRICS, "catalog_coverage", "ndcg@10_ci95")} | {"users": 2}
    systems = {name: dict(system) for name in agg.SYSTEMS}
    systems["fused_ranker"]["ndcg@10"] = 0.5
    delta = {"delta": -0.01, "lo": -0.05, "hi": 0.03}
    return {
        "dataset": "tiny", "artifact_version": "3", "data_spec": "synthetic:/x", "created": "2026-01-01T00:00:00Z",
        "config": {"recall_depths": [50, 100, 300], "served_diversity_weight": 0.1},
        "counts": {"users": 2, "positives": 3, "impressions": 0},
        "systems": systems,
        "retrieval": {"bert": {"recall@50": 0.1, "recall@100": 0.2, "recall@300": 0.3},
                      "merged": {"recall@50": 0.2, "recall@100": 0.3, "recall@300": 0.4},
                      "unretrieved": {"no_channel@300": 0.5, "not_in_merged": 0.6, "positives": 3}},
        "diversity_sweep": [{"weight": 0.0, "ndcg@10": 0.5, "hr@10": 1.0, "ild@10": 0.2,
                             "category_coverage@10": 0.3, "novelty_norm": float("nan")}],
        "cold_start": {"short_history_users": {"max_train_items": 5, "users": 0, "systems": {}},
                       "simulated_cold_users": None,
                       "cold_items": {"users": 0, "positives": 0, "systems": {}, "retrieval": {}}},
        "impressions": None,
        "serving_check": {"gateway_matches_replay": 1.0, "degraded_requests": 0, "degraded_reasons": {}},
        "references": {"ease": {"lambda": 200.0, "validation_ndcg@10": {"50.0": 0.1, "200.0": 0.2},
                                "restricted_to_items": None, "fit_seconds": 1.0},
                       "itemknn": {"neighbours": 100, "restricted_to_items": 20000, "fit_seconds": 2.0},
                       "als": {"factors": 64, "fit_seconds": 3.0}, "bpr": {"factors": 64, "fit_seconds": 4.0},
                       "training": {"users": 2, "items": 6, "interactions": 9}},
        "verdict": {"references": {"best_reference": "ease", "system": "full_pipeline", "metric": "ndcg@10",
                                   "delta": {"delta": -0.02, "lo": -0.04, "hi": -0.01}, "ratio": 0.9,
                                   "outcome": "loses", "beats": False},
                    "best_ndcg@10": "fused_ranker",
                    "winner": {"best": "fused_ranker", "runner_up": "popular", "delta": delta, "clear": False},
                    "reranker": {"earns_its_place": False, "why": "neither nDCG@10 nor diversity improves measurably",
                                 "ndcg@10_delta": delta, "ild@10_delta": delta}},
        "method": ["one line"],
    }


def test_markdown_states_the_winner_and_the_reranker_verdict() -> None:
    md = render_markdown(_tiny_report())
    assert md.startswith("# Offline quality report: tiny")
    verdict = md.split("## Verdict", 1)[1]
    assert verdict.lstrip().startswith(   # the headline: against the best reference
        "- **Against the references: the full pipeline (gateway) loses to the best reference, EASE (λ=200)**, "
        "on nDCG@10: 0.250 vs 0.250 (×0.90), difference -0.0200 [-0.0400, -0.0100] (paired bootstrap over "
        "users; the interval excludes zero).")
    assert "| EASE (reference) | 0.250 |" in md and "| BPR (reference) | 0.250 |" in md
    assert "## Reference recommenders" in md and "Fitted on every non-test interaction (train + valid: 9 interactions of 2 users)" in md
    assert "λ = 200 (validation nDCG@10 by λ: 50 → 0.100, 200 → 0.200); the whole catalog" in md
    assert "only the 20,000 most popular items" in md and "| ALS | 64 factors;" in md and "| 3.0 |" in md
    assert "**Best on nDCG@10: fused ranker, no re-ranker** (0.500" in md
    assert ("runner-up most popular: difference -0.0100 [-0.0500, +0.0300] (paired bootstrap), "
            "**not a measurable difference**.") in md
    assert "does not earn its place: neither nDCG@10 nor diversity improves measurably" in md
    assert "| full pipeline (gateway) | 0.250 |" in md
    assert "| merged | 0.200 | 0.300 | 0.400 |" in md
    assert "Test positives that no channel retrieves in its top 300: 50.0%" in md
    assert "(none in this data)" in md
    assert "Test positives unseen in training** (0 positives of 0 users)" in md
    assert "MIND impression" not in md                 # no impressions in this data
    assert "| 0.000 | 0.500 | 1.000 | 0.200 | 0.300 | – |" in md   # NaN shows as a dash


def test_markdown_shows_the_builds_fresh_slot_choice_when_the_manifest_has_one() -> None:
    report = _tiny_report()
    assert "Fresh items" not in render_markdown(report)   # a set built before the rule
    report["build_fresh"] = {"candidates": 10, "slots": 1, "lists": 20, "lists_with_unseen": 4,
                             "bert_unseen_recall@10": 0.25, "max_ndcg_cost": 0.02,
                             "valid": [{"slots": 0, "ndcg@10": 0.2, "unseen_recall@10": 0.0},
                                       {"slots": 1, "ndcg@10": 0.199, "unseen_recall@10": 0.5}]}
    md = render_markdown(report)
    assert "the build chose **1 fresh slot(s)** on 20 validation lists (4 with unseen positives" in md
    assert "recalls 0.250 of them" in md and "within 2% of the nDCG@10 of none" in md
    assert "| 1 | 0.199 | 0.500 |" in md


def test_markdown_without_references_keeps_the_old_verdict() -> None:
    report = _tiny_report()
    report["references"] = None
    del report["verdict"]["references"]
    md = render_markdown(report)
    assert "Against the references" not in md and "## Reference recommenders" not in md
    assert md.split("## Verdict", 1)[1].lstrip().startswith("- **Best on nDCG@10:")


def test_table_and_fmt() -> None:
    assert table(["a", "b"], [[1, float("nan")], [0.12345, True]]) == "| a | b |\n|---|---|\n| 1 | – |\n| 0.123 | yes |"
    assert fmt(300) == "300" and fmt(None) == "–" and fmt(0.5) == "0.500" and pct(0.1234) == "12.3%"


def test_json_safe_gives_strict_json() -> None:
    out = _json_safe({"a": float("nan"), 0.5: np.float32(1.5), "b": [np.int64(2), np.bool_(True)]})
    assert json.loads(json.dumps(out, allow_nan=False)) == {"a": None, "0.5": 1.5, "b": [2, True]}


# ---------------------------------------------------------------- small helpers, CLI

def test_sample_is_deterministic_and_bounded() -> None:
    class U:
        def __init__(self, user_id: str) -> None:
            self.user_id = user_id
    users = [U(str(i)) for i in range(20)]
    first = [u.user_id for u in sample(users, 5)]
    assert len(first) == 5 and first == [u.user_id for u in sample(list(reversed(users)), 5)]
    assert len(sample(users, None)) == 20 and len(sample(users, 50)) == 20


def test_resolve_data_spec_finds_repo_relative_paths(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_data_spec("movielens:data/ml-latest-small").endswith("/data/ml-latest-small")
    assert resolve_data_spec("movielens:data/ml-latest-small").startswith("movielens:/")
    assert resolve_data_spec("synthetic:/abs/x") == "synthetic:/abs/x"


def test_cli_parses_and_rejects_negative_limits(capsys) -> None:
    opts = options_from(parse(["eval", "--artifacts", "a", "--max-users", "30", "--max-impressions", "0"]))
    assert opts.max_users == 30 and opts.max_impressions is None and opts.diversity_weight is None
    assert opts.references and opts.reference_max_items == 20_000
    opts = options_from(parse(["eval", "--no-references", "--reference-max-items", "0"]))
    assert not opts.references and opts.reference_max_items is None
    for flag in ("--max-users", "--max-impressions", "--build-max-items", "--build-max-users",
                 "--reference-max-items"):
        with pytest.raises(SystemExit):
            parse(["eval", flag, "-1"])
        assert f"argument {flag}: must be >= 0" in capsys.readouterr().err
