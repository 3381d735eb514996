"""Gateway gRPC service (thin): proto -> domain objects (gateway.validation), call them, domain -> proto."""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import grpc
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from common.artifacts import ArtifactSet, open_artifacts
from common.config import GatewayConfig, parse_config
from common.metrics import ARTIFACT_INFO
from common.wire import reasons_to_proto
from common.server import observed, serve
from common.versions import VersionSet, watch_versions
from gateway.event_log import EventLog
from gateway.events import EventIngester, IngestResult
from gateway.items import ItemUpdater
from gateway.recommend import SERVICE, Recommendation, RecommendPipeline
from gateway.serving_state import ServingState
from gateway.state_store import open_store
from gateway.validation import (InvalidArgument, events_from_proto, validate_delete, validate_recommend,
                                validate_upsert)
from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc


def recommendation_to_proto(r: Recommendation) -> pb.RecommendResponse:
    response = pb.RecommendResponse(request_id=r.request_id, degraded=bool(r.reasons),
                                    degraded_reasons=[reason.value for reason in r.reasons],
                                    reasons=reasons_to_proto(r.reasons), versions=r.versions, stage_ms=r.stage_ms)
    for item in r.items:
        response.items.add(item_id=item.item_id, score=item.score, rank=item.rank, channels=item.channels,
                           title=item.title, category=item.category)
    return response


def ingested_to_proto(r: IngestResult) -> pb.ReportEventsResponse:
    return pb.ReportEventsResponse(accepted=r.accepted, history_updates=r.history_updates)


class RecommenderServicer(pb_grpc.RecommenderServicer):
    def __init__(self, recommender: RecommendPipeline, events: EventIngester, items: ItemUpdater,
                 default_deadline_s: float) -> None:
        self.recommender = recommender
        self.events = events
        self.items = items
        self.default_deadline_s = default_deadline_s

    def budget(self, context: grpc.aio.ServicerContext) -> float:
        """The caller's remaining time; no deadline means the gateway's default, never "infinite"."""
        remaining = context.time_remaining()
        return self.default_deadline_s if remaining is None or remaining > 3600 else remaining

    @observed(SERVICE, "Recommend")
    async def Recommend(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext) -> pb.RecommendResponse:
        try:
            query = validate_recommend(request)
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return recommendation_to_proto(await self.recommender.recommend(query, time.monotonic() + self.budget(context)))

    @observed(SERVICE, "ReportEventBatch")
    async def ReportEventBatch(self, request: pb.EventBatch, context: grpc.aio.ServicerContext) -> pb.ReportEventsResponse:
        try:
            return ingested_to_proto(await self.events.ingest(events_from_proto(request.events)))
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    @observed(SERVICE, "ReportEvents")
    async def ReportEvents(self, request_iterator: AsyncIterator[pb.EventBatch],
                           context: grpc.aio.ServicerContext) -> pb.ReportEventsResponse:
        """Client stream of batches; each batch is applied whole. A bad batch stops the stream with
        INVALID_ARGUMENT naming the batch and event; the batches before it stay applied."""
        total = pb.ReportEventsResponse()
        number = 0
        async for batch in request_iterator:
            try:
                done = await self.events.ingest(events_from_proto(batch.events))
            except InvalidArgument as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"batch {number}: {e} ({total.accepted} events of earlier batches accepted)")
            total.accepted += done.accepted
            total.history_updates += done.history_updates
            number += 1
        return total

    @observed(SERVICE, "UpsertItems")
    async def UpsertItems(self, request: pb.UpsertItemsRequest, context: grpc.aio.ServicerContext) -> pb.UpsertItemsResponse:
        try:
            done = await self.items.upsert(validate_upsert(request), self.budget(context))
            return pb.UpsertItemsResponse(added=done.added, updated=done.updated)
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except (InferenceServerException, grpc.aio.AioRpcError) as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"items not added: a dependency failed ({type(e).__name__})")

    @observed(SERVICE, "DeleteItems")
    async def DeleteItems(self, request: pb.DeleteItemsRequest, context: grpc.aio.ServicerContext) -> pb.DeleteItemsResponse:
        try:
            deleted = await self.items.delete(validate_delete(request), self.budget(context))
            return pb.DeleteItemsResponse(deleted=deleted)
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))


async def wait_for_version(version: str, retrieval: pb_grpc.RetrievalStub, ranking: pb_grpc.RankingStub,
                           timeout_s: float = 300.0) -> None:
    """Until both services serve `version` (an empty ItemUpdate is a cheap probe)."""
    deadline = time.monotonic() + timeout_s
    for stub in (retrieval, ranking):
        while True:
            try:
                await stub.UpdateItems(pb.ItemUpdate(artifact_version=version), timeout=5)
                break
            except grpc.aio.AioRpcError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"services did not load version {version}: {e.code().name}") from e
                await asyncio.sleep(0.2)


async def run(config: GatewayConfig) -> None:
    # round_robin spreads calls over every address a dns:/// target resolves to (k8s headless Services).
    options = [("grpc.max_receive_message_length", 8 << 20), ("grpc.lb_policy_name", "round_robin")]
    retrieval_channel = grpc.aio.insecure_channel(config.retrieval_addr, options=options)
    ranking_channel = grpc.aio.insecure_channel(config.ranking_addr, options=options)
    retrieval, ranking = pb_grpc.RetrievalStub(retrieval_channel), pb_grpc.RankingStub(ranking_channel)
    triton = InferenceServerClient(config.triton_url)
    store = open_store(config.state, cap=config.history_cap)
    states: VersionSet[ServingState] = VersionSet()
    items = ItemUpdater(states, triton, retrieval, ranking)

    async def load(artifacts: ArtifactSet) -> None:
        state = await asyncio.to_thread(ServingState.load, artifacts)
        if states.newest:   # a swap: the services must have it, and it must know today's changes
            await wait_for_version(state.version, retrieval, ranking)
            await items.replay(state)
        states.add(state.version, state)
        ARTIFACT_INFO.clear()
        ARTIFACT_INFO.labels(SERVICE, state.version).set(1)

    await load(open_artifacts(config.artifacts))
    recommender = RecommendPipeline(states, store, retrieval, ranking, config)
    events = EventIngester(states, EventLog(config.event_log), store)
    servicer = RecommenderServicer(recommender, events, items, config.default_deadline_ms / 1000.0)
    watcher = asyncio.create_task(watch_versions(config.artifacts, states.newest, load))

    async def close() -> None:
        watcher.cancel()
        await retrieval_channel.close()
        await ranking_channel.close()
        await triton.close()
        await store.close()

    await serve(config, [pb.DESCRIPTOR.services_by_name["Recommender"].full_name],
                lambda server: pb_grpc.add_RecommenderServicer_to_server(servicer, server), on_stop=close)

def main() -> None:
    asyncio.run(run(parse_config(GatewayConfig, description="FusionRec gateway (public Recommender API)")))


if __name__ == "__main__":
    main()
