"""Trace context and request ids across real grpc.aio servers in process (common/tracing.py).

The chain: caller -> gateway -> retrieval, gateway -> ranking -> Triton. Each hop is a small fake
servicer, but every server runs the real common.server.standard_interceptors, every channel
between them comes from common.client.open_channel, the gateway derives its response's
request_id with the real gateway.validation, and ranking calls "Triton" (a fake
GRPCInferenceService that records the metadata it gets) through the real TritonScorer.
Spans are read from an in-memory exporter; log lines from a handler on the `fusionrec` logger
with the real JsonFormatter.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.grpc.aio import InferenceServerClient

from common import tracing
from common.client import open_channel
from common.config import ServerConfig
from common.logs import JsonFormatter, current_request_id, get_logger
from common.server import standard_interceptors
from core.features import RETRIEVAL_FEATURES, TEXT_ENCODER_NAME
from gateway.items import ItemWriter
from gateway.validation import validate_recommend
from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc
from ranking.triton_scorer import TritonScorer

pytestmark = pytest.mark.timeout(60)

# Service names of their own: other tests' servers in this process keep their providers.
GATEWAY, RETRIEVAL, RANKING = "trace-test-gateway", "trace-test-retrieval", "trace-test-ranking"
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
log = get_logger("trace_test")

EXPORTER = InMemorySpanExporter()
for _service in (GATEWAY, RETRIEVAL, RANKING):
    tracing.add_span_processor(_service, SimpleSpanProcessor(EXPORTER))


class LogLines(logging.Handler):
    """Formatted JSON lines, formatted as they are emitted (the context is the emitter's)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))

    def of(self, hop: str) -> list[dict]:
        return [line for line in self.lines if line.get("hop") == hop]


@pytest.fixture
def logs():
    handler = LogLines()
    root = logging.getLogger("fusionrec")
    get_logger("trace_test")   # installs the root's stderr handler first if no test did
    root.addHandler(handler)
    EXPORTER.clear()
    yield handler
    root.removeHandler(handler)


class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    async def ModelInfer(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        if request.model_name == TEXT_ENCODER_NAME:   # texts [n] -> embedding [n, 4]
            n = request.inputs[0].shape[0]
            return service_pb2.ModelInferResponse(
                model_name=request.model_name, model_version=request.model_version,
                outputs=[service_pb2.ModelInferResponse.InferOutputTensor(name="embedding", datatype="FP32", shape=[n, 4])],
                raw_output_contents=[np.ones((n, 4), np.float32).tobytes()])
        n = request.inputs[1].shape[1]   # candidates [1, N]
        return service_pb2.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version,
            outputs=[service_pb2.ModelInferResponse.InferOutputTensor(name="scores", datatype="FP32", shape=[1, n])],
            raw_output_contents=[np.arange(n, dtype=np.float32)[None].tobytes()])


class FakeRetrieval(pb_grpc.RetrievalServicer):
    async def Retrieve(self, request, context):
        log.info("retrieve", extra={"hop": "retrieval"})
        return pb.RetrieveResponse()


class FakeRanking(pb_grpc.RankingServicer):
    def __init__(self, triton_target: str) -> None:
        self.triton_target = triton_target

    async def Rank(self, request, context):
        log.info("rank", extra={"hop": "ranking"})
        client = InferenceServerClient(self.triton_target)
        try:
            n = 3
            await TritonScorer(client, "1").score(np.arange(2), np.arange(n),
                                                  np.zeros((n, len(RETRIEVAL_FEATURES)), np.float32), timeout_s=5.0)
        finally:
            await client.close()
        return pb.RankResponse()


class FakeGateway(pb_grpc.RecommenderServicer):
    def __init__(self, retrieval: str, ranking: str, triton: str) -> None:
        self.retrieval = open_channel(retrieval)
        self.ranking = open_channel(ranking)
        self.triton = triton

    async def UpsertItems(self, request, context):
        """The real ItemWriter.embed (gateway -> Triton's text_encoder), nothing appended."""
        log.info("upsert", extra={"hop": "gateway"})
        client = InferenceServerClient(self.triton)
        try:
            await ItemWriter(None, client, None, None).embed([i.title for i in request.items], "1", 4, timeout_s=5.0)
        finally:
            await client.close()
        return pb.UpsertItemsResponse()

    async def Recommend(self, request, context):
        query = validate_recommend(request)   # the real rule for the response's request_id
        log.info("recommend", extra={"hop": "gateway"})
        await pb_grpc.RetrievalStub(self.retrieval).Retrieve(pb.RetrieveRequest(), timeout=5)
        await pb_grpc.RankingStub(self.ranking).Rank(pb.RankRequest(), timeout=5)
        return pb.RecommendResponse(request_id=query.request_id)

    async def ReportEvents(self, request_iterator, context):
        async for _ in request_iterator:
            log.info("batch", extra={"hop": "gateway-stream"})
        return pb.ReportEventsResponse()

    async def close(self) -> None:
        await self.retrieval.close()
        await self.ranking.close()


async def start(service: str | None, add) -> tuple[grpc.aio.Server, str]:
    interceptors = standard_interceptors(ServerConfig(), service) if service else []
    server = grpc.aio.server(interceptors=interceptors)
    add(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@asynccontextmanager
async def chain() -> AsyncIterator[tuple[pb_grpc.RecommenderStub, FakeTriton]]:
    triton = FakeTriton()
    servers = []
    gateway = None
    try:
        server, triton_target = await start(None, lambda s: service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(triton, s))
        servers.append(server)
        server, retrieval = await start(RETRIEVAL, lambda s: pb_grpc.add_RetrievalServicer_to_server(FakeRetrieval(), s))
        servers.append(server)
        server, ranking = await start(RANKING, lambda s: pb_grpc.add_RankingServicer_to_server(FakeRanking(triton_target), s))
        servers.append(server)
        gateway = FakeGateway(retrieval, ranking, triton_target)
        server, gateway_target = await start(GATEWAY, lambda s: pb_grpc.add_RecommenderServicer_to_server(gateway, s))
        servers.append(server)
        async with open_channel(gateway_target) as channel:
            yield pb_grpc.RecommenderStub(channel), triton
    finally:
        if gateway is not None:
            await gateway.close()
        for server in servers:
            await server.stop(None)


def server_spans() -> dict[str, object]:
    """service name -> its one SERVER span of the call."""
    spans = [s for s in EXPORTER.get_finished_spans() if s.kind == SpanKind.SERVER]
    by_service = {s.resource.attributes["service.name"].removeprefix("fusionrec-"): s for s in spans}
    assert len(by_service) == len(spans) == 3, [s.name for s in spans]
    return by_service


def hexid(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def test_caller_trace_and_request_id_cross_every_hop(logs):
    async def go():
        async with chain() as (stub, triton):
            reply = await stub.Recommend(pb.RecommendRequest(user_id="u", k=3), timeout=10, metadata=(
                ("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"), ("tracestate", "rojo=00f067aa0ba902b7"),
                ("x-request-id", "req-abc.1")))
            return reply, triton.metadata
    reply, triton_metadata = asyncio.run(go())
    assert reply.request_id == "req-abc.1"          # the caller's id, echoed

    spans = server_spans()
    gateway, retrieval, ranking = spans[GATEWAY], spans[RETRIEVAL], spans[RANKING]
    for span in spans.values():                      # one trace: the caller's
        assert hexid(span.context.trace_id, 32) == CALLER_TRACE
    assert hexid(gateway.parent.span_id, 16) == CALLER_SPAN   # continued: a new span under the caller's
    assert gateway.context.span_id != int(CALLER_SPAN, 16)
    assert retrieval.parent.span_id == gateway.context.span_id
    assert ranking.parent.span_id == gateway.context.span_id
    assert gateway.name == "fusionrec.v1.Recommender/Recommend"
    assert retrieval.name == "fusionrec.v1.Retrieval/Retrieve" and ranking.name == "fusionrec.v1.Ranking/Rank"

    # Ranking -> Triton: the ranking span is the parent, the request id travels along.
    (sent,) = triton_metadata
    assert sent["traceparent"] == f"00-{CALLER_TRACE}-{hexid(ranking.context.span_id, 16)}-01"
    assert sent["tracestate"] == "rojo=00f067aa0ba902b7" and sent["x-request-id"] == "req-abc.1"

    for hop in ("gateway", "retrieval", "ranking"):  # every hop's log line carries both ids
        (line,) = logs.of(hop)
        assert line["request_id"] == "req-abc.1" and line["trace_id"] == CALLER_TRACE, line


def test_the_gateways_text_encoder_call_carries_the_trace_and_request_id(logs):
    """UpsertItems embeds through Triton's text_encoder: that call is in the caller's trace, its
    parent the gateway's span, with the caller's request id."""
    async def go():
        async with chain() as (stub, triton):
            await stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.NewItem(item_id="n1", title="a title")]),
                                   timeout=10, metadata=(("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"),
                                                         ("x-request-id", "upsert-9")))
            return triton.metadata
    (sent,) = asyncio.run(go())
    gateway = server_spans_of(GATEWAY)
    assert sent["traceparent"] == f"00-{CALLER_TRACE}-{hexid(gateway.context.span_id, 16)}-01"
    assert sent["x-request-id"] == "upsert-9"


