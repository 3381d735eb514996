"""Ranking gRPC service (thin): proto in, Ranker.rank, proto out."""
from __future__ import annotations

import asyncio

import grpc
import numpy as np

from common.artifacts import open_artifacts
from common.config import RankingConfig, parse_config
from common.metrics import ARTIFACT_INFO
from common.server import observed, serve
from common.wire import candidates_from_proto, check_indices
from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc
from ranking.ranker import SERVICE, Ranker
from ranking.triton_scorer import TritonScorer

MAX_HISTORY = 1000
MAX_CANDIDATES = 1000
MAX_K = 100
RERANK_RESERVE_S = 0.004   # kept back from the deadline for the re-ranker and the reply


class RankingServicer(pb_grpc.RankingServicer):
    def __init__(self, ranker: Ranker, triton_timeout_s: float) -> None:
        self.ranker = ranker
        self.triton_timeout_s = triton_timeout_s

    @observed(SERVICE, "Rank")
    async def Rank(self, request: pb.RankRequest, context: grpc.aio.ServicerContext) -> pb.RankResponse:
        history = np.array(request.history, np.int64)
        try:
            items, columns = candidates_from_proto(request.candidates)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        n = self.ranker.n_items
        error = (check_indices("history", history, n, MAX_HISTORY)
                 or check_indices("candidates.items", items, n, MAX_CANDIDATES))
        if not error and not 1 <= request.k <= MAX_K:
            error = f"k: must be in 1..{MAX_K}, got {request.k}"
        if error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
        remaining = context.time_remaining()   # huge when the caller set no deadline
        timeout = min(self.triton_timeout_s, (remaining or 1e9) - RERANK_RESERVE_S)
        ranked = await self.ranker.rank(history, items, columns, request.k, timeout)
        return pb.RankResponse(items=ranked.items.tolist(), scores=ranked.scores.tolist(),
                               model_version=self.ranker.model_version,
                               degraded=bool(ranked.degraded_reasons),
                               degraded_reasons=ranked.degraded_reasons, stage_ms=ranked.stage_ms)


async def run(config: RankingConfig) -> None:
    artifacts = open_artifacts(config.artifacts)
    # The asyncio Triton client must be created inside the running event loop.
    scorer = TritonScorer(config.triton_url, str(artifacts.manifest["models"]["fused_ranker"]))
    ranker = Ranker(artifacts, scorer, config.reranker_threads, config.diversity_weight)
    await ranker.warm_up()
    ARTIFACT_INFO.labels(SERVICE, ranker.version).set(1)
    servicer = RankingServicer(ranker, config.triton_timeout_ms / 1000.0)
    await serve(config, [pb.DESCRIPTOR.services_by_name["Ranking"].full_name],
                lambda server: pb_grpc.add_RankingServicer_to_server(servicer, server),
                on_stop=scorer.close)


def main() -> None:
    asyncio.run(run(parse_config(RankingConfig, description="FusionRec ranking service")))

if __name__ == "__main__":
    main()
