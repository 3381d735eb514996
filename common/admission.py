"""Admission control: an adaptive concurrency limit per method, and RESOURCE_EXHAUSTED at once for
what is over it (issue 13, overload).

Without it an overloaded service queues everything: every request waits, most of them past their
deadline, and goodput collapses (300 rps offered: 106 good answers/s; 600 rps: 58/s). With it the
calls over the limit are refused within milliseconds, so the caller can back off or go elsewhere,
and the admitted ones keep the latency they have at capacity.

The limit (GradientLimit) is Envoy's adaptive-concurrency gradient controller:
  * min_rtt: the latency (p90) of the last `probe_samples` calls admitted with at most
    min_concurrency in flight — the service's latency without queueing, as the machine is now;
    refreshed every `probe_interval_s`, and measured afresh once the limit has sat at its floor
    for `stale_windows` windows (the machine got slower, e.g. from the cost of shedding itself).
    Unlike Envoy, no probe pins the limit at the floor: a burst is never refused for a
    measurement. The limit starts at INITIAL_LIMIT (clamped to the bounds; a flood at start is
    not let in at once) and only late windows move it until the first baseline. The floor is
    low (--min-concurrency 2): on a small machine the equilibrium (throughput x latency, about
    2-4 calls for ~20 core-ms calls on 2 cores) is below 8, and a floor above it kept the limit
    where admitted calls ran out of time (measured on a loaded 2-core box: at 6x, 27-89% of
    the answers degraded with the floor at 8; 3-45% with it at 2).
  * every `window_s`: sample = p90 latency of the calls finished in the window,
    gradient = clamp(min_rtt * (1 + buffer) / sample, 0.5, 2),
    limit = clamp(limit * gradient + sqrt(limit), min_concurrency, max_concurrency).
    At equilibrium gradient = 1 - 1/sqrt(limit): latency stays within ~2x of min_rtt.
  * the limit grows only when the window used at least half of it: a quiet service has no
    evidence that more concurrency is fine.
  * a window in which calls ran out of time (cancelled at their deadline, finished with under
    10% of it left, or reported late by the handler with report_late(): the gateway does when a
    hop timed out or was refused and it answers a fallback) cuts the limit by 0.8 at least:
    deadlines cap latency, so the gradient alone would not see that overload.
Over the limit a call waits at most `queue_ms` for a slot (FIFO), then is refused. When callers
are already waiting, a new call is refused at once by the AdmissionGate, the outermost interceptor:
before tracing, decoding and the gateway's token check run (they sit inside it). Under a flood the
refusal is the hot path: measured ~0.35-0.45 server core-ms per refused call, nearly all of it
grpc.aio's own per-call cost (a pass-through interceptor layer adds ~0.02). A refused call gets
no trace span (metrics count it).

A call that arrives with less of its deadline left than the method's mean latency now (of the
calls it admitted lately, Admission.recent) is refused at once too, whatever the limit
(Admission.doomed; the serving reads only, DEADLINE_JUDGED_METHODS): it would more likely than
not end past its deadline, and the work on it be lost. Under overload calls get that late
queueing in gRPC's core before any Python runs, which the limit cannot see (it counts calls in
Python). Only while the method is slow (its mean above
1.5x its uncrowded p90): a healthy one serves tiny deadlines the degraded answer they have time
for. One call per window goes through anyway, so that the estimate can come down again.

Not grpc.aio.server(maximum_concurrent_rpcs=N): measured on grpcio 1.81, calls over N are refused
at once but only after every Python interceptor has run for them (it saves ~0.07 core-ms per
refusal against the gate), and it refuses health checks and Status too: an overloaded process
would look dead to its probes.

Never limited: health checks, reflection, the replicas' Status probes (the gateway must see an
overloaded replica as alive) and streaming methods (a ReportEvents stream lives long; its
latency says nothing about load).
"""
from __future__ import annotations

import asyncio
import contextvars
import inspect
import math
import time
from collections import deque
from typing import Any, Awaitable, Callable

import grpc

from common.config import ServerConfig
from common.latency import LatencyEstimate
from common.metrics import ADMISSION_LIMIT, ADMISSION_SHED, GRPC_REQUESTS

