"""`fusionrec bench-hop`: what one bare gRPC hop costs on this machine, the floor under every Recommend.

A Recommend crosses three Python grpc.aio hops (client -> gateway, gateway -> retrieval, gateway ->
ranking) and one to Triton. This measures a unary echo with no work in the handler, one call in
flight at a time (as at 50 rps), in plaintext and with mTLS (the services' certificates, made in
a scratch folder): CPU core-ms per call in the server process (its poller thread included) and in
the client, and the wall time per call. The server runs in a child process started before this
process opens any gRPC channel. Prints the figures and writes them to --out; asserts nothing.

    fusionrec bench-hop                     # 3,000 calls per mode, ~7 KB payload (a RetrieveResponse)
    fusionrec bench-hop --calls 10000 --payload-bytes 300
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from common.pki import Pki, ensure_pki
from tools.bench import cpu_seconds
from tools.stack import free_port

METHOD = "/fusionrec.bench.Echo/Echo"
SERVER_CERT, CLIENT_CERT = "retrieval", "gateway"   # a service's certificate each, as between services
WARMUP_CALLS = 200


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calls", type=int, default=3000, help="measured calls per mode (default: %(default)s)")
    p.add_argument("--payload-bytes", type=int, default=7000,
                   help="request and response size (default: %(default)s, about a RetrieveResponse of 300 candidates)")
    p.add_argument("--out", type=Path, default=Path("reports/bench/hop.json"))
    p.add_argument("--serve", nargs=3, metavar=("PORT", "MODE", "PKI"), help=argparse.SUPPRESS)   # the child


def run(args: argparse.Namespace) -> int:
    if args.serve:
        port, mode, pki = args.serve
        asyncio.run(_serve(int(port), mode == "tls", Pki(Path(pki))))
        return 0
    if args.calls <= 0 or args.payload_bytes < 0:
        raise SystemExit("--calls must be > 0 and --payload-bytes >= 0")
    with tempfile.TemporaryDirectory(prefix="fusionrec-hop-") as scratch:
        pki = ensure_pki(Path(scratch) / "pki", ["localhost"])
        rows = [_measure(tls, pki, args.calls, args.payload_bytes) for tls in (False, True)]
    for row in rows:
        print(f"{row['mode']:9s} server {row['server_core_ms']:.3f} core-ms/call, client {row['client_core_ms']:.3f}, "
              f"wall {row['wall_ms']:.3f} ms ({row['calls']} calls, {row['payload_bytes']} B each way)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"written: {args.out}")
    return 0


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _serve(port: int, tls: bool, pki: Pki) -> None:
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(_echo)   # bytes in, bytes out: no proto work
    service, method = METHOD.strip("/").split("/")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {method: handler}),))
    address = f"127.0.0.1:{port}"
    if tls:
        server.add_secure_port(address, grpc.ssl_server_credentials(
            [(pki.key(SERVER_CERT).read_bytes(), pki.cert(SERVER_CERT).read_bytes())],
            root_certificates=pki.service_ca.read_bytes(), require_client_auth=True))
    else:
        server.add_insecure_port(address)
    await server.start()
    await server.wait_for_termination()


def _measure(tls: bool, pki: Pki, calls: int, size: int) -> dict:
    port = free_port()
    child = subprocess.Popen([sys.executable, "-m", "tools.cli", "bench-hop", "--serve", str(port),
                              "tls" if tls else "plain", str(pki.root)])
    try:
        return asyncio.run(_client(child.pid, port, tls, pki, calls, size))
    finally:
        child.terminate()
        child.wait(timeout=10)


async def _client(server_pid: int, port: int, tls: bool, pki: Pki, calls: int, size: int) -> dict:
    if tls:
        channel = grpc.aio.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(
            pki.service_ca.read_bytes(), pki.key(CLIENT_CERT).read_bytes(), pki.cert(CLIENT_CERT).read_bytes()))
    else:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    async with channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=30)
        call = channel.unary_unary(METHOD)
        payload = os.urandom(size)
        for _ in range(WARMUP_CALLS):
            await call(payload, timeout=5)
        server0, client0, wall0 = cpu_seconds(server_pid), time.process_time(), time.perf_counter()
        for _ in range(calls):
            await call(payload, timeout=5)
        server1, client1, wall1 = cpu_seconds(server_pid), time.process_time(), time.perf_counter()
    return {"mode": "mtls" if tls else "plaintext", "calls": calls, "payload_bytes": size,
            "server_core_ms": 1e3 * (server1 - server0) / calls, "client_core_ms": 1e3 * (client1 - client0) / calls,
            "wall_ms": 1e3 * (wall1 - wall0) / calls}
