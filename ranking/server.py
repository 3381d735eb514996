"""Ranking gRPC service (thin): proto in, Ranker.rank, proto out."""
from __future__ import annotations

import asyncio

import grpc
import numpy as np
from tritonclient.grpc.aio import InferenceServerClient

from common.artifacts import ArtifactSet, open_artifacts
from common.config import RankingConfig, parse_config
from common.metrics import ARTIFACT_INFO
from core.features import FUSED_RANKER_NAME, TEXT_ENCODER_NAME
from common.server import observed, serve
from common.versions import VersionSet, apply_item_update, version_or_abort, watch_versions
from common.wire import reasons_to_proto
from common.wire import candidates_from_proto, check_indices
from core.limits import MAX_RANK_CANDIDATES, MAX_RANK_HISTORY, MAX_RANK_K
from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc
from ranking.ranker import SERVICE, Ranker
from ranking.triton_scorer import TritonScorer, ensure_loaded

RERANK_RESERVE_S = 0.004   # kept back from the deadline for the re-ranker and the reply


class RankingServicer(pb_grpc.RankingServicer):
    def __init__(self, versions: VersionSet[Ranker], triton_timeout_s: float) -> None:
        self.versions = versions
        self.triton_timeout_s = triton_timeout_s

    @observed(SERVICE, "Rank")
    async def Rank(self, request: pb.RankRequest, context: grpc.aio.ServicerContext) -> pb.RankResponse:
        ranker = await version_or_abort(self.versions, request.artifact_version, context)
        history = np.array(request.history, np.int64)
        try:
            items, columns = candidates_from_proto(request.candidates)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        n = ranker.online.total
        error = (check_indices("history", history, n, MAX_RANK_HISTORY)
                 or check_indices("candidates.items", items, n, MAX_RANK_CANDIDATES))
        if not error and not 1 <= request.k <= MAX_RANK_K:
            error = f"k: must be in 1..{MAX_RANK_K}, got {request.k}"
        if error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
        remaining = context.time_remaining()   # huge when the caller set no deadline
        timeout = min(self.triton_timeout_s, (remaining or 1e9) - RERANK_RESERVE_S)
        ranked = await ranker.rank(history, items, columns, request.k, timeout)
        return pb.RankResponse(items=ranked.items.tolist(), scores=ranked.scores.tolist(),
                               model_version=ranker.model_version,
                               degraded=bool(ranked.degraded_reasons),
                               reasons=reasons_to_proto(ranked.degraded_reasons), stage_ms=ranked.stage_ms)

    @observed(SERVICE, "UpdateItems")
    async def UpdateItems(self, request: pb.ItemUpdate, context: grpc.aio.ServicerContext) -> pb.ItemUpdateResponse:
        _, held = await apply_item_update(self.versions, request, context)
        return pb.ItemUpdateResponse(online_items=held)


async def run(config: RankingConfig) -> None:
    # The asyncio Triton client must be created inside the running event loop.
    triton = InferenceServerClient(config.triton_url)
    versions: VersionSet[Ranker] = VersionSet()

    async def load(artifacts: ArtifactSet) -> None:
        models = {name: str(v) for name, v in artifacts.manifest["models"].items()
                  if name in (FUSED_RANKER_NAME, TEXT_ENCODER_NAME)}
        serving = {FUSED_RANKER_NAME: {r.model_version for r in versions.loaded.values()},
                   TEXT_ENCODER_NAME: {r.encoder_version for r in versions.loaded.values() if r.encoder_version}}
        await ensure_loaded(triton, models, serving)
        ranker = await asyncio.to_thread(Ranker, artifacts, TritonScorer(triton, models[FUSED_RANKER_NAME]),
                                         config.reranker_threads, config.diversity_weight)
        await ranker.warm_up()
        versions.add(ranker.version, ranker)
        ARTIFACT_INFO.clear()
        ARTIFACT_INFO.labels(SERVICE, ranker.version).set(1)

    await load(open_artifacts(config.artifacts))
    servicer = RankingServicer(versions, config.triton_timeout_ms / 1000.0)
    watcher = asyncio.create_task(watch_versions(config.artifacts, versions.newest, load))
    await serve(config, [pb.DESCRIPTOR.services_by_name["Ranking"].full_name],
                lambda server: pb_grpc.add_RankingServicer_to_server(servicer, server),
                on_stop=triton.close)
    watcher.cancel()

def main() -> None:
    asyncio.run(run(parse_config(RankingConfig, description="FusionRec ranking service")))

if __name__ == "__main__":
    main()
