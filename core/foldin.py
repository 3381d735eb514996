"""ALS fold-in: the CF vector of a user the model was not trained on, from their history alone.

The same closed form as implicit's ALS user step (confidence 1 + alpha on each item seen):
    (YᵀY + alpha · Y_hᵀY_h + λI) x = (1 + alpha) · Σ_h y_h
The fused ranker computes it again in torch (models/fused_ranker) for the same reason.
"""
from __future__ import annotations

import numpy as np


def fold_in(item_factors: np.ndarray, gram: np.ndarray, history: np.ndarray, alpha: float,
            regularization: float) -> np.ndarray | None:
    """item_factors [n, d], gram [d, d] = YᵀY, history [L] int64 -> [d] float32, or None when no
    history item has a factor (online items have none)."""
    history = history[history < len(item_factors)]
    if len(history) == 0:
        return None
    y = item_factors[np.unique(history)]
    a = gram + alpha * (y.T @ y) + regularization * np.eye(len(gram), dtype=np.float32)
    return np.linalg.solve(a, (1.0 + alpha) * y.sum(0)).astype(np.float32)
