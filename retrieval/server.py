"""Retrieval gRPC service (thin): proto in, core.Retriever (declared steps: channels, merge), proto out.

Every loaded version follows the item log (common/followed_versions.py): it replays the log before
it is offered, the first one before the service reports SERVING, and a background task tails it.
"""
from __future__ import annotations

import asyncio

import faiss
import grpc
import numpy as np
from tritonclient.grpc.aio import InferenceServerClient

from common.artifacts import ArtifactSet, open_artifacts
from common.client import triton_channel_args
from common.components import load_retriever
from common.config import RetrievalConfig, parse_config
from common.faiss_index import resolve_faiss_gpu
from common.followed_versions import catch_up, offer_followed, service_status, tail
from common.item_follower import ItemLogFollower
from common.item_log import open_item_log
from common.local_service import LocalService
from common.metrics import CANDIDATES, INDEX_ITEMS, STAGE_LATENCY, UNKNOWN_ITEMS, set_artifact_info
from common.server import observed, serve_service
from common.security import process_security
from common.versions import VersionSet, version_or_abort, watch_versions
from common.wire import candidates_to_proto, known_indices, reasons_to_proto
from core.channel_names import MERGED
from core.features import SEQ_ENCODER_NAME
from core.limits import MAX_RETRIEVE_CANDIDATES, MAX_RETRIEVE_EXCLUDE, MAX_RETRIEVE_HISTORY, MAX_USER_ID
from core.reasons import DegradedReason
from core.retriever import Retriever
from core.text_rules import VERSION_FORM, plain_error
from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc
from retrieval.seq_encoder import SeqEncoderClient

SERVICE = "retrieval"


def validate(request: pb.RetrieveRequest, known: int) -> tuple[np.ndarray, np.ndarray, str | None]:
    """(history, exclude) without the indices this replica does not know yet (counted), and an
    INVALID_ARGUMENT message naming the field and the limit, or None."""
    fields = {}
    for name, values, limit in (("history", request.history, MAX_RETRIEVE_HISTORY),
                                ("exclude", request.exclude, MAX_RETRIEVE_EXCLUDE)):
        ids = np.array(values, np.int64)
        kept, error = known_indices(name, ids, known, limit)
        if error:
            return ids, ids, error
        if len(kept) < len(ids):
            UNKNOWN_ITEMS.labels(SERVICE, name).inc(len(ids) - len(kept))
        fields[name] = kept
    error = None
    if not 0 <= request.num_candidates <= MAX_RETRIEVE_CANDIDATES:
        error = f"num_candidates: must be in 0..{MAX_RETRIEVE_CANDIDATES} (0 = default)"
    elif any(q < 0 for q in request.quotas.values()):
        error = "quotas: must be >= 0"
    elif any(q > MAX_RETRIEVE_CANDIDATES for q in request.quotas.values()):   # each channel fetches its quota
        error = f"quotas: each must be <= {MAX_RETRIEVE_CANDIDATES}"
    return fields["history"], fields["exclude"], error


def strings_error(request: pb.RetrieveRequest) -> str | None:
    """The request's strings, checked before anything uses them (the CF lookup, the version
    lookup, metric labels): an INVALID_ARGUMENT message naming the field, or None."""
    if len(request.user_id) > MAX_USER_ID:
        return f"user_id: {len(request.user_id)} characters exceeds the limit of {MAX_USER_ID}"
    if not VERSION_FORM.fullmatch(request.artifact_version):
        return "artifact_version: must be empty or 1..20 decimal digits"
    return plain_error("user_id", request.user_id)


class RetrievalServicer(pb_grpc.RetrievalServicer):
    def __init__(self, versions: VersionSet[Retriever], follower: ItemLogFollower, default_candidates: int,
                 seq_encoder: SeqEncoderClient | None = None) -> None:
        self.versions = versions
        self.follower = follower
        self.default_candidates = default_candidates
        self.seq_encoder = seq_encoder   # the sequential channel's query vector (Triton); None: no such call

    @observed(SERVICE, "Retrieve")
    async def Retrieve(self, request: pb.RetrieveRequest, context: grpc.aio.ServicerContext) -> pb.RetrieveResponse:
        error = strings_error(request)
        if error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
        if request.min_item_log_seq > self.follower.applied_seq:   # read the caller's writes first
            await catch_up(self.follower, request.min_item_log_seq, context.time_remaining())
        retriever = await version_or_abort(self.versions, request.artifact_version, context)
        history, exclude, error = validate(request, retriever.total)
        if error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
        # Before the channels: the sequential channel's vector from Triton (failure -> {} and the
        # channel is skipped), within a bounded share of the remaining deadline.
        encoded, seq_ms = ({}, None) if self.seq_encoder is None else \
            await self.seq_encoder.encoded(retriever.version, history, context.time_remaining())
        result = await retriever.retrieve_yielding(request.user_id, history, exclude,
                                                   request.num_candidates or self.default_candidates,
                                                   dict(request.quotas), encoded=encoded)
        if seq_ms is not None:
            result.stage_ms[SEQ_ENCODER_NAME] = seq_ms
        # A version with an encoder whose call failed: the answer lacks a channel it should have.
        failed = self.seq_encoder is not None and self.seq_encoder.missing(retriever.version, encoded)
        observe(result)
        c = result.candidates
        return pb.RetrieveResponse(candidates=candidates_to_proto(c.items, c.columns),
                                   index_version=retriever.version,
                                   skipped_channels=result.skipped, stage_ms=result.stage_ms,
                                   reasons=reasons_to_proto([DegradedReason.SEQUENTIAL_UNAVAILABLE] if failed else []))

    @observed(SERVICE, "Status")
    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.ServiceStatus:
        return service_status(self.versions, self.follower)


