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


def test_dev_rounds_write_minds_two_folders(tmp_path, synthetic):
    single, _ = synthetic
    folder = generate_mind(tmp_path / "split", dev_rounds=1)
    assert sorted(p.name for p in folder.iterdir()) == ["dev", "train"]
    assert _bytes(generate_mind(tmp_path / "again", dev_rounds=1) / "dev") == _bytes(folder / "dev")
    assert _bytes(generate_mind(tmp_path / "again", dev_rounds=1) / "train") == _bytes(folder / "train")
    rows = lambda file: [line.split("\t", 1) for line in file.read_text().splitlines()]  # (id, rest)
    train, dev, whole = rows(folder / "train" / "behaviors.tsv"), rows(folder / "dev" / "behaviors.tsv"), \
        rows(single / "behaviors.tsv")
    # Same rows as the single folder: dev is exactly its last round (one impression per user),
    # impression ids restart at 1 in each file as in MIND; news.tsv is in both.
    assert [r for _, r in dev] == [r for _, r in whole[-200:]]
    assert [r for _, r in train] == [r for _, r in whole[:-200]]
    assert [i for i, _ in dev] == [str(j) for j in range(1, 201)] and train[0][0] == "1"
    assert [r.split("\t")[0] for _, r in dev] == [f"U{u}" for u in range(1, 201)]
    for split in ("train", "dev"):
        assert (folder / split / "news.tsv").read_bytes() == (single / "news.tsv").read_bytes()
    with pytest.raises(ValueError):
        generate_mind(tmp_path / "x", impressions_per_user=2, dev_rounds=2)


def test_load_synthetic_reads_the_train_dev_layout(tmp_path):
    folder = generate_mind(tmp_path / "syn", dev_rounds=1)
    ds = load_synthetic(folder)
    assert not (folder / "news.tsv").exists()                     # loaded, not regenerated
    assert ds.name == "synthetic" and ds.split_labels is not None and not ds.report.malformed
    assert [imp.split for imp in ds.impressions] == ["train"] * 800 + ["dev"] * 200
    assert set(np.unique(ds.split_labels)) == {0, 1, 2}
