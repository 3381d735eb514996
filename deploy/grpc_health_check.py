"""Exit 0 when a gRPC server answers SERVING on grpc.health.v1 (compose healthcheck, k8s exec probe).

    python deploy/grpc_health_check.py 127.0.0.1:50051 [service] [--ca F --cert F --key F]

TLS (mTLS) when --ca/--cert/--key are given, or FUSIONREC_TLS_CA / FUSIONREC_TLS_CERT /
FUSIONREC_TLS_KEY are set (the service's own environment: a probe inside its container uses the
service's cert); plaintext otherwise (a service run with --insecure-dev).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _channel(address: str, ca: str, cert: str, key: str) -> grpc.Channel:
    if not (ca and cert and key):
        return grpc.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes(),
                                               private_key=Path(key).read_bytes(),
                                               certificate_chain=Path(cert).read_bytes())
    return grpc.secure_channel(address, credentials)


def check(address: str, service: str = "", timeout_s: float = 2.0,
          ca: str = "", cert: str = "", key: str = "") -> bool:
    with _channel(address, ca, cert, key) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="gRPC health check (exit 0 = SERVING)")
    p.add_argument("address")
    p.add_argument("service", nargs="?", default="")
    p.add_argument("--ca", default=os.environ.get("FUSIONREC_TLS_CA", ""))
    p.add_argument("--cert", default=os.environ.get("FUSIONREC_TLS_CERT", ""))
    p.add_argument("--key", default=os.environ.get("FUSIONREC_TLS_KEY", ""))
    p.add_argument("--timeout-s", type=float, default=2.0)
    a = p.parse_args(argv)
    return 0 if check(a.address, a.service, a.timeout_s, a.ca, a.cert, a.key) else 1


if __name__ == "__main__":
    sys.exit(main())
