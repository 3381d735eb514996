"""The gateway's Recommend steps in process: the tiny artifact set, fake Retrieval/Ranking stubs
(canned responses, or grpc.aio.AioRpcError with a status code), a fake user-state store.

Each fallback path, the deleted-item guard, degraded reasons as enum and strings, stage names.
"""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from prometheus_client import REGISTRY

from common.config import GatewayConfig
from common.versions import VersionSet
from core.reasons import DegradedReason as R
from gateway.recommend import Recommendation, RecommendPipeline
from gateway.server import RecommenderServicer, recommendation_to_proto
from gateway.serving_state import ServingState
from gateway.validation import RecommendQuery
from protos import fusionrec_pb2 as pb
from tests.tiny_artifacts import FakeServicerContext, item_id, user_id

K = 5
# The gateway stage names the dashboards and tests/unit/test_deploy_monitoring.py know.
GATEWAY_STAGES = {"retrieve", "rank", "fallback"}


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="fake")


def candidates(items: list[int]) -> pb.Candidates:
    """bert retrieved every item, cf every other one."""
    n = len(items)
    return pb.Candidates(items=items, channels=[
        pb.ChannelColumn(channel="bert", scores=[1.0] * n, ranks=list(range(1, n + 1))),
        pb.ChannelColumn(channel="cf", scores=[0.5 if j % 2 else 0.0 for j in range(n)],
                         ranks=[j if j % 2 else 0 for j in range(n)])])


class FakeRetrieval:
    def __init__(self, items: list[int] | None = None, fail: Exception | None = None) -> None:
        self.items = items if items is not None else list(range(40, 10, -1))
        self.fail = fail
        self.requests: list[pb.RetrieveRequest] = []
        self.updates: list[pb.ItemUpdate] = []

    async def Retrieve(self, request: pb.RetrieveRequest, timeout: float) -> pb.RetrieveResponse:
        self.requests.append(request)
        if self.fail is not None:
            raise self.fail
        return pb.RetrieveResponse(candidates=candidates(self.items), index_version="idx-7",
                                   stage_ms={"channel_bert": 0.5, "merge": 0.1})

    async def UpdateItems(self, request: pb.ItemUpdate, timeout: float) -> pb.ItemUpdateResponse:
        self.updates.append(request)
        return pb.ItemUpdateResponse()


class FakeRanking:
    """Ranks the candidates in reverse, scores 10, 9, ...; `reasons` as its own degraded reasons."""

    def __init__(self, fail: Exception | None = None, reasons: tuple[R, ...] = ()) -> None:
        self.fail = fail
        self.reasons = reasons
        self.requests: list[pb.RankRequest] = []

    async def Rank(self, request: pb.RankRequest, timeout: float) -> pb.RankResponse:
        self.requests.append(request)
        if self.fail is not None:
            raise self.fail
        items = list(request.candidates.items)[::-1][:request.k]
        return pb.RankResponse(items=items, scores=[10.0 - j for j in range(len(items))], model_version="3",
                               degraded=bool(self.reasons), stage_ms={"triton": 1.0, "rerank": 0.2},
                               reasons=[pb.DegradedReason.Value(f"DEGRADED_REASON_{r.name}") for r in self.reasons])


class FakeStore:
    def __init__(self, recent: list[str] | None = None, fail: bool = False) -> None:
        self._recent = recent or []
        self.fail = fail

    async def recent(self, user: str) -> list[str]:
        if self.fail:
            raise ConnectionError("store down")
        return list(self._recent)


@pytest.fixture
def state(tiny_artifacts) -> ServingState:
    return ServingState.load(tiny_artifacts)   # fresh per test: deletes change the catalog


