"""Recommend, top to bottom: user state -> retrieve -> popular fallback -> rank -> filter.

Each step is named and has a policy (core.pipeline); a fail-open step that fails degrades the
answer with a reason, never fails the call:
  user_state  fail-open   the store fails -> no history (user_state_unavailable): without the
                          store the gateway cannot know whether the user was erased, and an
                          erased user's build history must never be used
  retrieve    fail-open   retrieval down or late -> no candidates (retrieval_*)
  fallback    fail-closed no candidates -> the most popular items the user may get
  rank        fail-open   ranking down or late -> retrieval order (ranking_*)
  filter      fail-closed a deleted item never leaves the gateway
Items: the catalog of the request's version is the build plus the item log applied so far; each
request carries that log position (min_item_log_seq) so a replica behind it catches up first. A
replica ahead of the gateway may return an index the gateway cannot resolve yet: it is dropped
and counted (fusionrec_unknown_items_total), never an error. Deleted items are a bitmap lookup
per item (cost independent of how many are deleted). The item log unreadable: the answer is
served from the last applied state and degraded (item_state_unavailable).
Erased users (DeleteUserData): no build history, no user id sent to retrieval (no trained CF
vector); only the events they sent after the erase count.
Explain (query.explain, off by default: nothing below is built or asked for without it): each item
gets the channel columns of its candidate row (rank > 0), and from ranking's packed
RankExplanation its fused score, re-ranker correction and diversity penalty; `stage` says which
of them are known (retrieval order: channels only; popular fallback: the popular channel only).
Budget: what remains after a reserve for the gateway's own work is split by the hops' measured
latency (gateway.budget.HopBudget: retrieval may use all but ranking's latency tail;
`retrieval_share` until both hops are measured), ranking gets the rest. The response's stage_ms
reports the stages that did work (retrieve, fallback, rank: the dashboards' stage names) and the
services' own stages (retrieval.*, ranking.*).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from enum import StrEnum

import grpc
import numpy as np

from common.admission import report_late
from common.config import GatewayConfig
from common.item_follower import ItemLogFollower
from common.latency import LatencyEstimate
from common.metrics import UNKNOWN_ITEMS, record_degraded, record_stage
from common.wire import reasons_from_proto
from common.versions import VersionSet
from core.channel_names import ChannelName
from core.filters import ExcludedItemsFilter, SeenItemsFilter, apply_filters
from core.limits import MAX_RETRIEVE_EXCLUDE
from core.merge import rows_in
from core.pipeline import Step, StepFailed, run_steps_async
from core.reasons import DegradedReason
from core.types import EMPTY, ChannelResult, RetrievalQuery
from gateway.budget import HopBudget
from gateway.catalog import Catalog
from gateway.serving_state import ServingState
from gateway.state_store import UserStateStore
from gateway.validation import RecommendQuery
from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc

SERVICE = "gateway"
USER_STATE_SHARE = 0.1   # a slow store must not eat the request's budget
MIN_TIMEOUT_S = 0.001


class ExplainedStage(StrEnum):
    """The stage that ordered the slate last: which explanation fields are known."""
    RERANKER = "reranker"                  # fused score, correction, penalty
    FUSED_RANKER = "fused_ranker"          # re-ranker failed: fused score only
    RETRIEVAL = "retrieval"                # ranking (or Triton) down or late: channels only
    POPULAR_FALLBACK = "popular_fallback"  # retrieval down: the popular channel only
    UNKNOWN = "unknown"                    # ranking answered without an explanation (an older replica)


@dataclass(frozen=True)
class ChannelEvidence:
    channel: str
    score: float
    rank: int                        # 1-based within the channel


@dataclass(frozen=True)
class ItemExplanation:
    channels: tuple[ChannelEvidence, ...]
    stage: ExplainedStage
    fused_score: float | None = None         # None: not known on this path
    rerank_correction: float | None = None
    diversity_penalty: float | None = None


@dataclass(frozen=True)
class RecommendedItem:
    item_id: str
    score: float
    rank: int                        # 1-based
    channels: tuple[str, ...]        # retrieval channels that proposed it
    title: str
    category: str
    explanation: ItemExplanation | None = None   # only when the query asked (explain)


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


def observe_hop(estimate: LatencyEstimate, error: grpc.aio.AioRpcError, seconds: float) -> None:
    """A late call needed more than the time it had: counted when that is above the estimate (a
    short deadline says nothing). A fast failure (down, shed) says nothing of latency either.
    A hop late or refused (shed) is overload: the admission limit hears of it (a fallback answer
    comes back in time, so latency alone would not show it)."""
    code = error.code()
    if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED):
        report_late()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and seconds > estimate.mean:
        estimate.observe(seconds)


def in_order(items: np.ndarray) -> ChannelResult:
    """Items served in the given order: scores 0, -1, -2, ..."""
    return ChannelResult(items, -np.arange(len(items), dtype=np.float32))


def latest_occurrence(items: np.ndarray) -> np.ndarray:
    """Dedupe keeping each item's last occurrence, in order."""
    return np.array(list(dict.fromkeys(reversed(items.tolist())))[::-1], np.int64)


