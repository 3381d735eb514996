"""Recommend, top to bottom: user state -> retrieve -> popular fallback -> rank -> filter.

Each step is named and has a policy (core.pipeline); a fail-open step that fails degrades the
answer with a reason, never fails the call:
  user_state  fail-open   the store fails -> the build's history (user_state_unavailable)
  retrieve    fail-open   retrieval down or late -> no candidates (retrieval_*)
  fallback    fail-closed no candidates -> the most popular items the user may get
  rank        fail-open   ranking down or late -> retrieval order (ranking_*)
  filter      fail-closed a deleted item never leaves the gateway
Budget: retrieval gets `retrieval_share` of what remains (after a reserve for the gateway's own
work), ranking gets the rest. The response's stage_ms reports the stages that did work (retrieve,
fallback, rank: the dashboards' stage names) and the services' own stages (retrieval.*, ranking.*).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from common.config import GatewayConfig
from common.metrics import record_degraded, record_stage
from common.wire import reasons_from_proto
from common.versions import VersionSet
from core.channel_names import ChannelName
from core.filters import DeletedItemsFilter, apply_filters, blocked_count, standard_filters
from core.limits import MAX_RETRIEVE_EXCLUDE
from core.pipeline import Step, StepFailed, run_steps_async
from core.reasons import DegradedReason
from core.types import EMPTY, ChannelResult, RetrievalQuery
from gateway.catalog import Catalog
from gateway.serving_state import ServingState
from gateway.state_store import UserStateStore
from gateway.validation import RecommendQuery
from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc

SERVICE = "gateway"
USER_STATE_SHARE = 0.1   # a slow store must not eat the request's budget
MIN_TIMEOUT_S = 0.001


@dataclass(frozen=True)
class RecommendedItem:
    item_id: str
    score: float
    rank: int                        # 1-based
    channels: tuple[str, ...]        # retrieval channels that proposed it
    title: str
    category: str


@dataclass(frozen=True)
class Recommendation:
    request_id: str
    items: list[RecommendedItem]
    reasons: list[DegradedReason]    # in the order the stages fell back; empty = not degraded
    versions: dict[str, str]         # artifacts, index, fused_ranker
    stage_ms: dict[str, float]


@dataclass(frozen=True)
class HopReasons:
    """The degraded reasons of one internal call, by how it failed."""
    timeout: DegradedReason
    unavailable: DegradedReason
    error: DegradedReason

    def of(self, error: grpc.aio.AioRpcError) -> DegradedReason:
        code = error.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return self.timeout
        if code == grpc.StatusCode.UNAVAILABLE:
            return self.unavailable
        return self.error


RETRIEVAL = HopReasons(DegradedReason.RETRIEVAL_TIMEOUT, DegradedReason.RETRIEVAL_UNAVAILABLE,
                       DegradedReason.RETRIEVAL_ERROR)
RANKING = HopReasons(DegradedReason.RANKING_TIMEOUT, DegradedReason.RANKING_UNAVAILABLE,
                     DegradedReason.RANKING_ERROR)


def in_order(items: np.ndarray) -> ChannelResult:
    """Items served in the given order: scores 0, -1, -2, ..."""
    return ChannelResult(items, -np.arange(len(items), dtype=np.float32))


def latest_occurrence(items: np.ndarray) -> np.ndarray:
    """Dedupe keeping each item's last occurrence, in order."""
    return np.array(list(dict.fromkeys(reversed(items.tolist())))[::-1], np.int64)


def channels_of(candidates: pb.Candidates) -> dict[int, list[str]]:
    """item -> the channels that retrieved it (rank > 0 in the channel's column)."""
    out: dict[int, list[str]] = {int(i): [] for i in candidates.items}
    for column in candidates.channels:
        for item, rank in zip(candidates.items, column.ranks):
            if rank > 0:
                out[int(item)].append(column.channel)
    return out


