"""common.admission: the gradient limit on a fake clock, the bounded wait, and the interceptor on a
real in-process grpc.aio server (shed answers come back as RESOURCE_EXHAUSTED, fast)."""
from __future__ import annotations

import asyncio
import statistics
import time

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.admission import DOOMED_MESSAGE, SHED_MESSAGE, Admission, AdmissionInterceptor, GradientLimit, percentile
from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def limiter(clock: Clock, **kwargs) -> GradientLimit:
    kwargs = {"min_limit": 4, "max_limit": 64, "probe_samples": 10, "probe_interval_s": 1e9,
              "stale_windows": 10 ** 6, **kwargs}
    return GradientLimit(clock=clock, **kwargs)


def feed(limit: GradientLimit, clock: Clock, latency_s: float, windows: int, per_window: int = 20,
         inflight: int | None = None, late_first: bool = False) -> list[int]:
    """`windows` windows of `per_window` calls of latency_s each, admitted with the limit fully
    used (or `inflight` in flight); the limit after each window."""
    seen = []
    for _ in range(windows):
        for j in range(per_window):
            clock.t += limit.window_s / per_window * 1.0001   # the window closes on its last call
            limit.on_sample(latency_s, limit.limit if inflight is None else inflight, late_first and j == 0)
        seen.append(limit.limit)
    return seen


def baseline(limit: GradientLimit, clock: Clock, latency_s: float) -> None:
    """Calls admitted uncrowded (1 in flight): what min_rtt is measured from (no time passes, so
    the windows `feed` closes stay aligned)."""
    for _ in range(10):
        limit.on_sample(latency_s, 1)


def test_percentile_nearest_rank():
    assert percentile([5.0], 0.9) == 5.0
    assert percentile(list(map(float, range(1, 11))), 0.9) == 9.0
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0


def test_floor_until_a_baseline_then_grows_while_latency_is_flat_up_to_max():
    clock = Clock()
    limit = limiter(clock)
    assert limit.limit == 4 and limit.min_rtt is None           # a flood at start is not let in at once
    assert feed(limit, clock, 0.010, windows=3, inflight=5) == [4] * 3   # crowded calls: no baseline
    baseline(limit, clock, 0.010)
    assert limit.min_rtt == pytest.approx(0.010)
    seen = feed(limit, clock, 0.010, windows=30)                # latency at the baseline
    assert seen[0] > 4 and all(b >= a for a, b in zip(seen, seen[1:]))   # grows, never shrinks
    assert seen[-1] == 64                                               # and stops at max


def test_initial_limit_is_clamped_and_late_windows_take_it_down_to_the_floor_before_a_baseline():
    clock = Clock()
    assert limiter(clock, min_limit=2, max_limit=4, initial=8).limit == 4
    limit = limiter(clock, min_limit=2, initial=8)
    assert limit.limit == 8 and limit.min_rtt is None
    assert feed(limit, clock, 0.010, windows=3, inflight=8) == [8] * 3   # no baseline, no lateness: held
    seen = feed(limit, clock, 0.010, windows=10, inflight=8, late_first=True)
    assert seen[0] < 8 and seen[-1] == 2                                 # calls ran out of time: down to the floor


def test_shrinks_when_latency_rises_and_never_below_min():
    clock = Clock()
    limit = limiter(clock)
    baseline(limit, clock, 0.010)
    feed(limit, clock, 0.010, windows=10)
    assert feed(limit, clock, 0.010, windows=5) == [64] * 5             # never above max
    seen = feed(limit, clock, 0.040, windows=3)                        # 4x the baseline
    assert seen[0] < 64 and seen[1] < seen[0]
    seen = feed(limit, clock, 0.200, windows=20)
    assert min(seen) == 4 and seen[-1] == 4                             # floored at min


def test_does_not_grow_when_the_limit_is_not_used():
    clock = Clock()
    limit = limiter(clock)
    baseline(limit, clock, 0.010)
    feed(limit, clock, 0.200, windows=20)
    seen = feed(limit, clock, 0.005, windows=10, inflight=1)           # fast, but 1 in flight of 4
    assert seen == [4] * 10


