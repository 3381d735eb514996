"""W3C trace context across the hops (caller -> gateway -> retrieval / ranking -> Triton) with
OpenTelemetry, and the request id every log line carries (issue 13).

Server side, `server_interceptor` (outermost in common.server.standard_interceptors): reads
`traceparent` / `tracestate` and `x-request-id` from the incoming metadata, runs the handler
inside a SERVER span named after the method (a child of the caller's span, or the root of a new
trace when there is none or it does not parse), and binds the request id for common.logs: the
request message's own `request_id` field (RecommendRequest's, which the gateway echoes), else
the caller's `x-request-id`, when it is a sane token (letters, digits, `._:-`, at most
MAX_REQUEST_ID), else the trace id. Client side, `client_interceptors` (every aio channel from
common.client.open_channel) and `outgoing_headers` (ranking's Triton calls) write the current
span and the request id into the outgoing metadata: every hop logs the same id and continues the
same trace.

Every call gets a span of its own (a new span id under the caller's, or a new trace), so the ids
that propagate are the same whether or not spans are exported. Export is off by default: with an
OTLP endpoint (`--otlp-endpoint`) the SDK records each span and a BatchSpanProcessor sends them
from a background thread; without one the span is an OpenTelemetry NonRecordingSpan holding just
the new ids (the SDK's recording span costs ~10x more, for nothing when nobody collects it). The
caller's sampling flag is kept and passed on; a new trace is sampled, as the SDK's default.
Health checks and reflection are not traced (probes would drown the traces).
"""
from __future__ import annotations

import asyncio
import inspect
import random
import re
from typing import Any, Callable

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from common.logs import bind_request, current_request, unbind_request
from core.limits import MAX_REQUEST_ID

REQUEST_ID_HEADER = "x-request-id"
TRACE_HEADERS = ("traceparent", "tracestate")
PROPAGATOR = TraceContextTextMapPropagator()
# Version 00, the only one defined, is parsed here (a fraction of the reference parser's cost);
# anything else goes to the reference parser, which also knows the rules for later versions.
_TRACEPARENT_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
# A tracestate list member (W3C): checked first, because OpenTelemetry's parser logs a warning
# with the caller's text for each bad member: a malformed tracestate is dropped, silently.
_TRACESTATE_MEMBER = re.compile(r"[a-z0-9][a-z0-9_\-*/]{0,255}(?:@[a-z][a-z0-9_\-*/]{0,13})?"
                                r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
_SANE_ID = re.compile(rf"[A-Za-z0-9._:\-]{{1,{MAX_REQUEST_ID}}}")
_UNTRACED_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
# Server span status: these codes are the server's fault (OpenTelemetry's gRPC conventions);
# INVALID_ARGUMENT, NOT_FOUND, ... are the caller's and leave the span unset.
_SERVER_ERRORS = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL,
                            grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS})

_providers: dict[str, TracerProvider] = {}
_exporting: dict[str, str] = {}


def tracer_provider(service: str, otlp_endpoint: str = "") -> TracerProvider:
    """The service's provider (one per service name, so in-process tests keep services apart);
    the first call with an endpoint attaches the OTLP exporter."""
    provider = _providers.get(service)
    if provider is None:
        provider = _providers[service] = TracerProvider(
            resource=Resource.create({"service.name": f"fusionrec-{service or 'service'}"}))
    if otlp_endpoint and service not in _exporting:
        # Imported only when used: the exporter pulls in its own gRPC stubs.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        add_span_processor(service, BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)), otlp_endpoint)
    return provider


def add_span_processor(service: str, processor: Any, where: str = "processor") -> None:
    """Record the service's spans and hand them to processor (the OTLP exporter; tests: memory)."""
    tracer_provider(service).add_span_processor(processor)
    _exporting[service] = where


def remote_parent(carrier: dict[str, str]) -> SpanContext | None:
    """The caller's span from traceparent/tracestate; None when absent or malformed (all-zero
    ids, wrong lengths, unknown characters): the call then starts a new trace."""
    match = _TRACEPARENT_00.fullmatch(carrier.get("traceparent", ""))
    if match is None:
        if "traceparent" not in carrier:
            return None
        parent = trace.get_current_span(PROPAGATOR.extract(carrier)).get_span_context()
        return parent if parent.is_valid else None
    trace_id, span_id = int(match[1], 16), int(match[2], 16)
    if not trace_id or not span_id:
        return None
    state = _trace_state(carrier["tracestate"]) if "tracestate" in carrier else None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(match[3], 16)),
                       trace_state=state)


def _trace_state(header: str) -> TraceState | None:
    members = [m.strip(" \t") for m in header.split(",")]
    if not all(_TRACESTATE_MEMBER.fullmatch(m) for m in members if m):
        return None
    return TraceState.from_header([header])


def _unrecorded_span(parent: SpanContext | None) -> trace.Span:
    """A new span id under the parent's (or a new sampled trace), recording nothing."""
    if parent is not None:
        trace_id, flags, state = parent.trace_id, parent.trace_flags, parent.trace_state
    else:
        trace_id, flags, state = random.getrandbits(128) or 1, TraceFlags(TraceFlags.SAMPLED), None
    return NonRecordingSpan(SpanContext(trace_id, random.getrandbits(64) or 1, is_remote=False,
                                        trace_flags=flags, trace_state=state))


def sane_request_id(value: Any) -> str:
    """value when it is a short token safe to log and echo, else ''."""
    return value if isinstance(value, str) and _SANE_ID.fullmatch(value) else ""


def trace_id_of(span: trace.Span) -> str:
    return format(span.get_span_context().trace_id, "032x")


