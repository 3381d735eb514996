"""tools/eval_seeds.py: per-seed rows from eval reports, mean ± sd over seeds, the sd target, and the
same-seed sha256 comparison (on fake reports and manifests: the real run takes ~20 minutes)."""
from __future__ import annotations

import math
import statistics

import pytest

from tools.cli import parse
from tools.eval_seeds import TARGET_SD, aggregate, render, same_seed_check, seed_result


def quality(ndcg: float, hr: float, ease: float = 0.067) -> dict:
    return {"systems": {"full_pipeline": {"ndcg@10": ndcg, "hr@10": hr}, "fused_ranker": {"ndcg@10": ndcg - 0.001},
                        "ease": {"ndcg@10": ease}, "popular": {"ndcg@10": 0.04}},
            "verdict": {"references": {"best_reference": "ease"}}, "counts": {"users": 603}}


def manifest(seed: int, files: dict | None = None, checksum: str = "m") -> dict:
    return {"version": 1, "build_options": {"seed": seed}, "reranker": {"diversity_weight": 0.05, "trees": True},
            "files": files if files is not None else {"a.npy": "1", "b.npy": "2"}, "model_checksum": checksum}


def rows(values: list[float]) -> list[dict]:
    return [seed_result(s, quality(v, 0.3 + s / 100), manifest(s), 60.0, 120.0) for s, v in enumerate(values)]


def test_a_seed_row_takes_the_pipeline_and_the_best_reference_from_the_report():
    r = seed_result(3, quality(0.055, 0.27), manifest(3), 61.23, 140.0)
    assert r["seed"] == 3 and r["full_pipeline_ndcg@10"] == 0.055 and r["full_pipeline_hr@10"] == 0.27
    assert r["best_reference"] == "ease" and r["best_reference_ndcg@10"] == 0.067
    assert r["diversity_weight"] == 0.05 and r["rerank_trees"] is True and r["build_s"] == 61.2


def test_mean_and_sample_sd_over_seeds_and_the_target_met():
    values = [0.054, 0.055, 0.056, 0.055, 0.055]
    agg = aggregate(rows(values))
    assert agg["seeds"] == [0, 1, 2, 3, 4]
    assert agg["full_pipeline_ndcg@10"]["mean"] == pytest.approx(0.055)
    assert agg["full_pipeline_ndcg@10"]["sd"] == pytest.approx(statistics.stdev(values))   # ddof = 1
    assert agg["full_pipeline_hr@10"]["mean"] == pytest.approx(0.32)
    assert agg["best_reference_ndcg@10"]["sd"] == pytest.approx(0.0)
    assert agg["target"] == {"metric": "full_pipeline_ndcg@10", "sd_max": TARGET_SD,
                             "sd": pytest.approx(statistics.stdev(values)), "met": True}


def test_the_target_is_missed_by_a_spread_above_it_and_by_a_single_seed():
    spread = aggregate(rows([0.050, 0.060, 0.055]))
    assert spread["full_pipeline_ndcg@10"]["sd"] == pytest.approx(0.005) and not spread["target"]["met"]
    single = aggregate(rows([0.055]))
    assert math.isnan(single["target"]["sd"]) and not single["target"]["met"]


def test_same_seed_check_names_the_files_that_differ():
    same = same_seed_check(manifest(0), manifest(0))
    assert same["identical"] and same["differ"] == [] and same["seed"] == 0
    other = same_seed_check(manifest(0), manifest(0, {"a.npy": "1", "b.npy": "X"}, checksum="n"))
    assert not other["identical"] and other["differ"] == ["<fused ranker model>", "b.npy"]
    assert same_seed_check(manifest(0), manifest(0, {"a.npy": "1"}))["differ"] == ["b.npy"]


def test_render_prints_mean_sd_target_and_the_same_seed_line():
    r = rows([0.050, 0.060, 0.055])
    text = render({"per_seed": r, "aggregate": aggregate(r), "same_seed": same_seed_check(manifest(0), manifest(0))})
    assert "full pipeline nDCG@10: 0.0550 ± 0.0050 (mean ± sd over 3 seeds)" in text
    assert "best reference nDCG@10: 0.0670 ± 0.0000" in text
    assert "≤ 0.003: missed" in text and "identical artifact sha256s" in text


def test_cli_registers_eval_seeds_with_its_defaults():
    a = parse(["eval-seeds", "--max-users", "100"])
    assert a.seeds == 5 and a.max_users == 100 and a.data == "movielens:data/ml-latest-small"
    assert not a.no_same_seed_check and a.work_dir is None


def test_the_model_checksum_follows_the_weights_not_the_bytes_of_a_save(tmp_path):
    """Two torch.jit.save calls of the same weights write different bytes (a random serialization
    id): the manifest's model_checksum must agree for them and differ when one weight changes."""
    import hashlib
    import torch
    from offline.serving.export import weights_checksum
    torch.manual_seed(0)
    model = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Embedding(5, 2)))
    paths = [tmp_path / f"m{i}.pt" for i in range(3)]
    torch.jit.save(model, str(paths[0]))
    torch.jit.save(model, str(paths[1]))
    assert hashlib.sha256(paths[0].read_bytes()).digest() != hashlib.sha256(paths[1].read_bytes()).digest()
    assert weights_checksum(paths[0]) == weights_checksum(paths[1])
    with torch.no_grad():
        model[0].weight[0, 0] += 1e-6
    torch.jit.save(model, str(paths[2]))
    assert weights_checksum(paths[2]) != weights_checksum(paths[0])