def channels_of(candidates: pb.Candidates, items: list[int] | None = None,
                candidate_items: np.ndarray | None = None) -> dict[int, list[str]]:
    """item -> the channels that retrieved it (rank > 0 in the channel's column), for `items` only
    (None: every candidate). Provenance is asked for the served slate only: a lookup per served
    item and column, not a walk over every candidate. candidate_items: candidates.items decoded."""
    every = np.asarray(candidates.items, np.int64) if candidate_items is None else candidate_items
    wanted = every.tolist() if items is None else items
    rows, hit = rows_in(every, np.asarray(wanted, np.int64))   # the merged list has no repeats
    return {int(item): [c.channel for c in candidates.channels if c.ranks[row] > 0]
            for item, row, found in zip(wanted, rows.tolist(), hit.tolist()) if found}


def evidence_of(candidates: pb.Candidates, items: list[int]) -> dict[int, tuple[ChannelEvidence, ...]]:
    """item -> its (channel, score, rank) in every column that retrieved it (rank > 0), for `items` only."""
    row = {int(i): j for j, i in enumerate(candidates.items)}
    columns = [(c.channel, np.asarray(c.scores, np.float32), np.asarray(c.ranks, np.int32))
               for c in candidates.channels]
    out: dict[int, tuple[ChannelEvidence, ...]] = {}
    for item in items:
        j = row.get(item)
        out[item] = () if j is None else tuple(ChannelEvidence(name, float(scores[j]), int(ranks[j]))
                                               for name, scores, ranks in columns if ranks[j] > 0)
    return out


def scored_of(ranked: pb.RankResponse) -> tuple[ExplainedStage, dict[int, tuple[float | None, ...]]]:
    """Ranking's packed explanation -> (stage, item -> (fused, correction, penalty)); a column
    that does not align with the items is a stage that did not run."""
    if not ranked.HasField("explanation"):
        return ExplainedStage.UNKNOWN, {}
    e, n = ranked.explanation, len(ranked.items)
    fused = list(e.fused_scores) if len(e.fused_scores) == n else None
    reranked = fused is not None and len(e.corrections) == n and len(e.penalties) == n
    if fused is None:
        return ExplainedStage.RETRIEVAL, {}
    corrections = list(e.corrections) if reranked else [None] * n
    penalties = list(e.penalties) if reranked else [None] * n
    stage = ExplainedStage.RERANKER if reranked else ExplainedStage.FUSED_RANKER
    return stage, {int(i): (f, c, p) for i, f, c, p in zip(ranked.items, fused, corrections, penalties)}


def drop_unknown(catalog: Catalog, items: np.ndarray, field: str) -> np.ndarray:
    """[m] bool keep-mask of the indices this gateway can resolve; the others are counted."""
    keep = catalog.resolvable(items)
    unknown = len(keep) - int(keep.sum())
    if unknown:
        UNKNOWN_ITEMS.labels(SERVICE, field).inc(unknown)
    return keep


def select_candidates(candidates: pb.Candidates, keep: np.ndarray) -> pb.Candidates:
    """The candidates at keep (a bool mask over items), every column cut alike."""
    if keep.all():
        return candidates
    rows = np.flatnonzero(keep)
    out = pb.Candidates(items=np.asarray(candidates.items, np.int64)[rows].tolist())
    for column in candidates.channels:
        out.channels.add(channel=column.channel, scores=np.asarray(column.scores, np.float32)[rows].tolist(),
                         ranks=np.asarray(column.ranks, np.int32)[rows].tolist())
    return out


def live_only(catalog: Catalog, result: ChannelResult) -> ChannelResult:
    return result.where(catalog.live(result.items)) if len(result) else result


