"""The train / validation / test split every build stage and the evaluation use.

Data that comes with its own split keeps it (MIND train + dev folders: Dataset.split_labels, rule in
offline.datasets.mind). Otherwise the split is per user and by time: the oldest interactions train,
the next validate, the newest test. A per-user chronological split keeps every user in all three
parts (a global cut-off date would leave most MovieLens users with no test data), and no item a
user touched later leaks earlier.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from offline.datasets.base import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID, Dataset, Impression

IMPRESSION_TRAIN_SHARE = 0.8   # no own split: impressions, oldest first, this share trains the ranker
OWN_SPLIT_RULE = "mind train/dev"   # MIND's folders are the only data with its own split today


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # [n] bool masks over the dataset's interactions
    valid: np.ndarray
    test: np.ndarray
    rule: str          # how it was made, for the manifest and the build's figures


def dataset_split(ds: Dataset) -> Split:
    """The data's own split when it has one, else the per-user time split."""
    if ds.split_labels is None:
        return split_by_time(ds.users, ds.timestamps)
    labels = ds.split_labels
    return Split(labels == SPLIT_TRAIN, labels == SPLIT_VALID, labels == SPLIT_TEST, OWN_SPLIT_RULE)


def split_impressions(ds: Dataset) -> tuple[list[Impression], list[Impression]]:
    """(impressions the ranker trains on, held-out impressions), each oldest first.

    With its own split, train-folder impressions train and dev impressions are held out, as dev
    clicks are the test interactions; otherwise the newest 1 - IMPRESSION_TRAIN_SHARE is held out."""
    ordered = sorted(ds.impressions, key=lambda imp: imp.timestamp)
    if ds.split_labels is not None:
        return [imp for imp in ordered if imp.split == "train"], [imp for imp in ordered if imp.split == "dev"]
    cut = int(len(ordered) * IMPRESSION_TRAIN_SHARE)
    return ordered[:cut], ordered[cut:]


def split_by_time(users: np.ndarray, timestamps: np.ndarray, valid_frac: float = 0.1,
                  test_frac: float = 0.1, min_train: int = 3) -> Split:
    """users [n] object, timestamps [n] int64 -> masks. Users with too few events stay in train."""
    n = len(users)
    order = np.lexsort((np.arange(n), timestamps, users))   # by user, then time, stable
    train = np.zeros(n, bool)
    valid = np.zeros(n, bool)
    test = np.zeros(n, bool)
    sorted_users = users[order]
    bounds = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1], True])
    for start, end in zip(bounds[:-1], bounds[1:]):
        idx = order[start:end]
        count = len(idx)
        n_test = int(round(count * test_frac))
        n_valid = int(round(count * valid_frac))
        if count - n_test - n_valid < min_train:
            train[idx] = True
            continue
        train[idx[:count - n_test - n_valid]] = True
        valid[idx[count - n_test - n_valid:count - n_test]] = True
        test[idx[count - n_test:]] = True
    shares = (1 - valid_frac - test_frac, valid_frac, test_frac)
    return Split(train, valid, test, "per-user time " + "/".join(f"{100 * s:.0f}" for s in shares))
