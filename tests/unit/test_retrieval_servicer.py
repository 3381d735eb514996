"""The retrieval servicer in process over the tiny artifact set: proto in, the core Retriever's
answer out, bad requests refused with the status code and the field named."""
from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from common.components import load_retriever
from common.versions import VersionSet
from common.wire import candidates_from_proto
from core.limits import MAX_RETRIEVE_CANDIDATES, MAX_RETRIEVE_EXCLUDE, MAX_RETRIEVE_HISTORY
from core.retriever import Retriever
from protos import fusionrec_pb2 as pb
from retrieval.server import RetrievalServicer
from tests.tiny_artifacts import FakeServicerContext, user_id

DEFAULT_CANDIDATES = 25


@pytest.fixture
def retriever(tiny_artifacts) -> Retriever:
    """A fresh retriever per test: UpdateItems changes it in memory."""
    return load_retriever(tiny_artifacts)


@pytest.fixture
def servicer(retriever) -> RetrievalServicer:
    versions: VersionSet[Retriever] = VersionSet()
    versions.add(retriever.version, retriever)
    return RetrievalServicer(versions, DEFAULT_CANDIDATES)


def call(method, request):
    """(response, context) of one in-process call; the context records an abort."""
    context = FakeServicerContext()
    try:
        return asyncio.run(method(request, context)), context
    except grpc.aio.AbortError:
        return None, context


def refused(method, request) -> tuple[grpc.StatusCode, str]:
    response, context = call(method, request)
    assert response is None, "the request should have been refused"
    return context.code(), context.details


def items_of(response: pb.RetrieveResponse) -> list[int]:
    return list(response.candidates.items)


def test_retrieve_answers_what_the_core_retriever_answers(servicer, retriever):
    history, exclude = [3, 1, 4], [5, 9]
    request = pb.RetrieveRequest(user_id=user_id(2), history=history, exclude=exclude, num_candidates=18)
    response, context = call(servicer.Retrieve, request)
    assert context.code() is None
    direct = retriever.retrieve(user_id(2), np.array(history), np.array(exclude), 18).candidates
    items, columns = candidates_from_proto(response.candidates)
    assert items.tolist() == direct.items.tolist() and len(items) == 18
    assert set(columns) == set(direct.columns)
    for channel, (scores, ranks) in direct.columns.items():
        assert np.allclose(columns[channel][0], scores) and columns[channel][1].tolist() == ranks.tolist()
    assert response.index_version == retriever.version
    assert not set(items.tolist()) & set(history + exclude)
    assert "merge" in response.stage_ms


def test_defaults_and_quotas(servicer, retriever):
    response, _ = call(servicer.Retrieve, pb.RetrieveRequest(user_id=user_id(0), history=[1, 2]))
    assert len(items_of(response)) == DEFAULT_CANDIDATES   # num_candidates 0 = the server default
    only_popular = pb.RetrieveRequest(user_id=user_id(0), history=[1, 2], num_candidates=10,
                                      quotas={"bert": 0, "cf": 0, "popular": 10})
    response, _ = call(servicer.Retrieve, only_popular)
    direct = retriever.retrieve(user_id(0), np.array([1, 2]), np.zeros(0, np.int64), 10,
                                {"bert": 0, "cf": 0, "popular": 10})
    assert items_of(response) == direct.candidates.items.tolist()


@pytest.mark.parametrize("field, request_of", [
    ("history", lambda n: pb.RetrieveRequest(history=[1, n])),
    ("history", lambda n: pb.RetrieveRequest(history=[-1])),
    ("history", lambda n: pb.RetrieveRequest(history=[0] * (MAX_RETRIEVE_HISTORY + 1))),
    ("exclude", lambda n: pb.RetrieveRequest(exclude=[n + 5])),
    ("exclude", lambda n: pb.RetrieveRequest(exclude=[0] * (MAX_RETRIEVE_EXCLUDE + 1))),
    ("num_candidates", lambda n: pb.RetrieveRequest(num_candidates=MAX_RETRIEVE_CANDIDATES + 1)),
    ("num_candidates", lambda n: pb.RetrieveRequest(num_candidates=-1)),
    ("quotas", lambda n: pb.RetrieveRequest(quotas={"bert": -1})),
])
def test_bad_requests_are_invalid_argument_naming_the_field(servicer, retriever, field, request_of):
    code, details = refused(servicer.Retrieve, request_of(retriever.online.total))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(f"{field}:"), details


def test_unknown_artifact_version_is_failed_precondition(servicer):
    code, details = refused(servicer.Retrieve, pb.RetrieveRequest(artifact_version="999"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "artifact_version" in details and "999" in details
    code, _ = refused(servicer.UpdateItems, pb.ItemUpdate(artifact_version="999"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_update_items_adds_an_online_item_and_removes_one(servicer, retriever, tiny_artifacts):
    n = retriever.online.total
    history = [7]
    # The new item's vector is the history item's own: the bert channel's best match.
    vector = tiny_artifacts.npy("item_text.npy")[7]
    before, _ = call(servicer.Retrieve, pb.RetrieveRequest(user_id=user_id(1), history=history,
                                                           num_candidates=n - 1))
    removed = items_of(before)[0]
    update = pb.ItemUpdate(add_indices=[n], add_vectors=vector.tolist(), add_categories=[1],
                           remove_indices=[removed])
    response, context = call(servicer.UpdateItems, update)
    assert context.code() is None and response.online_items == 1

    after, context = call(servicer.Retrieve, pb.RetrieveRequest(user_id=user_id(1), history=history,
                                                                num_candidates=n))
    assert context.code() is None
    items = items_of(after)
    assert n in items and removed not in items
    bert = next(c for c in after.candidates.channels if c.channel == "bert")
    assert bert.ranks[items.index(n)] == 1
    # The online item is a valid index now: a history may name it.
    _, context = call(servicer.Retrieve, pb.RetrieveRequest(user_id=user_id(1), history=[n]))
    assert context.code() is None


def test_removed_item_never_returns(servicer, retriever):
    popular = retriever.popular.ranked_items[:3].tolist()
    call(servicer.UpdateItems, pb.ItemUpdate(remove_indices=popular))
    for user in range(5):
        response, _ = call(servicer.Retrieve, pb.RetrieveRequest(
            user_id=user_id(user), history=[user + 10], num_candidates=retriever.n_items))
        assert not set(items_of(response)) & set(popular)


def test_malformed_update_is_invalid_argument_and_applies_nothing(servicer, retriever):
    n = retriever.online.total
    code, details = refused(servicer.UpdateItems, pb.ItemUpdate(add_indices=[n], add_vectors=[0.5],
                                                                add_categories=[1]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "add_vectors" in details
    gap = pb.ItemUpdate(add_indices=[n + 3], add_vectors=[0.1] * retriever.text_dim, add_categories=[0])
    code, details = refused(servicer.UpdateItems, gap)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "add_indices" in details
    assert retriever.online.total == n