def make(state: ServingState, retrieval: FakeRetrieval | None = None, ranking: FakeRanking | None = None,
         store: FakeStore | None = None, **config) -> tuple[RecommendPipeline, FakeRetrieval, FakeRanking]:
    states: VersionSet[ServingState] = VersionSet()
    states.add(state.version, state)
    retrieval, ranking = retrieval or FakeRetrieval(), ranking or FakeRanking()
    pipeline = RecommendPipeline(states, store or FakeStore(), retrieval, ranking,
                                 GatewayConfig(port=1, **config))
    return pipeline, retrieval, ranking


def query(user: str = user_id(0), k: int = K, exclude: tuple[str, ...] = (),
          history: tuple[str, ...] = ()) -> RecommendQuery:
    return RecommendQuery(user, k, exclude, history, "home", "req-1")


def recommend(pipeline: RecommendPipeline, q: RecommendQuery | None = None,
              budget_s: float = 1.0) -> Recommendation:
    return asyncio.run(pipeline.recommend(q or query(), time.monotonic() + budget_s))


def indices(state: ServingState, r: Recommendation) -> list[int]:
    return [state.catalog.index[i.item_id] for i in r.items]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_steps_are_declared_in_order_with_their_policy(state):
    pipeline, _, _ = make(state)
    assert [(s.name, s.fail_open) for s in pipeline.steps] == [
        ("user_state", True), ("retrieve", True), ("fallback", False), ("rank", True), ("filter", False)]


def test_happy_path_serves_the_ranked_slate(state):
    pipeline, retrieval, ranking = make(state)
    before = metric("fusionrec_stage_seconds_count", service="gateway", stage="rank")
    r = recommend(pipeline)
    assert r.reasons == []
    assert indices(state, r) == list(range(11, 11 + K))          # FakeRanking: candidates reversed
    assert [i.score for i in r.items] == [10.0, 9.0, 8.0, 7.0, 6.0]
    assert [i.rank for i in r.items] == [1, 2, 3, 4, 5]
    # item 11 is the last candidate (position 29: odd -> cf too); 12 is at position 28 (bert only)
    assert r.items[0].channels == ("bert", "cf") and r.items[1].channels == ("bert",)
    assert r.items[0].title == state.catalog.titles[11] and r.items[0].item_id == item_id(11)
    assert r.versions == {"artifacts": state.version, "index": "idx-7", "fused_ranker": "3"}
    assert set(r.stage_ms) == {"retrieve", "rank", "retrieval.channel_bert", "retrieval.merge",
                               "ranking.triton", "ranking.rerank"}
    assert metric("fusionrec_stage_seconds_count", service="gateway", stage="rank") == before + 1
    # retrieval got the user's build history; ranking got the candidates unchanged and k
    assert retrieval.requests[0].history == state.base_history.history(user_id(0)).tolist()
    assert retrieval.requests[0].num_candidates == 300 and retrieval.requests[0].artifact_version == state.version
    assert ranking.requests[0].candidates == candidates(retrieval.items) and ranking.requests[0].k == K


@pytest.mark.parametrize("error, reason", [
    (rpc_error(grpc.StatusCode.UNAVAILABLE), R.RETRIEVAL_UNAVAILABLE),
    (rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED), R.RETRIEVAL_TIMEOUT),
    (rpc_error(grpc.StatusCode.INTERNAL), R.RETRIEVAL_ERROR),
    (RuntimeError("a bug in the step"), R.RETRIEVAL_ERROR),          # fail-open: any error degrades
])
def test_retrieval_failure_serves_popular_items_not_seen_or_excluded(state, error, reason):
    pipeline, _, ranking = make(state, retrieval=FakeRetrieval(fail=error))
    popular = state.catalog.popular.tolist()
    exclude = (item_id(popular[0]), item_id(popular[3]))
    before = metric("fusionrec_degraded_total", service="gateway", reason=reason.value)
    r = recommend(pipeline, query(exclude=exclude))
    history = set(state.base_history.history(user_id(0)).tolist())
    expected = [i for i in popular if i not in history and i not in {popular[0], popular[3]}][:K]
    assert indices(state, r) == expected
    assert [i.score for i in r.items] == [0.0, -1.0, -2.0, -3.0, -4.0]
    assert all(i.channels == ("popular",) for i in r.items)
    assert r.reasons == [reason]
    assert set(r.stage_ms) == {"retrieve", "fallback"} and r.versions == {"artifacts": state.version}
    assert ranking.requests == []
    assert metric("fusionrec_degraded_total", service="gateway", reason=reason.value) == before + 1