def server_spans_of(service: str):
    (span,) = [s for s in EXPORTER.get_finished_spans()
               if s.kind == SpanKind.SERVER and s.resource.attributes["service.name"] == f"fusionrec-{service}"]
    return span


@pytest.mark.parametrize("metadata", [(), (("x-request-id", "from-header"),)])
def test_the_request_field_request_id_is_the_one_every_hop_logs(logs, metadata):
    """RecommendRequest.request_id is echoed in the response, so it is also the id every hop
    logs and Triton gets (ahead of x-request-id)."""
    async def go():
        async with chain() as (stub, triton):
            reply = await stub.Recommend(pb.RecommendRequest(user_id="u", k=3, request_id="body-7"),
                                         timeout=10, metadata=metadata)
            return reply, triton.metadata
    reply, (sent,) = asyncio.run(go())
    assert reply.request_id == "body-7" and sent["x-request-id"] == "body-7"
    assert [line["request_id"] for hop in ("gateway", "retrieval", "ranking") for line in logs.of(hop)] == ["body-7"] * 3


def test_without_caller_context_one_new_trace_and_its_id_is_the_request_id(logs):
    async def go():
        async with chain() as (stub, triton):
            return await stub.Recommend(pb.RecommendRequest(user_id="u", k=3), timeout=10), triton.metadata
    reply, (sent,) = asyncio.run(go())
    assert "x-request-id" not in sent   # the id is the trace id: traceparent carries it, no second header
    spans = server_spans()
    trace_ids = {hexid(s.context.trace_id, 32) for s in spans.values()}
    assert len(trace_ids) == 1 and CALLER_TRACE not in trace_ids
    (trace_id,) = trace_ids
    assert spans[GATEWAY].parent is None             # the gateway's span is the root
    assert reply.request_id == trace_id              # response, logs and trace agree
    assert {line["request_id"] for line in logs.lines if "hop" in line} == {trace_id}


