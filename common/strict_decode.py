"""Undecodable requests -> INVALID_ARGUMENT ("request: not a valid <message>"), on every method of
every service, unary and client-streaming alike.

Without this, grpc.aio answers a DecodeError with UNKNOWN and the exception text on unary methods
("Unexpected <class 'DecodeError'>: ..."), and on a client stream the error surfaces inside the
servicer's `async for`, where it becomes INTERNAL with a logged traceback per request.

How: the method handler's request_deserializer is wrapped so that bytes which do not parse give
a sentinel instead of raising; the behaviour is wrapped so that the sentinel aborts the call with
INVALID_ARGUMENT. On a stream the check happens message by message as the servicer reads: the
messages before the bad one are handled as usual (ReportEvents keeps the earlier batches
applied). Servicers must read streams by iterating (`async for`), not with context.read().
A handler without a deserializer (raw bytes, e.g. a rejection built by an inner interceptor) is
left alone. A warning line names the method, never the bytes; at most one per method per second
(with the number it stands for), so garbage cannot flood the log; the request metric counts all.
"""
from __future__ import annotations

import inspect
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc

from common.logs import get_logger
from common.metrics import GRPC_REQUESTS

log = get_logger("strict_decode")


class _Undecodable:
    """What the wrapped deserializer returns for bytes that are not a valid message."""
    __slots__ = ()

    def __repr__(self) -> str:
        return "<undecodable request>"


UNDECODABLE = _Undecodable()


def message_name(deserializer: Callable[[bytes], Any]) -> str:
    """The proto message a deserializer parses (pb.X.FromString -> 'fusionrec.v1.X')."""
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "") or "request message"


def lenient(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - DecodeError (upb), and anything else a parser raises on bad bytes
            return UNDECODABLE
    return parse


class StrictDecodeInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, service: str, log_every_s: float = 1.0) -> None:
        self.service = service
        # A flood of garbage must not flood the log: one line per method per log_every_s, with
        # the count of the refusals it stands for (the metric counts every one).
        self.log_every_s = log_every_s
        self._logged: dict[str, tuple[float, int]] = {}   # method -> (last line at, refused since)
        # method -> (the inner handler's parts, their wrapped replacements): built once per method,
        # not per call (an inner interceptor hands a fresh namedtuple each call, with the same parts).
        self._wrapped: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parts = (handler.request_deserializer, handler.unary_unary, handler.unary_stream,
                 handler.stream_unary, handler.stream_stream)
        cached = self._wrapped.get(details.method)
        if cached is None or any(a is not b for a, b in zip(cached[0], parts)):
            cached = self._wrapped[details.method] = (parts, self._replacements(details.method, handler))
        return handler._replace(**cached[1])

    def _replacements(self, full_method: str, handler: grpc.RpcMethodHandler) -> dict[str, Any]:
        method = full_method.rsplit("/", 1)[-1]
        reject = self._rejecter(method, message_name(handler.request_deserializer))
        replaced: dict[str, Any] = {"request_deserializer": lenient(handler.request_deserializer)}
        if handler.unary_unary is not None:
            replaced["unary_unary"] = _guard_request(handler.unary_unary, reject)
        elif handler.unary_stream is not None:
            replaced["unary_stream"] = _guard_request(handler.unary_stream, reject)
        elif handler.stream_unary is not None:
            replaced["stream_unary"] = _guard_stream(handler.stream_unary, reject)
        elif handler.stream_stream is not None:
            replaced["stream_stream"] = _guard_stream(handler.stream_stream, reject)
        return replaced

    def _rejecter(self, method: str, name: str) -> Callable[[grpc.aio.ServicerContext, int | None], Awaitable[None]]:
        async def reject(context: grpc.aio.ServicerContext, position: int | None) -> None:
            where = "" if position is None else f" (stream message {position}; the messages before it were handled)"
            self._log(method, position)
            if position is None:   # a unary request never reaches the servicer's own metrics
                GRPC_REQUESTS.labels(self.service, method, "INVALID_ARGUMENT").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid {name}{where}")
        return reject

    def _log(self, method: str, position: int | None) -> None:
        now = time.monotonic()
        last, suppressed = self._logged.get(method, (-1e18, 0))
        if now - last < self.log_every_s:
            self._logged[method] = (last, suppressed + 1)
            return
        self._logged[method] = (now, 0)
        log.warning("undecodable request refused", extra={"service": self.service, "method": method,
                                                          "stream_message": position,
                                                          "suppressed_since_last": suppressed})


def _guard_request(behaviour: Callable, reject: Callable) -> Callable:
    """One request message: refused before the servicer sees it."""
    if inspect.isasyncgenfunction(behaviour):
        async def streamed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if request is UNDECODABLE:
                await reject(context, None)
            async for response in behaviour(request, context):
                yield response
        return streamed

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request is UNDECODABLE:
            await reject(context, None)
        result = behaviour(request, context)
        return await result if inspect.isawaitable(result) else result
    return unary


def _guard_stream(behaviour: Callable, reject: Callable) -> Callable:
    """A client stream: each message is checked as the servicer reads it."""
    async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        position = 0
        async for request in requests:
            if request is UNDECODABLE:
                await reject(context, position)
            yield request
            position += 1

    if inspect.isasyncgenfunction(behaviour):
        async def streamed(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for response in behaviour(checked(requests, context), context):
                yield response
        return streamed

    async def unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        result = behaviour(checked(requests, context), context)
        return await result if inspect.isawaitable(result) else result
    return unary
