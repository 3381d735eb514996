"""The one place service-to-service gRPC channels are opened (gateway -> retrieval/ranking, replica
probes, the operator tools): reconnect backoff short enough that a restarted dependency is used
again within a second, and the interceptors every outgoing call carries."""
from __future__ import annotations

from typing import Any, Sequence

import grpc

from common.security import Security, process_default

MAX_MESSAGE_BYTES = 8 * 1024 * 1024

# gRPC's defaults back off to 120 s between reconnect attempts; a dependency that restarts in
# seconds would stay unused for that long (issue 13: reconnect within 1 s of it returning).
# - max 500 ms: with gRPC's +-20% jitter no wait between attempts exceeds 600 ms, which leaves
#   the handshake and the first call well inside the second (measured: tests/integration/
#   test_supervisor.py); a refused connect on a dead port costs next to nothing;
# - min_reconnect_backoff is C-core's *connect timeout* (a refused connect fails at once and the
#   next attempt follows the backoff): 1 s, so a TLS handshake on a busy machine is not cut off;
# - DNS re-resolution at most every 1 s (default 30 s): a replaced pod's new address is found
#   when the old one fails (dns:/// targets; the k8s headless Services).
RECONNECT_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 1000),
    ("grpc.max_reconnect_backoff_ms", 500),
    ("grpc.dns_min_time_between_resolutions_ms", 1000),
)


def channel_options(extra: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    return [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), *RECONNECT_OPTIONS, *extra]


def triton_channel_args() -> list[tuple[str, Any]]:
    """`channel_args` for tritonclient's InferenceServerClient (ranking, gateway -> Triton): its own
    message limits (2 GiB) and our reconnect backoff; without them tritonclient uses gRPC's
    defaults and a restarted Triton stayed unused for 6.6 s after it was ready (measured)."""
    limit = 2**31 - 1
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit), *RECONNECT_OPTIONS]


def client_interceptors() -> list[Any]:
    """Interceptors on every outgoing aio call (trace context propagation: common/tracing.py)."""
    from common import tracing   # lazy: OpenTelemetry loads with the first channel
    return tracing.client_interceptors()


def tls_name_override(target: str) -> list[tuple[str, Any]]:
    """A multi-address `ipv4:a:p,b:q` target has no single host to check the server cert against:
    check the first address (every replica's cert names it; on loopback, 127.0.0.1)."""
    for scheme in ("ipv4:", "ipv6:"):
        if target.startswith(scheme):
            first = target[len(scheme):].split(",")[0]
            host = first[1:first.index("]")] if first.startswith("[") else first.rsplit(":", 1)[0]
            return [("grpc.ssl_target_name_override", host)]
    return []


def open_channel(target: str, *, options: Sequence[tuple[str, Any]] = (), aio: bool = True,
                 security: Security | None = None, token: str | None = None) -> Any:
    """A channel to one of our services (aio unless aio=False): TLS with this process's cert
    (mTLS) unless security is plaintext (--insecure-dev). token: a bearer token sent on every
    call (`authorization: Bearer ...`, the public API; not sent over plaintext)."""
    security = security or process_default()
    if security is None or security.insecure:
        opts = channel_options(options)
        if aio:
            return grpc.aio.insecure_channel(target, options=opts, interceptors=client_interceptors())
        return grpc.insecure_channel(target, options=opts)
    given = {name for name, _ in options}
    opts = channel_options([*options, *(o for o in tls_name_override(target) if o[0] not in given)])
    credentials = security.channel_credentials()
    if token:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    if aio:
        return grpc.aio.secure_channel(target, credentials, options=opts, interceptors=client_interceptors())
    return grpc.secure_channel(target, credentials, options=opts)