@pytest.mark.parametrize("traceparent", ["garbage", f"00-{'0' * 32}-{CALLER_SPAN}-01",
                                         f"zz-{CALLER_TRACE}-{CALLER_SPAN}-01", f"00-{CALLER_TRACE}-{CALLER_SPAN}"])
def test_a_malformed_traceparent_starts_a_new_trace_and_the_call_succeeds(logs, traceparent):
    async def go():
        async with chain() as (stub, _):
            return await stub.Recommend(pb.RecommendRequest(user_id="u", k=3), timeout=10, metadata=(
                ("traceparent", traceparent), ("x-request-id", "not a token; {json}")))
    reply = asyncio.run(go())
    spans = server_spans()
    (trace_id,) = {hexid(s.context.trace_id, 32) for s in spans.values()}
    assert trace_id not in (CALLER_TRACE, "0" * 32)
    assert spans[GATEWAY].parent is None
    # An x-request-id that is not a sane token is not logged or echoed: the trace id stands in.
    assert reply.request_id == trace_id
    assert {line["request_id"] for line in logs.lines if "hop" in line} == {trace_id}


def test_a_malformed_tracestate_is_dropped_without_a_log_line(logs, caplog):
    async def go():
        async with chain() as (stub, triton):
            await stub.Recommend(pb.RecommendRequest(user_id="u", k=3), timeout=10, metadata=(
                ("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"), ("tracestate", "user 42 = secret")))
            return triton.metadata
    with caplog.at_level(logging.WARNING, logger="opentelemetry"):
        (sent,) = asyncio.run(go())
    assert "tracestate" not in sent and sent["traceparent"].split("-")[1] == CALLER_TRACE   # trace kept
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")]


