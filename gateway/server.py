"""Gateway gRPC service (thin): validate, Orchestrator.recommend, proto out."""
from __future__ import annotations

import asyncio
import time

import grpc

from common.artifacts import open_artifacts
from common.config import GatewayConfig, parse_config
from common.metrics import ARTIFACT_INFO
from common.server import observed, serve
from gateway.catalog import Catalog
from gateway.orchestrator import SERVICE, Orchestrator
from gateway.user_state import ArtifactHistoryStore
from gateway.validation import InvalidArgument, validate_recommend
from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc


class RecommenderServicer(pb_grpc.RecommenderServicer):
    def __init__(self, orchestrator: Orchestrator, default_deadline_s: float) -> None:
        self.orchestrator = orchestrator
        self.default_deadline_s = default_deadline_s

    @observed(SERVICE, "Recommend")
    async def Recommend(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext) -> pb.RecommendResponse:
        try:
            query = validate_recommend(request)
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        remaining = context.time_remaining()
        # No deadline from the caller means the gateway's default budget, never "infinite".
        budget = self.default_deadline_s if remaining is None or remaining > 3600 else remaining
        return await self.orchestrator.recommend(query, time.monotonic() + budget)


async def run(config: GatewayConfig) -> None:
    artifacts = open_artifacts(config.artifacts)
    # round_robin spreads calls over every address a dns:/// target resolves to (k8s headless Services).
    options = [("grpc.max_receive_message_length", 8 << 20), ("grpc.lb_policy_name", "round_robin")]
    retrieval_channel = grpc.aio.insecure_channel(config.retrieval_addr, options=options)
    ranking_channel = grpc.aio.insecure_channel(config.ranking_addr, options=options)
    orchestrator = Orchestrator(Catalog(artifacts), ArtifactHistoryStore(artifacts),
                                pb_grpc.RetrievalStub(retrieval_channel), pb_grpc.RankingStub(ranking_channel),
                                config, artifacts.version)
    ARTIFACT_INFO.labels(SERVICE, artifacts.version).set(1)
    servicer = RecommenderServicer(orchestrator, config.default_deadline_ms / 1000.0)

    async def close() -> None:
        await retrieval_channel.close()
        await ranking_channel.close()

    await serve(config, [pb.DESCRIPTOR.services_by_name["Recommender"].full_name],
                lambda server: pb_grpc.add_RecommenderServicer_to_server(servicer, server), on_stop=close)


def main() -> None:
    asyncio.run(run(parse_config(GatewayConfig, description="FusionRec gateway (public Recommender API)")))


if __name__ == "__main__":
    main()
