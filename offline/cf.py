"""Collaborative filtering: implicit-feedback ALS (the `implicit` library).

The gram matrix is kept so that serving can fold in users that have history but no trained
vector (core.channels.CfChannel.user_vector; the fused ranker does the same in torch).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits


@dataclass(frozen=True)
class CfModel:
    user_ids: list[str]        # row order of user_factors
    user_factors: np.ndarray   # [n_users, f] float32
    item_factors: np.ndarray   # [n_items, f] float32
    gram: np.ndarray           # [f, f] float32, item_factors.T @ item_factors (for fold-in)
    alpha: float
    regularization: float


def train_als(user_idx: np.ndarray, item_idx: np.ndarray, n_users: int, n_items: int,
              user_ids: list[str], factors: int = 64, iterations: int = 15,
              regularization: float = 0.05, alpha: float = 10.0, seed: int = 0) -> CfModel:
    """user_idx, item_idx: [n] int interactions (train split only)."""
    from implicit.cpu.als import AlternatingLeastSquares
    matrix = sp.csr_matrix((np.ones(len(user_idx), np.float32), (user_idx, item_idx)),
                           shape=(n_users, n_items))
    matrix.data[:] = 1.0   # duplicates collapse to a single positive
    with threadpool_limits(1, "blas"):   # implicit parallelizes itself; nested BLAS threads thrash
        model = AlternatingLeastSquares(factors=factors, iterations=iterations, alpha=alpha,
                                        regularization=regularization, random_state=seed,
                                        calculate_training_loss=False)
        model.fit(matrix, show_progress=False)
    items = np.ascontiguousarray(model.item_factors, dtype=np.float32)
    users = np.ascontiguousarray(model.user_factors, dtype=np.float32)
    return CfModel(user_ids, users, items, items.T @ items, alpha, regularization)

