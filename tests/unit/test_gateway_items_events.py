"""UpsertItems / DeleteItems / ReportEventBatch / DeleteUserData in process, on a real SQLite item
log in tmp_path, the real ItemLogFollower, a fake text encoder, and (for erasing) both real
user-state backends. The servicer translates proto <-> the gateway's dataclasses."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Sequence

import grpc
import numpy as np
import pytest

from common.item_follower import ItemLogFollower
from common.item_log import ItemLog, ItemLogUnavailable, SqliteItemLog
from core.item_records import ItemOp, ItemRecord
from gateway.erase import UserEraser
from gateway.event_log import Event, EventLog
from gateway.events import EventIngester, IngestResult
from gateway.items import ItemWriter, NewItem, UpsertResult
from gateway.server import RecommenderServicer
from gateway.serving_state import ServingState
from gateway.state_store import open_store
from gateway.validation import InvalidArgument, validate_upsert
from offline.datasets.generic import load_generic
from protos import fusionrec_pb2 as pb
from tests.tiny_artifacts import FakeServicerContext, item_id, user_id
from tests.unit.test_gateway_recommend import FakeStore as FakeRecentStore
from tests.unit.test_gateway_recommend import make, query, recommend


class FakeTriton:
    """text_encoder: one unit vector per text."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.calls: list[int] = []   # texts per call

    async def infer(self, model: str, inputs, model_version: str = "", client_timeout: float = 0.0, headers=None):
        n = inputs[0].shape()[0]
        self.calls.append(n)
        vectors = np.eye(n, self.dim, dtype=np.float32)

        class Result:
            def as_numpy(self, name: str) -> np.ndarray:
                return vectors
        return Result()


class SwitchableLog(ItemLog):
    """A real SqliteItemLog whose store can be switched off (every call ItemLogUnavailable)."""

    def __init__(self, inner: ItemLog) -> None:
        self.inner = inner
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise ItemLogUnavailable("item log: connection refused (test)")

    async def append(self, records: Sequence[ItemRecord]) -> int:
        self._check()
        return await self.inner.append(records)

    async def read(self, after: int, limit: int = 10_000) -> list[ItemRecord]:
        self._check()
        return await self.inner.read(after, limit)

    async def last_seq(self) -> int:
        self._check()
        return await self.inner.last_seq()

    async def close(self) -> None:
        await self.inner.close()


class FakeStore:
    def __init__(self) -> None:
        self.added: list[tuple[str, str, float]] = []
        self.down = False

    async def add(self, events) -> None:
        if self.down:
            raise ConnectionError("store down")
        self.added.extend(events)


@pytest.fixture
def setup(tiny_artifacts, tmp_path):
    state = ServingState.load(tiny_artifacts)
    pipeline, _, _ = make(state)
    item_log = SwitchableLog(SqliteItemLog(tmp_path / "items.db"))
    follower = ItemLogFollower(item_log)
    follower.subscribe(state.version, state.catalog.apply, state.catalog.folded_seq)
    items = ItemWriter(pipeline.states, FakeTriton(tiny_artifacts.manifest["dims"]["text"]), item_log, follower)
    store = FakeStore()
    events = EventIngester(pipeline.states, EventLog(tmp_path / "events"), store)
    servicer = RecommenderServicer(pipeline, events, items, default_deadline_s=1.0)
    yield state, servicer, items, events, item_log, store
    asyncio.run(item_log.close())


def call(method, request):
    """-> (response or None, context)."""
    context = FakeServicerContext()
    try:
        return asyncio.run(method(request, context)), context
    except grpc.aio.AbortError:
        return None, context


def test_upsert_and_delete_append_to_the_log_and_apply_here_at_once(setup):
    state, _, items, _, item_log, _ = setup
    n = state.catalog.n_artifact_items
    done = asyncio.run(items.upsert([NewItem("fresh", "A title", "text", "category1"),
                                     NewItem(item_id(3), "Renamed")], timeout_s=1.0))
    assert done == UpsertResult(added=1, updated=1, item_log_seq=2)
    records = asyncio.run(item_log.read(0))
    assert [(r.op, r.item_id, r.seq) for r in records] == [(ItemOp.UPSERT, "fresh", 1), (ItemOp.UPSERT, item_id(3), 2)]
    assert records[0].vector.shape == (state.catalog.overlay.text_dim,) and records[0].category == "category1"
    # applied by this gateway before the answer: index from the log order, the new title served
    assert state.catalog.index["fresh"] == n and state.catalog.title(3) == "Renamed"
    assert state.catalog.applied_seq == 2 and state.catalog.knows("fresh")
    gone = asyncio.run(items.delete(["fresh", "never-existed", "fresh"]))
    assert (gone.deleted, gone.item_log_seq) == (1, 3)
    assert [(r.op, r.item_id) for r in asyncio.run(item_log.read(2))] == [(ItemOp.DELETE, "fresh")]   # only live ids
    assert not state.catalog.knows("fresh") and state.catalog.index["fresh"] == n   # the index stays reserved
    again = asyncio.run(items.delete(["fresh"]))
    assert (again.deleted, again.item_log_seq) == (0, 3)                            # nothing to log


