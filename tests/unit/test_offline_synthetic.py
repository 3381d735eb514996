"""The offline build recovers the structure planted in the synthetic MIND data."""
from __future__ import annotations

import numpy as np
import pytest

from common.artifacts import open_artifacts
from common.components import load_retriever
from core.features import RETRIEVAL_FEATURES


def test_bert_channel_follows_the_history_topic(synthetic_built):
    artifacts = open_artifacts(synthetic_built)
    retriever = load_retriever(artifacts)
    categories = np.array(artifacts.json("catalog.json")["categories"])
    for topic in sorted(set(categories)):
        history = np.flatnonzero(categories == topic)[:8].astype(np.int64)
        found = retriever.channel_results("", history, np.zeros(0, np.int64), 20, ["bert"])["bert"]
        share = float(np.mean(categories[found.items] == topic))
        assert share >= 0.7, f"{topic}: only {share:.0%} of BERT candidates share the history's topic"


def test_fused_ranker_beats_popularity_on_held_out_impressions(synthetic_built):
    q = open_artifacts(synthetic_built).manifest["quality"]
    assert q["impression_auc"] >= q["impression_popularity_auc"] + 0.1, q
    assert q["ranker_auc"] > q["popularity_auc"], q


def test_manifest_records_build_figures(synthetic_built):
    m = open_artifacts(synthetic_built).manifest
    assert m["dataset"] == "synthetic" and m["counts"]["items"] == 200
    assert m["split"] == "mind train/dev"          # the fixture's data has train/ and dev/ folders
    assert [s["stage"] for s in m["stages"]][:3] == ["load", "split", "text"]
    assert len(m["data_fingerprint"]) == 16 and m["models"]["text_encoder"]


def test_evaluation_holds_out_what_the_build_held_out(synthetic_built, tmp_path):
    """The evaluation recomputes MIND's own split: dev impressions (the last round, one per user) are
    held out; the same rows in one folder would split by time, and are refused."""
    from offline.datasets.synthetic import generate_mind
    from offline.eval_testset import DataMismatch, load_eval_set
    artifacts = open_artifacts(synthetic_built)
    evalset = load_eval_set(artifacts, f"synthetic:{synthetic_built.parent / 'data'}")
    assert [case.user_id for case in evalset.impressions] == [f"U{u}" for u in range(1, 201)]
    assert len(evalset.users) > 150 and all(len(u.positives) for u in evalset.users)
    with pytest.raises(DataMismatch, match="mind train/dev"):
        load_eval_set(artifacts, f"synthetic:{generate_mind(tmp_path / 'single')}")


def test_content_only_path_scores_online_items_by_topic(synthetic_built):
    """Items the model never trained on (online items) are scored from their BERT vector alone:
    for a user with a topic-A history, unseen topic-A items outscore topic-B items."""
    import torch
    artifacts = open_artifacts(synthetic_built)
    model = torch.jit.load(str(synthetic_built.parent / "model_repository" / "fused_ranker" /
                               artifacts.manifest["models"]["fused_ranker"] / "model.pt"))
    categories = np.array(artifacts.json("catalog.json")["categories"])
    vectors = artifacts.npy("item_text.npy")
    cat_index = {c: j for j, c in enumerate(artifacts.json("catalog.json")["category_names"])}
    n = len(categories)
    wins = 0
    topics = sorted(set(categories))
    for a, b in zip(topics, topics[1:] + topics[:1]):
        in_a, in_b = np.flatnonzero(categories == a), np.flatnonzero(categories == b)
        history = torch.from_numpy(in_a[:10].astype(np.int64))
        online = np.r_[in_a[10:20], in_b[10:20]]            # their vectors become "new" items
        extra_text = torch.from_numpy(vectors[online])
        extra_cat = torch.tensor([cat_index[c] for c in categories[online]])
        with torch.inference_mode():
            scores = model(history, torch.arange(n, n + 20), torch.zeros(20, len(RETRIEVAL_FEATURES)), extra_text, extra_cat).numpy()
        wins += scores[:10].mean() > scores[10:].mean()
    assert wins == len(topics)