def outgoing_headers() -> dict[str, str] | None:
    """traceparent / tracestate of the current span and x-request-id, for a call made outside our
    channels (Triton's client); None when there is neither. x-request-id is left out when the id
    is the trace id (the next hop derives the same id from traceparent): metadata has a cost per
    call in gRPC."""
    headers: dict[str, str] = {}
    PROPAGATOR.inject(headers)
    request = current_request()
    if request is not None and request[0] != headers.get("traceparent", "")[3:35]:
        headers[REQUEST_ID_HEADER] = request[0]
    return headers or None


class _Traced:
    """One server call's span, OpenTelemetry context and request id: entered before the handler
    runs, left after it (however it ends)."""
    __slots__ = ("span", "_context_token", "_request_token")

    def __init__(self, tracer: trace.Tracer | None, name: str, attributes: dict[str, str],
                 metadata: Any, request: Any) -> None:
        carrier: dict[str, str] = {}
        request_id = ""
        for key, value in metadata or ():
            if key in TRACE_HEADERS:
                carrier[key] = value
            elif key == REQUEST_ID_HEADER:
                request_id = sane_request_id(value)
        # The message's own id first: it is the one the gateway echoes in its response.
        request_id = sane_request_id(getattr(request, "request_id", "")) or request_id
        parent = remote_parent(carrier) if carrier else None
        if tracer is None:
            self.span = _unrecorded_span(parent)
        else:
            self.span = tracer.start_span(name, kind=SpanKind.SERVER, attributes=attributes,
                                          context=trace.set_span_in_context(NonRecordingSpan(parent)) if parent else None)
        trace_id = trace_id_of(self.span)
        request_id = request_id or trace_id
        if self.span.is_recording():
            self.span.set_attribute("fusionrec.request_id", request_id)
        self._context_token = otel_context.attach(trace.set_span_in_context(self.span))
        self._request_token = bind_request(request_id, trace_id)

    def close(self, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
        try:
            if self.span.is_recording():
                code = _code_of(context, error)
                self.span.set_attribute("rpc.grpc.status_code", code.value[0])
                if code in _SERVER_ERRORS:
                    self.span.set_status(Status(StatusCode.ERROR, code.name))
            self.span.end()
        finally:
            unbind_request(self._request_token)
            otel_context.detach(self._context_token)


def _code_of(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    try:
        code = context.code()
    except Exception:   # a context that does not track codes
        code = None
    if isinstance(code, grpc.StatusCode):
        return code
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """A SERVER span + the request id around every call's handler (see the module docstring)."""

    def __init__(self, service: str, tracer: trace.Tracer) -> None:
        self.service = service
        self.tracer = tracer
        self._names: dict[str, tuple[str, dict[str, str]]] = {}

    def _name(self, method: str) -> tuple[str, dict[str, str]]:
        named = self._names.get(method)
        if named is None:
            service, _, rpc = method.lstrip("/").rpartition("/")
            named = self._names[method] = (method.lstrip("/"), {"rpc.system": "grpc", "rpc.service": service,
                                                                 "rpc.method": rpc})
        return named

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_UNTRACED_PREFIXES):
            return handler
        name, attributes = self._name(details.method)
        metadata = details.invocation_metadata
        tracer = self.tracer if self.service in _exporting else None   # None: ids only, no recording
        for kind in _HANDLER_KINDS:
            behavior = getattr(handler, kind)
            if behavior is None:
                continue
            if inspect.isasyncgenfunction(behavior):
                async def streamed(request: Any, context: grpc.aio.ServicerContext, behavior=behavior) -> Any:
                    traced = _Traced(tracer, name, attributes, metadata, request)
                    error = None
                    try:
                        async for response in behavior(request, context):
                            yield response
                    except BaseException as e:
                        error = e
                        raise
                    finally:
                        traced.close(context, error)
                wrapped: Callable = streamed
            elif inspect.iscoroutinefunction(behavior):
                async def awaited(request: Any, context: grpc.aio.ServicerContext, behavior=behavior) -> Any:
                    traced = _Traced(tracer, name, attributes, metadata, request)
                    error = None
                    try:
                        return await behavior(request, context)
                    except BaseException as e:
                        error = e
                        raise
                    finally:
                        traced.close(context, error)
                wrapped = awaited
            else:
                return handler   # a synchronous handler runs on a thread: left as it is
            return handler._replace(**{kind: wrapped})   # grpc's handlers are namedtuples
        return handler


_HANDLER_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def server_interceptor(config: Any, service: str) -> TracingInterceptor:
    """The tracing interceptor of one service; config.otlp_endpoint (ServerConfig) turns export on."""
    provider = tracer_provider(service, getattr(config, "otlp_endpoint", "") or "")
    return TracingInterceptor(service, provider.get_tracer("fusionrec.grpc"))


def _with_trace_metadata(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    headers = outgoing_headers()
    if headers is None:
        return details
    kept = [(k, v) for k, v in details.metadata if k not in headers] if details.metadata else ()
    return details._replace(metadata=grpc.aio.Metadata(*kept, *headers.items()))


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[override]
        return await continuation(_with_trace_metadata(details), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):  # type: ignore[override]
        return await continuation(_with_trace_metadata(details), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):  # type: ignore[override]
        return await continuation(_with_trace_metadata(details), request_iterator)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):  # type: ignore[override]
        return await continuation(_with_trace_metadata(details), request_iterator)


def client_interceptors() -> list[Any]:
    """One per call kind: grpc.aio files an interceptor under the first kind it subclasses."""
    return [_UnaryUnary(), _UnaryStream(), _StreamUnary(), _StreamStream()]
