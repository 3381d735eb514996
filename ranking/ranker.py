"""The ranking pipeline as a plain object: Triton fused scores, then the LightGBM slate builder.

Degrades instead of failing: Triton down or late -> the retrieval order, marked degraded; a
re-ranker error -> the fused order, marked degraded.

explain=True also returns a core.rerank.SlateExplanation aligned with the slate: the fused scores,
and with the re-ranker its corrections and penalties. Retrieval order: no explanation (nothing scored).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import lightgbm as lgb
import numpy as np
from threadpoolctl import threadpool_limits

from common.artifacts import ArtifactError, ArtifactSet, check_shape
from core.channel_names import ChannelName
from core.features import FUSED_RANKER_NAME, TEXT_ENCODER_NAME, retrieval_features
from core.limits import DEFAULT_CANDIDATES
from common.components import fresh_items, item_overlay
from common.logs import get_logger
from common.metrics import record_degraded, stage_timer
from core.item_overlay import AppliedRecords
from core.item_records import ItemRecord
from core.reasons import DegradedReason
from core.blend import Blend, BlendError, untrained
from core.fresh import FreshItems
from core.rerank import DiversityReranker, NoCorrection, SlateExplanation
from core.scoring import Scorer, ScorerUnavailable

SERVICE = "ranking"
log = get_logger("ranking")


@dataclass
class Ranked:
    items: np.ndarray
    scores: np.ndarray
    degraded_reasons: list[DegradedReason] = field(default_factory=list)
    stage_ms: dict[str, float] = field(default_factory=dict)
    explanation: SlateExplanation | None = None   # only when asked, and only once the fused ranker scored


def _scorer_reason(error: ScorerUnavailable) -> DegradedReason:
    """The scorer's reason as the enum; one outside the vocabulary counts as Triton unavailable."""
    try:
        return DegradedReason(error.reason)
    except ValueError:
        return DegradedReason.TRITON_UNAVAILABLE


LEGACY_DIVERSITY_WEIGHT = 0.1   # artifacts built before the build chose the weight (no manifest "reranker")


def served_reranking(manifest: dict, diversity_weight: float | None = None) -> tuple[bool, float]:
    """(trees, weight) to serve: the build's choice (manifest "reranker", offline.reranker.choose_reranking)
    unless diversity_weight is given; None or negative = from the artifacts.
    trees false: the build found that the LightGBM corrections do not measurably raise validation nDCG@10, so the
    slate is the fused order with only the diversity step (core.rerank.NoCorrection)."""
    chosen = manifest.get("reranker") or {}
    trees = bool(chosen.get("trees", True))
    if diversity_weight is not None and diversity_weight >= 0:
        return trees, float(diversity_weight)
    return trees, float(chosen.get("diversity_weight", LEGACY_DIVERSITY_WEIGHT))


def served_fresh(manifest: dict, fresh_slots: int | None = None) -> FreshItems:
    """The manifest's fresh rule, its slot count replaced by fresh_slots when that is >= 0."""
    fresh = fresh_items(manifest)
    return replace(fresh, slots=int(fresh_slots)) if fresh_slots is not None and fresh_slots >= 0 else fresh