SHED_MESSAGE = "overloaded; retry with backoff"
DOOMED_MESSAGE = "too little of the deadline left for this service; retry with backoff or a longer deadline"
EXEMPT_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
EXEMPT_METHODS = frozenset({"Status"})
# Judged by the deadline they have left (Admission.doomed): the serving reads, whose latency does
# not hang on the request's size. A write's does (UpsertItems of 1 item or of 256), so its mean
# would refuse small writes for the time big ones took.
DEADLINE_JUDGED_METHODS = frozenset({"Recommend", "Retrieve", "Rank"})
LATE_BACKOFF = 0.8      # multiplicative decrease when calls of the window ran out of time
LATE_SHARE = 0.1        # a call that ends with less than this share of its deadline left was late
LATE_MARGIN_S = 0.002   # ... or with less than this
INITIAL_LIMIT = 8       # where a method's limit starts (clamped to min/max concurrency)
RECENT_ALPHA = 0.1      # weight of each admitted call in the latency a deadline is judged against
RECENT_MIN_SAMPLES = 20 # ... judged only once this many calls were measured
SLOW_MEAN_MULTIPLE = 1.5  # ... and only while that mean is this far above the uncrowded p90 (overload)


# The running call's "late" flag (set by the admission wrapper, read when the call ends).
_LATE: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar("admission_late", default=None)


