"""Leak-free channel tables for the fused ranker's cut lists.

A cut list takes a prefix of a user's training sequence as the history and the next items as the
targets (offline.ranker.cut_lists). Scored by the served tables, fitted on the whole training split,
its targets are items those tables saw: measured on the latent catalog, the item-to-item channel's
own order reached nDCG@10 0.72 on cut lists against 0.12 on validation lists (sequential EASE
memorises the very transitions), CF 0.23 against 0.12, and the ranker learned to trust what would
not hold at serving time (its validation nDCG@10 stayed below the channel's alone).

So the cut lists are retrieved from an inner artifact set: the served set's files, with the CF model,
its index, the item-to-item neighbours and the counts refitted on the training split *without* the
cut users' cut spans (the tail of each sequence from its earliest cut). The fused ranker trains on
those lists with the inner CF tables, and serves with the outer ones (`outer_cf` in offline/build.py):
its CF input is a fold-in score, the same quantity in either.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from common.artifacts import MANIFEST, write_manifest
from offline.cf import CfModel, train_als
from offline.index import build_index, cf_index_rows
from offline.item_neighbours import NeighbourConfig, item_neighbours, save_neighbours

# The files the inner set refits; every other file of the served set is shared (hard-linked).
REFITTED = ("item_cf.npy", "user_cf.npy", "cf_gram.npy", "cf_users.json", "index_cf.faiss",
            "item_neighbours.npz", "item_counts.npy", "popular.npy")


def cut_span_mask(users: np.ndarray, timestamps: np.ndarray, held_users: set[str], cuts: int,
                  window: float = 0.125, min_history: int = 5) -> np.ndarray:
    """[n] bool over training interactions: True where a row lies in a held user's cut spans (from
    the earliest cut of offline.ranker.sequence_cuts with the same cuts / window / min_history to
    the sequence's end), in the users' time order (ties: row order, as offline.build.user_sequences)."""
    order = np.lexsort((timestamps, users))
    sorted_users = users[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    ends = np.r_[starts[1:], len(order)]
    held = np.zeros(len(users), bool)
    for start, end in zip(starts, ends):
        if sorted_users[start] not in held_users:
            continue
        length = end - start
        span = max(1, int(round(window * length)))
        usable = sum(1 for k in range(cuts) if length - (k + 1) * span >= min_history)
        if usable:
            held[order[end - usable * span:end]] = True
    return held


@dataclass(frozen=True)
class InnerSet:
    folder: Path
    cf: CfModel


def write_inner_set(served: Path, folder: Path, users: np.ndarray, items: np.ndarray, timestamps: np.ndarray,
                    n_items: int, factors: int, seed: int, neighbour_config: NeighbourConfig) -> InnerSet:
    """The served set at `served` (a complete staging folder with its manifest) copied to `folder`
    with the REFITTED files fitted on these interactions (users [n] str, items [n], timestamps [n])."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for path in served.iterdir():
        if path.is_file() and path.name not in REFITTED and path.name != MANIFEST:
            os.link(path, folder / path.name)
    cf_users = sorted(set(users.tolist()))
    row = {u: j for j, u in enumerate(cf_users)}
    user_rows = np.array([row[u] for u in users], np.int64)
    cf = train_als(user_rows, items, len(cf_users), n_items, cf_users, factors=factors, seed=seed)
    counts = np.bincount(items, minlength=n_items).astype(np.int64)
    index = build_index(cf.item_factors, seed=seed, ids=cf_index_rows(counts))
    faiss.write_index(index, str(folder / "index_cf.faiss"))
    np.save(folder / "item_cf.npy", cf.item_factors)
    np.save(folder / "user_cf.npy", cf.user_factors)
    np.save(folder / "cf_gram.npy", cf.gram)
    np.save(folder / "item_counts.npy", counts)
    np.save(folder / "popular.npy", np.argsort(-counts, kind="stable").astype(np.int64))
    (folder / "cf_users.json").write_text(json.dumps(cf_users))
    save_neighbours(folder / "item_neighbours.npz",
                    item_neighbours(user_rows, items, timestamps, n_items, neighbour_config))
    manifest = json.loads((served / MANIFEST).read_text())
    manifest["counts"] = dict(manifest["counts"], cf_users=len(cf_users))
    manifest["indexes"] = dict(manifest["indexes"], cf=dict(manifest["indexes"]["cf"], vectors=int(index.ntotal)))
    manifest["inner"] = "cut-list tables (offline/inner_tables.py): never served"
    write_manifest(folder, manifest)
    return InnerSet(folder, cf)