@pytest.mark.parametrize("code, reason", [
    (grpc.StatusCode.UNAVAILABLE, R.RANKING_UNAVAILABLE),
    (grpc.StatusCode.DEADLINE_EXCEEDED, R.RANKING_TIMEOUT),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, R.RANKING_ERROR),
])
def test_ranking_failure_serves_the_retrieval_order(state, code, reason):
    pipeline, retrieval, _ = make(state, ranking=FakeRanking(fail=rpc_error(code)))
    r = recommend(pipeline)
    assert indices(state, r) == retrieval.items[:K]
    assert [i.score for i in r.items] == [0.0, -1.0, -2.0, -3.0, -4.0]
    assert r.reasons == [reason]
    assert r.versions == {"artifacts": state.version, "index": "idx-7"}
    assert set(r.stage_ms) == {"retrieve", "rank", "retrieval.channel_bert", "retrieval.merge"}


def test_no_budget_left_skips_ranking(state):
    """A deadline already spent: retrieval still answers (fake), ranking is not even called."""
    pipeline, retrieval, ranking = make(state)
    r = recommend(pipeline, query(history=(item_id(1), item_id(2))), budget_s=0.0)
    assert r.reasons == [R.RANKING_TIMEOUT] and ranking.requests == []
    assert indices(state, r) == retrieval.items[:K]
    assert "rank" not in r.stage_ms and "retrieve" in r.stage_ms


def test_ranking_reasons_pass_through_as_enum_and_strings(state):
    pipeline, _, _ = make(state, store=FakeStore(fail=True),
                          ranking=FakeRanking(reasons=(R.TRITON_UNAVAILABLE, R.RERANKER_ERROR)))
    r = recommend(pipeline)
    assert r.reasons == [R.USER_STATE_UNAVAILABLE, R.TRITON_UNAVAILABLE, R.RERANKER_ERROR]
    msg = recommendation_to_proto(r)
    assert msg.degraded and list(msg.degraded_reasons) == [
        "user_state_unavailable", "triton_unavailable", "reranker_error"]
    assert [pb.DegradedReason.Name(n) for n in msg.reasons] == [
        "DEGRADED_REASON_USER_STATE_UNAVAILABLE", "DEGRADED_REASON_TRITON_UNAVAILABLE",
        "DEGRADED_REASON_RERANKER_ERROR"]
    assert [i.item_id for i in msg.items] == [i.item_id for i in r.items] and msg.request_id == "req-1"
    assert dict(msg.versions) == r.versions and set(msg.stage_ms) == set(r.stage_ms)


def test_failing_store_keeps_the_build_history_without_deleted_items(state):
    base = state.base_history.history(user_id(0)).tolist()
    state.catalog.delete([item_id(base[0])])
    pipeline, retrieval, _ = make(state, store=FakeStore(fail=True))
    r = recommend(pipeline)
    assert r.reasons == [R.USER_STATE_UNAVAILABLE]
    assert retrieval.requests[0].history == base[1:]
    assert len(r.items) == K                                     # the answer itself is whole


def test_recent_events_extend_the_history_latest_occurrence_kept_and_capped(state):
    base = state.base_history.history(user_id(0)).tolist()
    a, b = [j for j in range(60) if j not in base][:2]
    recent = [item_id(a), item_id(base[0]), item_id(b), "unknown-item"]
    pipeline, retrieval, _ = make(state, store=FakeStore(recent))
    recommend(pipeline)
    assert retrieval.requests[0].history == [*base[1:], a, base[0], b]
    capped, retrieval, _ = make(state, store=FakeStore(recent), history_cap=2)
    recommend(capped)
    assert retrieval.requests[0].history == [base[0], b]