def report_late() -> None:
    """Called by a handler when part of its work ran out of time or was refused downstream (the
    gateway: a hop timed out and it answers a fallback). The call then counts as late for the
    limit: its answer was degraded by load, although it came back in time."""
    flag = _LATE.get()
    if flag is not None:
        flag[0] = True


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of a non-empty list, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class GradientLimit:
    """The concurrency limit, from latencies only (no gRPC, no asyncio); clock injectable."""

    def __init__(self, min_limit: int = 2, max_limit: int = 64, *, window_s: float = 0.1,
                 q: float = 0.9, buffer: float = 0.25, probe_samples: int = 50,
                 probe_interval_s: float = 10.0, stale_windows: int = 5, initial: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 1 <= min_limit <= max_limit:
            raise ValueError(f"concurrency limits: need 1 <= min ({min_limit}) <= max ({max_limit})")
        self.min_limit, self.max_limit = min_limit, max_limit
        self.window_s, self.q, self.buffer = window_s, q, buffer
        self.probe_interval_s, self.stale_windows = probe_interval_s, stale_windows
        self.clock = clock
        self.min_rtt: float | None = None   # until known only late windows move the limit
        self._limit = float(min(max_limit, max(min_limit, initial or min_limit)))   # default: the floor
        self._quiet: deque[float] = deque(maxlen=probe_samples)   # latencies of calls started uncrowded
        self._refresh_at = -math.inf
        self._window: list[float] = []
        self._window_start = clock()
        self._window_peak = 0
        self._window_late = 0
        self._at_floor = 0

    @property
    def limit(self) -> int:
        """Calls allowed in flight now."""
        return int(self._limit)

    def on_sample(self, latency_s: float, inflight: int, late: bool = False) -> None:
        """One admitted call finished after latency_s; `inflight` calls (itself included) were in
        flight when it was admitted; late: it ran out of its deadline (or its caller gave up)."""
        now = self.clock()
        if inflight <= self.min_limit and not late:   # a late call's latency is its deadline's
            self._quiet.append(latency_s)
            if len(self._quiet) == self._quiet.maxlen and now >= self._refresh_at:
                self.min_rtt = max(percentile(list(self._quiet), self.q), 1e-6)
                self._refresh_at = now + self.probe_interval_s
        self._window.append(latency_s)
        self._window_peak = max(self._window_peak, inflight)
        self._window_late += late
        if now - self._window_start >= self.window_s:
            self._update()
            self._window, self._window_start, self._window_peak, self._window_late = [], now, 0, 0

    def _update(self) -> None:
        if self.min_rtt is None:
            new = self._limit
        else:
            sample = percentile(self._window, self.q)
            gradient = min(2.0, max(0.5, self.min_rtt * (1.0 + self.buffer) / max(sample, 1e-9)))
            new = self._limit * gradient + math.sqrt(self._limit)
        if self._window_late:
            # Calls ran out of time: latency is capped by deadlines there (a gateway answers a
            # degraded fallback just in time), so the gradient alone would not see the overload.
            new = min(new, self._limit * LATE_BACKOFF)
        elif new > self._limit and self._window_peak < self._limit / 2:
            new = self._limit   # not using the limit: no evidence that more is fine
        self._limit = min(float(self.max_limit), max(float(self.min_limit), new))
        self._at_floor = self._at_floor + 1 if int(self._limit) <= self.min_limit else 0
        if self._at_floor >= self.stale_windows:
            # Pinned at the floor: the baseline may be stale (the machine got slower, e.g. from
            # the cost of shedding itself). Every call now starts uncrowded: measure it afresh.
            self._quiet.clear()
            self._refresh_at = -math.inf
            self._at_floor = 0


class Admission:
    """In-flight count against a GradientLimit, with a bounded FIFO wait for a slot (one event loop)."""

    def __init__(self, limit: GradientLimit, queue_s: float) -> None:
        self.limiter = limit
        self.queue_s = queue_s
        self.inflight = 0
        self._waiters: deque[asyncio.Future] = deque()
        self.recent = LatencyEstimate(RECENT_ALPHA)   # admitted calls' latency, as the process is now
        self._probe_at = -math.inf

    async def acquire(self) -> int:
        """Admitted: the calls in flight with this one (pass it to release() when done).
        0: refuse the call."""
        if self.inflight < self.limiter.limit and not self._waiters:
            self.inflight += 1
            return self.inflight
        if self.queue_s <= 0:
            return 0
        slot = asyncio.get_running_loop().create_future()
        self._waiters.append(slot)
        try:
            await asyncio.wait((slot,), timeout=self.queue_s)
        except asyncio.CancelledError:   # the caller went away while waiting
            if slot.done():
                self.inflight -= 1   # handed over, never used: give it back
                self._hand_over()
            self._drop(slot)
            raise
        if slot.done():   # release() handed its slot over (and counted it)
            return slot.result()
        self._drop(slot)
        return 0

    @property
    def saturated(self) -> bool:
        """At the limit with callers already waiting: a new call would almost surely time out in
        the queue, so it can be refused before any other interceptor runs."""
        return self.inflight >= self.limiter.limit and (
            self.queue_s <= 0 or len(self._waiters) >= max(1, self.limiter.limit // 8))

    def doomed(self, budget_s: float | None) -> bool:
        """Less of the caller's deadline left than the mean latency of the calls admitted lately:
        refuse it (each refusal ~0.4 core-ms instead of a whole call that would miss), except one
        call per limiter window, a probe, so that an estimate inflated by a slow spell is measured
        again even when every caller is short of time (otherwise nothing would ever be admitted to
        bring it down). Judged only while the service is slow (that mean above SLOW_MEAN_MULTIPLE
        x min_rtt, its uncrowded p90): on a healthy one a caller with a tiny deadline still gets
        the degraded answer it has time for."""
        rtt = self.limiter.min_rtt
        if budget_s is None or rtt is None or self.recent.samples < RECENT_MIN_SAMPLES \
                or self.recent.mean < SLOW_MEAN_MULTIPLE * rtt or budget_s >= self.recent.mean:
            return False
        now = self.limiter.clock()
        if now >= self._probe_at:
            self._probe_at = now + self.limiter.window_s
            return False
        return True

    def _drop(self, slot: asyncio.Future) -> None:
        slot.cancel()
        try:
            self._waiters.remove(slot)
        except ValueError:
            pass

    def release(self, latency_s: float, admitted_with: int, late: bool = False) -> None:
        self.limiter.on_sample(latency_s, admitted_with, late)
        if not late or latency_s > self.recent.mean:   # a late call's latency is a lower bound of its need
            self.recent.observe(latency_s)
        self.inflight -= 1
        self._hand_over()

    def _hand_over(self) -> None:
        while self._waiters and self.inflight < self.limiter.limit:
            slot = self._waiters.popleft()
            if not slot.done():
                self.inflight += 1
                slot.set_result(self.inflight)


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """One Admission per unary method of the service, created at its first call."""

    def __init__(self, service: str, min_concurrency: int = 2, max_concurrency: int = 64,
                 queue_ms: float = 2.0, make_limit: Callable[[], GradientLimit] | None = None) -> None:
        if queue_ms < 0:
            raise ValueError(f"--queue-ms must be >= 0, got {queue_ms}")
        GradientLimit(min_concurrency, max_concurrency)   # fail at start on bad bounds
        self.service = service
        self.queue_s = queue_ms / 1000.0
        self.make_limit = make_limit or (lambda: GradientLimit(min_concurrency, max_concurrency,
                                                               initial=INITIAL_LIMIT))
        self.admissions: dict[str, Admission] = {}
        self._guarded: dict[str, tuple[Callable, Callable]] = {}   # method -> (behaviour, guarded)
        self._refusals: dict[str, grpc.RpcMethodHandler] = {}      # method -> refusing handler

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        refusal = self.refusal_if_saturated(details.method)
        if refusal is not None:   # the cheap path: no inner interceptor, no decoding
            return refusal
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None or details.method.startswith(EXEMPT_PREFIXES):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        if method in EXEMPT_METHODS:
            return handler
        admission = self.admissions.get(method)
        if admission is None:   # a method the servicer implements: the label set stays bounded
            admission = self.admissions[method] = Admission(self.make_limit(), self.queue_s)
            ADMISSION_SHED.labels(self.service, method)   # exported at 0 from the first call
            self._refusals[method] = grpc.unary_unary_rpc_method_handler(self._refuse(method))
        behaviour = handler.unary_unary
        cached = self._guarded.get(method)
        if cached is None or cached[0] is not behaviour:   # built once per method (the shed path is hot)
            cached = self._guarded[method] = (behaviour, self._guard(behaviour, admission, method))
        return handler._replace(unary_unary=cached[1])

    def refusal_if_saturated(self, full_method: str) -> grpc.RpcMethodHandler | None:
        """The refusing handler when the method is at its limit with callers waiting, else None."""
        method = full_method.rsplit("/", 1)[-1]
        known = self.admissions.get(method)
        return self._refusals[method] if known is not None and known.saturated else None

    def gate(self) -> "AdmissionGate":
        """This limit's cheap refusal, to run outermost (common.server.standard_interceptors)."""
        return AdmissionGate(self)

    def _refuse(self, method: str,
                message: str = SHED_MESSAGE) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]:
        shed = ADMISSION_SHED.labels(self.service, method)
        refused = GRPC_REQUESTS.labels(self.service, method, "RESOURCE_EXHAUSTED")

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            shed.inc()
            refused.inc()   # never reaches the servicer's own request metrics
            # Not context.abort(): raising costs more than the rest of the refusal; with a
            # non-OK code grpc.aio sends no response message.
            context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            context.set_details(message)
        return refuse

    def _guard(self, behaviour: Callable, admission: Admission, method: str) -> Callable:
        gauge = ADMISSION_LIMIT.labels(self.service, method)
        refuse, refuse_doomed = self._refuse(method), self._refuse(method, DOOMED_MESSAGE)
        judged = method in DEADLINE_JUDGED_METHODS

        async def admitted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if judged and admission.doomed(context.time_remaining()):
                return await refuse_doomed(request, context)
            admitted_with = await admission.acquire()
            if not admitted_with:
                return await refuse(request, context)
            start = time.perf_counter()
            budget = context.time_remaining()
            cancelled = False
            flag = [False]
            token = _LATE.set(flag)
            try:
                result = behaviour(request, context)
                return await result if inspect.isawaitable(result) else result
            except asyncio.CancelledError:   # the deadline passed or the caller gave up
                cancelled = True
                raise
            finally:
                _LATE.reset(token)
                admission.release(time.perf_counter() - start, admitted_with,
                                  cancelled or flag[0] or out_of_time(context, budget))
                gauge.set(admission.limiter.limit)
        return admitted


class AdmissionGate(grpc.aio.ServerInterceptor):
    """Outermost: a call to a saturated method is refused before any other interceptor runs
    (each costs Python per call, refused or not). The AdmissionInterceptor, further in, admits."""

    def __init__(self, admission: AdmissionInterceptor) -> None:
        self.admission = admission

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        refusal = self.admission.refusal_if_saturated(details.method)
        return refusal if refusal is not None else await continuation(details)


def out_of_time(context: grpc.aio.ServicerContext, budget: float | None) -> bool:
    """The call used nearly all of the deadline it had when admitted (None: no deadline)."""
    if budget is None:
        return False
    left = context.time_remaining()
    return left is not None and left < max(LATE_MARGIN_S, LATE_SHARE * budget)


def admission_interceptors(config: ServerConfig, service: str) -> list[AdmissionInterceptor]:
    """The admission interceptor for a service, or none with --no-admission."""
    if config.no_admission:
        return []
    return [AdmissionInterceptor(service, config.min_concurrency, config.max_concurrency, config.queue_ms)]