def test_an_unsampled_caller_is_propagated_but_not_recorded(logs):
    async def go():
        async with chain() as (stub, triton):
            await stub.Recommend(pb.RecommendRequest(user_id="u", k=3), timeout=10, metadata=(
                ("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"),))
            return triton.metadata
    (sent,) = asyncio.run(go())
    assert EXPORTER.get_finished_spans() == ()       # the caller's "not sampled" is kept...
    version, trace_id, span_id, flags = sent["traceparent"].split("-")
    assert (trace_id, flags) == (CALLER_TRACE, "00")  # ...and passed on, with our own span ids
    assert span_id != CALLER_SPAN
    assert {line["trace_id"] for line in logs.lines if "hop" in line} == {CALLER_TRACE}


def test_a_stream_handler_logs_with_the_request_id_and_nothing_leaks_between_calls(logs):
    async def batches():
        for _ in range(2):
            yield pb.EventBatch()

    async def go():
        async with chain() as (stub, _):
            await stub.ReportEvents(batches(), timeout=10, metadata=(("x-request-id", "stream-1"),))
            await stub.Recommend(pb.RecommendRequest(user_id="u", k=3), timeout=10, metadata=(("x-request-id", "next-2"),))
        log.info("after", extra={"hop": "outside"})
        return current_request_id()
    outside = asyncio.run(go())
    assert [line["request_id"] for line in logs.of("gateway-stream")] == ["stream-1", "stream-1"]
    assert [line["request_id"] for line in logs.of("gateway")] == ["next-2"]
    (after,) = logs.of("outside")
    assert "request_id" not in after and "trace_id" not in after and outside == ""


