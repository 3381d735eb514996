"""Ranking gRPC service (thin): proto in, Ranker.rank, proto out.

Every loaded version follows the item log (common/followed_versions.py), as in retrieval: replayed
before it is offered (the first before SERVING), then tailed in the background.
"""
from __future__ import annotations

import asyncio

import grpc
import numpy as np
from tritonclient.grpc.aio import InferenceServerClient

from common.artifacts import ArtifactSet, open_artifacts
from common.config import RankingConfig, parse_config
from common.followed_versions import catch_up, offer_followed, service_status, tail
from common.item_follower import ItemLogFollower
from common.client import triton_channel_args
from common.item_log import open_item_log
from common.local_service import LocalService
from common.metrics import UNKNOWN_ITEMS, set_artifact_info
from common.server import observed, serve_service
from common.security import process_security, read_secret
from common.triton import admin_headers
from common.versions import VersionSet, version_or_abort, watch_versions
from common.wire import candidates_from_proto, known_indices, reasons_to_proto
from core.features import FUSED_RANKER_NAME, SEQ_ENCODER_NAME, TEXT_ENCODER_NAME
from core.limits import MAX_RANK_CANDIDATES, MAX_RANK_HISTORY, MAX_RANK_K
from core.rerank import SlateExplanation
from core.text_rules import FINITE, VERSION_FORM
from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc
from ranking.ranker import SERVICE, Ranker, log
from ranking.triton_scorer import TritonScorer, ensure_loaded

RERANK_RESERVE_S = 0.004   # kept back from the deadline for the re-ranker and the reply


def known_candidates(items: np.ndarray, columns: dict[str, tuple[np.ndarray, np.ndarray]],
                     known: int) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]], str | None]:
    """Candidates this replica knows, with their channel columns; an INVALID_ARGUMENT message or None."""
    kept, error = known_indices("candidates.items", items, known, MAX_RANK_CANDIDATES)
    if error or len(kept) == len(items):
        return items, columns, error
    UNKNOWN_ITEMS.labels(SERVICE, "candidates").inc(len(items) - len(kept))
    rows = items < known
    return kept, {c: (scores[rows], ranks[rows]) for c, (scores, ranks) in columns.items()}, None


def scores_error(candidates: pb.Candidates,
                 columns: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> str | None:
    """NaN or an infinity in a channel's scores would reach the fused model and the re-ranker as a
    feature (and the slate's order): an INVALID_ARGUMENT message naming the column and entry, or None.
    columns: candidates_from_proto's decoded columns, checked instead of decoding the scores again
    (used only when the channel names are distinct, i.e. one column each)."""
    decoded = columns if columns is not None and len(columns) == len(candidates.channels) else None
    for c, column in enumerate(candidates.channels):
        scores = decoded[column.channel][0] if decoded is not None else np.asarray(column.scores, np.float32)
        bad = np.flatnonzero(~np.isfinite(scores))
        if len(bad):
            return f"candidates.channels[{c}].scores[{bad[0]}]: {FINITE}"
    return None


def explanation_to_proto(explained: SlateExplanation | None) -> pb.RankExplanation:
    """Packed columns aligned with the slate; an empty column = that stage did not run."""
    out = pb.RankExplanation()
    if explained is None:
        return out
    out.fused_scores.extend(explained.fused.tolist())
    if explained.correction is not None and explained.penalty is not None:
        out.corrections.extend(explained.correction.tolist())
        out.penalties.extend(explained.penalty.tolist())
    return out


class RankingServicer(pb_grpc.RankingServicer):
    def __init__(self, versions: VersionSet[Ranker], follower: ItemLogFollower, triton_timeout_s: float) -> None:
        self.versions = versions
        self.follower = follower
        self.triton_timeout_s = triton_timeout_s

    @observed(SERVICE, "Rank")
    async def Rank(self, request: pb.RankRequest, context: grpc.aio.ServicerContext) -> pb.RankResponse:
        if not VERSION_FORM.fullmatch(request.artifact_version):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "artifact_version: must be empty or 1..20 decimal digits")
        if request.min_item_log_seq > self.follower.applied_seq:   # read the caller's writes first
            await catch_up(self.follower, request.min_item_log_seq, context.time_remaining())
        ranker = await version_or_abort(self.versions, request.artifact_version, context)
        try:
            items, columns = candidates_from_proto(request.candidates)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        error = scores_error(request.candidates, columns)
        if error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
        ids = np.array(request.history, np.int64)
        history, error = known_indices("history", ids, ranker.total, MAX_RANK_HISTORY)
        if not error and len(history) < len(ids):
            UNKNOWN_ITEMS.labels(SERVICE, "history").inc(len(ids) - len(history))
        if not error:
            items, columns, error = known_candidates(items, columns, ranker.total)
        if not error and not 1 <= request.k <= MAX_RANK_K:
            error = f"k: must be in 1..{MAX_RANK_K}, got {request.k}"
        if error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
        remaining = context.time_remaining()   # huge when the caller set no deadline
        timeout = min(self.triton_timeout_s, (remaining or 1e9) - RERANK_RESERVE_S)
        ranked = await ranker.rank(history, items, columns, request.k, timeout, request.explain)
        response = pb.RankResponse(items=ranked.items.tolist(), scores=ranked.scores.tolist(),
                                   model_version=ranker.model_version,
                                   degraded=bool(ranked.degraded_reasons),
                                   reasons=reasons_to_proto(ranked.degraded_reasons), stage_ms=ranked.stage_ms)
        if request.explain:
            response.explanation.CopyFrom(explanation_to_proto(ranked.explanation))
        return response

    @observed(SERVICE, "Status")
    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.ServiceStatus:
        return service_status(self.versions, self.follower)


