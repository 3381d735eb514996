"""End to end through the public API, on the real Triton, FAISS and LightGBM."""
from __future__ import annotations

import re
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos import fusionrec_pb2 as pb

pytestmark = pytest.mark.integration


def test_known_user_gets_k_distinct_unseen_items(gateway, known_user):
    user, history = known_user
    exclude = ["1", "2", "3"]
    r = gateway.Recommend(pb.RecommendRequest(user_id=user, k=10, exclude_item_ids=exclude,
                                              request_id="req-1"), timeout=5)
    ids = [i.item_id for i in r.items]
    assert len(ids) == 10 == len(set(ids))
    assert not set(ids) & (set(history) | set(exclude))
    assert not r.degraded, list(r.degraded_reasons)
    assert r.request_id == "req-1"
    assert {"artifacts", "index", "fused_ranker"} <= set(r.versions)
    assert [i.rank for i in r.items] == list(range(1, 11))
    assert all(i.title and i.channels for i in r.items)
    assert {"retrieve", "rank", "ranking.triton", "ranking.rerank"} <= set(r.stage_ms)


def test_anonymous_user_with_history(gateway, known_user):
    _, history = known_user
    r = gateway.Recommend(pb.RecommendRequest(history_item_ids=history[-5:], k=5), timeout=5)
    assert len(r.items) == 5 and not r.degraded
    assert not {i.item_id for i in r.items} & set(history[-5:])
    assert any("bert" in i.channels for i in r.items)
    assert r.request_id   # generated


def test_unknown_user_without_history_gets_popular_items(gateway):
    r = gateway.Recommend(pb.RecommendRequest(user_id="never-seen-user", k=7), timeout=5)
    assert len(r.items) == 7
    assert all(list(i.channels) == ["popular"] for i in r.items)


@pytest.mark.parametrize("kwargs, field, limit", [
    ({"user_id": "u", "k": 0}, "k", "1..100"),
    ({"user_id": "u", "k": 101}, "k", "1..100"),
    ({"user_id": "", "k": 5}, "user_id", "required unless history_item_ids"),
    ({"user_id": "x" * 10_000, "k": 5}, "user_id", "256"),
    ({"user_id": "u", "k": 5, "exclude_item_ids": [str(i) for i in range(100_000)]}, "exclude_item_ids", "10000"),
])
def test_bad_input_is_invalid_argument(gateway, kwargs, field, limit):
    with pytest.raises(grpc.RpcError) as info:
        gateway.Recommend(pb.RecommendRequest(**kwargs), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field + ":")
    assert limit in info.value.details()


def test_internal_services_reject_bad_indices(stack):
    from protos import fusionrec_pb2_grpc as pb_grpc
    with stack.channel("retrieval") as ch:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.RetrievalStub(ch).Retrieve(pb.RetrieveRequest(history=[10**9]), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "history" in info.value.details()
    with stack.channel("ranking") as ch:
        bad = pb.Candidates(items=[1, 2], channels=[pb.ChannelColumn(channel="bert", scores=[1.0], ranks=[1])])
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.RankingStub(ch).Rank(pb.RankRequest(candidates=bad, k=1), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "candidates" in info.value.details()


@pytest.mark.parametrize("name, service", [("gateway", "fusionrec.v1.Recommender"),
                                           ("retrieval", "fusionrec.v1.Retrieval"),
                                           ("ranking", "fusionrec.v1.Ranking")])
def test_health_and_reflection(stack, name, service):
    with stack.channel(name) as ch:   # the operator's channel (a client cert cannot reach retrieval/ranking)
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        replies = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert service in names and "grpc.health.v1.Health" in names


def _metrics(stack, name: str) -> str:
    return urllib.request.urlopen(stack.metrics_url(name), timeout=5).read().decode()


def test_metrics_exposed_without_ids(stack, gateway, known_user):
    user, _ = known_user
    gateway.Recommend(pb.RecommendRequest(user_id=user, k=5), timeout=5)
    with pytest.raises(grpc.RpcError):
        gateway.Recommend(pb.RecommendRequest(user_id=user, k=0), timeout=5)
    text = _metrics(stack, "gateway")
    assert 'fusionrec_grpc_requests_total{code="OK",method="Recommend",service="gateway"}' in text
    assert 'fusionrec_grpc_requests_total{code="INVALID_ARGUMENT",method="Recommend",service="gateway"}' in text
    assert 'fusionrec_stage_seconds_count{service="gateway",stage="rank"}' in text
    retrieval = _metrics(stack, "retrieval")
    for stage in ("channel_bert", "channel_cf", "channel_popular", "merge"):
        assert f'stage="{stage}"' in retrieval
    assert 'fusionrec_candidates_count{channel="merged"}' in retrieval
    ranking = _metrics(stack, "ranking")
    assert 'stage="triton"' in ranking and 'stage="rerank"' in ranking
    for body in (text, retrieval, ranking):
        labels = " ".join(re.findall(r"\{([^}]*)\}", body))
        assert f'"{user}"' not in labels
