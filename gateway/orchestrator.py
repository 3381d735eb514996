"""Recommend, end to end: user state -> retrieval -> ranking, within the caller's deadline.

Budget: retrieval gets `retrieval_share` of what remains (after a reserve for the gateway's own
work), ranking gets the rest. A failing stage degrades the answer, never fails it:
retrieval down or late -> popular items; ranking down or late -> retrieval order.
"""
from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np

from common.config import GatewayConfig
from common.metrics import record_degraded, stage_timer
from gateway.catalog import Catalog
from gateway.state_store import UserStateStore
from common.versions import VersionSet
from gateway.serving_state import ServingState
from gateway.validation import RecommendQuery
from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc

SERVICE = "gateway"
MAX_EXCLUDE = 20_000   # the retrieval service's limit


def _reason(stage: str, error: grpc.aio.AioRpcError) -> str:
    code = error.code()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{stage}_timeout"
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"{stage}_unavailable"
    return f"{stage}_error"


class Orchestrator:
    def __init__(self, states: VersionSet[ServingState], store: UserStateStore,
                 retrieval: pb_grpc.RetrievalStub, ranking: pb_grpc.RankingStub, config: GatewayConfig) -> None:
        self.states = states
        self.store = store
        self.retrieval = retrieval
        self.ranking = ranking
        self.config = config

    async def recommend(self, q: RecommendQuery, deadline: float) -> pb.RecommendResponse:
        """deadline: time.monotonic() by which the answer must be out."""
        # One version for the whole request: item indices mean different items in another version.
        state = self.states.get()
        catalog = state.catalog
        stage_ms: dict[str, float] = {}
        reasons: list[str] = []
        versions = {"artifacts": state.version}
        reserve = self.config.reserve_ms / 1000.0
        if q.history_item_ids:
            history = catalog.to_indices(q.history_item_ids)
        else:
            history, state_ok = await self.user_history(state, q.user_id, deadline)
            if not state_ok:
                reasons.append("user_state_unavailable")
        exclude = catalog.to_indices(q.exclude_item_ids)

        candidates = None
        budget = (deadline - time.monotonic() - reserve) * self.config.retrieval_share
        try:
            with stage_timer(SERVICE, "retrieve", stage_ms):
                retrieved = await self.retrieval.Retrieve(pb.RetrieveRequest(
                    user_id=q.user_id, history=history.tolist(),
                    exclude=[*exclude.tolist(), *sorted(catalog.deleted)][:MAX_EXCLUDE],
                    num_candidates=self.config.candidates, artifact_version=state.version),
                    timeout=max(budget, 0.001))
            candidates = retrieved.candidates
            versions["index"] = retrieved.index_version
            stage_ms.update({f"retrieval.{k}": v for k, v in retrieved.stage_ms.items()})
        except grpc.aio.AioRpcError as e:
            reasons.append(_reason("retrieval", e))

        if candidates is None:
            with stage_timer(SERVICE, "fallback", stage_ms):
                seen = set(history.tolist()) | set(exclude.tolist())
                items = catalog.popular_excluding(q.k, seen)
            return self._response(catalog, q, items, -np.arange(len(items), dtype=np.float32),
                                  {int(i): ["popular"] for i in items}, reasons, versions, stage_ms)

        channels = self._channels(candidates)
        remaining = deadline - time.monotonic() - reserve
        ranked = None
        if remaining <= 0.001:
            reasons.append("ranking_timeout")
        else:
            try:
                with stage_timer(SERVICE, "rank", stage_ms):
                    ranked = await self.ranking.Rank(pb.RankRequest(
                        history=history.tolist(), candidates=candidates, k=q.k,
                        artifact_version=state.version), timeout=remaining)
            except grpc.aio.AioRpcError as e:
                reasons.append(_reason("ranking", e))
        if ranked is not None:
            versions["fused_ranker"] = ranked.model_version
            reasons.extend(ranked.degraded_reasons)
            stage_ms.update({f"ranking.{k}": v for k, v in ranked.stage_ms.items()})
            items, scores = np.array(ranked.items, np.int64), np.array(ranked.scores, np.float32)
        else:
            items = np.array(candidates.items[:q.k + len(catalog.deleted)], np.int64)
            scores = -np.arange(len(items), dtype=np.float32)
        if catalog.deleted:   # the guarantee: a deleted item never leaves the gateway
            keep = np.array([i not in catalog.deleted for i in items.tolist()], bool)
            items, scores = items[keep][:q.k], scores[keep][:q.k]
        return self._response(catalog, q, items, scores, channels, reasons, versions, stage_ms)

    async def user_history(self, state: ServingState, user_id: str, deadline: float) -> tuple[np.ndarray, bool]:
        """(history, store_ok): the build's history for the user, then their events since,
        deduped with the latest occurrence kept. A failing store degrades to the build's history."""
        base = state.base_history.history(user_id).tolist()
        ok = True
        try:
            # A slow store must not eat the request's budget: give it a small share of it.
            budget = max((deadline - time.monotonic()) * 0.1, 0.001)
            recent = state.catalog.to_indices(
                await asyncio.wait_for(self.store.recent(user_id), timeout=budget)).tolist()
        except Exception:  # noqa: BLE001
            ok, recent = False, []
        merged = list(dict.fromkeys(reversed([*base, *recent])))[::-1] if recent else base
        merged = [i for i in merged if i not in state.catalog.deleted]
        return np.array(merged[-self.config.history_cap:], np.int64), ok

    @staticmethod
    def _channels(candidates: pb.Candidates) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {int(i): [] for i in candidates.items}
        for column in candidates.channels:
            for item, rank in zip(candidates.items, column.ranks):
                if rank > 0:
                    out[int(item)].append(column.channel)
        return out

    @staticmethod
    def _response(catalog: Catalog, q: RecommendQuery, items: np.ndarray, scores: np.ndarray,
                  channels: dict[int, list[str]], reasons: list[str], versions: dict[str, str],
                  stage_ms: dict[str, float]) -> pb.RecommendResponse:
        for reason in reasons:
            record_degraded(SERVICE, reason)
        response = pb.RecommendResponse(request_id=q.request_id, degraded=bool(reasons),
                                        degraded_reasons=reasons, versions=versions, stage_ms=stage_ms)
        for rank, (item, score) in enumerate(zip(items.tolist(), scores.tolist()), start=1):
            response.items.add(item_id=catalog.item_ids[item], score=score, rank=rank,
                               channels=channels.get(item, []), title=catalog.titles[item],
                               category=catalog.categories[item])
        return response