def test_streaming_calls_from_inside_a_span_carry_it(logs):
    """The client interceptors of the streaming kinds inject too (client stream: ReportEvents;
    server stream: Health.Watch, untraced by the server but sent through the interceptor)."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    async def batches():
        yield pb.EventBatch()

    async def go():
        mine = SpanContext(int(CALLER_TRACE, 16), int(CALLER_SPAN, 16), is_remote=False,
                           trace_flags=TraceFlags(TraceFlags.SAMPLED))
        token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(mine)))
        try:
            async with chain() as (stub, _):
                await stub.ReportEvents(batches(), timeout=10)
            health_servicer = health.aio.HealthServicer()
            server, target = await start(GATEWAY, lambda s: health_pb2_grpc.add_HealthServicer_to_server(health_servicer, s))
            try:
                async with open_channel(target) as channel:
                    async for reply in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=5):
                        return reply.status
            finally:
                await server.stop(None)
        finally:
            otel_context.detach(token)
    assert asyncio.run(go()) == health_pb2.HealthCheckResponse.SERVING
    (span,) = [s for s in EXPORTER.get_finished_spans() if s.name.endswith("ReportEvents")]
    assert hexid(span.context.trace_id, 32) == CALLER_TRACE and hexid(span.parent.span_id, 16) == CALLER_SPAN
    (line,) = logs.of("gateway-stream")
    assert line["trace_id"] == CALLER_TRACE


def test_health_checks_are_not_traced(logs):
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    async def go():
        server, target = await start(GATEWAY, lambda s: health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), s))
        try:
            async with open_channel(target) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        finally:
            await server.stop(None)
        return reply.status
    assert asyncio.run(go()) == 1   # SERVING
    assert EXPORTER.get_finished_spans() == ()


class _Context:
    """Enough of a ServicerContext for calling the wrapped handler directly."""

    def code(self):
        return None


def test_interceptor_cost_per_call_is_small(logs):
    """Prints the interceptor's own cost per call (span, context, request id) with no exporter
    (the default), measured without the network; asserts only what each call saw. Then, with the
    in-memory exporter, that each call got its own span in the caller's trace."""
    calls = 1000

    async def behavior(request, context):
        return current_request_id()

    async def continuation(details):
        return grpc.unary_unary_rpc_method_handler(behavior)

    details = grpc.HandlerCallDetails()
    details.method = "/fusionrec.v1.Retrieval/Retrieve"
    details.invocation_metadata = (("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"), ("x-request-id", "bench"))

    async def go(interceptor, n: int) -> tuple[float, list[str]]:
        ids = []
        start = time.perf_counter()
        for _ in range(n):
            handler = await (interceptor.intercept_service(continuation, details) if interceptor else continuation(details))
            ids.append(await handler.unary_unary(None, _Context()))
        return (time.perf_counter() - start) / n * 1e6, ids

    bare_us, _ = asyncio.run(go(None, calls))
    traced_us, ids = asyncio.run(go(tracing.server_interceptor(ServerConfig(), "trace-test-bench"), calls))
    print(f"\ntracing interceptor, no exporter: {traced_us - bare_us:.1f} us per call "
          f"(traced {traced_us:.1f} us, bare {bare_us:.1f} us; {calls} calls)")
    assert ids == ["bench"] * calls

    EXPORTER.clear()
    asyncio.run(go(tracing.server_interceptor(ServerConfig(), RETRIEVAL), 50))
    spans = EXPORTER.get_finished_spans()
    assert len(spans) == 50 and len({s.context.span_id for s in spans}) == 50
    assert {hexid(s.context.trace_id, 32) for s in spans} == {CALLER_TRACE}


def test_with_an_otlp_endpoint_spans_reach_the_collector(logs):
    """--otlp-endpoint on: the server's spans arrive at an OTLP/gRPC collector (a fake one here)
    with the service name and the caller's trace id."""
    from concurrent import futures

    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received: list = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            received.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    collector = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), collector)
    port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()
    service = "trace-test-otlp"
    config = ServerConfig(otlp_endpoint=f"http://127.0.0.1:{port}")

    async def go():
        server = grpc.aio.server(interceptors=standard_interceptors(config, service))
        pb_grpc.add_RetrievalServicer_to_server(FakeRetrieval(), server)
        target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        try:
            async with open_channel(target) as channel:
                await pb_grpc.RetrievalStub(channel).Retrieve(pb.RetrieveRequest(), timeout=5, metadata=(
                    ("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"),))
        finally:
            await server.stop(None)
    try:
        asyncio.run(go())
        assert tracing.tracer_provider(service).force_flush(10_000)
    finally:
        collector.stop(None)
    spans = [(resource.resource, span) for request in received for resource in request.resource_spans
             for scope in resource.scope_spans for span in scope.spans]
    assert len(spans) == 1, spans
    resource, span = spans[0]
    assert {a.key: a.value.string_value for a in resource.attributes}["service.name"] == f"fusionrec-{service}"
    assert span.trace_id.hex() == CALLER_TRACE and span.parent_span_id.hex() == CALLER_SPAN
    assert span.name == "fusionrec.v1.Retrieval/Retrieve"
