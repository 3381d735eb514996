"""The ranking pipeline as a plain object: Triton fused scores, then the LightGBM slate builder.

Degrades instead of failing: Triton down or late -> the retrieval order, marked degraded; a
re-ranker error -> the fused order, marked degraded.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import lightgbm as lgb
import numpy as np
from threadpoolctl import threadpool_limits

from common.artifacts import ArtifactSet, check_shape
from core.channel_names import ChannelName
from core.features import FUSED_RANKER_NAME, TEXT_ENCODER_NAME, retrieval_features
from core.limits import DEFAULT_CANDIDATES
from common.logs import get_logger
from common.metrics import record_degraded, stage_timer
from core.online_items import ItemChange, OnlineItems
from core.reasons import DegradedReason
from core.rerank import DiversityReranker
from core.scoring import Scorer, ScorerUnavailable

SERVICE = "ranking"
log = get_logger("ranking")


@dataclass
class Ranked:
    items: np.ndarray
    scores: np.ndarray
    degraded_reasons: list[DegradedReason] = field(default_factory=list)
    stage_ms: dict[str, float] = field(default_factory=dict)


def _scorer_reason(error: ScorerUnavailable) -> DegradedReason:
    """The scorer's reason as the enum; one outside the vocabulary counts as Triton unavailable."""
    try:
        return DegradedReason(error.reason)
    except ValueError:
        return DegradedReason.TRITON_UNAVAILABLE


class Ranker:
    def __init__(self, artifacts: ArtifactSet, scorer: Scorer, threads: int = 1,
                 diversity_weight: float = 0.1) -> None:
        m = artifacts.manifest
        n_items = m["counts"]["items"]
        item_text = artifacts.npy("item_text.npy")
        item_category = artifacts.npy("item_category.npy")
        item_side = artifacts.npy("item_side.npy")
        check_shape("item_text.npy", item_text, n_items, m["dims"]["text"])
        check_shape("item_category.npy", item_category, n_items)
        check_shape("item_side.npy", item_side, n_items, 2)
        # Threads are set once here: num_threads per predict call costs extra on every call, and
        # Booster(model_file=...) ignores params (reset_parameter on it crashes lightgbm 4.7).
        booster = lgb.Booster(model_file=str(artifacts.path("reranker.txt")))
        threadpool_limits(threads, "openmp")
        self.reranker = DiversityReranker(booster, item_text, item_category, item_side, diversity_weight)
        self.base_tables = (item_text, item_category, item_side)
        self.online = OnlineItems(n_items, item_text.shape[1])
        self.scorer = scorer
        self.n_items = n_items
        self.text_dim = item_text.shape[1]
        self.version = artifacts.version
        self.model_version = str(m["models"][FUSED_RANKER_NAME])
        self.encoder_version = str(m["models"].get(TEXT_ENCODER_NAME, ""))

    def update_items(self, change: ItemChange) -> int:
        """Apply online additions/removals; the re-ranker's tables grow to cover new indices."""
        self.online.apply(change)
        text, category, side = self.base_tables
        m = len(self.online.vectors)
        # New items: no popularity yet, age 0 (brand new).
        self.reranker.item_text = np.vstack([text, self.online.vectors])
        self.reranker.item_category = np.concatenate([category, self.online.categories])
        self.reranker.item_side = np.vstack([side, np.zeros((m, side.shape[1]), np.float32)])
        return m

    async def warm_up(self, rounds: int = 5, timeout_s: float = 30.0) -> None:
        """Score a realistic request a few times before serving: the first TorchScript calls are slow."""
        rng = np.random.default_rng(0)
        items = rng.choice(self.n_items, size=min(DEFAULT_CANDIDATES, self.n_items), replace=False).astype(np.int64)
        history = rng.choice(self.n_items, size=min(20, self.n_items), replace=False).astype(np.int64)
        columns = {ChannelName.BERT: (np.ones(len(items), np.float32), np.arange(1, len(items) + 1, dtype=np.int32))}
        for _ in range(rounds):
            ranked = await self.rank(history, items, columns, 10, timeout_s)
            if ranked.degraded_reasons:
                log.warning("warm-up degraded", extra={"reasons": ranked.degraded_reasons})
                return

    async def rank(self, history: np.ndarray, items: np.ndarray,
                   columns: dict[str, tuple[np.ndarray, np.ndarray]], k: int, timeout_s: float) -> Ranked:
        out = Ranked(items[:k], np.zeros(min(k, len(items)), np.float32))
        if len(items) == 0:
            return out
        features = retrieval_features(columns, len(items))
        try:
            with stage_timer(SERVICE, "triton", out.stage_ms):
                online = self.online
                needs_extra = (len(items) and items.max() >= self.n_items) or (len(history) and history.max() >= self.n_items)
                fused = await self.scorer.score(
                    history, items, features, timeout_s,
                    online.vectors if needs_extra else None, online.categories if needs_extra else None)
        except ScorerUnavailable as e:
            reason = _scorer_reason(e)
            log.warning("fused ranker unavailable, serving retrieval order", extra={"reason": str(reason)})
            record_degraded(SERVICE, reason)
            out.degraded_reasons.append(reason)
            out.scores = -np.arange(len(out.items), dtype=np.float32)
            return out
        try:
            with stage_timer(SERVICE, "rerank", out.stage_ms):
                out.items, out.scores = self.reranker.rerank(items, fused, features, k)
        except Exception:  # a broken re-ranker must not cost the answer: serve the fused order
            log.exception("re-ranker failed, serving fused order")
            record_degraded(SERVICE, DegradedReason.RERANKER_ERROR)
            out.degraded_reasons.append(DegradedReason.RERANKER_ERROR)
            top = np.argsort(-fused, kind="stable")[:k]
            out.items, out.scores = items[top], fused[top]
        return out
