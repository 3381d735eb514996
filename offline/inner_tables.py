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

The same refit (fit_tables) makes the served tables at the end of the build: once every choice has
been made on validation with tables fitted on the training split, the REFITTED files are fitted
again on train + valid (offline/build.py, stage refit), so that serving knows the period just
before the test period.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from common.artifacts import MANIFEST, write_manifest
from common.faiss_index import index_info
from offline.cf import CfModel, train_als
from offline.index import RECALL_K, build_index, cf_index_rows, recall_at_k
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


@dataclass(frozen=True)
class FittedTables:
    cf: CfModel
    index: faiss.Index
    cf_users: list[str]
    index_recall: float   # recall@RECALL_K vs exact on users' factors the tuning did not see


def fit_tables(folder: Path, users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, n_items: int,
               factors: int, seed: int, neighbour_config: NeighbourConfig, progress: bool = False) -> FittedTables:
    """Fit the REFITTED files on these interactions (users [n] str, items [n], timestamps [n]) and
    write them into `folder`, replacing what is there."""
    cf_users = sorted(set(users.tolist()))
    row = {u: j for j, u in enumerate(cf_users)}
    user_rows = np.array([row[u] for u in users], np.int64)
    cf = train_als(user_rows, items, len(cf_users), n_items, cf_users, factors=factors, seed=seed)
    counts = np.bincount(items, minlength=n_items).astype(np.int64)
    # Tuned on a sample of the users' factors and measured on another, as the build's CF index is
    # (offline.build, stage index).
    picks = np.random.default_rng(seed).choice(len(cf_users), min(200, len(cf_users)), replace=False)
    ids = cf_index_rows(counts)
    index = build_index(cf.item_factors, queries=cf.user_factors[picks[::2]], seed=seed, ids=ids)
    measure = cf.user_factors[picks[1::2] if len(picks) > 1 else picks]
    recall = recall_at_k(index, cf.item_factors, measure, RECALL_K, ids)
    # Each file is written beside its final name and moved over it: a new inode, so a retriever
    # still mapping the old tables (the build's own) keeps reading them intact.
    def replace(name: str, write) -> None:
        temporary = folder / f".refit-{name}"
        write(temporary)
        os.replace(temporary, folder / name)
    replace("index_cf.faiss", lambda path: faiss.write_index(index, str(path)))
    for name, table in (("item_cf.npy", cf.item_factors), ("user_cf.npy", cf.user_factors), ("cf_gram.npy", cf.gram),
                        ("item_counts.npy", counts),
                        ("popular.npy", np.argsort(-counts, kind="stable").astype(np.int64))):
        replace(name, lambda path, table=table: np.save(path, table))
    replace("cf_users.json", lambda path: path.write_text(json.dumps(cf_users)))
    neighbours = item_neighbours(user_rows, items, timestamps, n_items, neighbour_config, progress=progress)
    replace("item_neighbours.npz", lambda path: save_neighbours(path, neighbours))
    return FittedTables(cf, index, cf_users, recall)


def refitted_manifest(manifest: dict, tables: FittedTables) -> dict:
    """The manifest's counts and CF index entry for refitted tables."""
    return {**manifest, "counts": dict(manifest["counts"], cf_users=len(tables.cf_users)),
            "indexes": dict(manifest["indexes"], cf=dict(manifest["indexes"]["cf"], **asdict(index_info(tables.index)),
                                                         vectors=int(tables.index.ntotal),
                                                         **{f"recall@{RECALL_K}": tables.index_recall}))}


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
    tables = fit_tables(folder, users, items, timestamps, n_items, factors, seed, neighbour_config)
    manifest = refitted_manifest(json.loads((served / MANIFEST).read_text()), tables)
    manifest["inner"] = "cut-list tables (offline/inner_tables.py): never served"
    write_manifest(folder, manifest)
    return InnerSet(folder, tables.cf)
