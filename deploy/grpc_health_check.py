"""Exit 0 when a gRPC server answers SERVING on grpc.health.v1 (compose healthcheck).

    python deploy/grpc_health_check.py 127.0.0.1:50051 [service]
Kubernetes does not need this: its probes speak the gRPC health protocol natively.
"""
from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout_s: float = 2.0) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: grpc_health_check.py HOST:PORT [SERVICE]")
    sys.exit(0 if check(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else "") else 1)
