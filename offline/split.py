"""Time-based split per user: the oldest interactions train, the next validate, the newest test.

A per-user chronological split keeps every user in all three parts (a global cut-off date would
leave most MovieLens users with no test data), and no item a user touched later leaks earlier.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # [n] bool masks over the dataset's interactions
    valid: np.ndarray
    test: np.ndarray


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
    return Split(train, valid, test)