def test_a_restarted_gateway_rebuilds_the_same_catalog_from_the_log(setup, tiny_artifacts):
    state, _, items, _, item_log, _ = setup
    asyncio.run(items.upsert([NewItem("a", "A"), NewItem("b", "B")], timeout_s=1.0))
    asyncio.run(items.delete(["a"]))
    fresh = ServingState.load(tiny_artifacts)                    # a new process: nothing in memory
    follower = ItemLogFollower(item_log)
    follower.subscribe(fresh.version, fresh.catalog.apply, fresh.catalog.folded_seq)
    assert asyncio.run(follower.sync())
    assert fresh.catalog.index["b"] == state.catalog.index["b"] and fresh.catalog.total == state.catalog.total
    assert not fresh.catalog.knows("a") and fresh.catalog.knows("b")


def test_servicer_answers_with_the_log_position(setup):
    state, servicer, *_ = setup
    ok, _ = call(servicer.UpsertItems, pb.UpsertItemsRequest(items=[pb.NewItem(item_id="x", title="T")]))
    assert (ok.added, ok.updated, ok.item_log_seq) == (1, 0, 1)
    gone, _ = call(servicer.DeleteItems, pb.DeleteItemsRequest(item_ids=["x", item_id(0)]))
    assert (gone.deleted, gone.item_log_seq) == (2, 3)
    _, context = call(servicer.UpsertItems, pb.UpsertItemsRequest(items=[pb.NewItem(item_id="y", title="")]))
    assert context.code() == grpc.StatusCode.INVALID_ARGUMENT and context.details == "items[0].title: must be 1..1000 characters"
    with pytest.raises(InvalidArgument, match=r"items\[1\].item_id: duplicate"):
        validate_upsert(pb.UpsertItemsRequest(items=[pb.NewItem(item_id="a", title="t")] * 2))


@pytest.mark.parametrize("field, item", [
    ("items[0].item_id", pb.NewItem(item_id="bad\nid", title="t")),
    ("items[0].item_id", pb.NewItem(item_id="bad\rid", title="t")),
    ("items[0].item_id", pb.NewItem(item_id="nul\x00", title="t")),
    ("items[0].item_id", pb.NewItem(item_id="bell\x07", title="t")),
    ("items[0].item_id", pb.NewItem(item_id="sep\u2028", title="t")),
    ("items[0].title", pb.NewItem(item_id="ok", title="two\nlines")),
    ("items[0].category", pb.NewItem(item_id="ok", title="t", category="c\tx")),
    ("items[0].text", pb.NewItem(item_id="ok", title="t", text="nul \x00 inside")),
])
def test_control_characters_are_invalid_and_nothing_is_logged(setup, field, item):
    _, servicer, _, _, item_log, _ = setup
    _, context = call(servicer.UpsertItems, pb.UpsertItemsRequest(items=[item]))
    assert context.code() == grpc.StatusCode.INVALID_ARGUMENT and context.details.startswith(field + ": must not contain")
    assert asyncio.run(item_log.last_seq()) == 0


def test_text_may_have_line_breaks_and_delete_ids_are_checked(setup):
    _, servicer, *_ = setup
    ok, _ = call(servicer.UpsertItems, pb.UpsertItemsRequest(items=[pb.NewItem(item_id="ok", title="t", text="a\nb")]))
    assert ok.added == 1
    _, context = call(servicer.DeleteItems, pb.DeleteItemsRequest(item_ids=["ok", "x\ny"]))
    assert context.code() == grpc.StatusCode.INVALID_ARGUMENT and context.details.startswith("item_ids[1]: must not contain")


