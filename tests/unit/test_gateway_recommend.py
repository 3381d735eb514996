"""The gateway's Recommend steps in process: the tiny artifact set, fake Retrieval/Ranking stubs
(canned responses, or grpc.aio.AioRpcError with a status code), a fake user-state store, item-log
records applied to the catalog as the follower would.

Each fallback path, the deleted-item guard (bitmap), unknown indices from a replica ahead of the
gateway, the item log unreadable, erased users, degraded reasons as enum and strings, stage names.
"""
from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from common.config import GatewayConfig
from common.versions import VersionSet
from common.wire import reasons_to_proto
from core.item_records import ItemOp, ItemRecord
from core.reasons import DegradedReason as R
from gateway.recommend import Recommendation, RecommendPipeline
from gateway.server import RecommenderServicer, recommendation_to_proto
from gateway.serving_state import ServingState
from gateway.state_store import UserRecent
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
    def __init__(self, items: list[int] | None = None, fail: Exception | None = None,
                 reasons: tuple[R, ...] = ()) -> None:
        self.items = items if items is not None else list(range(40, 10, -1))
        self.fail = fail
        self.reasons = reasons
        self.requests: list[pb.RetrieveRequest] = []

    async def Retrieve(self, request: pb.RetrieveRequest, timeout: float) -> pb.RetrieveResponse:
        self.requests.append(request)
        if self.fail is not None:
            raise self.fail
        return pb.RetrieveResponse(candidates=candidates(self.items), index_version="idx-7",
                                   stage_ms={"channel_bert": 0.5, "merge": 0.1},
                                   reasons=reasons_to_proto(self.reasons))


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
    def __init__(self, recent: list[str] | None = None, fail: bool = False, erased_at: float | None = None) -> None:
        self._recent = recent or []
        self.fail = fail
        self.erased_at = erased_at
        self.asked: list[str] = []

    async def recent_state(self, user: str) -> UserRecent:
        self.asked.append(user)
        if self.fail:
            raise ConnectionError("store down")
        return UserRecent(list(self._recent), self.erased_at)


class FakeFollower:
    def __init__(self, ok: bool = True) -> None:
        self.ok = ok


def log_records(state: ServingState, *records: ItemRecord) -> int:
    """Apply records to the catalog as the item-log follower would (next seqs); -> the last seq."""
    seq = state.catalog.applied_seq
    numbered = [ItemRecord(r.op, r.item_id, r.title, r.text, r.category, r.vector, seq + j + 1)
                for j, r in enumerate(records)]
    state.catalog.apply(numbered)
    return numbered[-1].seq


def delete(state: ServingState, indices) -> None:
    log_records(state, *(ItemRecord(ItemOp.DELETE, item_id(int(j))) for j in indices))


def upsert_online(state: ServingState, ids: list[str]) -> list[int]:
    dim = state.catalog.overlay.text_dim
    log_records(state, *(ItemRecord(ItemOp.UPSERT, i, f"Online {i}", "", "category1",
                                    np.eye(1, dim, 0, np.float32)[0]) for i in ids))
    return [state.catalog.index[i] for i in ids]


@pytest.fixture
def state(tiny_artifacts) -> ServingState:
    return ServingState.load(tiny_artifacts)   # fresh per test: deletes change the catalog


def make(state: ServingState, retrieval: FakeRetrieval | None = None, ranking: FakeRanking | None = None,
         store: FakeStore | None = None, follower: FakeFollower | None = None,
         **config) -> tuple[RecommendPipeline, FakeRetrieval, FakeRanking]:
    states: VersionSet[ServingState] = VersionSet()
    states.add(state.version, state)
    retrieval, ranking = retrieval or FakeRetrieval(), ranking or FakeRanking()
    pipeline = RecommendPipeline(states, store or FakeStore(), retrieval, ranking,
                                 GatewayConfig(port=1, **config), follower=follower)
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
    assert r.items[0].title == state.catalog.title(11) and r.items[0].item_id == item_id(11)
    assert r.versions == {"artifacts": state.version, "index": "idx-7", "fused_ranker": "3"}
    assert set(r.stage_ms) == {"retrieve", "rank", "retrieval.channel_bert", "retrieval.merge",
                               "ranking.triton", "ranking.rerank"}
    assert metric("fusionrec_stage_seconds_count", service="gateway", stage="rank") == before + 1
    # retrieval got the user's build history; ranking got the candidates unchanged and k
    assert retrieval.requests[0].history == state.base_history.history(user_id(0)).tolist()
    assert retrieval.requests[0].num_candidates == 300 and retrieval.requests[0].artifact_version == state.version
    assert retrieval.requests[0].user_id == user_id(0)
    assert ranking.requests[0].candidates == candidates(retrieval.items) and ranking.requests[0].k == K


