"""The gateway with retrieval and ranking in its own process: `python -m tools.colocated`.

Three processes pay three gRPC servers and two client hops per Recommend before any work is done
(README "One process or three"). Colocated, the gateway opens both services in its own event loop
(their `open_service`: the same servicers, item-log followers, version watchers and Triton clients
as in their own processes) and calls them through common.local_service stubs: the same messages,
status codes and degradation, no serialization, TLS or second server. Triton stays its own
process. What changes for operators: one pod per replica, scaled as a whole; this process holds the
ranking service's Triton model-control secret; retrieval and ranking have no ports, health or
admission limits of their own (the gateway's guard the call that came in).

It lives in tools/ because it joins three services (a service never imports another).
"""
from __future__ import annotations

import asyncio

from common.config import ColocatedConfig, RankingConfig, RetrievalConfig, parse_config
from common.local_service import LocalService
from common.replicas import ReplicaStatus, StatusStubFactory
from gateway import server as gateway_server
from gateway.replica_monitor import ReplicaService
from protos import fusionrec_pb2 as pb
from ranking import server as ranking_server
from retrieval import server as retrieval_server

LOCAL_TARGET = "in-process:"   # the replica monitor's target of a colocated service


def service_configs(config: ColocatedConfig) -> tuple[RetrievalConfig, RankingConfig]:
    """The services' configs: what they share with the gateway from its flags, the rest their
    defaults or FUSIONREC_* environment variables, as in their own processes."""
    argv = ["--port", str(config.port), "--artifacts", str(config.artifacts), "--item-log", config.item_log,
            "--triton-url", config.triton_url]
    if config.insecure_dev:
        argv.append("--insecure-dev")
    for name in ("tls_ca", "tls_cert", "tls_key", "otlp_endpoint"):
        if getattr(config, name):
            argv += [f"--{name.replace('_', '-')}", str(getattr(config, name))]
    secret = ["--triton-admin-secret-file", config.triton_admin_secret_file] if config.triton_admin_secret_file else []
    return parse_config(RetrievalConfig, argv), parse_config(RankingConfig, argv + secret)


def colocated_backends(config: ColocatedConfig) -> gateway_server.Backends:
    """Both services opened in this event loop, as the gateway's backends."""
    retrieval_config, ranking_config = service_configs(config)
    services = [retrieval_server.open_service(retrieval_config), ranking_server.open_service(ranking_config)]

    async def probe(target: str, _: StatusStubFactory, timeout_s: float) -> list[ReplicaStatus]:
        """The replica monitor's probe of an in-process service: one replica, always reachable."""
        service = next(s for s in services if LOCAL_TARGET + s.name == target)
        status = await service.stub.Status(pb.StatusRequest(), timeout=timeout_s)
        return [ReplicaStatus.answered(target, status)]

    async def start() -> None:   # both loaded and replayed (what their SERVING means), in parallel
        await asyncio.gather(*(s.start() for s in services))

    async def close() -> None:
        await asyncio.gather(*(s.close() for s in services), return_exceptions=True)

    retrieval, ranking = services
    return gateway_server.Backends(retrieval.stub, ranking.stub, [replica_of(s) for s in services],
                                   probe=probe, start=start, close=close)


def replica_of(service: LocalService) -> ReplicaService:
    return ReplicaService(service.name, LOCAL_TARGET + service.name, lambda channel: None)


def main() -> None:
    gateway_server.main(ColocatedConfig, colocated_backends,
                        "FusionRec gateway with retrieval and ranking in its process (public Recommender API)")


if __name__ == "__main__":
    main()