def observe(result) -> None:
    """Stage latencies and candidate counts of one retrieval into the metrics."""
    for stage, ms in result.stage_ms.items():
        STAGE_LATENCY.labels(SERVICE, stage).observe(ms / 1000.0)
    for channel, count in result.candidates.per_channel.items():
        CANDIDATES.labels(channel).observe(count)
    CANDIDATES.labels(MERGED).observe(len(result.candidates.items))


def follow(retriever: Retriever):
    """The retriever's item-log apply function, keeping the index-size gauge current."""
    def apply(records) -> None:
        retriever.apply(records)
        INDEX_ITEMS.labels("text").set(retriever.index_sizes["text"])
    return apply


def open_service(config: RetrievalConfig) -> LocalService:
    """The retrieval service without its server (called inside the running event loop): the
    servicer, its start (the first version replayed, then tail and watch) and close. Its own
    process serves it (run); a colocated gateway calls it in process (tools/colocated.py)."""
    security = process_security(config)   # no TLS files and no --insecure-dev: fails at once, naming the flags
    if not 0 < config.triton_deadline_share <= 1:
        raise SystemExit(f"--triton-deadline-share must be in (0, 1], got {config.triton_deadline_share}")
    # Triton (seq_encoder) over mTLS with this process's cert; the asyncio client must be made in the loop.
    triton = InferenceServerClient(config.triton_url, **security.triton_client_kwargs(),
                                   channel_args=triton_channel_args()) if config.triton_url else None
    seq_encoder = SeqEncoderClient(triton, config.triton_timeout_ms / 1000.0, config.triton_deadline_share)
    faiss.omp_set_num_threads(config.faiss_threads)
    gpu = resolve_faiss_gpu(config.faiss_gpu)   # faiss_gpu=on without a GPU stops here
    item_log = open_item_log(config.item_log)
    follower = ItemLogFollower(item_log)
    versions: VersionSet[Retriever] = VersionSet()
    tasks: list[asyncio.Task] = []

    async def load(artifacts: ArtifactSet) -> None:
        retriever = await asyncio.to_thread(load_retriever, artifacts, gpu)
        if SEQ_ENCODER_NAME in artifacts.manifest["models"]:   # before it is offered: its first call has it
            seq_encoder.versions[retriever.version] = str(artifacts.manifest["models"][SEQ_ENCODER_NAME])
            await seq_encoder.warm_up(retriever.version, retriever.n_items)
        await offer_followed(versions, follower, retriever.version, retriever, follow(retriever),
                             retriever.overlay.folded_seq)
        set_artifact_info(SERVICE, retriever.version)
        for name, size in retriever.index_sizes.items():
            INDEX_ITEMS.labels(name).set(size)

    first = open_artifacts(config.artifacts)   # a bad set fails here, before the port is bound

    async def start() -> None:   # health says SERVING once this returns: after the replay
        await load(first)
        tasks.append(asyncio.create_task(tail(follower)))
        tasks.append(asyncio.create_task(watch_versions(config.artifacts, versions.newest, load)))

    async def close() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if triton is not None:
            await triton.close()
        await item_log.close()

    servicer = RetrievalServicer(versions, follower, config.candidates, seq_encoder)
    return LocalService(SERVICE, servicer, start, close)


async def run(config: RetrievalConfig) -> None:
    await serve_service(config, open_service(config), pb.DESCRIPTOR.services_by_name["Retrieval"].full_name,
                        pb_grpc.add_RetrievalServicer_to_server)


def main() -> None:
    asyncio.run(run(parse_config(RetrievalConfig, description="FusionRec retrieval service")))


if __name__ == "__main__":
    main()
