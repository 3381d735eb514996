"""Prometheus metric set shared by all services (documented in the README's metrics table).

Label values are bounded: service, method, gRPC code, stage, channel and degraded reason come
from fixed vocabularies. User ids, item ids and request strings never become label values.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from core.reasons import PRODUCED, DegradedReason

# Latency buckets in seconds, dense around the 5-50 ms serving range.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04,
                   0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
COUNT_BUCKETS = (0, 1, 5, 10, 25, 50, 100, 150, 200, 250, 300, 400, 500, 1000)

GRPC_REQUESTS = Counter(
    "fusionrec_grpc_requests_total", "gRPC requests handled, by method and status code",
    ["service", "method", "code"])
GRPC_LATENCY = Histogram(
    "fusionrec_grpc_request_seconds", "gRPC request latency, by method and status code",
    ["service", "method", "code"], buckets=LATENCY_BUCKETS)
STAGE_LATENCY = Histogram(
    "fusionrec_stage_seconds", "Latency of one pipeline stage (retrieval channel, Triton call, re-rank, hop)",
    ["service", "stage"], buckets=LATENCY_BUCKETS)
CANDIDATES = Histogram(
    "fusionrec_candidates", "Candidates per request, per retrieval channel and merged",
    ["channel"], buckets=COUNT_BUCKETS)
DEGRADED = Counter(
    "fusionrec_degraded_total", "Responses that fell back, by reason", ["service", "reason"])
ARTIFACT_INFO = Gauge(
    "fusionrec_artifact_info", "Artifact version loaded (value 1)", ["service", "version"])


_served_versions: dict[str, str] = {}   # service -> the version its fusionrec_artifact_info series names


def set_artifact_info(service: str, version: str) -> None:
    """The version `service` serves now: its earlier series removed, other services' kept (a
    colocated gateway hosts three services in one registry)."""
    previous = _served_versions.get(service)
    if previous is not None and previous != version:
        ARTIFACT_INFO.remove(service, previous)
    ARTIFACT_INFO.labels(service, version).set(1)
    _served_versions[service] = version


INDEX_ITEMS = Gauge(
    "fusionrec_index_items", "Items in a FAISS index", ["index"])
EVENTS = Counter(
    "fusionrec_events_total", "Events ingested, by type and outcome", ["type", "outcome"])
# -- item log and replicas (gateway)
UNKNOWN_ITEMS = Counter(
    "fusionrec_unknown_items_total", "Item indices dropped because this process has not applied them "
    "from the item log yet (a replica ahead of it), by field", ["service", "field"])
REPLICAS_LAGGING = Gauge(
    "fusionrec_replicas_lagging", "Reachable replicas that do not serve the newest artifact version or "
    "are behind on the item log, as seen by the gateway", ["service"])
REPLICAS_REACHABLE = Gauge(
    "fusionrec_replicas_reachable", "Replicas that answered the gateway's last Status probe", ["service"])
# -- public API auth (gateway/auth.py): method is a mapped name or "other"; token is the token's
# NAME from the tokens file (operator-chosen, bounded by the file), "" when none matched.
AUTH_DECISIONS = Counter(
    "fusionrec_auth_total", "Public API auth decisions, by method, outcome (ok, unauthenticated, "
    "permission_denied, rate_limited) and token name", ["method", "outcome", "token"])
# -- admission control (common/admission.py): method is one the service implements
ADMISSION_LIMIT = Gauge(
    "fusionrec_admission_limit", "Adaptive concurrency limit: calls admitted in flight, by method",
    ["service", "method"])
ADMISSION_SHED = Counter(
    "fusionrec_admission_shed", "Calls refused early with RESOURCE_EXHAUSTED (over the concurrency "
    "limit), by method", ["service", "method"])

# Fixed vocabularies: anything else is mapped to "other" so a label can never explode.
DEGRADED_REASONS = frozenset({*(r.value for r in PRODUCED), "other"})


def start_metrics_server(port: int, host: str = "127.0.0.1") -> None:
    """Expose /metrics over HTTP on host:port (0 is not allowed: the port is chosen by the caller)."""
    start_http_server(port, addr=host)


def record_degraded(service: str, reason: DegradedReason | str) -> None:
    label = str(reason)
    DEGRADED.labels(service, label if label in DEGRADED_REASONS else "other").inc()


def record_stage(service: str, stage: str, seconds: float) -> None:
    STAGE_LATENCY.labels(service, stage).observe(seconds)


@contextmanager
def stage_timer(service: str, stage: str, sink: dict[str, float] | None = None) -> Iterator[None]:
    """Time a block into fusionrec_stage_seconds and, if given, sink[stage] in milliseconds."""
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        record_stage(service, stage, elapsed)
        if sink is not None:
            sink[stage] = elapsed * 1000.0
