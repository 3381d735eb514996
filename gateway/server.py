"""Gateway gRPC service (thin): proto -> domain objects (gateway.validation), call them, domain -> proto."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from common.artifacts import ArtifactSet, open_artifacts
from common.client import open_channel, triton_channel_args
from common.security import process_security
from common.config import GatewayConfig, parse_config
from common.followed_versions import offer_followed
from common.item_follower import ItemLogFollower
from common.item_log import ItemLogUnavailable, open_item_log
from common.logs import get_logger
from common.metrics import set_artifact_info
from common.wire import reasons_to_proto
from common.server import observed, serve
from common.replicas import probe_replicas
from common.versions import VersionSet, watch_versions
from gateway.auth import TokenFileError, auth_interceptors
from gateway.erase import UserDataUnavailable, UserEraser
from gateway.event_log import EventLog
from gateway.events import EventIngester, IngestResult
from gateway.items import EncoderError, ItemWriter, TextSpaceBrought
from gateway.recommend import SERVICE, ExplainedStage, ItemExplanation, Recommendation, RecommendPipeline
from gateway.replica_monitor import REPLICAS_HEALTH, Probe, ReplicaMonitor, ReplicaService
from gateway.serving_state import ServingState
from gateway.state_store import open_store
from gateway.validation import (InvalidArgument, events_from_proto, validate_delete, validate_delete_user,
                                validate_recommend, validate_upsert)

log = get_logger("gateway")
from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc


async def _nothing() -> None:
    return None


STAGES_TO_PROTO = {stage: pb.ExplainedStage.Value(f"EXPLAINED_STAGE_{stage.name}")
                   for stage in ExplainedStage if stage is not ExplainedStage.UNKNOWN}


def explanation_to_proto(e: ItemExplanation, out: pb.Explanation) -> None:
    """Fills `out`; a figure the stage did not produce stays absent (optional fields)."""
    out.SetInParent()
    for c in e.channels:
        out.channels.add(channel=c.channel, score=c.score, rank=c.rank)
    if e.fused_score is not None:
        out.fused_score = e.fused_score
    if e.rerank_correction is not None:
        out.rerank_correction = e.rerank_correction
    if e.diversity_penalty is not None:
        out.diversity_penalty = e.diversity_penalty
    out.stage = STAGES_TO_PROTO.get(e.stage, pb.EXPLAINED_STAGE_UNSPECIFIED)


def recommendation_to_proto(r: Recommendation) -> pb.RecommendResponse:
    response = pb.RecommendResponse(request_id=r.request_id, degraded=bool(r.reasons),
                                    degraded_reasons=[reason.value for reason in r.reasons],
                                    reasons=reasons_to_proto(r.reasons), versions=r.versions, stage_ms=r.stage_ms)
    for item in r.items:
        added = response.items.add(item_id=item.item_id, score=item.score, rank=item.rank, channels=item.channels,
                                   title=item.title, category=item.category)
        if item.explanation is not None:
            explanation_to_proto(item.explanation, added.explanation)
    return response


def ingested_to_proto(r: IngestResult) -> pb.ReportEventsResponse:
    return pb.ReportEventsResponse(accepted=r.accepted, history_updates=r.history_updates)


class RecommenderServicer(pb_grpc.RecommenderServicer):
    def __init__(self, recommender: RecommendPipeline, events: EventIngester, items: ItemWriter,
                 default_deadline_s: float, users: UserEraser | None = None,
                 write_deadline_s: float = 30.0) -> None:
        self.recommender = recommender
        self.events = events
        self.items = items
        self.users = users
        self.default_deadline_s = default_deadline_s
        self.write_deadline_s = write_deadline_s

    def budget(self, context: grpc.aio.ServicerContext, write: bool = False) -> float:
        """The caller's remaining time; no deadline means the gateway's default, never "infinite":
        default_deadline_ms for Recommend, write_deadline_ms for UpsertItems, DeleteItems and
        DeleteUserData (embedding 256 items takes seconds; a read's 250 ms failed every upsert).
        Event batches are not cut at a default (protos/fusionrec.proto: a retry would log twice)."""
        remaining = context.time_remaining()
        default = self.write_deadline_s if write else self.default_deadline_s
        return default if remaining is None or remaining > 3600 else remaining

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
            done = await self.items.upsert(validate_upsert(request), self.budget(context, write=True))
            return pb.UpsertItemsResponse(added=done.added, updated=done.updated, item_log_seq=done.item_log_seq)
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except TextSpaceBrought:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, TextSpaceBrought.MESSAGE)
        except ItemLogUnavailable:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "items not added: the item store is unavailable; retry")
        except (InferenceServerException, grpc.aio.AioRpcError, EncoderError, asyncio.TimeoutError) as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"items not added: a dependency failed ({type(e).__name__})")

    @observed(SERVICE, "DeleteItems")
    async def DeleteItems(self, request: pb.DeleteItemsRequest, context: grpc.aio.ServicerContext) -> pb.DeleteItemsResponse:
        try:
            ids = validate_delete(request)
            done = await asyncio.wait_for(self.items.delete(ids), self.budget(context, write=True))
            return pb.DeleteItemsResponse(deleted=done.deleted, item_log_seq=done.item_log_seq)
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except ItemLogUnavailable:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "items not deleted: the item store is unavailable; retry")
        except asyncio.TimeoutError:   # a hanging store: bounded by the write deadline; a repeated delete is a no-op
            await context.abort(grpc.StatusCode.UNAVAILABLE, "items not confirmed deleted within the write deadline; retry")

    @observed(SERVICE, "DeleteUserData")
    async def DeleteUserData(self, request: pb.DeleteUserDataRequest,
                             context: grpc.aio.ServicerContext) -> pb.DeleteUserDataResponse:
        """Erase a user (the privacy guarantee). When this returns OK:
        - the user's recent history is gone from the user-state store (every gateway replica shares
          it), and an erased marker is set;
        - every Recommend for the user, through any gateway, treats them as unknown: no history
          from the build (user_history.npz) and no user id sent to retrieval, so no CF vector
          trained on their past; if the store cannot be read, every user is served that way
          (degraded user_state_unavailable), so an outage never brings an erased history back;
        - a tombstone is durable in this gateway's event log: its export, which the next offline
          build reads, leaves out every event of the user logged before it (the raw day files
          keep the rows until retention removes them);
        - events the user sends afterwards are accepted and count again.
        Idempotent: on UNAVAILABLE retry; a repeated erase removes 0 entries."""
        try:
            user_id = validate_delete_user(request)
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            done = await asyncio.wait_for(self.users.erase(user_id), self.budget(context, write=True))
        except UserDataUnavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"user data not erased: the {e} is unavailable; retry")
        except asyncio.TimeoutError:   # a hanging store, bounded by the write deadline; the erase is idempotent
            await context.abort(grpc.StatusCode.UNAVAILABLE, "user data not confirmed erased within the write deadline; retry")
        return pb.DeleteUserDataResponse(history_entries_removed=done.history_entries_removed,
                                         events_tombstoned=done.events_tombstoned)


@dataclass
class Backends:
    """What the gateway calls for a Recommend: retrieval and ranking stubs (`await stub.Retrieve(
    request, timeout=...)`), their replicas for the monitor (Status through `probe`), and what
    runs before SERVING (start) and after the server stops (close). Remote services over gRPC
    channels by default; in the gateway's own process with `python -m tools.colocated`."""
    retrieval: Any
    ranking: Any
    replicas: list[ReplicaService]
    probe: Probe = probe_replicas
    start: Callable[[], Awaitable[None]] = _nothing
    close: Callable[[], Awaitable[None]] = _nothing