@dataclass
class RecommendRun:
    """One request, filled in step by step. One serving version for all of it: item indices mean
    different items in another version."""
    query: RecommendQuery
    state: ServingState
    deadline: float                                   # time.monotonic() by which the answer is out
    exclude: np.ndarray                               # [E] int64
    history: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    retrieval_user: str = ""                          # user id retrieval may look up (CF); "" = unknown
    candidates: pb.Candidates | None = None
    candidate_items: np.ndarray | None = None          # candidates.items decoded once [N] int64
    slate: ChannelResult = EMPTY                      # what is served, best first
    channels: dict[int, list[str]] = field(default_factory=dict)
    reasons: list[DegradedReason] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    step_ms: dict[str, float] = field(default_factory=dict)     # every step, as run_steps_async times them
    stages: list[str] = field(default_factory=list)             # steps that did work: reported stages
    remote_ms: dict[str, float] = field(default_factory=dict)   # retrieval.*, ranking.*
    # explain only: the stage that ordered the slate, item -> (fused, correction, penalty), and
    # the popular fallback's evidence
    explained_by: ExplainedStage = ExplainedStage.RETRIEVAL
    scored: dict[int, tuple[float | None, ...]] = field(default_factory=dict)
    fallback_evidence: dict[int, tuple[ChannelEvidence, ...]] = field(default_factory=dict)

    @property
    def catalog(self) -> Catalog:
        return self.state.catalog

    def retrieval_query(self) -> RetrievalQuery:
        return RetrievalQuery(self.retrieval_user, self.history, self.exclude)

    def stage_ms(self) -> dict[str, float]:
        return {**{s: self.step_ms[s] for s in self.stages}, **self.remote_ms}

    def explanations(self, items: list[int]) -> dict[int, ItemExplanation]:
        evidence = (self.fallback_evidence if self.candidates is None
                    else evidence_of(self.candidates, items))
        out = {}
        for item in items:
            fused, correction, penalty = self.scored.get(item, (None, None, None))
            out[item] = ItemExplanation(evidence.get(item, ()), self.explained_by, fused, correction, penalty)
        return out

    def recommendation(self) -> Recommendation:
        catalog = self.catalog
        slate = self.slate.items.tolist()
        if self.candidates is not None:   # provenance of the served items only (the fallback set its own)
            self.channels = channels_of(self.candidates, slate, self.candidate_items)
        explained = self.explanations(slate) if self.query.explain else {}
        items = [RecommendedItem(catalog.item_id(item), score, rank, tuple(self.channels.get(item, ())),
                                 catalog.title(item), catalog.category(item), explained.get(item))
                 for rank, (item, score) in enumerate(zip(slate, self.slate.scores.tolist()), start=1)]
        return Recommendation(self.query.request_id, items, list(self.reasons), dict(self.versions),
                              self.stage_ms())