def deleted_filter(catalog: Catalog) -> DeletedItemsFilter:
    return DeletedItemsFilter(lambda: catalog.deleted)


@dataclass
class RecommendRun:
    """One request, filled in step by step. One serving version for all of it: item indices mean
    different items in another version."""
    query: RecommendQuery
    state: ServingState
    deadline: float                                   # time.monotonic() by which the answer is out
    exclude: np.ndarray                               # [E] int64
    history: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    candidates: pb.Candidates | None = None
    slate: ChannelResult = EMPTY                      # what is served, best first
    channels: dict[int, list[str]] = field(default_factory=dict)
    reasons: list[DegradedReason] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    step_ms: dict[str, float] = field(default_factory=dict)     # every step, as run_steps_async times them
    stages: list[str] = field(default_factory=list)             # steps that did work: reported stages
    remote_ms: dict[str, float] = field(default_factory=dict)   # retrieval.*, ranking.*

    @property
    def catalog(self) -> Catalog:
        return self.state.catalog

    def retrieval_query(self) -> RetrievalQuery:
        return RetrievalQuery(self.query.user_id, self.history, self.exclude)

    def stage_ms(self) -> dict[str, float]:
        return {**{s: self.step_ms[s] for s in self.stages}, **self.remote_ms}

    def recommendation(self) -> Recommendation:
        catalog = self.catalog
        items = [RecommendedItem(catalog.item_ids[item], score, rank, tuple(self.channels.get(item, ())),
                                 catalog.titles[item], catalog.categories[item])
                 for rank, (item, score) in enumerate(zip(self.slate.items.tolist(),
                                                          self.slate.scores.tolist()), start=1)]
        return Recommendation(self.query.request_id, items, list(self.reasons), dict(self.versions),
                              self.stage_ms())