def test_requests_carry_the_item_log_position_and_no_deleted_list(state):
    """A replica behind the gateway's log position catches up first; deletes are its own bitmap."""
    delete(state, [3, 4])
    seq = log_records(state, ItemRecord(ItemOp.DELETE, item_id(5)))
    pipeline, retrieval, ranking = make(state)
    recommend(pipeline, query(exclude=(item_id(7),)))
    assert retrieval.requests[0].min_item_log_seq == seq == ranking.requests[0].min_item_log_seq
    assert list(retrieval.requests[0].exclude) == [7]            # only the caller's exclusions


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


def test_retrievals_reasons_degrade_the_answer_before_rankings(state):
    """A channel that failed in retrieval (the sequential encoder) is a degraded answer, though the
    candidates came and were ranked."""
    pipeline, _, _ = make(state, retrieval=FakeRetrieval(reasons=(R.SEQUENTIAL_UNAVAILABLE,)),
                          ranking=FakeRanking(reasons=(R.RERANKER_ERROR,)))
    r = recommend(pipeline)
    assert r.reasons == [R.SEQUENTIAL_UNAVAILABLE, R.RERANKER_ERROR] and len(r.items) == K
    assert recommendation_to_proto(r).degraded


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


def test_failing_store_serves_the_user_as_unknown(state):
    """Without the store the gateway cannot tell an erased user: no build history, no user id."""
    pipeline, retrieval, _ = make(state, store=FakeStore(fail=True))
    r = recommend(pipeline)
    assert r.reasons == [R.USER_STATE_UNAVAILABLE]
    assert retrieval.requests[0].history == [] and retrieval.requests[0].user_id == ""
    assert len(r.items) == K                                     # the answer itself is whole


def test_history_leaves_out_deleted_items(state):
    base = state.base_history.history(user_id(0)).tolist()
    delete(state, [base[0]])
    pipeline, retrieval, _ = make(state)
    recommend(pipeline)
    assert retrieval.requests[0].history == base[1:]


def test_an_erased_user_is_unknown_until_their_new_events(state):
    base = state.base_history.history(user_id(0)).tolist()
    assert base, "the tiny set gives every user a history"
    pipeline, retrieval, _ = make(state, store=FakeStore(erased_at=1.7e9))
    r = recommend(pipeline)
    assert retrieval.requests[0].history == [] and retrieval.requests[0].user_id == ""   # no build data, no CF vector
    assert r.reasons == [] and len(r.items) == K
    fresh = [j for j in range(60) if j not in base][:2]
    pipeline, retrieval, _ = make(state, store=FakeStore([item_id(j) for j in fresh], erased_at=1.7e9))
    recommend(pipeline)
    assert retrieval.requests[0].history == fresh and retrieval.requests[0].user_id == ""
    # With an explicit history too: the user id is not sent for an erased user.
    pipeline, retrieval, _ = make(state, store=FakeStore(erased_at=1.7e9))
    recommend(pipeline, query(history=(item_id(9),)))
    assert retrieval.requests[0].history == [9] and retrieval.requests[0].user_id == ""


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


def test_explicit_history_is_sent_whole_not_cut_to_the_history_cap(state):
    """history_cap bounds the stored recent history; a caller's explicit history (<= MAX_HISTORY) is
    all "seen": cutting it would let retrieval propose items the caller said the user has seen."""
    pipeline, retrieval, _ = make(state, history_cap=2)
    history = tuple(item_id(j) for j in range(10))
    recommend(pipeline, query(history=history))
    assert retrieval.requests[0].history == list(range(10))


def test_explicit_history_is_used_as_given(state):
    store = FakeStore(fail=True)
    pipeline, retrieval, _ = make(state, store=store)   # anonymous: not asked, no degraded reason
    r = recommend(pipeline, query(user="", history=(item_id(7), item_id(3), "unknown")))
    assert retrieval.requests[0].history == [7, 3] and r.reasons == [] and store.asked == []


@pytest.mark.parametrize("ranking_fails", [False, True])
def test_deleted_items_never_leave_the_gateway(state, ranking_fails):
    """Retrieval and ranking may not know a delete yet: the filter step takes the items out and
    the answer still has k items when there are enough."""
    pipeline, retrieval, ranking = make(
        state, ranking=FakeRanking(fail=rpc_error(grpc.StatusCode.UNAVAILABLE) if ranking_fails else None))
    served_first = retrieval.items[:2] if ranking_fails else [11, 12]
    delete(state, served_first)
    r = recommend(pipeline)
    assert not set(indices(state, r)) & set(served_first)
    assert not set(served_first) & set(retrieval.requests[0].exclude)  # retrieval's own bitmap, not the request
    if ranking_fails:
        assert indices(state, r) == retrieval.items[2:2 + K]
    else:
        assert indices(state, r) == [13, 14, 15]                     # ranking's slate, less the deleted


