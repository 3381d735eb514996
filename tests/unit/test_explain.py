"""RecommendRequest.explain, in process: the tiny artifact set, a real ranking.ranker.Ranker behind
the real RankingServicer (FakeScorer in place of Triton), called by the gateway's RecommendPipeline
through an in-process stub; retrieval is a canned Candidates message.

Off: no explanation anywhere (not asked of ranking, not built, not sent). On: every item's channels
are its candidate columns with rank > 0, its fused score is the scorer's, and its score is
fused + correction - penalty up to the re-ranker's non-increasing clamp (core/rerank.py: the
reported score is the running minimum of the placement scores). Degraded paths mark what is absent.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time

import grpc
import numpy as np
import pytest

from common.config import GatewayConfig
from common.item_log import SqliteItemLog
from common.versions import VersionSet
from core.features import RETRIEVAL_FEATURES
from core.rerank import DiversityReranker
from gateway.recommend import ExplainedStage, Recommendation, RecommendPipeline
from gateway.server import RecommenderServicer, recommendation_to_proto
from gateway.serving_state import ServingState
from gateway.state_store import UserRecent
from gateway.validation import RecommendQuery, validate_recommend
from protos import fusionrec_pb2 as pb
from ranking.ranker import Ranker
from ranking.server import RankingServicer
from tests.tiny_artifacts import FakeScorer, FakeServicerContext, unavailable, user_id
from tests.tiny_artifacts import ranking_servicer
from tools import client

K = 8
CANDIDATES = list(range(45, 9, -1))   # retrieval order: high indices first; FakeScorer prefers low ones


def candidates(items: list[int]) -> pb.Candidates:
    """bert retrieved every item, cf every third one, popular none (a column of zeros)."""
    n = len(items)
    return pb.Candidates(items=items, channels=[
        pb.ChannelColumn(channel="bert", scores=np.linspace(0.9, 0.1, n).tolist(), ranks=list(range(1, n + 1))),
        pb.ChannelColumn(channel="cf", scores=[0.5 + j / 100 if j % 3 == 0 else 0.0 for j in range(n)],
                         ranks=[j // 3 + 1 if j % 3 == 0 else 0 for j in range(n)]),
        pb.ChannelColumn(channel="popular", scores=[0.0] * n, ranks=[0] * n)])


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="fake")


class FakeRetrieval:
    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail

    async def Retrieve(self, request: pb.RetrieveRequest, timeout: float) -> pb.RetrieveResponse:
        if self.fail is not None:
            raise self.fail
        return pb.RetrieveResponse(candidates=candidates(CANDIDATES), index_version="idx-7")


class InProcessRanking:
    """A RankingStub that calls the real servicer in process and keeps what crossed the hop."""

    def __init__(self, servicer: RankingServicer | None, fail: Exception | None = None) -> None:
        self.servicer = servicer
        self.fail = fail
        self.requests: list[pb.RankRequest] = []
        self.responses: list[pb.RankResponse] = []

    async def Rank(self, request: pb.RankRequest, timeout: float) -> pb.RankResponse:
        self.requests.append(request)
        if self.fail is not None:
            raise self.fail
        response = await self.servicer.Rank(request, FakeServicerContext(timeout))
        self.responses.append(response)
        return response


class FakeStore:
    async def recent_state(self, user: str) -> UserRecent:
        return UserRecent([], None)


def ranking_of(artifacts, item_log: SqliteItemLog, scorer: FakeScorer) -> tuple[RankingServicer, Ranker]:
    return ranking_servicer(artifacts, scorer, item_log)


@pytest.fixture
def stack(tiny_artifacts, tmp_path):
    """-> make(scorer=..., retrieval_fail=..., ranking_fail=...) -> (pipeline, ranking stub, ranker, state)."""
    def make(scorer: FakeScorer | None = None, retrieval_fail: Exception | None = None,
             ranking_fail: Exception | None = None):
        state = ServingState.load(tiny_artifacts)
        states: VersionSet[ServingState] = VersionSet()
        states.add(state.version, state)
        servicer, ranker = ranking_of(tiny_artifacts, SqliteItemLog(tmp_path / f"items{time.monotonic_ns()}.db"),
                                      scorer or FakeScorer())
        ranking = InProcessRanking(servicer, ranking_fail)
        pipeline = RecommendPipeline(states, FakeStore(), FakeRetrieval(retrieval_fail), ranking,
                                     GatewayConfig(port=1))
        return pipeline, ranking, ranker, state
    return make


def query(explain: bool, k: int = K) -> RecommendQuery:
    return RecommendQuery(user_id(0), k, (), (), "home", "req-1", explain)


def recommend(pipeline: RecommendPipeline, q: RecommendQuery) -> Recommendation:
    return asyncio.run(pipeline.recommend(q, time.monotonic() + 2.0))


def expected_channels(index: int) -> list[tuple[str, float, int]]:
    """The candidate columns of item `index` where it was retrieved (rank > 0)."""
    msg = candidates(CANDIDATES)
    row = CANDIDATES.index(index)
    return [(c.channel, pytest.approx(c.scores[row]), c.ranks[row]) for c in msg.channels if c.ranks[row] > 0]


def channels_of(e) -> list[tuple[str, float, int]]:
    return [(c.channel, c.score, c.rank) for c in e.channels]


# -- off by default: nothing asked, built or sent

def test_explain_is_off_by_default_and_nothing_is_set(stack):
    assert pb.RecommendRequest(user_id="u", k=3).explain is False
    assert validate_recommend(pb.RecommendRequest(user_id="u", k=3)).explain is False
    pipeline, ranking, ranker, state = stack()
    calls = []
    ranker.reranker.rerank_explained = lambda *a, **kw: calls.append(a)   # must not be reached
    r = recommend(pipeline, query(explain=False))
    assert len(r.items) == K and all(i.explanation is None for i in r.items)
    assert ranking.requests[0].explain is False and not ranking.responses[0].HasField("explanation")
    assert calls == []
    msg = recommendation_to_proto(r)
    assert not any(i.HasField("explanation") for i in msg.items)


def test_explain_changes_nothing_but_the_explanation(stack):
    pipeline, _, _, _ = stack()
    plain, explained = recommend(pipeline, query(False)), recommend(pipeline, query(True))
    assert [(i.item_id, i.score, i.rank, i.channels) for i in plain.items] == \
           [(i.item_id, i.score, i.rank, i.channels) for i in explained.items]


# -- on: every figure checked against its source

def test_each_item_is_explained_from_its_candidate_columns_scorer_and_reranker(stack):
    pipeline, ranking, ranker, state = stack()
    r = recommend(pipeline, query(explain=True))
    assert ranking.requests[0].explain is True and r.reasons == []
    assert len(r.items) == K
    previous = np.inf
    for item in r.items:
        index = state.catalog.index[item.item_id]
        e = item.explanation
        assert e.stage is ExplainedStage.RERANKER
        assert channels_of(e) == expected_channels(index)
        assert item.channels == tuple(c for c, _, _ in expected_channels(index))
        assert e.fused_score == pytest.approx(-index / 1000.0, abs=1e-7)   # FakeScorer's score for it
        assert e.diversity_penalty >= 0.0
        placed = e.fused_score + e.rerank_correction - e.diversity_penalty
        # The re-ranker reports the running minimum of placement scores (non-increasing clamp).
        assert item.score == pytest.approx(min(previous, placed), abs=1e-5)
        previous = item.score
    assert r.items[0].explanation.diversity_penalty == 0.0               # nothing placed above it yet
    assert any(i.explanation.diversity_penalty > 0 for i in r.items[1:])  # diversity_weight 0.1 served
    assert r.versions == {"artifacts": state.version, "index": "idx-7", "fused_ranker": ranker.model_version}


def test_the_proto_carries_every_figure_and_the_stage(stack):
    pipeline, _, _, _ = stack()
    r = recommend(pipeline, query(explain=True))
    msg = recommendation_to_proto(r)
    for item, domain in zip(msg.items, r.items):
        e = item.explanation
        assert e.stage == pb.EXPLAINED_STAGE_RERANKER
        for field in ("fused_score", "rerank_correction", "diversity_penalty"):
            assert e.HasField(field)
            assert getattr(e, field) == pytest.approx(getattr(domain.explanation, field), abs=1e-6)
        assert channels_of(e) == [(c, pytest.approx(s), k) for c, s, k in channels_of(domain.explanation)]
    # A penalty of exactly 0 (the first item) is present, not dropped as a proto3 default.
    assert msg.items[0].explanation.HasField("diversity_penalty")


def test_the_internal_hop_is_packed_columns_aligned_with_the_slate(stack):
    pipeline, ranking, _, _ = stack()
    recommend(pipeline, query(explain=True))
    reply = ranking.responses[0]
    e = reply.explanation
    assert len(e.fused_scores) == len(e.corrections) == len(e.penalties) == len(reply.items) == K
    assert np.allclose(e.fused_scores, -np.array(reply.items) / 1000.0)
    assert not e.DESCRIPTOR.fields_by_name["fused_scores"].message_type   # floats, not sub-messages


def test_the_explanation_is_bounded_in_size(stack):
    """At most k items x one evidence per channel + three floats: a fixed bound per item."""
    pipeline, _, _, _ = stack()
    k = 30
    plain = recommendation_to_proto(recommend(pipeline, query(False, k)))
    explained = recommendation_to_proto(recommend(pipeline, query(True, k)))
    n_channels = len(candidates(CANDIDATES).channels)
    per_item = max(i.explanation.ByteSize() for i in explained.items)
    assert all(len(i.explanation.channels) <= n_channels for i in explained.items)
    assert per_item <= n_channels * 20 + 20
    assert explained.ByteSize() - plain.ByteSize() <= k * (per_item + 3)


# -- degraded paths: what is known, the rest absent

@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
def test_ranking_down_explains_the_channels_only(stack, code):
    pipeline, _, _, state = stack(ranking_fail=rpc_error(code))
    r = recommend(pipeline, query(explain=True))
    assert r.reasons and [state.catalog.index[i.item_id] for i in r.items] == CANDIDATES[:K]
    msg = recommendation_to_proto(r)
    for item, domain in zip(msg.items, r.items):
        e = item.explanation
        assert e.stage == pb.EXPLAINED_STAGE_RETRIEVAL
        assert channels_of(domain.explanation) == expected_channels(state.catalog.index[item.item_id])
        assert not any(e.HasField(f) for f in ("fused_score", "rerank_correction", "diversity_penalty"))


def test_triton_down_explains_the_channels_only(stack):
    pipeline, ranking, _, state = stack(scorer=FakeScorer(fail=unavailable()))
    r = recommend(pipeline, query(explain=True))
    assert [x.value for x in r.reasons] == ["triton_unavailable"]
    e = ranking.responses[0].explanation
    assert ranking.responses[0].HasField("explanation") and not (e.fused_scores or e.corrections or e.penalties)
    for item in r.items:
        assert item.explanation.stage is ExplainedStage.RETRIEVAL
        assert channels_of(item.explanation) == expected_channels(state.catalog.index[item.item_id])
        assert item.explanation.fused_score is None and item.explanation.rerank_correction is None


def test_reranker_failure_explains_the_fused_score_only(stack):
    pipeline, _, ranker, state = stack()

    def broken(*args, **kwargs):
        raise RuntimeError("a broken booster")
    ranker.reranker.rerank_explained = broken
    r = recommend(pipeline, query(explain=True))
    assert [x.value for x in r.reasons] == ["reranker_error"]
    msg = recommendation_to_proto(r)
    for item in msg.items:
        e = item.explanation
        assert e.stage == pb.EXPLAINED_STAGE_FUSED_RANKER
        index = state.catalog.index[item.item_id]
        assert e.HasField("fused_score") and e.fused_score == pytest.approx(-index / 1000.0, abs=1e-7)
        assert item.score == pytest.approx(e.fused_score)                # the fused order, unadjusted
        assert not e.HasField("rerank_correction") and not e.HasField("diversity_penalty")


def test_popular_fallback_explains_the_popular_channel_only(stack):
    pipeline, ranking, _, state = stack(retrieval_fail=rpc_error(grpc.StatusCode.UNAVAILABLE))
    r = recommend(pipeline, query(explain=True))
    assert ranking.requests == []
    popular = state.catalog.popular.tolist()
    for item in recommendation_to_proto(r).items:
        e = item.explanation
        assert e.stage == pb.EXPLAINED_STAGE_POPULAR_FALLBACK
        index = state.catalog.index[item.item_id]
        assert channels_of(e) == [("popular", 0.0, popular.index(index) + 1)]
        assert not any(e.HasField(f) for f in ("fused_score", "rerank_correction", "diversity_penalty"))


def test_a_ranking_reply_without_explanation_is_marked_unspecified(stack):
    """A ranking replica that predates explain answers without RankResponse.explanation: the gateway
    does not guess (an older replica's slate is still the ranked one)."""
    pipeline, ranking, _, state = stack()

    class OldRanking(InProcessRanking):
        async def Rank(self, request, timeout):
            reply = await super().Rank(request, timeout)
            reply.ClearField("explanation")
            return reply
    pipeline.ranking = OldRanking(ranking.servicer)
    msg = recommendation_to_proto(recommend(pipeline, query(explain=True)))
    for item in msg.items:
        assert item.explanation.stage == pb.EXPLAINED_STAGE_UNSPECIFIED and item.explanation.channels
        assert not item.explanation.HasField("fused_score")


# -- the re-ranker itself

def spy_reranker(ranker: Ranker) -> tuple[DiversityReranker, list[int]]:
    """The ranker's re-ranker with a booster that counts predict calls."""
    r = ranker.reranker
    calls: list[int] = []

    class Counting:
        def predict(self, features):
            calls.append(len(features))
            return r.booster.predict(features)
    return DiversityReranker(Counting(), r.item_text, r.item_category, r.item_side, r.diversity_weight), calls


def test_rerank_explained_builds_the_same_slate_with_the_same_model_calls(stack):
    _, _, ranker, _ = stack()
    reranker, calls = spy_reranker(ranker)
    rng = np.random.default_rng(1)
    items = np.arange(10, 55, dtype=np.int64)
    fused = rng.normal(size=len(items)).astype(np.float32)
    features = np.zeros((len(items), len(RETRIEVAL_FEATURES)), np.float32)
    slate, scores = reranker.rerank(items, fused, features, 10)
    plain_calls, calls[:] = list(calls), []
    slate2, scores2, e = reranker.rerank_explained(items, fused, features, 10)
    assert calls == plain_calls                                        # no extra model work
    assert slate.tolist() == slate2.tolist() and np.array_equal(scores, scores2)
    assert len(e.fused) == len(e.correction) == len(e.penalty) == len(slate)
    by_item = dict(zip(items.tolist(), fused.tolist()))
    assert np.allclose(e.fused, [by_item[i] for i in slate.tolist()])
    placed = e.fused + e.correction - e.penalty
    assert np.allclose(scores, np.minimum.accumulate(placed), atol=1e-5)
    assert np.all(scores <= placed + 1e-5)
    assert e.penalty[0] == 0.0 and np.all(e.penalty >= 0)


def test_rerank_explained_penalty_is_the_weight_times_max_similarity(stack):
    _, _, ranker, _ = stack()
    r = ranker.reranker
    reranker = DiversityReranker(r.booster, r.item_text, r.item_category, r.item_side, 2.0)
    items = np.arange(0, 40, dtype=np.int64)
    fused = np.linspace(1, 0, 40).astype(np.float32)
    slate, _, e = reranker.rerank_explained(items, fused, np.zeros((40, len(RETRIEVAL_FEATURES)), np.float32), 6)
    vectors = r.item_text[slate]
    for j in range(1, len(slate)):
        assert e.penalty[j] == pytest.approx(2.0 * max(0.0, float((vectors[:j] @ vectors[j]).max())), abs=1e-5)


# -- the servicer and the CLI

def test_invalid_argument_is_unchanged_with_explain(stack):
    pipeline, _, _, _ = stack()
    servicer = RecommenderServicer(pipeline, events=None, items=None, default_deadline_s=0.5)
    context = FakeServicerContext(1.0)
    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(servicer.Recommend(pb.RecommendRequest(user_id="u", k=0, explain=True), context))
    assert context.code() == grpc.StatusCode.INVALID_ARGUMENT and context.details.startswith("k:")
    reply = asyncio.run(servicer.Recommend(pb.RecommendRequest(user_id=user_id(1), k=4, explain=True),
                                           FakeServicerContext(1.0)))
    assert len(reply.items) == 4 and all(i.HasField("explanation") for i in reply.items)


def explained_reply(stack, **kw) -> pb.RecommendResponse:
    pipeline, _, _, _ = stack(**kw)
    return recommendation_to_proto(recommend(pipeline, query(explain=True, k=4)))


def test_cli_prints_the_explanation_table(stack, monkeypatch, capsys):
    reply = explained_reply(stack)
    sent = []
    monkeypatch.setattr(client, "recommend", lambda channel, request, timeout: sent.append(request) or reply)
    parser = argparse.ArgumentParser()
    client.add_arguments(parser)
    assert client.run(parser.parse_args(["--insecure-dev", "--target", "x:1", "--user", "u", "--k", "4", "--explain"])) == 0
    out = capsys.readouterr().out
    assert sent[0].explain is True
    header = next(line for line in out.splitlines() if line.startswith("rank"))
    for column in ("item", "channels", "fused", "correction", "penalty", "score"):
        assert column in header
    for item in reply.items:
        row = next(line for line in out.splitlines() if f"  {item.item_id}  " in f"  {line}  " and line.startswith(str(item.rank)))
        e = item.explanation
        assert f"{e.fused_score:.3f}" in row and f"{e.rerank_correction:.3f}" in row
        assert f"{e.diversity_penalty:.3f}" in row and f"{item.score:.3f}" in row
        assert all(f"{c.channel} {c.score:.3f} #{c.rank}" in row for c in e.channels)
    assert "ordered by reranker" in out

    # Without --explain nothing is asked and no table is printed.
    sent.clear()
    client.run(parser.parse_args(["--insecure-dev", "--target", "x:1", "--user", "u"]))
    assert sent[0].explain is False and "correction" not in capsys.readouterr().out


def test_cli_table_marks_absent_figures_and_json_carries_the_explanation(stack, monkeypatch, capsys):
    reply = explained_reply(stack, ranking_fail=rpc_error(grpc.StatusCode.UNAVAILABLE))
    table = client.format_explanation(reply)
    rows = table.splitlines()[2:]
    assert "fused + correction" not in table   # the formula line is printed only for re-ranked slates
    assert len(rows) == len(reply.items) and all(line.split()[-4:-1] == ["-", "-", "-"] for line in rows)
    assert "ordered by retrieval" in table
    monkeypatch.setattr(client, "recommend", lambda channel, request, timeout: reply)
    parser = argparse.ArgumentParser()
    client.add_arguments(parser)
    client.run(parser.parse_args(["--insecure-dev", "--target", "x:1", "--user", "u", "--explain", "--json"]))
    data = json.loads(capsys.readouterr().out)
    e = data["items"][0]["explanation"]
    assert e["stage"] == "EXPLAINED_STAGE_RETRIEVAL" and e["channels"][0]["channel"] == "bert"
    assert "fusedScore" not in e and "rerankCorrection" not in e