def test_equilibrium_keeps_latency_near_baseline():
    """A service whose latency grows with concurrency (queueing past 8 in flight): the limit settles
    where latency is within ~2x of the no-load latency, not at max."""
    clock = Clock()
    limit = limiter(clock)

    def latency(n: int) -> float:
        return 0.010 * max(1.0, n / 8)
    baseline(limit, clock, latency(1))
    for _ in range(200):
        for _ in range(20):
            clock.t += 0.005
            limit.on_sample(latency(limit.limit), limit.limit)
    assert 8 <= limit.limit <= 24 and latency(limit.limit) <= 0.025


def test_stale_baseline_is_measured_again_at_the_floor():
    """The machine got 5x slower for good: pinned at the floor, the limiter re-measures min_rtt from
    the (uncrowded) calls there and grows again instead of staying at min."""
    clock = Clock()
    limit = limiter(clock, stale_windows=3)
    baseline(limit, clock, 0.010)
    for _ in range(60):
        feed(limit, clock, 0.050, windows=1)
        if limit.min_rtt == pytest.approx(0.050):
            break
    assert limit.min_rtt == pytest.approx(0.050)
    assert feed(limit, clock, 0.050, windows=5)[-1] > 4


def test_late_calls_cut_the_limit_although_latency_is_capped():
    """Deadlines cap latency (the gateway answers a fallback just in time): calls that ran out of
    time shrink the limit even when their latency looks like the baseline."""
    clock = Clock()
    limit = limiter(clock)
    baseline(limit, clock, 0.010)
    assert feed(limit, clock, 0.010, windows=10)[-1] == 64
    seen = feed(limit, clock, 0.010, windows=5, late_first=True)
    assert seen[0] <= int(64 * 0.8) and all(b < a for a, b in zip(seen, seen[1:]))


def test_late_calls_do_not_count_in_the_baseline():
    clock = Clock()
    limit = limiter(clock)
    for _ in range(10):
        clock.t += 0.001
        limit.on_sample(0.5, 1, late=True)
    assert limit.min_rtt is None
    baseline(limit, clock, 0.010)
    assert limit.min_rtt == pytest.approx(0.010)


def test_bounds_checked():
    with pytest.raises(ValueError, match="min"):
        GradientLimit(0, 10)
    with pytest.raises(ValueError, match="max"):
        GradientLimit(8, 4)
    with pytest.raises(ValueError, match="queue-ms"):
        AdmissionInterceptor("t", queue_ms=-1)


def test_bounded_wait_hands_the_slot_over_fifo_or_refuses():
    async def go():
        clock = Clock()
        admission = Admission(limiter(clock, min_limit=1, max_limit=1), queue_s=0.05)
        assert await admission.acquire() == 1
        waiter = asyncio.ensure_future(admission.acquire())
        await asyncio.sleep(0.005)
        admission.release(0.001, 1)                    # the slot goes to the waiter
        assert await waiter == 1 and admission.inflight == 1
        started = time.perf_counter()
        assert not await admission.acquire()           # nobody releases: refused after queue_s
        waited = time.perf_counter() - started
        assert admission.inflight == 1 and not admission._waiters
        return waited
    assert asyncio.run(go()) >= 0.04

    async def no_queue():
        admission = Admission(limiter(Clock(), min_limit=1, max_limit=1), queue_s=0.0)
        assert await admission.acquire() and not await admission.acquire()
    asyncio.run(no_queue())


def finished(admission: Admission, latency_s: float, calls: int) -> None:
    """`calls` admitted calls of latency_s each, one at a time."""
    for _ in range(calls):
        admission.release(latency_s, asyncio.run(admission.acquire()))