class Ranker:
    def __init__(self, artifacts: ArtifactSet, scorer: Scorer, threads: int = 1,
                 diversity_weight: float | None = None, fresh_slots: int | None = None) -> None:
        """diversity_weight None or negative: the weight this artifact version's build chose (a hot
        swap to a new version brings its own); >= 0 overrides it (--diversity-weight). fresh_slots
        the same for the slate positions kept for untrained items (--fresh-slots, core.fresh)."""
        m = artifacts.manifest
        n_items = m["counts"]["items"]
        # Memory-mapped and populated, its pages shared with retrieval's (ArtifactSet.shared_table).
        item_text = artifacts.shared_table("item_text.npy")
        item_category = artifacts.npy("item_category.npy")
        item_side = artifacts.npy("item_side.npy")
        check_shape("item_text.npy", item_text, n_items, m["dims"]["text"])
        check_shape("item_category.npy", item_category, n_items)
        check_shape("item_side.npy", item_side, n_items, 2)
        # Threads are set once here: num_threads per predict call costs extra on every call, and
        # Booster(model_file=...) ignores params (reset_parameter on it crashes lightgbm 4.7).
        booster = lgb.Booster(model_file=str(artifacts.path("reranker.txt")))
        threadpool_limits(threads, "openmp")
        trees, weight = served_reranking(m, diversity_weight)
        self.reranker = DiversityReranker(booster if trees else NoCorrection(), item_text, item_category,
                                          item_side, weight, fresh=served_fresh(m, fresh_slots))
        self.diversity_weight, self.rerank_trees = weight, trees
        try:
            self.blend = Blend.from_manifest(m)
        except BlendError as e:
            raise ArtifactError(str(e)) from None
        log.info("re-ranker configured", extra={"artifact_version": artifacts.version, "diversity_weight": weight,
                                                "trees": trees, "blend": self.blend.describe(),
                                                "fresh": self.reranker.fresh.describe(), "weight_from": "flag" if diversity_weight is not None
                                                and diversity_weight >= 0 else "build"})
        self.overlay = item_overlay(artifacts)   # online items, from the item log
        self.scorer = scorer
        self.n_items = n_items
        self.text_dim = item_text.shape[1]
        self.version = artifacts.version
        self.model_version = str(m["models"][FUSED_RANKER_NAME])
        self.encoder_version = str(m["models"].get(TEXT_ENCODER_NAME, ""))

    @property
    def total(self) -> int:
        """Item indices this version knows: artifact items plus the online items applied so far."""
        return self.overlay.total

    def apply(self, records: Sequence[ItemRecord]) -> AppliedRecords:
        """Apply item-log records (in log order); the re-ranker's tables cover the new indices and
        take the changed items' vectors and categories (new items: no popularity yet, age 0).
        Deleted items need nothing here: the gateway never serves them."""
        applied = self.overlay.apply(records)
        if len(applied.upserted) or self.overlay.total > len(self.reranker.item_text):
            r, rows, up = self.reranker, self.overlay.total, applied.upserted
            # Grown with headroom (amortized, not a full copy per upsert); rows past `total` are unused.
            text, category, side = _grown(r.item_text, rows), _grown(r.item_category, rows), _grown(r.item_side, rows)
            text[up], category[up] = applied.vectors, applied.categories
            r.item_text, r.item_category, r.item_side = text, category, side
        return applied

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
                   columns: dict[str, tuple[np.ndarray, np.ndarray]], k: int, timeout_s: float,
                   explain: bool = False) -> Ranked:
        out = Ranked(items[:k], np.zeros(min(k, len(items)), np.float32))
        if len(items) == 0:
            return out
        features = retrieval_features(columns, len(items))
        try:
            with stage_timer(SERVICE, "triton", out.stage_ms):
                online = self.overlay
                needs_extra = (len(items) and items.max() >= self.n_items) or (len(history) and history.max() >= self.n_items)
                if needs_extra:   # only the involved online items' rows travel, not every online item's
                    sent_history, sent_items, extra_text, extra_category = involved_online(
                        history, items, self.n_items, online.vectors, online.category_ids)
                    fused = await self.scorer.score(sent_history, sent_items, features, timeout_s,
                                                    extra_text, extra_category)
                else:
                    fused = await self.scorer.score(history, items, features, timeout_s, None, None)
        except ScorerUnavailable as e:
            reason = _scorer_reason(e)
            log.warning("fused ranker unavailable, serving retrieval order", extra={"reason": str(reason)})
            record_degraded(SERVICE, reason)
            out.degraded_reasons.append(reason)
            out.scores = -np.arange(len(out.items), dtype=np.float32)
            return out
        # Score fusion with the channel the build chose (core.blend); the re-ranker was trained on it.
        fused = self.blend.apply(fused, features, untrained(items, self.reranker.item_side[:, 0]))
        try:
            with stage_timer(SERVICE, "rerank", out.stage_ms):
                if explain:
                    out.items, out.scores, out.explanation = self.reranker.rerank_explained(items, fused, features, k)
                else:
                    out.items, out.scores = self.reranker.rerank(items, fused, features, k)
        except Exception:  # a broken re-ranker must not cost the answer: serve the fused order
            log.exception("re-ranker failed, serving fused order")
            record_degraded(SERVICE, DegradedReason.RERANKER_ERROR)
            out.degraded_reasons.append(DegradedReason.RERANKER_ERROR)
            top = np.argsort(-fused, kind="stable")[:k]
            out.items, out.scores = items[top], fused[top]
            out.explanation = SlateExplanation(fused[top].astype(np.float32)) if explain else None
        return out


def involved_online(history: np.ndarray, items: np.ndarray, n_items: int, vectors: np.ndarray,
                    categories: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(history, items, extra_text, extra_category) for the fused ranker with the request's online
    items (indices >= n_items) renumbered n_items + 0..m-1 and only their m rows of the online
    tables. The model numbers online items per request (row = index - n_items) and only looks their
    rows up, so the scores are those of the whole table; the request no longer grows with the
    number of online items (issue 14). vectors/categories: row j = index n_items + j."""
    involved = np.unique(np.concatenate([history[history >= n_items], items[items >= n_items]]))

    def renumbered(ids: np.ndarray) -> np.ndarray:
        out = ids.astype(np.int64, copy=True)
        online = out >= n_items
        out[online] = n_items + np.searchsorted(involved, out[online])
        return out

    rows = involved - n_items
    return renumbered(history), renumbered(items), vectors[rows], np.asarray(categories)[rows]


def _grown(table: np.ndarray, rows: int) -> np.ndarray:
    """A writable table with at least `rows` rows (zeros past the old ones): the same array when
    it is writable and large enough, else a copy with half again as many rows."""
    if len(table) >= rows and table.flags.writeable:
        return table
    size = rows if len(table) >= rows else max(rows, len(table) * 3 // 2)
    out = np.zeros((size, *table.shape[1:]), table.dtype)
    out[:len(table)] = table
    return out