class RecommendPipeline:
    def __init__(self, states: VersionSet[ServingState], store: UserStateStore,
                 retrieval: pb_grpc.RetrievalStub, ranking: pb_grpc.RankingStub, config: GatewayConfig,
                 follower: ItemLogFollower | None = None) -> None:
        self.states = states
        self.follower = follower
        self.store = store
        self.retrieval = retrieval
        self.ranking = ranking
        self.config = config
        self.reserve_s = config.reserve_ms / 1000.0
        self.budget = HopBudget(config.retrieval_share)
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
        if self.follower is not None and not self.follower.ok:   # online items may be stale
            run.reasons.append(DegradedReason.ITEM_STATE_UNAVAILABLE)
        await run_steps_async(self.steps, run, run.step_ms, run.reasons)
        for reason in run.reasons:
            record_degraded(SERVICE, reason)
        for stage in run.stages:
            record_stage(SERVICE, stage, run.step_ms[stage] / 1000.0)
        return run.recommendation()

    # -- the steps, in order

    async def user_state(self, run: RecommendRun) -> None:
        """The explicit history if given; else the build's history for the user, then their events
        since (latest occurrence kept). Until the store answers the user counts as unknown (no
        history, no user id for retrieval): a failing store must not resurrect an erased user."""
        q, catalog = run.query, run.catalog
        if q.history_item_ids:   # the caller's whole history (<= MAX_HISTORY): all of it is "seen"
            run.history = catalog.to_indices(q.history_item_ids)
        if not q.user_id:
            return
        budget = max((run.deadline - time.monotonic()) * USER_STATE_SHARE, MIN_TIMEOUT_S)
        state = await asyncio.wait_for(self.store.recent_state(q.user_id), timeout=budget)
        erased = state.erased_at is not None
        if not erased:
            run.retrieval_user = q.user_id
        if q.history_item_ids:
            return
        base = np.zeros(0, np.int64) if erased else run.state.base_history.history(q.user_id)
        recent = catalog.to_indices(state.items)
        run.history = self._cleaned_history(run, latest_occurrence(np.concatenate([base, recent]))
                                            if len(recent) else base)

    def _cleaned_history(self, run: RecommendRun, history: np.ndarray) -> np.ndarray:
        """Without deleted items, the most recent `history_cap`."""
        history = history.astype(np.int64)
        return history[run.catalog.live(history)][-self.config.history_cap:]

    async def retrieve(self, run: RecommendRun) -> None:
        run.stages.append("retrieve")
        budget = self.budget.retrieval_timeout(run.deadline - time.monotonic() - self.reserve_s)
        started = time.monotonic()
        # Only the caller's exclusions: deleted items are retrieval's own bitmap (same log).
        try:
            retrieved = await self.retrieval.Retrieve(pb.RetrieveRequest(
                user_id=run.retrieval_user, history=run.history.tolist(),
                exclude=run.exclude[:MAX_RETRIEVE_EXCLUDE].tolist(), num_candidates=self.config.candidates,
                artifact_version=run.state.version, min_item_log_seq=run.catalog.applied_seq),
                timeout=max(budget, MIN_TIMEOUT_S))
        except grpc.aio.AioRpcError as e:
            observe_hop(self.budget.retrieve, e, time.monotonic() - started)
            raise StepFailed(RETRIEVAL.of(e), e.details() or "") from e
        self.budget.retrieve.observe(time.monotonic() - started)
        candidates = retrieved.candidates
        items = np.asarray(candidates.items, np.int64)
        keep = drop_unknown(run.catalog, items, "candidates")
        run.candidates = select_candidates(candidates, keep)
        run.candidate_items = items if keep.all() else items[keep]
        run.versions["index"] = retrieved.index_version
        run.reasons.extend(reasons_from_proto(retrieved.reasons))   # a channel that failed (the sequential encoder)
        run.remote_ms.update({f"retrieval.{k}": v for k, v in retrieved.stage_ms.items()})

    def popular_fallback(self, run: RecommendRun) -> None:
        """No candidates: the most popular items, less those seen, excluded or deleted."""
        if run.candidates is not None:
            return
        run.stages.append("fallback")
        query, filters = run.retrieval_query(), [SeenItemsFilter(), ExcludedItemsFilter()]
        popular, k = run.catalog.popular, run.query.k
        # Seen and excluded take out at most len(history) + len(exclude) of the head; deletes are
        # unbounded, so widen the window (doubling) instead of fetching len(deleted) more.
        size = k + len(query.history) + len(query.exclude)
        while True:
            head = in_order(popular[:size])
            kept = apply_filters(filters, live_only(run.catalog, head), query)
            if len(kept) >= k or size >= len(popular):
                break
            size *= 2
        items = kept.head(k).items
        run.slate = in_order(items)
        run.channels = {int(i): [ChannelName.POPULAR.value] for i in items}
        run.explained_by = ExplainedStage.POPULAR_FALLBACK
        if run.query.explain:   # the popular channel, ranked by the build's popularity order
            place = {int(i): j for j, i in enumerate(popular[:size].tolist(), start=1)}
            run.fallback_evidence = {int(i): (ChannelEvidence(ChannelName.POPULAR.value, 0.0, place[int(i)]),)
                                     for i in items}

    async def rank(self, run: RecommendRun) -> None:
        if run.candidates is None:   # the popular fallback is the answer
            return
        # Served if ranking fails: the retrieval order (the filter step takes deleted items out).
        run.slate = in_order(run.candidate_items if run.candidate_items is not None
                             else np.array(run.candidates.items, np.int64))
        remaining = run.deadline - time.monotonic() - self.reserve_s
        if remaining <= MIN_TIMEOUT_S:
            report_late()
            raise StepFailed(DegradedReason.RANKING_TIMEOUT, "no budget left for ranking")
        run.stages.append("rank")
        started = time.monotonic()
        try:
            ranked = await self.ranking.Rank(pb.RankRequest(
                history=run.history.tolist(), candidates=run.candidates, k=run.query.k,
                artifact_version=run.state.version, min_item_log_seq=run.catalog.applied_seq,
                explain=run.query.explain), timeout=remaining)
        except grpc.aio.AioRpcError as e:
            observe_hop(self.budget.rank, e, time.monotonic() - started)
            raise StepFailed(RANKING.of(e), e.details() or "") from e
        self.budget.rank.observe(time.monotonic() - started)
        run.versions["fused_ranker"] = ranked.model_version
        run.reasons.extend(reasons_from_proto(ranked.reasons))
        run.remote_ms.update({f"ranking.{k}": v for k, v in ranked.stage_ms.items()})
        slate = ChannelResult(np.array(ranked.items, np.int64), np.array(ranked.scores, np.float32))
        run.slate = slate.where(drop_unknown(run.catalog, slate.items, "ranked"))
        if run.query.explain:   # with the ranked slate, never before it is served
            run.explained_by, run.scored = scored_of(ranked)

    def filter_deleted(self, run: RecommendRun) -> None:
        """The guarantee: a deleted item never leaves the gateway (it may be deleted while the
        request is in retrieval or ranking), checked in the bitmap item by item."""
        run.slate = live_only(run.catalog, run.slate).head(run.query.k)
