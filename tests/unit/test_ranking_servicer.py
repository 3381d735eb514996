"""The ranking servicer in process: a ranking.ranker.Ranker over the tiny artifact set with a fake
scorer in place of Triton, following a real item log (SQLite in tmp_path). Checked by behaviour
(status codes, slates, `degraded`)."""
from __future__ import annotations

import asyncio
import json

import grpc
import lightgbm as lgb
import numpy as np
import pytest

from prometheus_client import REGISTRY

from common.artifacts import open_artifacts, write_manifest
from common.item_log import SqliteItemLog
from common.wire import MAX_INDICES_AHEAD, candidates_to_proto
from core.item_records import ItemOp, ItemRecord
from core.rerank import POOL_SIZE
from protos import fusionrec_pb2 as pb
from ranking.ranker import Ranker
from ranking.server import RankingServicer
from tests.tiny_artifacts import FakeScorer, FakeServicerContext, item_id, unavailable, write_tiny_artifacts
from tests.tiny_artifacts import ranking_servicer

HISTORY = [2, 3, 5]
# Retrieval order: highest index first; the fake scorer prefers low indices, so the fused order
# (and the slate built from it) differs from the retrieval order.
CANDIDATES = np.arange(49, 9, -1, dtype=np.int64)


def servicer_of(artifacts, scorer: FakeScorer, item_log: SqliteItemLog) -> tuple[RankingServicer, Ranker]:
    """A ranking replica whose only version followed `item_log` before it was offered."""
    return ranking_servicer(artifacts, scorer, item_log)


@pytest.fixture
def item_log(tmp_path) -> SqliteItemLog:
    return SqliteItemLog(tmp_path / "items.db")


@pytest.fixture
def serving(tiny_artifacts, item_log) -> tuple[RankingServicer, Ranker]:
    return servicer_of(tiny_artifacts, FakeScorer(), item_log)


def upsert(item: str, vector: np.ndarray, category: str) -> ItemRecord:
    return ItemRecord(ItemOp.UPSERT, item, title=item, text=item, category=category, vector=np.asarray(vector, np.float32))


