"""UpsertItems / DeleteItems / ReportEventBatch in process: the servicer translates proto <-> the
gateway's dataclasses; ItemUpdater and EventIngester never see a proto message from the caller."""
from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from gateway.event_log import Event, EventLog
from gateway.events import EventIngester, IngestResult
from gateway.items import ItemUpdater, NewItem, UpsertResult
from gateway.server import RecommenderServicer
from gateway.validation import InvalidArgument, validate_upsert
from protos import fusionrec_pb2 as pb
from tests.tiny_artifacts import FakeServicerContext, item_id, user_id
from tests.unit.test_gateway_recommend import FakeRetrieval, make


class FakeTriton:
    """text_encoder: one unit vector per text."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.calls: list[int] = []   # texts per call

    async def infer(self, model: str, inputs, model_version: str = "", client_timeout: float = 0.0):
        n = inputs[0].shape()[0]
        self.calls.append(n)
        vectors = np.eye(n, self.dim, dtype=np.float32)

        class Result:
            def as_numpy(self, name: str) -> np.ndarray:
                return vectors
        return Result()


class FakeRanking:
    def __init__(self) -> None:
        self.updates: list[pb.ItemUpdate] = []

    async def UpdateItems(self, request: pb.ItemUpdate, timeout: float) -> pb.ItemUpdateResponse:
        self.updates.append(request)
        return pb.ItemUpdateResponse()


class FakeStore:
    def __init__(self) -> None:
        self.added: list[tuple[str, str, float]] = []

    async def add(self, events) -> None:
        self.added.extend(events)


@pytest.fixture
def setup(tiny_artifacts, tmp_path):
    from gateway.serving_state import ServingState
    state = ServingState.load(tiny_artifacts)
    pipeline, _, _ = make(state)
    retrieval, ranking = FakeRetrieval(), FakeRanking()
    items = ItemUpdater(pipeline.states, FakeTriton(tiny_artifacts.manifest["dims"]["text"]), retrieval, ranking)
    store = FakeStore()
    events = EventIngester(pipeline.states, EventLog(tmp_path / "events"), store)
    servicer = RecommenderServicer(pipeline, events, items, default_deadline_s=1.0)
    return state, servicer, items, events, retrieval, ranking, store


def test_upsert_and_delete_take_domain_objects(setup):
    state, _, items, _, retrieval, ranking, _ = setup
    n = len(state.catalog.item_ids)
    done = asyncio.run(items.upsert([NewItem("fresh", "A title", "text", "category1"),
                                     NewItem(item_id(3), "Renamed")], timeout_s=1.0))
    assert done == UpsertResult(added=1, updated=1)
    assert state.catalog.index["fresh"] == n and state.catalog.titles[3] == "Renamed"
    assert ranking.updates[0].add_indices == [n]                # only the online item needs a ranking row
    assert retrieval.updates[0].add_indices == [n, 3]                 # in request order
    assert asyncio.run(items.delete(["fresh", "never-existed"], timeout_s=1.0)) == 1
    assert not state.catalog.knows("fresh") and retrieval.updates[-1].remove_indices == [n]


def test_servicer_validates_upserts_and_translates_responses(setup):
    state, servicer, *_ = setup
    ok = asyncio.run(servicer.UpsertItems(pb.UpsertItemsRequest(items=[pb.NewItem(item_id="x", title="T")]),
                                          FakeServicerContext()))
    assert (ok.added, ok.updated) == (1, 0)
    gone = asyncio.run(servicer.DeleteItems(pb.DeleteItemsRequest(item_ids=["x", item_id(0)]), FakeServicerContext()))
    assert gone.deleted == 2
    context = FakeServicerContext()
    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(servicer.UpsertItems(pb.UpsertItemsRequest(items=[pb.NewItem(item_id="y", title="")]), context))
    assert context.code() == grpc.StatusCode.INVALID_ARGUMENT and context.details == "items[0].title: must be 1..1000 characters"
    with pytest.raises(InvalidArgument, match=r"items\[1\].item_id: duplicate"):
        validate_upsert(pb.UpsertItemsRequest(items=[pb.NewItem(item_id="a", title="t")] * 2))


def test_events_are_validated_logged_and_fed_to_the_store(setup):
    _, servicer, _, events, _, _, store = setup
    now = time.time()
    done = asyncio.run(events.ingest([Event(user_id(0), item_id(1), "click", now),
                                      Event(user_id(0), item_id(2), "impression", now, 0.0)]))
    assert done == IngestResult(accepted=2, history_updates=1)
    assert store.added == [(user_id(0), item_id(1), now)]
    logged = (events.log.files()[0]).read_text().splitlines()
    assert logged[-1].endswith(",impression,1.0")                # value 0 = the default weight 1
    with pytest.raises(InvalidArgument, match=r"events\[1\].item_id: unknown or deleted item"):
        asyncio.run(events.ingest([Event(user_id(0), item_id(1), "click", now), Event(user_id(0), "zz", "click", now)]))
    msg = asyncio.run(servicer.ReportEventBatch(
        pb.EventBatch(events=[pb.Event(user_id=user_id(1), item_id=item_id(4), type="like", timestamp=now)]),
        FakeServicerContext()))
    assert (msg.accepted, msg.history_updates) == (1, 1)
    context = FakeServicerContext()
    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(servicer.ReportEventBatch(
            pb.EventBatch(events=[pb.Event(user_id=user_id(1), item_id=item_id(4), type="view", timestamp=now)]),
            context))
    assert context.details.startswith("events[0].type: must be one of impression, click")
