"""The offline evaluation end to end on the synthetic MIND dataset: real stack, real report files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from offline import eval_aggregate as agg

UNIT_INTERVAL = ("hr@10", "ndcg@10", "mrr@10", "recall@10", "category_coverage@10", "catalog_coverage",
                 "novelty_norm")


@pytest.fixture(scope="module")
def report_dir(synthetic_built: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tools.evaluate import EvalOptions, evaluate
    root = synthetic_built.parent   # the fixture builds root/{data,artifacts,model_repository}
    out = tmp_path_factory.mktemp("eval") / "reports" / "synthetic"
    # Few users keep this quick on 2 cores; the manifest's data_spec points at root/data.
    return evaluate(EvalOptions(artifacts=synthetic_built, model_repo=root / "model_repository", out=out,
                                max_users=40, max_impressions=60, progress=False,
                                run_dir=tmp_path_factory.mktemp("eval-run")))


@pytest.fixture(scope="module")
def quality(report_dir: Path) -> dict:
    return json.loads((report_dir / "quality.json").read_text())


def test_files_are_written(report_dir: Path) -> None:
    for name in ("quality.md", "quality.json", "recall_at_k.png", "diversity_vs_ndcg.png", "ndcg_by_system.png"):
        assert (report_dir / name).stat().st_size > 0, name


def test_pngs_are_valid_images(report_dir: Path) -> None:
    import matplotlib.image as mpimg
    for name in ("recall_at_k.png", "diversity_vs_ndcg.png", "ndcg_by_system.png"):
        assert (report_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = mpimg.imread(report_dir / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_every_system_has_every_metric_in_range(quality: dict) -> None:
    assert set(quality["systems"]) == set(agg.SYSTEMS)
    for name, metrics in quality["systems"].items():
        for metric in (*agg.SLATE_METRICS, "catalog_coverage", "ndcg@10_ci95", "users"):
            assert metrics[metric] is not None, (name, metric)
        for metric in UNIT_INTERVAL:
            assert 0.0 <= metrics[metric] <= 1.0, (name, metric, metrics[metric])
        assert 0.0 <= metrics["ild@10"] <= 2.0           # 1 - cosine
        assert metrics["users"] == quality["counts"]["users"] > 0
    # Planted topics: the system that serves must beat "most popular" on this data.
    assert quality["systems"]["full_pipeline"]["ndcg@10"] > quality["systems"]["popular"]["ndcg@10"]


def test_retrieval_recall_per_channel(quality: dict) -> None:
    retrieval = quality["retrieval"]
    for channel in ("bert", "cf", "popular", "merged"):
        values = [retrieval[channel][f"recall@{d}"] for d in (50, 100, 300)]
        assert all(0.0 <= v <= 1.0 for v in values) and values == sorted(values), channel
    unretrieved = retrieval["unretrieved"]
    assert 0.0 <= unretrieved["no_channel@300"] <= unretrieved["not_in_merged"] <= 1.0


def test_sweep_cold_start_impressions_and_verdict(quality: dict) -> None:
    assert [row["weight"] for row in quality["diversity_sweep"]] == [0.0, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]
    for row in quality["diversity_sweep"]:
        assert 0.0 <= row["ndcg@10"] <= 1.0 and 0.0 <= row["ild@10"] <= 2.0
    cold = quality["cold_start"]
    assert set(cold["simulated_cold_users"]["systems"]) == set(agg.SYSTEMS)
    assert cold["short_history_users"]["users"] >= 0 and cold["cold_items"]["users"] >= 0
    # Synthetic data is MIND-format: the official impression metrics are reported.
    fused = quality["impressions"]["fused_ranker"]
    assert quality["counts"]["impressions"] == fused["impressions"] == 60
    for metric in ("auc", "mrr", "ndcg@5", "ndcg@10"):
        assert 0.0 <= fused[metric] <= 1.0
    assert quality["verdict"]["best_ndcg@10"] in agg.SYSTEMS
    # The headline: the full pipeline against the best reference recommender.
    against = quality["verdict"]["references"]
    assert against["best_reference"] in agg.REFERENCES and against["system"] == "full_pipeline"
    assert against["outcome"] in ("beats", "loses", "ties") and against["beats"] == (against["outcome"] == "beats")
    assert against["delta"]["lo"] <= against["delta"]["delta"] <= against["delta"]["hi"]
    best = max(agg.REFERENCES, key=lambda name: quality["systems"][name]["ndcg@10"])
    assert quality["systems"][against["best_reference"]]["ndcg@10"] == quality["systems"][best]["ndcg@10"]
    refs = quality["references"]
    assert refs["ease"]["lambda"] in [float(lam) for lam in refs["ease"]["validation_ndcg@10"]]
    assert refs["training"]["interactions"] > 0
    assert quality["verdict"]["winner"]["best"] == quality["verdict"]["best_ndcg@10"]
    assert isinstance(quality["verdict"]["reranker"]["earns_its_place"], bool)
    # What was measured is what was served: the replay reproduces the gateway's slates.
    assert quality["serving_check"]["gateway_matches_replay"] == 1.0
    assert quality["serving_check"]["degraded_requests"] == 0


def test_markdown_states_the_verdicts(report_dir: Path, quality: dict) -> None:
    md = (report_dir / "quality.md").read_text()
    assert "**Best on nDCG@10:" in md and "its place:" in md
    assert md.split("## Verdict", 1)[1].lstrip().startswith("- **Against the references: the full pipeline")
    assert "## Reference recommenders" in md and "| EASE (reference) |" in md
    assert "## MIND impression metrics" in md and "## Cold start" in md
    assert "![diversity vs nDCG](diversity_vs_ndcg.png)" in md