def columns_of(items: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    n = len(items)
    return {"bert": (np.linspace(0.9, 0.1, n).astype(np.float32), np.arange(1, n + 1, dtype=np.int32)),
            "popular": (np.full(n, 0.5, np.float32), np.zeros(n, np.int32))}


def rank_request(items: np.ndarray = CANDIDATES, k: int = 10, **kw) -> pb.RankRequest:
    return pb.RankRequest(history=kw.pop("history", HISTORY), candidates=candidates_to_proto(items, columns_of(items)),
                          k=k, **kw)


def call(method, request, time_remaining_s: float | None = None):
    context = FakeServicerContext(time_remaining_s)
    try:
        return asyncio.run(method(request, context)), context
    except grpc.aio.AbortError:
        return None, context


def reason_names(response: pb.RankResponse) -> list[str]:
    return [pb.DegradedReason.Name(r) for r in response.reasons]


def test_ranked_slate_of_k(serving):
    servicer, ranker = serving
    response, context = call(servicer.Rank, rank_request(k=10))
    assert context.code() is None
    items = list(response.items)
    assert len(items) == 10 and len(set(items)) == 10 and set(items) <= set(CANDIDATES.tolist())
    assert len(response.scores) == 10 and not response.degraded and not response.reasons
    assert response.model_version == ranker.model_version
    # The servicer serves what the Ranker builds from the same scores.
    direct = asyncio.run(ranker.rank(np.array(HISTORY), CANDIDATES, columns_of(CANDIDATES), 10, 0.5))
    assert items == direct.items.tolist()
    assert np.allclose(response.scores, direct.scores)
    # The slate comes from the re-ranker's pool: the best fused scores, not the retrieval order.
    assert set(items) <= set(np.sort(CANDIDATES)[:max(POOL_SIZE, 10)].tolist())
    assert items != CANDIDATES[:10].tolist()
    call_args = ranker.scorer.calls[0]
    assert call_args["history"].tolist() == HISTORY and call_args["candidates"].tolist() == CANDIDATES.tolist()
    assert call_args["features"].shape[0] == len(CANDIDATES)


def test_k_larger_than_the_candidates_gives_them_all(serving):
    servicer, _ = serving
    response, _ = call(servicer.Rank, rank_request(CANDIDATES[:4], k=10))
    assert sorted(response.items) == sorted(CANDIDATES[:4].tolist())


def test_degrades_to_retrieval_order_when_the_scorer_is_unavailable(tiny_artifacts, item_log):
    servicer, _ = servicer_of(tiny_artifacts, FakeScorer(fail=unavailable()), item_log)
    response, context = call(servicer.Rank, rank_request(k=7))
    assert context.code() is None, "a scorer outage must not fail the call"
    assert response.degraded
    assert list(response.items) == CANDIDATES[:7].tolist()
    assert reason_names(response) == ["DEGRADED_REASON_TRITON_UNAVAILABLE"]


def test_degrades_to_fused_order_when_the_reranker_fails(tmp_path, item_log):
    # A booster trained on fewer columns than RERANK_FEATURES loads, then refuses every predict.
    folder = write_tiny_artifacts(tmp_path)
    rows = np.random.default_rng(0).random((200, 3))
    lgb.train({"objective": "regression", "verbose": -1, "num_threads": 1},
              lgb.Dataset(rows, rows[:, 0]), num_boost_round=2).save_model(str(folder / "reranker.txt"))
    manifest = json.loads((folder / "manifest.json").read_text())
    write_manifest(folder, {k: v for k, v in manifest.items() if k != "files"})
    servicer, _ = servicer_of(open_artifacts(folder), FakeScorer(), item_log)
    response, context = call(servicer.Rank, rank_request(k=6))
    assert context.code() is None and response.degraded
    assert list(response.items) == np.sort(CANDIDATES)[:6].tolist()   # the fake scorer's order
    assert reason_names(response) == ["DEGRADED_REASON_RERANKER_ERROR"]


def test_deadline_shorter_than_the_scorer_timeout_still_answers(serving):
    servicer, ranker = serving
    response, context = call(servicer.Rank, rank_request(k=5), time_remaining_s=0.2)
    assert context.code() is None and len(response.items) == 5


@pytest.mark.parametrize("field, request_of", [
    ("k", lambda n: rank_request(k=0)),
    ("k", lambda n: rank_request(k=10_000)),
    ("candidates", lambda n: rank_request(np.array([1, n + MAX_INDICES_AHEAD], np.int64))),
    ("candidates", lambda n: rank_request(np.array([-1, 2], np.int64))),
    ("history", lambda n: rank_request(history=[-2])),
    ("history", lambda n: rank_request(history=[n + MAX_INDICES_AHEAD])),
])
def test_bad_requests_are_invalid_argument_naming_the_field(serving, field, request_of):
    servicer, ranker = serving
    response, context = call(servicer.Rank, request_of(ranker.total))
    assert response is None and context.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert context.details.startswith(field), context.details
    assert ranker.scorer.calls == [], "a refused request never reaches the scorer"


def test_misaligned_channel_column_is_invalid_argument(serving):
    servicer, _ = serving
    request = rank_request(k=5)
    request.candidates.channels[0].scores.append(0.1)   # one score too many
    response, context = call(servicer.Rank, request)
    assert response is None and context.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "candidates.channels" in context.details


def test_unknown_artifact_version_is_failed_precondition(serving):
    servicer, _ = serving
    response, context = call(servicer.Rank, rank_request(artifact_version="999"))
    assert response is None and context.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "artifact_version" in context.details


def unknown_count(field: str) -> float:
    return REGISTRY.get_sample_value("fusionrec_unknown_items_total", {"service": "ranking", "field": field}) or 0.0


def test_an_online_item_in_the_log_is_rankable_with_its_vector_sent_to_the_model(serving, item_log, tiny_artifacts):
    servicer, ranker = serving
    n = ranker.total
    vector = tiny_artifacts.npy("item_text.npy")[0]
    other = tiny_artifacts.npy("item_text.npy")[1]

    async def scenario():
        seq = await item_log.append([upsert("fresh", vector, "category2"), upsert("gone", other, "category1"),
                                     ItemRecord(ItemOp.DELETE, "gone"), upsert(item_id(11), other, "category3")])
        items = np.array([n, 11, 12], np.int64)
        # This replica has not applied the log: the request's position makes it catch up first.
        response = await servicer.Rank(rank_request(items, k=3, min_item_log_seq=seq), FakeServicerContext(0.5))
        return items, response
    items, response = asyncio.run(scenario())
    assert sorted(response.items) == sorted(items.tolist())
    sent = ranker.scorer.calls[-1]
    assert sent["candidates"].tolist() == items.tolist()
    # Only the involved online items' rows travel (not the deleted "gone"), numbered per request.
    assert sent["extra_text"].shape == (1, len(vector)) and np.allclose(sent["extra_text"][0], vector)
    assert sent["extra_category"].tolist() == [3]   # category_names: "", category0, category1, ...
    # The re-ranker's tables cover the online items and take a catalog item's new vector and category.
    assert len(ranker.reranker.item_text) >= n + 2 and np.allclose(ranker.reranker.item_text[n], vector)
    assert np.allclose(ranker.reranker.item_text[11], other) and ranker.reranker.item_category[11] == 4
    assert ranker.reranker.item_category[n] == 3 and not ranker.reranker.item_side[n].any()   # new: age 0


def test_a_request_without_online_items_sends_no_extra_inputs(serving, item_log, tiny_artifacts):
    servicer, ranker = serving
    asyncio.run(item_log.append([upsert("fresh", tiny_artifacts.npy("item_text.npy")[0], "category2")]))
    asyncio.run(servicer.follower.sync())
    response, context = call(servicer.Rank, rank_request(CANDIDATES, k=5))
    assert context.code() is None and ranker.scorer.calls[-1]["extra_text"] is None


def test_candidates_and_history_this_replica_does_not_know_yet_are_dropped_and_counted(serving):
    servicer, ranker = serving
    n = ranker.total
    before = unknown_count("candidates"), unknown_count("history")
    items = np.array([n + 2, 11, n, 12, 13], np.int64)
    response, context = call(servicer.Rank, rank_request(items, k=5, history=[2, n + 1]))
    assert context.code() is None and sorted(response.items) == [11, 12, 13]
    sent = ranker.scorer.calls[-1]
    assert sent["candidates"].tolist() == [11, 12, 13] and sent["history"].tolist() == [2]
    assert sent["features"].shape[0] == 3   # the channel columns dropped with their candidates
    assert (unknown_count("candidates"), unknown_count("history")) == (before[0] + 2, before[1] + 1)


def test_status_reports_versions_and_log_position(serving, item_log, tiny_artifacts):
    servicer, ranker = serving
    status, context = call(servicer.Status, pb.StatusRequest())
    assert context.code() is None
    assert (list(status.loaded_versions), status.newest_version) == ([ranker.version], ranker.version)
    assert (status.item_log_seq, status.item_log_ok) == (0, True)
    seq = asyncio.run(item_log.append([upsert("s", tiny_artifacts.npy("item_text.npy")[3], "")]))
    asyncio.run(servicer.follower.sync())
    status, _ = call(servicer.Status, pb.StatusRequest())
    assert (status.item_log_seq, status.item_log_ok) == (seq, True) and ranker.total == ranker.n_items + 1
