"""Trace context on the real stack: one Recommend with a caller's traceparent, every service
exporting to an OTLP/gRPC collector (a fake one in this test) -> the gateway's, retrieval's and
ranking's spans arrive in the caller's trace, chained gateway -> retrieval / ranking. (The
services write no per-request log line at info, so the spans are what is checked; the ranking ->
Triton headers are checked in tests/unit/test_tracing.py.)"""
from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc
from tools.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []   # (service.name, span)
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource in request.resource_spans:
                name = {a.key: a.value.string_value for a in resource.resource.attributes}.get("service.name", "")
                self.spans += [(name, span) for scope in resource.scope_spans for span in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: str) -> dict[str, object]:
        with self.lock:
            return {name: span for name, span in self.spans if span.trace_id.hex() == trace_id}


def test_one_recommend_is_one_trace_across_the_services(built, tmp_path, monkeypatch):
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv("FUSIONREC_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")   # every child
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")                        # export within 0.1 s
    artifacts, model_repo = built
    try:
        with Stack(artifacts, model_repo, tmp_path / "run") as stack:
            channel = stack.gateway_channel(scopes="recommend")
            reply = pb_grpc.RecommenderStub(channel).Recommend(
                pb.RecommendRequest(user_id="1", k=5), timeout=5,
                metadata=(("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"), ("x-request-id", "stack-trace-1")))
            channel.close()
            assert reply.request_id == "stack-trace-1" and not reply.degraded, reply.degraded_reasons
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and len(collector.of_trace(CALLER_TRACE)) < 3:
                time.sleep(0.1)
    finally:
        server.stop(None)
    spans = collector.of_trace(CALLER_TRACE)
    gateway, retrieval, ranking = (spans.get(f"fusionrec-{s}") for s in ("gateway", "retrieval", "ranking"))
    assert gateway is not None and retrieval is not None and ranking is not None, sorted(spans)
    assert gateway.name == "fusionrec.v1.Recommender/Recommend" and gateway.parent_span_id.hex() == CALLER_SPAN
    assert retrieval.name == "fusionrec.v1.Retrieval/Retrieve" and retrieval.parent_span_id == gateway.span_id
    assert ranking.name == "fusionrec.v1.Ranking/Rank" and ranking.parent_span_id == gateway.span_id
    for span in (gateway, retrieval, ranking):   # the caller's x-request-id reached every hop
        attributes = {a.key: a.value.string_value for a in span.attributes}
        assert attributes["fusionrec.request_id"] == "stack-trace-1", span.name