def test_popular_fallback_skips_deleted_items(state):
    popular = state.catalog.popular.tolist()
    history = set(state.base_history.history(user_id(0)).tolist())
    live = [i for i in popular if i not in history]
    delete(state, [live[0], live[2]])
    pipeline, _, _ = make(state, retrieval=FakeRetrieval(fail=rpc_error(grpc.StatusCode.UNAVAILABLE)))
    r = recommend(pipeline)
    assert indices(state, r) == [live[1], *live[3:3 + K - 1]]


def test_popular_fallback_fills_k_when_most_items_are_deleted(state):
    """The fallback widens its window instead of fetching len(deleted) more: still k live items."""
    popular = state.catalog.popular.tolist()
    history = set(state.base_history.history(user_id(0)).tolist())
    live = [i for i in popular if i not in history]
    delete(state, live[:-K])
    pipeline, _, _ = make(state, retrieval=FakeRetrieval(fail=rpc_error(grpc.StatusCode.UNAVAILABLE)))
    assert indices(state, recommend(pipeline)) == live[-K:]


@pytest.mark.parametrize("ranking_fails", [False, True])
def test_an_index_the_gateway_cannot_resolve_is_dropped_and_counted(state, ranking_fails):
    """A retrieval replica ahead of this gateway on the item log: its online items are not
    served (the gateway has no id or title for them) and are counted, never an INTERNAL."""
    online = upsert_online(state, ["online-a"])
    total = state.catalog.total
    ahead = [total, total + 1]                                   # online items this gateway has not applied
    retrieval = FakeRetrieval(items=[ahead[0], online[0], 20, ahead[1], 21, 22, 23, 24, 25])
    ranking = FakeRanking(fail=rpc_error(grpc.StatusCode.UNAVAILABLE) if ranking_fails else None)
    pipeline, _, ranking = make(state, retrieval=retrieval, ranking=ranking)
    before = metric("fusionrec_unknown_items_total", service="gateway", field="candidates")
    r = recommend(pipeline)
    assert metric("fusionrec_unknown_items_total", service="gateway", field="candidates") == before + 2
    served = [i.item_id for i in r.items]
    assert len(served) == K
    if ranking_fails:                                            # the retrieval order, less what is unknown
        assert indices(state, r) == [online[0], 20, 21, 22, 23] and served[0] == "online-a"
    assert all(i < total for i in indices(state, r))
    if not ranking_fails:                                        # ranking never sees what the gateway cannot serve
        assert list(ranking.requests[0].candidates.items) == [online[0], 20, 21, 22, 23, 24, 25]
        assert [len(c.ranks) for c in ranking.requests[0].candidates.channels] == [7, 7]


def test_a_ranked_index_the_gateway_cannot_resolve_is_dropped(state):
    class AheadRanking(FakeRanking):
        async def Rank(self, request, timeout):
            reply = await super().Rank(request, timeout)
            reply.items.insert(0, 10_000)
            reply.scores.insert(0, 99.0)
            return reply
    pipeline, _, _ = make(state, ranking=AheadRanking())
    before = metric("fusionrec_unknown_items_total", service="gateway", field="ranked")
    r = recommend(pipeline)
    assert metric("fusionrec_unknown_items_total", service="gateway", field="ranked") == before + 1
    assert r.reasons == [] and 10_000 not in indices(state, r) and r.items[0].score == 10.0


def test_online_items_are_served_with_their_id_and_title(state):
    online = upsert_online(state, ["online-b"])
    pipeline, _, _ = make(state, retrieval=FakeRetrieval(items=[online[0], 30, 31, 32, 33, 34]),
                          ranking=FakeRanking(fail=rpc_error(grpc.StatusCode.UNAVAILABLE)))
    first = recommend(pipeline).items[0]
    assert (first.item_id, first.title, first.category) == ("online-b", "Online online-b", "category1")


def test_item_log_unreadable_degrades_the_answer(state):
    pipeline, _, _ = make(state, follower=FakeFollower(ok=False))
    before = metric("fusionrec_degraded_total", service="gateway", reason="item_state_unavailable")
    r = recommend(pipeline)
    assert r.reasons == [R.ITEM_STATE_UNAVAILABLE] and len(r.items) == K
    assert list(recommendation_to_proto(r).reasons) == [pb.DEGRADED_REASON_ITEM_STATE_UNAVAILABLE]
    assert metric("fusionrec_degraded_total", service="gateway", reason="item_state_unavailable") == before + 1
    assert recommend(make(state, follower=FakeFollower(ok=True))[0]).reasons == []


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