def remote_backends(config: GatewayConfig) -> Backends:
    """Channels to every replica of both services (inside the running event loop)."""
    # round_robin spreads calls over every address a dns:/// target resolves to (k8s headless Services).
    options = [("grpc.lb_policy_name", "round_robin")]
    retrieval_channel = open_channel(config.retrieval_addr, options=options)
    ranking_channel = open_channel(config.ranking_addr, options=options)

    async def close() -> None:
        await retrieval_channel.close()
        await ranking_channel.close()
    return Backends(pb_grpc.RetrievalStub(retrieval_channel), pb_grpc.RankingStub(ranking_channel),
                    [ReplicaService("retrieval", config.retrieval_addr, pb_grpc.RetrievalStub),
                     ReplicaService("ranking", config.ranking_addr, pb_grpc.RankingStub)], close=close)


def serving_health(healthy: bool) -> int:
    return health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING


async def run(config: GatewayConfig, backends: Callable[[], Backends] | None = None) -> None:
    """Serve until SIGTERM; backends: made inside the event loop (default: remote_backends)."""
    security = process_security(config)   # TLS to retrieval/ranking/Triton; fails here without files
    interceptors = auth_interceptors(config)   # bearer tokens + scopes; a missing/bad --tokens fails here
    calls = backends() if backends is not None else remote_backends(config)
    triton = InferenceServerClient(config.triton_url, **security.triton_client_kwargs(),
                                    channel_args=triton_channel_args())
    store = open_store(config.state, cap=config.history_cap)
    item_log = open_item_log(config.item_log)
    follower = ItemLogFollower(item_log)
    states: VersionSet[ServingState] = VersionSet()
    health_servicer = health.aio.HealthServicer()

    async def replicas_health(healthy: bool) -> None:
        await health_servicer.set(REPLICAS_HEALTH, serving_health(healthy))

    monitor = ReplicaMonitor(calls.replicas, lambda: states.get().catalog.applied_seq if states.newest else 0,
                             lambda: states.newest, on_health=replicas_health, probe=calls.probe)

    async def load(artifacts: ArtifactSet) -> None:
        state = await asyncio.to_thread(ServingState.load, artifacts)
        if states.newest:   # a swap: every replica we can reach must serve it first
            await monitor.wait_for_version(state.version)
        # Replays the item log into the new catalog before requests see it (retries while the
        # store is down; the old version keeps serving meanwhile).
        await offer_followed(states, follower, state.version, state, state.catalog.apply, state.catalog.folded_seq)
        set_artifact_info(SERVICE, state.version)

    first = open_artifacts(config.artifacts)
    recommender = RecommendPipeline(states, store, calls.retrieval, calls.ranking, config, follower=follower)
    events = EventIngester(states, EventLog(config.event_log), store)
    items = ItemWriter(states, triton, item_log, follower)
    users = UserEraser(store, events.log, events.log_lock)
    servicer = RecommenderServicer(recommender, events, items, config.default_deadline_ms / 1000.0, users=users,
                                     write_deadline_s=config.write_deadline_ms / 1000.0)
    tasks: list[asyncio.Task] = []

    async def start() -> None:
        """Before SERVING: the backends' own start (colocated: their first version loaded), the
        first version replayed from the item log, then tail and watch."""
        await calls.start()
        await load(first)
        tasks.append(asyncio.create_task(follower.run()))
        tasks.append(asyncio.create_task(watch_versions(config.artifacts, states.newest, load)))
        tasks.append(asyncio.create_task(monitor.run()))

    async def close() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await calls.close()
        await triton.close()
        await store.close()
        await item_log.close()

    await health_servicer.set(REPLICAS_HEALTH, serving_health(False))   # unknown until the first check
    await serve(config, [pb.DESCRIPTOR.services_by_name["Recommender"].full_name],
                lambda server: pb_grpc.add_RecommenderServicer_to_server(servicer, server),
                on_stop=close, on_start=start, health_servicer=health_servicer, service=SERVICE,
                interceptors=interceptors)


def main(config_class: type[GatewayConfig] = GatewayConfig,
         backends_of: Callable[[Any], Backends] | None = None,
         description: str = "FusionRec gateway (public Recommender API)") -> None:
    """backends_of(config): the backends to call, made inside the event loop (default: remote)."""
    config = parse_config(config_class, description=description)
    try:
        asyncio.run(run(config, (lambda: backends_of(config)) if backends_of is not None else None))
    except TokenFileError as e:   # a clear one-line start failure, not a traceback
        raise SystemExit(f"gateway: {e}") from None


if __name__ == "__main__":
    main()