class RecommendPipeline:
    def __init__(self, states: VersionSet[ServingState], store: UserStateStore,
                 retrieval: pb_grpc.RetrievalStub, ranking: pb_grpc.RankingStub, config: GatewayConfig) -> None:
        self.states = states
        self.store = store
        self.retrieval = retrieval
        self.ranking = ranking
        self.config = config
        self.reserve_s = config.reserve_ms / 1000.0
        self.steps: list[Step[RecommendRun]] = [
            Step("user_state", self.user_state, fail_open=True, reason=DegradedReason.USER_STATE_UNAVAILABLE),
            Step("retrieve", self.retrieve, fail_open=True, reason=DegradedReason.RETRIEVAL_ERROR),
            Step("fallback", self.popular_fallback, fail_open=False),
            Step("rank", self.rank, fail_open=True, reason=DegradedReason.RANKING_ERROR),
            Step("filter", self.filter_deleted, fail_open=False),
        ]

    async def recommend(self, q: RecommendQuery, deadline: float) -> Recommendation:
        """deadline: time.monotonic() by which the answer must be out."""
        state = self.states.get()
        run = RecommendRun(q, state, deadline, state.catalog.to_indices(q.exclude_item_ids),
                           versions={"artifacts": state.version})
        await run_steps_async(self.steps, run, run.step_ms, run.reasons)
        for reason in run.reasons:
            record_degraded(SERVICE, reason)
        for stage in run.stages:
            record_stage(SERVICE, stage, run.step_ms[stage] / 1000.0)
        return run.recommendation()

    # -- the steps, in order

    async def user_state(self, run: RecommendRun) -> None:
        """The explicit history if given; else the build's history for the user, then their events
        since (latest occurrence kept). Set before the store is asked: a failing store leaves it."""
        q, catalog = run.query, run.catalog
        if q.history_item_ids:
            run.history = catalog.to_indices(q.history_item_ids)
            return
        base = run.state.base_history.history(q.user_id)
        run.history = self._cleaned_history(run, base)
        budget = max((run.deadline - time.monotonic()) * USER_STATE_SHARE, MIN_TIMEOUT_S)
        recent = catalog.to_indices(await asyncio.wait_for(self.store.recent(q.user_id), timeout=budget))
        if len(recent):
            run.history = self._cleaned_history(run, latest_occurrence(np.concatenate([base, recent])))

    def _cleaned_history(self, run: RecommendRun, history: np.ndarray) -> np.ndarray:
        """Without deleted items, the most recent `history_cap`."""
        kept = deleted_filter(run.catalog).apply(in_order(history.astype(np.int64)), run.retrieval_query()).kept
        return kept.items[-self.config.history_cap:]

    async def retrieve(self, run: RecommendRun) -> None:
        run.stages.append("retrieve")
        budget = (run.deadline - time.monotonic() - self.reserve_s) * self.config.retrieval_share
        # Retrieval is told the deleted items too: it then fills the list with live ones.
        exclude = [*run.exclude.tolist(), *sorted(run.catalog.deleted)][:MAX_RETRIEVE_EXCLUDE]
        try:
            retrieved = await self.retrieval.Retrieve(pb.RetrieveRequest(
                user_id=run.query.user_id, history=run.history.tolist(), exclude=exclude,
                num_candidates=self.config.candidates, artifact_version=run.state.version),
                timeout=max(budget, MIN_TIMEOUT_S))
        except grpc.aio.AioRpcError as e:
            raise StepFailed(RETRIEVAL.of(e), e.details() or "") from e
        run.candidates = retrieved.candidates
        run.versions["index"] = retrieved.index_version
        run.remote_ms.update({f"retrieval.{k}": v for k, v in retrieved.stage_ms.items()})

    def popular_fallback(self, run: RecommendRun) -> None:
        """No candidates: the most popular items, less those seen, excluded or deleted."""
        if run.candidates is not None:
            return
        run.stages.append("fallback")
        query, filters = run.retrieval_query(), standard_filters(lambda: run.catalog.deleted)
        # The filters take out at most blocked_count of the head: fetch that much more than k.
        head = run.catalog.popular[:run.query.k + blocked_count(filters, query)].astype(np.int64)
        items = apply_filters(filters, in_order(head), query).head(run.query.k).items
        run.slate = in_order(items)
        run.channels = {int(i): [ChannelName.POPULAR.value] for i in items}

    async def rank(self, run: RecommendRun) -> None:
        if run.candidates is None:   # the popular fallback is the answer
            return
        run.channels = channels_of(run.candidates)
        # Served if ranking fails: the retrieval order, with room for the deleted items filter takes out.
        run.slate = in_order(np.array(run.candidates.items[:run.query.k + len(run.catalog.deleted)], np.int64))
        remaining = run.deadline - time.monotonic() - self.reserve_s
        if remaining <= MIN_TIMEOUT_S:
            raise StepFailed(DegradedReason.RANKING_TIMEOUT, "no budget left for ranking")
        run.stages.append("rank")
        try:
            ranked = await self.ranking.Rank(pb.RankRequest(
                history=run.history.tolist(), candidates=run.candidates, k=run.query.k,
                artifact_version=run.state.version), timeout=remaining)
        except grpc.aio.AioRpcError as e:
            raise StepFailed(RANKING.of(e), e.details() or "") from e
        run.versions["fused_ranker"] = ranked.model_version
        run.reasons.extend(reasons_from_proto(ranked.reasons))
        run.remote_ms.update({f"ranking.{k}": v for k, v in ranked.stage_ms.items()})
        run.slate = ChannelResult(np.array(ranked.items, np.int64), np.array(ranked.scores, np.float32))

    def filter_deleted(self, run: RecommendRun) -> None:
        """The guarantee: a deleted item never leaves the gateway (it may be deleted while the
        request is in retrieval or ranking)."""
        run.slate = deleted_filter(run.catalog).apply(run.slate, run.retrieval_query()).kept.head(run.query.k)