def test_a_call_with_less_time_left_than_the_recent_mean_latency_is_doomed_but_for_one_probe_per_window():
    clock = Clock()
    admission = Admission(limiter(clock), queue_s=0.0)
    finished(admission, 0.010, 10)                      # the uncrowded baseline: min_rtt 10 ms
    assert admission.limiter.min_rtt == pytest.approx(0.010)
    finished(admission, 0.012, 10)
    assert not admission.doomed(0.001)                  # healthy (mean near min_rtt): nothing is judged
    finished(admission, 0.030, 20)                      # slow now: mean ~28 ms, above 1.5 x min_rtt
    assert not admission.doomed(None)                   # the caller set no deadline
    assert not admission.doomed(0.031)                  # time enough
    assert not admission.doomed(0.010)                  # short, but the window's probe
    assert admission.doomed(0.010) and admission.doomed(0.0)
    clock.t += admission.limiter.window_s
    assert not admission.doomed(0.010) and admission.doomed(0.010)   # the next window's probe
    finished(admission, 0.005, 40)                      # the probes found the service fast again
    assert not admission.doomed(0.001) and admission.inflight == 0


def test_late_calls_raise_the_latency_estimate_but_never_lower_it():
    """A late call's latency is what it was given, a lower bound of what it needed: it may only
    raise the estimate (a flood of calls late at 5 ms must not make a 30 ms service look fast)."""
    clock = Clock()
    admission = Admission(limiter(clock), queue_s=0.0)
    finished(admission, 0.010, 10)
    finished(admission, 0.030, 20)
    before = admission.recent.mean
    for _ in range(20):
        admission.release(0.005, asyncio.run(admission.acquire()), late=True)
    assert admission.recent.mean == before
    for _ in range(20):
        admission.release(0.200, asyncio.run(admission.acquire()), late=True)
    assert admission.recent.mean > 0.1 and admission.doomed(0.05) is False   # the window's probe
    assert admission.doomed(0.05)


class SlowRetrieval(pb_grpc.RetrievalServicer):
    def __init__(self) -> None:
        self.calls = 0

    async def Retrieve(self, request, context):
        self.calls += 1
        await asyncio.sleep(0.2)
        return pb.RetrieveResponse(index_version="v")

    async def Status(self, request, context):
        await asyncio.sleep(0.2)
        return pb.ServiceStatus()


def test_interceptor_sheds_fast_and_never_health_or_status():
    async def go():
        interceptor = AdmissionInterceptor("retrieval", min_concurrency=2, max_concurrency=2, queue_ms=1.0)
        server = grpc.aio.server(interceptors=[interceptor])
        servicer = SlowRetrieval()
        pb_grpc.add_RetrievalServicer_to_server(servicer, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.RetrievalStub(channel)
                await channel.channel_ready()

                async def timed(call):
                    started = time.perf_counter()
                    try:
                        await call
                        return "OK", time.perf_counter() - started, ""
                    except grpc.aio.AioRpcError as e:
                        return e.code().name, time.perf_counter() - started, e.details()
                slow = [asyncio.ensure_future(timed(stub.Retrieve(pb.RetrieveRequest(), timeout=5)))
                        for _ in range(2)]
                await asyncio.sleep(0.05)        # both admitted and in the servicer
                shed = await asyncio.gather(*[timed(stub.Retrieve(pb.RetrieveRequest(), timeout=5))
                                              for _ in range(10)])
                exempt = await asyncio.gather(
                    timed(stub.Status(pb.StatusRequest(), timeout=5)),
                    timed(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)))
                done = await asyncio.gather(*slow)
                return shed, exempt, done, servicer.calls
        finally:
            await server.stop(None)

    shed, exempt, done, calls = asyncio.run(go())
    assert {code for code, _, _ in shed} == {"RESOURCE_EXHAUSTED"}
    assert {details for _, _, details in shed} == {SHED_MESSAGE}
    assert statistics.median(t for _, t, _ in shed) < 0.15      # well before the 200 ms servicer
    assert [code for code, _, _ in exempt] == ["OK", "OK"]      # Status and health are never shed
    assert [code for code, _, _ in done] == ["OK", "OK"] and calls == 2