def test_explicit_history_is_used_as_given(state):
    pipeline, retrieval, _ = make(state, store=FakeStore(fail=True))   # not asked: no degraded reason
    r = recommend(pipeline, query(user="", history=(item_id(7), item_id(3), "unknown")))
    assert retrieval.requests[0].history == [7, 3] and r.reasons == []


@pytest.mark.parametrize("ranking_fails", [False, True])
def test_deleted_items_never_leave_the_gateway(state, ranking_fails):
    """Retrieval and ranking may not know a delete yet: the filter step takes the items out and
    the answer still has k items when there are enough."""
    pipeline, retrieval, ranking = make(
        state, ranking=FakeRanking(fail=rpc_error(grpc.StatusCode.UNAVAILABLE) if ranking_fails else None))
    served_first = retrieval.items[:2] if ranking_fails else [11, 12]
    state.catalog.delete([item_id(i) for i in served_first])
    r = recommend(pipeline)
    assert not set(indices(state, r)) & set(served_first)
    assert set(served_first) <= set(retrieval.requests[0].exclude)    # retrieval is told too
    if ranking_fails:
        assert indices(state, r) == retrieval.items[2:2 + K]
    else:
        assert indices(state, r) == [13, 14, 15]                     # ranking's slate, less the deleted


def test_popular_fallback_skips_deleted_items(state):
    popular = state.catalog.popular.tolist()
    history = set(state.base_history.history(user_id(0)).tolist())
    live = [i for i in popular if i not in history]
    state.catalog.delete([item_id(live[0]), item_id(live[2])])
    pipeline, _, _ = make(state, retrieval=FakeRetrieval(fail=rpc_error(grpc.StatusCode.UNAVAILABLE)))
    r = recommend(pipeline)
    assert indices(state, r) == [live[1], *live[3:3 + K - 1]]


def test_retrieve_exclude_is_capped_at_the_retrieval_limit(state):
    from core.limits import MAX_RETRIEVE_EXCLUDE
    pipeline, retrieval, _ = make(state)
    recommend(pipeline, query(exclude=tuple(item_id(j % 60) for j in range(MAX_RETRIEVE_EXCLUDE + 5))))
    assert len(retrieval.requests[0].exclude) == MAX_RETRIEVE_EXCLUDE


def test_stage_names_are_the_dashboards(state):
    seen: set[str] = set()
    for retrieval, ranking in ((None, None), (FakeRetrieval(fail=rpc_error(grpc.StatusCode.UNAVAILABLE)), None),
                               (None, FakeRanking(fail=rpc_error(grpc.StatusCode.UNAVAILABLE)))):
        pipeline, _, _ = make(state, retrieval=retrieval, ranking=ranking)
        seen |= {k for k in recommend(pipeline).stage_ms if "." not in k}
    assert seen == GATEWAY_STAGES


def test_servicer_translates_request_and_response(state):
    pipeline, _, _ = make(state, ranking=FakeRanking(fail=rpc_error(grpc.StatusCode.UNAVAILABLE)))
    servicer = RecommenderServicer(pipeline, events=None, items=None, default_deadline_s=1.0)
    msg = asyncio.run(servicer.Recommend(pb.RecommendRequest(user_id=user_id(1), k=3), FakeServicerContext()))
    assert len(msg.items) == 3 and list(msg.degraded_reasons) == ["ranking_unavailable"]
    assert list(msg.reasons) == [pb.DEGRADED_REASON_RANKING_UNAVAILABLE] and len(msg.request_id) == 32
    context = FakeServicerContext()
    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(servicer.Recommend(pb.RecommendRequest(user_id="u", k=0), context))
    assert context.code() == grpc.StatusCode.INVALID_ARGUMENT and context.details.startswith("k:")
