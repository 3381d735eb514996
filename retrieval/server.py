"""Retrieval gRPC service (thin): proto in, core.Retriever (declared steps: channels, merge), proto out."""
from __future__ import annotations

import asyncio

import faiss
import grpc
import numpy as np

from common.artifacts import ArtifactSet, open_artifacts
from common.components import load_retriever
from common.config import RetrievalConfig, parse_config
from common.faiss_index import resolve_faiss_gpu
from common.metrics import ARTIFACT_INFO, CANDIDATES, INDEX_ITEMS, STAGE_LATENCY
from common.server import observed, serve
from common.versions import VersionSet, apply_item_update, version_or_abort, watch_versions
from common.wire import candidates_to_proto, check_indices
from core.channel_names import MERGED
from core.limits import MAX_RETRIEVE_CANDIDATES, MAX_RETRIEVE_EXCLUDE, MAX_RETRIEVE_HISTORY
from core.retriever import Retriever
from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc

SERVICE = "retrieval"


def validate(request: pb.RetrieveRequest, n_items: int) -> str | None:
    """An INVALID_ARGUMENT message naming the field and the limit, or None."""
    error = (check_indices("history", np.array(request.history, np.int64), n_items, MAX_RETRIEVE_HISTORY)
             or check_indices("exclude", np.array(request.exclude, np.int64), n_items, MAX_RETRIEVE_EXCLUDE))
    if not error and not 0 <= request.num_candidates <= MAX_RETRIEVE_CANDIDATES:
        error = f"num_candidates: must be in 0..{MAX_RETRIEVE_CANDIDATES} (0 = default)"
    if not error and any(q < 0 for q in request.quotas.values()):
        error = "quotas: must be >= 0"
    return error


class RetrievalServicer(pb_grpc.RetrievalServicer):
    def __init__(self, versions: VersionSet[Retriever], default_candidates: int) -> None:
        self.versions = versions
        self.default_candidates = default_candidates

    @observed(SERVICE, "Retrieve")
    async def Retrieve(self, request: pb.RetrieveRequest, context: grpc.aio.ServicerContext) -> pb.RetrieveResponse:
        retriever = await version_or_abort(self.versions, request.artifact_version, context)
        error = validate(request, retriever.online.total)
        if error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
        result = retriever.retrieve(request.user_id, np.array(request.history, np.int64),
                                    np.array(request.exclude, np.int64),
                                    request.num_candidates or self.default_candidates, dict(request.quotas))
        observe(result)
        c = result.candidates
        return pb.RetrieveResponse(candidates=candidates_to_proto(c.items, c.columns),
                                   index_version=retriever.version,
                                   skipped_channels=result.skipped, stage_ms=result.stage_ms)

    @observed(SERVICE, "UpdateItems")
    async def UpdateItems(self, request: pb.ItemUpdate, context: grpc.aio.ServicerContext) -> pb.ItemUpdateResponse:
        retriever, held = await apply_item_update(self.versions, request, context)
        INDEX_ITEMS.labels("text").set(retriever.index_sizes["text"])
        return pb.ItemUpdateResponse(online_items=held)


def observe(result) -> None:
    """Stage latencies and candidate counts of one retrieval into the metrics."""
    for stage, ms in result.stage_ms.items():
        STAGE_LATENCY.labels(SERVICE, stage).observe(ms / 1000.0)
    for channel, count in result.candidates.per_channel.items():
        CANDIDATES.labels(channel).observe(count)
    CANDIDATES.labels(MERGED).observe(len(result.candidates.items))


async def run(config: RetrievalConfig) -> None:
    faiss.omp_set_num_threads(config.faiss_threads)
    gpu = resolve_faiss_gpu(config.faiss_gpu)   # faiss_gpu=on without a GPU stops here
    versions: VersionSet[Retriever] = VersionSet()

    async def load(artifacts: ArtifactSet) -> None:
        retriever = await asyncio.to_thread(load_retriever, artifacts, gpu)
        versions.add(retriever.version, retriever)
        ARTIFACT_INFO.clear()
        ARTIFACT_INFO.labels(SERVICE, retriever.version).set(1)
        for name, size in retriever.index_sizes.items():
            INDEX_ITEMS.labels(name).set(size)

    await load(open_artifacts(config.artifacts))
    servicer = RetrievalServicer(versions, config.candidates)
    watcher = asyncio.create_task(watch_versions(config.artifacts, versions.newest, load))
    await serve(config, [pb.DESCRIPTOR.services_by_name["Retrieval"].full_name],
                lambda server: pb_grpc.add_RetrievalServicer_to_server(servicer, server))
    watcher.cancel()


def main() -> None:
    asyncio.run(run(parse_config(RetrievalConfig, description="FusionRec retrieval service")))


if __name__ == "__main__":
    main()
