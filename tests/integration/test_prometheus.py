"""A real Prometheus server (Debian's package) scrapes the running stack, Triton included."""
from __future__ import annotations

import time

import pytest

from protos import fusionrec_pb2 as pb

from .prometheus_fixture import JOBS, prometheus, query, wait_for  # noqa: F401  (prometheus: fixture)

pytestmark = pytest.mark.integration


def test_every_component_is_scraped(prometheus, gateway, known_user):
    for _ in range(5):
        gateway.Recommend(pb.RecommendRequest(user_id=known_user[0], k=10), timeout=5)
    up = wait_for(prometheus, "up == 1")
    deadline = time.monotonic() + 30
    while {s["metric"]["job"] for s in up} != set(JOBS) and time.monotonic() < deadline:
        time.sleep(0.5)
        up = query(prometheus, "up == 1")
    assert {s["metric"]["job"] for s in up} == set(JOBS)
    ok = wait_for(prometheus, 'fusionrec_grpc_requests_total{service="gateway",method="Recommend",code="OK"} > 0')
    assert ok
    p99 = wait_for(prometheus, 'histogram_quantile(0.99, sum by (le, stage) (fusionrec_stage_seconds_bucket{service="ranking"}))')
    assert {s["metric"]["stage"] for s in p99} >= {"triton", "rerank"}
    assert wait_for(prometheus, 'nv_inference_request_success{model="fused_ranker"} > 0')
