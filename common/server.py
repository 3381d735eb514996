"""Server bootstrap shared by the three services: grpc.aio server, health, reflection, metrics,
per-method request metrics, and a graceful stop on SIGTERM/SIGINT.
"""
from __future__ import annotations

import asyncio
import functools
import signal
import time
from typing import Any, Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common import tracing
from common.admission import admission_interceptors
from common.gc_pauses import freeze_loaded, watch_pauses
from common.config import ServerConfig
from common.local_service import LocalService
from common.logs import get_logger
from common.metrics import GRPC_LATENCY, GRPC_REQUESTS, start_metrics_server
from common.security import add_port, process_security
from common.strict_decode import StrictDecodeInterceptor

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
log = get_logger("server")


def observed(service: str, method: str) -> Callable:
    """Record request count and latency by status code; turn unexpected errors into INTERNAL."""
    def wrap(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(fn)
        async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            code = "OK"
            try:
                return await fn(self, request, context)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except grpc.aio.AbortError:
                code = context.code().name if context.code() else "UNKNOWN"
                raise
            except Exception:
                code = "INTERNAL"
                log.exception("unhandled error", extra={"service": service, "method": method})
                await context.abort(grpc.StatusCode.INTERNAL, f"{method}: internal error")
            finally:
                elapsed = time.perf_counter() - start
                GRPC_REQUESTS.labels(service, method, code).inc()
                GRPC_LATENCY.labels(service, method, code).observe(elapsed)
        return handler
    return wrap


def standard_interceptors(config: ServerConfig, service: str) -> list[grpc.aio.ServerInterceptor]:
    """What every service runs on every call, outermost first. One line per concern; each
    interceptor lives in its own module under common/."""
    admission = admission_interceptors(config, service)   # [] with --no-admission
    chain: list[grpc.aio.ServerInterceptor] = [a.gate() for a in admission]   # saturated: refused first
    chain.append(tracing.server_interceptor(config, service))   # W3C trace context + request id in logs
    chain.append(StrictDecodeInterceptor(service))   # undecodable requests -> INVALID_ARGUMENT
    chain.extend(admission)   # over the limit -> RESOURCE_EXHAUSTED early (after queue_ms at most)
    return chain


async def serve(config: ServerConfig, service_names: list[str],
                add_servicers: Callable[[grpc.aio.Server], None],
                on_stop: Callable[[], Awaitable[None]] | None = None,
                on_start: Callable[[], Awaitable[None]] | None = None,
                health_servicer: health.aio.HealthServicer | None = None,
                service: str = "", interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> None:
    """Run until SIGTERM/SIGINT: health says NOT_SERVING first, then in-flight calls get grace_s.

    on_start (e.g. the item-log replay) runs once the port is bound, while health says
    NOT_SERVING; the service reports SERVING only after it returns. If it raises, the server
    stops and the error propagates (the process fails at start). health_servicer: a service that
    reports more health names of its own (the gateway's replicas) passes its servicer in.
    service: the metrics/log name of the service; interceptors: the service's own (the gateway's
    token check), run inside the standard ones."""
    watch_pauses()
    server = grpc.aio.server(interceptors=[*standard_interceptors(config, service), *interceptors],
                             options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.so_reuseport", 0)])
    add_servicers(server)
    health_servicer = health_servicer or health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server)
    address = f"{config.host}:{config.port}"
    # TLS (mTLS for internal services: only service-CA certs may call them); plaintext only with
    # --insecure-dev. The gateway (service "gateway") is the public port: client certs optional.
    add_port(server, address, process_security(config), require_client_auth=service != "gateway")
    if config.metrics_port:
        start_metrics_server(config.metrics_port, config.host)
    names = ["", *service_names]
    for name in names:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if on_start is not None and not await _started(on_start, stop):
            log.info("stopped before it was ready")
        else:
            freeze_loaded()   # the first version's objects are never walked by a full collection
            for name in names:
                await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
            log.info("serving", extra={"address": address, "services": service_names,
                                       "metrics_port": config.metrics_port})
            await stop.wait()
            log.info("stopping", extra={"grace_s": config.grace_s})
            for name in names:
                await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await server.stop(config.grace_s)
        if on_stop is not None:
            await on_stop()


async def serve_service(config: ServerConfig, service: LocalService, full_name: str,
                        add_servicer: Callable[[Any, grpc.aio.Server], None]) -> None:
    """A service opened by its `open_service`, served on its own port until SIGTERM, then closed."""
    try:
        await serve(config, [full_name], lambda server: add_servicer(service.servicer, server),
                    on_start=service.start, service=service.name)
    finally:
        await service.close()


async def _started(on_start: Callable[[], Awaitable[None]], stop: asyncio.Event) -> bool:
    """Run on_start unless a stop signal comes first; True when it finished."""
    starting = asyncio.ensure_future(on_start())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not starting.done():
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        return False
    starting.result()   # raises what on_start raised
    return True
