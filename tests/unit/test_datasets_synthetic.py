"""Synthetic MIND generator: deterministic bytes, valid MIND format, planted topic structure."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from offline.datasets.mind import load_mind
from offline.datasets.synthetic import generate_mind, load_synthetic, topic_names


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = generate_mind(tmp_path_factory.mktemp("synthetic"))
    return folder, load_mind(folder)


def _bytes(folder):
    return (folder / "news.tsv").read_bytes(), (folder / "behaviors.tsv").read_bytes()


def test_same_seed_same_bytes_other_seed_differs(tmp_path, synthetic):
    folder, _ = synthetic
    assert _bytes(generate_mind(tmp_path / "again")) == _bytes(folder)
    assert _bytes(generate_mind(tmp_path / "other", seed=1)) != _bytes(folder)
    assert not list(tmp_path.glob("again/*.tmp"))


def test_loads_cleanly_with_requested_sizes(synthetic):
    _, ds = synthetic
    assert not ds.report.malformed
    assert len(ds.items) == 4 * 50 and len(ds.impressions) == 200 * 5
    assert len(set(ds.users)) == 200
    assert all(any(imp.clicked) for imp in ds.impressions)
    assert all(not set(imp.shown) & set(imp.history) for imp in ds.impressions)
    assert sum(it.text == "" for it in ds.items) == 10            # every 20th has no abstract
    assert {it.category for it in ds.items} == set(topic_names(4))


def test_timestamps_increase_in_file_order(synthetic):
    _, ds = synthetic
    stamps = [imp.timestamp for imp in ds.impressions]
    assert all(a < b for a, b in zip(stamps, stamps[1:]))
    # Round-robin over users: every user has an impression in the last fifth of the period.
    cut = np.quantile(stamps, 0.8)
    late = {imp.user_id for imp in ds.impressions if imp.timestamp >= cut}
    assert len(late) == 200


def test_planted_topic_structure(synthetic):
    _, ds = synthetic
    category = {it.item_id: it.category for it in ds.items}
    topics = topic_names(4)
    preferred = {f"U{u + 1}": topics[u % 4] for u in range(200)}
    share = []
    for user, topic in preferred.items():
        history = next(imp.history for imp in ds.impressions if imp.user_id == user)
        share.append(sum(category[i] == topic for i in history) / len(history))
    assert np.mean(share) > 0.75 and np.mean(np.array(share) > 0.7) > 0.8
    clicks = Counter(category[i] == preferred[imp.user_id]
                     for imp in ds.impressions for i, c in zip(imp.shown, imp.clicked) if c)
    assert clicks[True] / sum(clicks.values()) > 0.7
    # Vocabulary: a topic's own words dominate its items' text.
    sports_words = Counter(w for it in ds.items if it.category == "sports" for w in it.title.lower().split())
    assert sports_words.most_common(1)[0][0] not in {"new", "report", "today", "week"}


def test_small_and_extra_topics(tmp_path):
    ds = load_mind(generate_mind(tmp_path, n_topics=10, items_per_topic=12, n_users=15,
                                 impressions_per_user=2, seed=3))
    assert not ds.report.malformed and len(ds.items) == 120 and len(ds.impressions) == 30
    assert "topic9" in {it.category for it in ds.items}
    with pytest.raises(ValueError):
        generate_mind(tmp_path / "x", n_topics=1)


def test_load_synthetic_generates_once(tmp_path):
    folder = tmp_path / "syn"
    ds = load_synthetic(folder)
    assert ds.name == "synthetic" and len(ds.impressions) == 1000
    (folder / "news.tsv").write_text((folder / "news.tsv").read_text().splitlines()[0] + "\n")
    assert len(load_synthetic(folder).items) == 1                  # existing files are not regenerated
