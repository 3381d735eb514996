"""Inner tables for the cut lists (offline/inner_tables.py): the held rows are exactly the cut
targets, and the refitted set never saw them."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.artifacts import open_artifacts
from common.components import load_retriever
from offline.build import user_sequences
from offline.inner_tables import REFITTED, cut_span_mask, write_inner_set
from offline.item_neighbours import NeighbourConfig
from offline.ranker import sequence_cuts, use_cf_tables
from tests.tiny_artifacts import write_tiny_artifacts

N_ITEMS = 60


def interactions(seed: int = 0, users: int = 12, per_user: int = 16):
    rng = np.random.default_rng(seed)
    u = np.repeat([f"u{j}" for j in range(users)], per_user)
    items = rng.integers(0, N_ITEMS - 10, len(u)).astype(np.int64)   # 50..59 stay untouched
    ts = rng.permutation(len(u)).astype(np.float64)                   # shuffled times: row order != time order
    return u, items, ts


def test_the_held_rows_are_exactly_the_cut_targets_of_the_held_users():
    users, items, ts = interactions()
    held_users = {"u0", "u3", "u7"}
    held = cut_span_mask(users, ts, held_users, cuts=4)
    sequences = user_sequences(users, items, ts)
    for user in sorted(set(users)):
        rows = np.flatnonzero(users == user)
        in_time = rows[np.argsort(ts[rows], kind="stable")]
        cuts = sequence_cuts(sequences[user], 4)
        if user in held_users:
            targets = sum(len(t) for _, t in cuts)
            assert targets > 0 and held[in_time].tolist() == [False] * (len(rows) - targets) + [True] * targets
            assert np.array_equal(items[in_time][held[in_time]], np.concatenate([t for _, t in reversed(cuts)]))
        else:
            assert not held[rows].any()


def test_a_short_sequence_holds_nothing():
    users = np.array(["a"] * 5 + ["b"] * 12)
    ts = np.arange(17, dtype=np.float64)
    held = cut_span_mask(users, ts, {"a", "b"}, cuts=4, min_history=5)
    # a: 5 items, no cut leaves 5 before it; b: 12 items, span 2, three cuts (10, 8, 6 before them).
    assert not held[:5].any() and held[5:].tolist() == [False] * 6 + [True] * 6


def test_the_inner_set_refits_what_saw_the_targets_and_shares_the_rest(tmp_path):
    served = write_tiny_artifacts(tmp_path / "served", n_items=N_ITEMS)
    users, items, ts = interactions()
    u0 = np.flatnonzero(users == "u0")
    items[u0[np.argsort(ts[u0])][-4:]] = [55, 56, 55, 56]   # u0's newest: items nobody else has
    held = cut_span_mask(users, ts, {"u0", "u1", "u2", "u3"}, cuts=4)
    top_n = json.loads((served / "manifest.json").read_text())["item2item"]["top_n"]
    inner = write_inner_set(served, tmp_path / "inner", users[~held], items[~held], ts[~held], N_ITEMS,
                            factors=8, seed=0, neighbour_config=NeighbourConfig(method="cooccurrence", top_n=top_n))
    opened = open_artifacts(inner.folder)   # checksums verified
    m = opened.manifest
    assert m["counts"]["cf_users"] == len(set(users[~held])) == len(json.loads((inner.folder / "cf_users.json").read_text()))
    counts = opened.npy("item_counts.npy")
    assert counts.tolist() == np.bincount(items[~held], minlength=N_ITEMS).tolist()
    for name in served.iterdir():   # shared files are the same inode; refitted ones are new
        if name.is_file() and name.name != "manifest.json":
            same = (inner.folder / name.name).stat().st_ino == name.stat().st_ino
            assert same == (name.name not in REFITTED), name.name
    # An item seen only in held rows has no training count, no neighbours and is no CF candidate.
    only_held = sorted(set(items[held].tolist()) - set(items[~held].tolist()))
    assert (counts[only_held] == 0).all()
    retriever = load_retriever(opened)
    got = retriever.retrieve("u5", np.array([1, 2, 3], np.int64), np.zeros(0, np.int64), total=40)
    assert len(got.candidates.items) > 0   # the inner set serves like any set
    ids = retriever.generator.channels["item2item"].ids
    assert only_held and (ids[only_held] == -1).all() and not np.isin(ids, only_held).any()


def test_use_cf_tables_swaps_the_factors_in_place():
    from offline.serving.fused_ranker import FusedRanker
    rng = np.random.default_rng(0)
    text = rng.normal(size=(N_ITEMS, 8)).astype(np.float32)
    inner_cf, outer_cf = (rng.normal(size=(N_ITEMS, 4)).astype(np.float32) for _ in range(2))
    model = FusedRanker(text, inner_cf, inner_cf.T @ inner_cf, 10.0, 0.05, np.zeros(N_ITEMS, np.float32),
                        np.zeros(N_ITEMS, np.float32), np.zeros(N_ITEMS, np.int64), 1, 10)
    use_cf_tables(model, outer_cf, outer_cf.T @ outer_cf)
    assert torch.equal(model.item_cf, torch.from_numpy(outer_cf))
    assert np.allclose(model.cf_gram.numpy(), outer_cf.T @ outer_cf)
    with pytest.raises(RuntimeError):
        use_cf_tables(model, outer_cf[:, :2], outer_cf.T @ outer_cf)   # shapes must match


def test_the_served_tables_are_refitted_on_train_and_valid_and_the_ranker_uses_them(built, artifacts):
    """After tuning on tables fitted on the training split, the build serves tables fitted on
    train + valid (offline.build, stage refit): counts, CF factors (also inside the fused ranker)."""
    from offline import datasets
    from offline.build import subset_dataset
    from offline.serving.export import load_ranker
    from offline.split import dataset_split
    from tests.conftest import DATA
    m = artifacts.manifest
    options = m["build_options"]
    ds = subset_dataset(datasets.load(DATA), options["max_items"], options["max_users"])
    split = dataset_split(ds)
    index_of = {iid: j for j, iid in enumerate(artifacts.json("catalog.json")["item_ids"])}
    items = np.array([index_of[i] for i in ds.item_ids], np.int64)
    seen = split.train | split.valid
    counts = artifacts.npy("item_counts.npy")
    assert counts.tolist() == np.bincount(items[seen], minlength=len(index_of)).tolist()
    assert counts.sum() > np.count_nonzero(split.train)   # not the training split's
    assert m["served_tables"]["fitted_on"] == "train+valid" and m["served_tables"]["interactions"] == int(seen.sum())
    assert m["counts"]["cf_users"] == len(set(ds.users[seen]))
    ranker = load_ranker(built[1], m["models"]["fused_ranker"])
    assert np.allclose(ranker.item_cf.numpy(), artifacts.npy("item_cf.npy"))
    assert np.allclose(ranker.cf_gram.numpy(), artifacts.npy("cf_gram.npy"), atol=1e-4)
