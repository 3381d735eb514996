"""The held-out test set of a built artifact set, recomputed exactly as offline.build split it.

The build does not store its split; this module reloads the dataset with the same loader and
subset options, checks that the result is the data the artifacts were built from (item ids equal
the catalog's, the data fingerprint and split rule equal the manifest's), and reruns
offline.split.dataset_split and split_impressions, as the build does.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from common.artifacts import ArtifactSet
from common.logs import get_logger
from core.limits import MAX_EXCLUDE, MAX_HISTORY
from offline import datasets
from offline.build import data_fingerprint, subset_dataset, user_sequences
from offline.split import dataset_split, split_impressions

log = get_logger("offline.evaluate")
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class TestUser:
    user_id: str
    history: np.ndarray    # [L] int64 train + valid items, oldest first
    positives: np.ndarray  # [P] int64 test items not already in the history
    n_train: int           # train interactions (short histories = cold users)


@dataclass(frozen=True)
class ImpressionCase:
    """A held-out MIND impression: the history before it, what was shown, what was clicked."""
    user_id: str
    history: np.ndarray    # [L] int64 oldest first
    shown: np.ndarray      # [S] int64
    labels: np.ndarray     # [S] float32, 1 = clicked


@dataclass(frozen=True)
class SplitMatrices:
    """The non-test interactions as binary users x items matrices (what reference recommenders train on)."""
    user_ids: list[str]     # row order
    train: sp.csr_matrix    # [n_users, n_items] float32, 1 = interacted in the train split
    valid: sp.csr_matrix    # [n_users, n_items] float32, the validation split


@dataclass(frozen=True)
class EvalSet:
    dataset: str
    item_ids: list[str]                 # index -> external id (equals the catalog's)
    users: list[TestUser]               # every user with at least one test positive
    impressions: list[ImpressionCase]   # held-out impressions (empty unless the data has them)
    train_counts: np.ndarray            # [n_items] int64 training interactions per item
    interactions: SplitMatrices | None = None   # train / valid matrices over every user


class DataMismatch(ValueError):
    """The data given is not the data the artifacts were built from."""


def resolve_data_spec(spec: str) -> str:
    """'<kind>:<path>' with a relative path that does not exist here resolved against the repo root."""
    kind, sep, path = spec.partition(":")
    if sep and not Path(path).is_absolute() and not Path(path).exists() and (REPO / path).exists():
        return f"{kind}:{REPO / path}"
    return spec


def load_eval_set(artifacts: ArtifactSet, data_spec: str, max_items: int | None = None,
                  max_users: int | None = None) -> EvalSet:
    """Reload the data, check it is what the artifacts were built from, recompute the split.

    max_items/max_users must be the build's own (offline build --max-items/--max-users)."""
    manifest = artifacts.manifest
    ds = subset_dataset(datasets.load(resolve_data_spec(data_spec)), max_items, max_users)
    item_ids = [it.item_id for it in ds.items]
    catalog = artifacts.json("catalog.json")["item_ids"]
    fingerprint = data_fingerprint(item_ids, ds)
    if item_ids != catalog or fingerprint != manifest.get("data_fingerprint"):
        raise DataMismatch(
            f"data {data_spec!r} (max_items={max_items}, max_users={max_users}) gives {len(item_ids)} items and "
            f"fingerprint {fingerprint}; artifact set {artifacts.version} has {len(catalog)} items and "
            f"fingerprint {manifest.get('data_fingerprint')}: pass the build's --data, --build-max-items "
            "and --build-max-users")
    split = dataset_split(ds)
    if split.rule != manifest.get("split", split.rule):   # manifests before the key: no check
        raise DataMismatch(f"data {data_spec!r} splits by {split.rule!r}; artifact set {artifacts.version} "
                           f"was built with {manifest['split']!r}")
    index_of = {iid: j for j, iid in enumerate(item_ids)}
    items = np.array([index_of[i] for i in ds.item_ids], np.int64)
    seen = split.train | split.valid
    history = user_sequences(ds.users[seen], items[seen], ds.timestamps[seen])
    test = user_sequences(ds.users[split.test], items[split.test], ds.timestamps[split.test])
    n_train = dict(zip(*np.unique(ds.users[split.train], return_counts=True)))
    users = []
    for user in sorted(test):
        past = history.get(user, np.zeros(0, np.int64))
        positives = np.array([i for i in dict.fromkeys(test[user].tolist()) if i not in set(past.tolist())], np.int64)
        if len(positives):
            users.append(TestUser(user, past, positives, int(n_train.get(user, 0))))
    log.info("test split recomputed", extra={"users": len(users), "test_interactions": int(split.test.sum())})
    return EvalSet(ds.name, item_ids, users, _held_out_impressions(ds, index_of),
                   np.bincount(items[split.train], minlength=len(item_ids)).astype(np.int64),
                   split_matrices(ds.users, items, split.train, split.valid, len(item_ids)))


def split_matrices(users: np.ndarray, items: np.ndarray, train: np.ndarray, valid: np.ndarray,
                   n_items: int) -> SplitMatrices:
    """users [n] ids, items [n] int64, train / valid [n] bool masks -> binary matrices over all users."""
    user_ids = sorted(set(users[train | valid].tolist()))
    row = {u: j for j, u in enumerate(user_ids)}
    rows = np.fromiter((row.get(u, -1) for u in users), np.int64, len(users))

    def matrix(mask: np.ndarray) -> sp.csr_matrix:
        x = sp.csr_matrix((np.ones(int(mask.sum()), np.float32), (rows[mask], items[mask])),
                          shape=(len(user_ids), n_items), dtype=np.float32)
        x.sum_duplicates()
        x.data[:] = 1.0
        return x
    return SplitMatrices(user_ids, matrix(train), matrix(valid))


def served_history(full: np.ndarray, history_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A user's whole history [L] (oldest first) -> (history, older) as the replay sends them to the
    gateway: the newest min(L, history_len or MAX_HISTORY) items as history, the MAX_EXCLUDE items
    before those as exclusions (the API's limits)."""
    keep = min(len(full), MAX_HISTORY if history_len is None else history_len)
    return full[len(full) - keep:], full[:len(full) - keep][-MAX_EXCLUDE:]


def _held_out_impressions(ds: datasets.Dataset, index_of: dict[str, int]) -> list[ImpressionCase]:
    """The impressions the fused ranker never trained on, oldest first (offline.split)."""
    out = []
    for imp in split_impressions(ds)[1]:
        shown = [(index_of[i], c) for i, c in zip(imp.shown, imp.clicked) if i in index_of]
        if not shown:
            continue
        out.append(ImpressionCase(imp.user_id, np.array([index_of[i] for i in imp.history if i in index_of], np.int64),
                                  np.array([i for i, _ in shown], np.int64),
                                  np.array([float(c) for _, c in shown], np.float32)))
    return out


def sample(values: list, limit: int | None, key=lambda v: v.user_id) -> list:
    """A deterministic spread-out subset of at most `limit` (by crc32 of the key, as the build samples)."""
    if not limit or limit >= len(values):
        return list(values)
    return sorted(values, key=lambda v: zlib.crc32(str(key(v)).encode()))[:limit]