def test_store_down_is_unavailable_and_nothing_is_applied(setup):
    state, servicer, _, _, item_log, _ = setup
    total, seq = state.catalog.total, state.catalog.applied_seq
    item_log.down = True
    _, context = call(servicer.UpsertItems, pb.UpsertItemsRequest(items=[pb.NewItem(item_id="x", title="T")]))
    assert context.code() == grpc.StatusCode.UNAVAILABLE
    assert "sqlite" not in context.details and "refused" not in context.details   # no internals
    _, context = call(servicer.DeleteItems, pb.DeleteItemsRequest(item_ids=[item_id(1)]))
    assert context.code() == grpc.StatusCode.UNAVAILABLE
    assert (state.catalog.total, state.catalog.applied_seq) == (total, seq) and state.catalog.knows(item_id(1))
    item_log.down = False
    assert asyncio.run(item_log.last_seq()) == 0                  # nothing half-written either


def test_events_are_validated_logged_and_fed_to_the_store(setup):
    _, servicer, _, events, _, store = setup
    now = time.time()
    done = asyncio.run(events.ingest([Event(user_id(0), item_id(1), "click", now),
                                      Event(user_id(0), item_id(2), "impression", now, 0.0)]))
    assert done == IngestResult(accepted=2, history_updates=1)
    assert store.added == [(user_id(0), item_id(1), now)]
    logged = (events.log.files()[0]).read_text().splitlines()
    assert logged[-1].endswith(",impression,1.0")                # value 0 = the default weight 1
    with pytest.raises(InvalidArgument, match=r"events\[1\].item_id: unknown or deleted item"):
        asyncio.run(events.ingest([Event(user_id(0), item_id(1), "click", now), Event(user_id(0), "zz", "click", now)]))
    msg, _ = call(servicer.ReportEventBatch,
                  pb.EventBatch(events=[pb.Event(user_id=user_id(1), item_id=item_id(4), type="like", timestamp=now)]))
    assert (msg.accepted, msg.history_updates) == (1, 1)
    _, context = call(servicer.ReportEventBatch,
                      pb.EventBatch(events=[pb.Event(user_id=user_id(1), item_id=item_id(4), type="view", timestamp=now)]))
    assert context.details.startswith("events[0].type: must be one of impression, click")


def test_events_with_the_store_down_are_logged_and_acknowledged_without_history(setup):
    """The documented rule (gateway/events.py): the batch is durable in the event log, so it is
    acknowledged; only the recent-history update is lost, and history_updates says so."""
    _, servicer, _, events, _, store = setup
    store.down = True
    now = time.time()
    msg, context = call(servicer.ReportEventBatch,
                        pb.EventBatch(events=[pb.Event(user_id=user_id(1), item_id=item_id(4), type="click",
                                                       timestamp=now)]))
    assert context.code() is None and (msg.accepted, msg.history_updates) == (1, 0)
    assert store.added == [] and events.log.files()[0].read_text().splitlines()[-1].startswith(user_id(1))


def test_an_event_on_an_item_upserted_through_the_log_is_accepted(setup):
    _, servicer, *_ = setup
    call(servicer.UpsertItems, pb.UpsertItemsRequest(items=[pb.NewItem(item_id="new", title="T")]))
    msg, _ = call(servicer.ReportEventBatch, pb.EventBatch(events=[pb.Event(
        user_id="u", item_id="new", type="click", timestamp=time.time())]))
    assert msg.accepted == 1


# ---------------------------------------------------------------- DeleteUserData

@pytest.fixture(params=["sqlite", "redis"])
def store_spec(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'state.db'}"
    import redis
    url = request.getfixturevalue("redis_url")
    with redis.from_url(url) as client:
        client.flushdb()
    return url


def write_items(folder, ids) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "items.jsonl").write_text("".join(json.dumps({"id": i, "title": f"item {i}"}) + "\n" for i in ids))


