"""The ranking stage's two interfaces: a Scorer gives every candidate a fused score, a
SlateBuilder turns scored candidates into the final slate. ranking.triton_scorer.TritonScorer
implements Scorer on Triton; core.rerank.DiversityReranker implements SlateBuilder."""
from __future__ import annotations

from typing import Protocol

import numpy as np


class ScorerUnavailable(RuntimeError):
    """The scorer could not score in time (down, overloaded, model missing); `reason` is a
    degraded reason (a metric label from a fixed vocabulary)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class Scorer(Protocol):
    model_version: str

    async def score(self, history: np.ndarray, candidates: np.ndarray, features: np.ndarray,
                    timeout_s: float, extra_text: np.ndarray | None = None,
                    extra_category: np.ndarray | None = None) -> np.ndarray:
        """history [L] int64, candidates [N] int64, features [N, F] float32 -> scores [N] float32;
        extra_text [M, Dt] / extra_category [M]: online items. Raises ScorerUnavailable."""
        ...


class SlateBuilder(Protocol):
    def rerank(self, items: np.ndarray, fused: np.ndarray, retrieval: np.ndarray, k: int,
               diversity_weight: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """items [N], fused [N], retrieval features [N, F] -> (slate [<=k] int64, scores [<=k] float32)."""
        ...
