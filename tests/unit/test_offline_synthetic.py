"""The offline build recovers the structure planted in the synthetic MIND data."""
from __future__ import annotations

import numpy as np

from common.artifacts import open_artifacts
from retrieval.retriever import Retriever


def test_bert_channel_follows_the_history_topic(synthetic_built):
    artifacts = open_artifacts(synthetic_built)
    retriever = Retriever(artifacts)
    categories = np.array(artifacts.json("catalog.json")["categories"])
    for topic in sorted(set(categories)):
        history = np.flatnonzero(categories == topic)[:8].astype(np.int64)
        found = retriever.bert.retrieve(history, 20, set(history.tolist()))
        share = float(np.mean(categories[found.items] == topic))
        assert share >= 0.7, f"{topic}: only {share:.0%} of BERT candidates share the history's topic"


def test_fused_ranker_beats_popularity_on_held_out_impressions(synthetic_built):
    q = open_artifacts(synthetic_built).manifest["quality"]
    assert q["impression_auc"] >= q["impression_popularity_auc"] + 0.1, q
    assert q["ranker_auc"] > q["popularity_auc"], q


def test_manifest_records_build_figures(synthetic_built):
    m = open_artifacts(synthetic_built).manifest
    assert m["dataset"] == "synthetic" and m["counts"]["items"] == 200
    assert [s["stage"] for s in m["stages"]][:3] == ["load", "split", "text"]
    assert len(m["data_fingerprint"]) == 16 and m["models"]["text_encoder"]
