"""A service run inside another process: its servicer called as a remote stub would call it.

The colocated gateway (`python -m tools.colocated`, README "One process or three") hosts retrieval and
ranking in its own process and event loop. Its pipeline keeps calling them through the stub
interface (`await stub.Retrieve(request, timeout=...)`), so this module gives it an object with
that interface over the servicer: the same request and response messages (not serialized), the
same status codes (an abort reaches the caller as grpc.aio.AioRpcError with the servicer's code
and details), the timeout as the callee's deadline (`context.time_remaining()`) and enforced
(DEADLINE_EXCEEDED, the callee's work cancelled). What the transport did stays out: no bytes, no
TLS, no interceptors (the gateway's own admission gate, tracing and token check guard the call
that came in; the request id and trace context are the caller's, carried by contextvars).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import grpc

NO_DEADLINE_S = 1e9   # what time_remaining() reads without a timeout (grpc: "huge")


class LocalContext:
    """The part of grpc.aio.ServicerContext the services use: abort, code, time_remaining."""

    def __init__(self, timeout_s: float | None) -> None:
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._code: grpc.StatusCode | None = None
        self._details = ""

    def time_remaining(self) -> float:
        return NO_DEADLINE_S if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        self._code, self._details = code, details
        raise grpc.aio.AbortError()

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def invocation_metadata(self) -> tuple:
        return ()


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class LocalStub:
    """`stub.Method(request, timeout=None)` for each method of `servicer` (unary-unary only)."""

    def __init__(self, servicer: object) -> None:
        self._servicer = servicer

    def __getattr__(self, method: str) -> Callable[..., Awaitable[Any]]:
        handler = getattr(self._servicer, method)

        async def call(request: Any, timeout: float | None = None, **_: Any) -> Any:
            return await call_local(handler, request, timeout)
        setattr(self, method, call)   # found on the instance from now on: __getattr__ runs once per method
        return call


async def call_local(handler: Callable[[Any, LocalContext], Awaitable[Any]], request: Any,
                     timeout: float | None) -> Any:
    """One call as the remote caller sees it: the response, or AioRpcError with the callee's code."""
    context = LocalContext(timeout)
    try:
        async with asyncio.timeout(timeout):
            return await handler(request, context)
    except grpc.aio.AbortError:
        raise rpc_error(context.code() or grpc.StatusCode.UNKNOWN, context.details()) from None
    except TimeoutError:
        raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None


@dataclass
class LocalService:
    """A service's parts without its server: the servicer, and what its process would run once the
    port is bound (start: load + tail tasks, before SERVING) and at the end (close)."""
    name: str
    servicer: object
    start: Callable[[], Awaitable[None]]
    close: Callable[[], Awaitable[None]]
    stub: LocalStub = field(init=False)

    def __post_init__(self) -> None:
        self.stub = LocalStub(self.servicer)