def test_delete_user_data_erases_history_tombstones_and_makes_the_user_unknown(tiny_artifacts, tmp_path, store_spec):
    state = ServingState.load(tiny_artifacts)
    secret = user_id(0)

    async def go():
        store = open_store(store_spec)
        try:
            pipeline, retrieval, _ = make(state, store=store)
            events = EventIngester(pipeline.states, EventLog(tmp_path / "events"), store)
            servicer = RecommenderServicer(pipeline, events, None, default_deadline_s=1.0,
                                           users=UserEraser(store, events.log, events.log_lock))
            now = time.time()
            await events.ingest([Event(secret, item_id(j), "click", now - 10 + j) for j in (1, 2, 3)])
            await events.ingest([Event(user_id(1), item_id(4), "click", now)])
            before = await pipeline.recommend(query(secret), time.monotonic() + 1)
            assert retrieval.requests[-1].user_id == secret and 3 in retrieval.requests[-1].history

            reply = await servicer.DeleteUserData(pb.DeleteUserDataRequest(user_id=secret), FakeServicerContext())
            assert (reply.history_entries_removed, reply.events_tombstoned) == (3, True)
            assert (await store.recent_state(secret)).items == [] and await store.recent(user_id(1)) == [item_id(4)]
            assert (await store.recent_state(secret)).erased_at is not None
            await pipeline.recommend(query(secret), time.monotonic() + 1)
            assert retrieval.requests[-1].history == [] and retrieval.requests[-1].user_id == ""   # unknown now

            await events.ingest([Event(secret, item_id(7), "click", time.time())])      # after the erase: counts
            await pipeline.recommend(query(secret), time.monotonic() + 1)
            assert retrieval.requests[-1].history == [7] and retrieval.requests[-1].user_id == ""
            again = await servicer.DeleteUserData(pb.DeleteUserDataRequest(user_id=secret), FakeServicerContext())
            assert again.history_entries_removed == 1                                    # item 7 only
            return before, events.log
        finally:
            await store.close()
    before, log = asyncio.run(go())
    assert before.items
    folder = tmp_path / "dataset"
    write_items(folder, [item_id(j) for j in range(10)])
    assert log.export(folder / "interactions.csv") == 1                 # user 1's click; the erased user's gone
    ds = load_generic(folder)
    assert not ds.report.malformed and set(ds.users) == {user_id(1)}


def test_export_keeps_events_logged_after_the_tombstone(tmp_path):
    log = EventLog(tmp_path / "events")
    log.append([Event("u", "a", "click", 1.7e9), Event("v", "a", "click", 1.7e9)])
    log.append_tombstone("u", when=1.7e9 + 5)
    log.append([Event("u", "b", "click", 1.7e9 + 1)])   # logged after the erase, even if dated before it
    folder = tmp_path / "dataset"
    write_items(folder, ["a", "b"])
    assert log.export(folder / "interactions.csv") == 2
    ds = load_generic(folder)
    assert sorted(zip(ds.users, ds.item_ids)) == [("u", "b"), ("v", "a")]


@pytest.mark.parametrize("user, detail", [("", "user_id: must be 1..256"), ("x" * 257, "user_id: must be 1..256"),
                                          ("a\nb", "user_id: must not contain"), ("nul\x00", "user_id: must not contain")])
def test_delete_user_data_validates_the_user_id(user, detail):
    servicer = RecommenderServicer(None, None, None, default_deadline_s=1.0, users=None)
    _, context = call(servicer.DeleteUserData, pb.DeleteUserDataRequest(user_id=user))
    assert context.code() == grpc.StatusCode.INVALID_ARGUMENT and context.details.startswith(detail)


def test_delete_user_data_with_the_store_down_is_unavailable(tmp_path):
    class DownStore(FakeRecentStore):
        async def erase(self, user_id, when=None):
            raise ConnectionError("redis at 10.0.0.7:6379 refused")
    log = EventLog(tmp_path / "events")
    servicer = RecommenderServicer(None, None, None, default_deadline_s=1.0, users=UserEraser(DownStore(), log))
    _, context = call(servicer.DeleteUserData, pb.DeleteUserDataRequest(user_id="u"))
    assert context.code() == grpc.StatusCode.UNAVAILABLE and "10.0.0.7" not in context.details
    assert "user-state store" in context.details and {u: p for u, (p, _) in log.tombstones().items()} == {"u": 1}   # a retry completes it


def test_recommend_for_an_erased_user_with_a_fake_store(tiny_artifacts):
    state = ServingState.load(tiny_artifacts)
    pipeline, retrieval, _ = make(state, store=FakeRecentStore(erased_at=1.0))
    assert len(recommend(pipeline).items) == 5 and retrieval.requests[0].user_id == ""


def test_upsert_into_a_catalog_of_brought_vectors_is_refused_and_logs_nothing(setup, tiny_artifacts, tmp_path):
    """With --item-vectors the text space is another model's: the text_encoder cannot place new
    items in it, so UpsertItems answers INVALID_ARGUMENT naming `items` and writes nothing."""
    import dataclasses
    from protos import fusionrec_pb2 as pb
    state, servicer, _, _, item_log, _ = setup
    brought = dataclasses.replace(state, text_space="brought")
    servicer.items.states = type("States", (), {"get": lambda self: brought})()
    reply, context = call(servicer.UpsertItems, pb.UpsertItemsRequest(items=[pb.NewItem(item_id="new", title="T")]))
    assert reply is None and context.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert context.details.startswith("items:") and "text_space=brought" in context.details
    assert asyncio.run(item_log.read(0)) == []
    assert state.text_space == "encoder"   # what a build without brought vectors serves