def open_service(config: RankingConfig) -> LocalService:
    """The ranking service without its server (called inside the running event loop): the
    servicer, its start (models loaded, the first version replayed, then tail and watch) and
    close. Its own process serves it (run); a colocated gateway calls it in process."""
    security = process_security(config)   # no TLS files and no --insecure-dev: fails here
    admin = admin_headers(read_secret(config.triton_admin_secret_file)) if config.triton_admin_secret_file else None
    # The asyncio Triton client must be created inside the running event loop.
    triton = InferenceServerClient(config.triton_url, **security.triton_client_kwargs(),
                                    channel_args=triton_channel_args())
    item_log = open_item_log(config.item_log)
    follower = ItemLogFollower(item_log)
    versions: VersionSet[Ranker] = VersionSet()
    tasks: list[asyncio.Task] = []

    seq_versions: dict[str, str] = {}   # artifact version -> its seq_encoder version

    async def ensure_seq_encoder(artifacts: ArtifactSet) -> None:
        """seq_encoder is retrieval's model, loaded here (only ranking holds Triton's model-control
        secret); one that fails to load skips retrieval's sequential channel, not this version."""
        seq = artifacts.manifest["models"].get(SEQ_ENCODER_NAME)
        if seq is None:
            return
        keep = {SEQ_ENCODER_NAME: {seq_versions[v] for v in versions.loaded if v in seq_versions}}
        try:
            await ensure_loaded(triton, {SEQ_ENCODER_NAME: str(seq)}, keep, headers=admin)
            seq_versions[artifacts.version] = str(seq)
        except RuntimeError as e:
            log.warning("seq_encoder not loaded: retrieval skips the sequential channel",
                        extra={"version": artifacts.version, "error": str(e)[:200]})

    async def load(artifacts: ArtifactSet) -> None:
        models = {name: str(v) for name, v in artifacts.manifest["models"].items()
                  if name in (FUSED_RANKER_NAME, TEXT_ENCODER_NAME)}
        serving = {FUSED_RANKER_NAME: {r.model_version for r in versions.loaded.values()},
                   TEXT_ENCODER_NAME: {r.encoder_version for r in versions.loaded.values() if r.encoder_version}}
        await ensure_loaded(triton, models, serving, headers=admin)
        await ensure_seq_encoder(artifacts)
        ranker = await asyncio.to_thread(Ranker, artifacts, TritonScorer(triton, models[FUSED_RANKER_NAME]),
                                         config.reranker_threads, config.diversity_weight, config.fresh_slots)
        await ranker.warm_up()
        await offer_followed(versions, follower, ranker.version, ranker, ranker.apply, ranker.overlay.folded_seq)
        set_artifact_info(SERVICE, ranker.version)

    first = open_artifacts(config.artifacts)   # a bad set fails here, before the port is bound

    async def start() -> None:   # health says SERVING once this returns: after the replay
        await load(first)
        tasks.append(asyncio.create_task(tail(follower)))
        tasks.append(asyncio.create_task(watch_versions(config.artifacts, versions.newest, load)))

    async def close() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await triton.close()
        await item_log.close()

    servicer = RankingServicer(versions, follower, config.triton_timeout_ms / 1000.0)
    return LocalService(SERVICE, servicer, start, close)


async def run(config: RankingConfig) -> None:
    await serve_service(config, open_service(config), pb.DESCRIPTOR.services_by_name["Ranking"].full_name,
                        pb_grpc.add_RankingServicer_to_server)


def main() -> None:
    asyncio.run(run(parse_config(RankingConfig, description="FusionRec ranking service")))


if __name__ == "__main__":
    main()