class Counting(grpc.aio.ServerInterceptor):
    """An inner interceptor (as the gateway's token check): counts the calls that reach it."""

    def __init__(self) -> None:
        self.calls = 0

    async def intercept_service(self, continuation, details):
        self.calls += 1
        return await continuation(details)


def test_saturated_calls_are_refused_before_inner_interceptors_and_decoding():
    async def go():
        inner = Counting()
        interceptor = AdmissionInterceptor("retrieval", min_concurrency=1, max_concurrency=1, queue_ms=0)
        server = grpc.aio.server(interceptors=[interceptor, inner])
        pb_grpc.add_RetrievalServicer_to_server(SlowRetrieval(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.RetrievalStub(channel)
                busy = asyncio.ensure_future(stub.Retrieve(pb.RetrieveRequest(), timeout=5))
                await asyncio.sleep(0.05)
                reached = inner.calls
                junk = channel.unary_unary("/fusionrec.v1.Retrieval/Retrieve")   # undecodable bytes
                codes = []
                for call in [stub.Retrieve(pb.RetrieveRequest(), timeout=5) for _ in range(5)] + [junk(b"\xff\xff", timeout=5)]:
                    try:
                        await call
                        codes.append("OK")
                    except grpc.aio.AioRpcError as e:
                        codes.append(e.code().name)
                await busy
                return codes, inner.calls - reached
        finally:
            await server.stop(None)

    codes, reached_inner = asyncio.run(go())
    assert codes == ["RESOURCE_EXHAUSTED"] * 6
    assert reached_inner == 0


def test_a_handler_can_report_its_call_late():
    """The gateway answers a fallback in time when a hop timed out: report_late() makes that call
    count as late, and outside a call it does nothing."""
    from common.admission import report_late
    report_late()   # no call running: no effect, no error
    seen = []

    class Recorder(Admission):
        def release(self, latency_s, admitted_with, late=False):
            seen.append(late)
            super().release(latency_s, admitted_with, late)

    async def go():
        interceptor = AdmissionInterceptor("t", min_concurrency=4, max_concurrency=4)
        interceptor.admissions["Retrieve"] = Recorder(GradientLimit(4, 4), 0.001)
        interceptor._refusals["Retrieve"] = grpc.unary_unary_rpc_method_handler(interceptor._refuse("Retrieve"))

        class Servicer(pb_grpc.RetrievalServicer):
            async def Retrieve(self, request, context):
                if request.user_id == "late":
                    report_late()
                return pb.RetrieveResponse()
        server = grpc.aio.server(interceptors=[interceptor])
        pb_grpc.add_RetrievalServicer_to_server(Servicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.RetrievalStub(channel)
                for user in ("ok", "late", "ok"):
                    await stub.Retrieve(pb.RetrieveRequest(user_id=user), timeout=5)
        finally:
            await server.stop(None)
    asyncio.run(go())
    assert seen == [False, True, False]


def test_standard_chain_refuses_a_saturated_method_before_tracing_and_inner_interceptors():
    """common.server.standard_interceptors puts the admission's gate outermost: a refused call runs
    no tracing (no span), no decoding and no inner interceptor (the gateway's token check)."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from common import tracing
    from common.config import ServerConfig
    from common.server import standard_interceptors

    service = "admission-gate-test"
    exporter = InMemorySpanExporter()
    tracing.add_span_processor(service, SimpleSpanProcessor(exporter))

    async def go():
        inner = Counting()
        config = ServerConfig(min_concurrency=1, max_concurrency=1, queue_ms=0.0)
        server = grpc.aio.server(interceptors=[*standard_interceptors(config, service), inner])
        pb_grpc.add_RetrievalServicer_to_server(SlowRetrieval(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.RetrievalStub(channel)
                await stub.Retrieve(pb.RetrieveRequest(), timeout=5)   # the method's admission exists
                busy = asyncio.ensure_future(stub.Retrieve(pb.RetrieveRequest(), timeout=5))
                await asyncio.sleep(0.05)
                reached = inner.calls
                codes = []
                for _ in range(5):
                    try:
                        await stub.Retrieve(pb.RetrieveRequest(), timeout=5)
                        codes.append("OK")
                    except grpc.aio.AioRpcError as e:
                        codes.append(e.code().name)
                await busy
                return codes, inner.calls - reached
        finally:
            await server.stop(None)

    codes, reached_inner = asyncio.run(go())
    spans = [s for s in exporter.get_finished_spans() if s.name.endswith("/Retrieve")]
    assert codes == ["RESOURCE_EXHAUSTED"] * 5
    assert reached_inner == 0
    assert len(spans) == 2   # the two admitted calls only


class SlowedDown:
    """A servicer method: 5 ms a call for its first 10 calls (the uncrowded baseline), 50 ms after."""

    def __init__(self, response) -> None:
        self.calls = 0
        self.response = response

    async def __call__(self, request, context):
        self.calls += 1
        await asyncio.sleep(0.005 if self.calls <= 10 else 0.05)
        return self.response


async def short_calls_after_a_slowdown(service: str, add_servicer, servicer, stub_class, method: str, request):
    """30 sequential calls (baseline, then slowed down), 3 calls with a 30 ms deadline, then one with
    time enough: ([(code, details)] of the short calls, servicer calls before the last one, the
    last answer, the method's Admission)."""
    # A long window: the one probe it allows is the first short call, however slow the machine.
    interceptor = AdmissionInterceptor(service, make_limit=lambda: GradientLimit(
        2, 8, window_s=30.0, probe_samples=10, probe_interval_s=1e9))
    server = grpc.aio.server(interceptors=[interceptor])
    add_servicer(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = getattr(stub_class(channel), method)
            for _ in range(30):
                await call(request, timeout=5)
            codes = []
            for _ in range(3):
                try:
                    await call(request, timeout=0.03)
                    codes.append(("OK", ""))
                except grpc.aio.AioRpcError as e:
                    codes.append((e.code().name, e.details()))
            calls = getattr(servicer, method).calls
            last = await call(request, timeout=5)
            return codes, calls, last, interceptor.admissions[method]
    finally:
        await server.stop(None)


def test_doomed_calls_are_refused_at_once_and_never_reach_the_servicer():
    """Once the service is slow (50 ms a call here against a 5 ms baseline), a call arriving with a
    shorter deadline is refused with RESOURCE_EXHAUSTED before any work (a timeout would be
    DEADLINE_EXCEEDED), after the window's one probe; a call with time enough is served."""
    class Timed(pb_grpc.RetrievalServicer):
        Retrieve = SlowedDown(pb.RetrieveResponse(index_version="v"))

    codes, calls, ok, admission = asyncio.run(short_calls_after_a_slowdown(
        "retrieval", pb_grpc.add_RetrievalServicer_to_server, Timed(), pb_grpc.RetrievalStub, "Retrieve",
        pb.RetrieveRequest()))
    assert admission.recent.mean >= 0.03
    assert codes[0][0] == "DEADLINE_EXCEEDED"            # the probe: admitted, and it ran out of time
    assert codes[1:] == [("RESOURCE_EXHAUSTED", DOOMED_MESSAGE)] * 2
    assert calls - 30 == 1                               # the refused ones never reached the servicer
    assert ok.index_version == "v" and admission.inflight == 0


def test_writes_are_not_judged_by_their_deadline():
    """A write's latency hangs on its size (UpsertItems of 1 item or 256): a short write with a
    short deadline is worked on, however long earlier writes took."""
    class Writes(pb_grpc.RecommenderServicer):
        UpsertItems = SlowedDown(pb.UpsertItemsResponse())

    codes, calls, _, _ = asyncio.run(short_calls_after_a_slowdown(
        "gateway", pb_grpc.add_RecommenderServicer_to_server, Writes(), pb_grpc.RecommenderStub, "UpsertItems",
        pb.UpsertItemsRequest()))
    assert [code for code, _ in codes] == ["DEADLINE_EXCEEDED"] * 3 and calls == 33
