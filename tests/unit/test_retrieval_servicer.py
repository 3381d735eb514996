"""The retrieval servicer in process over the tiny artifact set: proto in, the core Retriever's
answer out, bad requests refused with the status code and the field named; online items and
deletes arrive through a real item log (SQLite in tmp_path), never through the request."""
from __future__ import annotations

import asyncio
import os
import signal
import socket

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

import core.channels
import retrieval.server
from common.artifacts import open_artifacts
from common.components import load_retriever
from common.config import RetrievalConfig
from common.followed_versions import offer_followed
from common.item_follower import ItemLogFollower
from common.item_log import ItemLog, ItemLogUnavailable, SqliteItemLog
from common.versions import VersionSet
from common.wire import MAX_INDICES_AHEAD, candidates_from_proto
from core.item_records import ItemOp, ItemRecord
from core.limits import MAX_RETRIEVE_CANDIDATES, MAX_RETRIEVE_EXCLUDE, MAX_RETRIEVE_HISTORY
from core.retriever import Retriever
from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc
from retrieval.server import RetrievalServicer
from tests.tiny_artifacts import FakeServicerContext, item_id, user_id, write_tiny_artifacts

DEFAULT_CANDIDATES = 25


class Serving:
    """One retrieval replica in process: a servicer whose only version follows `item_log`."""

    def __init__(self, artifacts, item_log: ItemLog) -> None:
        self.artifacts = artifacts
        self.follower = ItemLogFollower(item_log, interval_s=0.01)
        self.versions: VersionSet[Retriever] = VersionSet()
        self.servicer = RetrievalServicer(self.versions, self.follower, DEFAULT_CANDIDATES)
        self.retriever: Retriever | None = None

    async def start(self) -> "Serving":
        self.retriever = load_retriever(self.artifacts)
        await offer_followed(self.versions, self.follower, self.retriever.version, self.retriever,
                             self.retriever.apply, self.retriever.overlay.folded_seq, retry_s=0.01)
        return self


async def acall(method, request, time_remaining_s: float | None = None):
    """(response, context) of one in-process call; the context records an abort."""
    context = FakeServicerContext(time_remaining_s)
    try:
        return await method(request, context), context
    except grpc.aio.AbortError:
        return None, context


def call(method, request):
    return asyncio.run(acall(method, request))


def refused(method, request) -> tuple[grpc.StatusCode, str]:
    response, context = call(method, request)
    assert response is None, "the request should have been refused"
    return context.code(), context.details


def items_of(response: pb.RetrieveResponse) -> list[int]:
    return list(response.candidates.items)


def upsert(item: str, vector: np.ndarray, category: str = "category1") -> ItemRecord:
    return ItemRecord(ItemOp.UPSERT, item, title=f"title {item}", text=f"text {item}", category=category,
                      vector=np.asarray(vector, np.float32))


def delete(item: str) -> ItemRecord:
    return ItemRecord(ItemOp.DELETE, item)


def unknown_count(field: str) -> float:
    return REGISTRY.get_sample_value("fusionrec_unknown_items_total",
                                     {"service": "retrieval", "field": field}) or 0.0


class GatedLog(ItemLog):
    """A real log whose reads wait for `gate` (a slow store), or fail while `down` (a store outage)."""

    def __init__(self, inner: ItemLog) -> None:
        self.inner = inner
        self.gate = asyncio.Event()
        self.gate.set()
        self.down = False
        self.reads = 0

    async def append(self, records):
        return await self.inner.append(records)

    async def read(self, after: int, limit: int = 10_000):
        self.reads += 1
        if self.down:
            raise ItemLogUnavailable("item log: test outage")
        await self.gate.wait()
        return await self.inner.read(after, limit)

    async def last_seq(self) -> int:
        return await self.inner.last_seq()

    async def close(self) -> None:
        await self.inner.close()


@pytest.fixture
def item_log(tmp_path) -> SqliteItemLog:
    return SqliteItemLog(tmp_path / "items.db")


@pytest.fixture
def serving(tiny_artifacts, item_log) -> Serving:
    """A fresh replica per test (the log changes it in memory), over an empty log."""
    return asyncio.run(Serving(tiny_artifacts, item_log).start())


def test_retrieve_answers_what_the_core_retriever_answers(serving):
    servicer, retriever = serving.servicer, serving.retriever
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


def test_defaults_and_quotas(serving):
    servicer, retriever = serving.servicer, serving.retriever
    response, _ = call(servicer.Retrieve, pb.RetrieveRequest(user_id=user_id(0), history=[1, 2]))
    assert len(items_of(response)) == DEFAULT_CANDIDATES   # num_candidates 0 = the server default
    only_popular = pb.RetrieveRequest(user_id=user_id(0), history=[1, 2], num_candidates=10,
                                      quotas={"bert": 0, "cf": 0, "popular": 10})
    response, _ = call(servicer.Retrieve, only_popular)
    direct = retriever.retrieve(user_id(0), np.array([1, 2]), np.zeros(0, np.int64), 10,
                                {"bert": 0, "cf": 0, "popular": 10})
    assert items_of(response) == direct.candidates.items.tolist()


@pytest.mark.parametrize("field, request_of", [
    ("history", lambda n: pb.RetrieveRequest(history=[-1])),
    ("history", lambda n: pb.RetrieveRequest(history=[1, n + MAX_INDICES_AHEAD])),
    ("history", lambda n: pb.RetrieveRequest(history=[0] * (MAX_RETRIEVE_HISTORY + 1))),
    ("exclude", lambda n: pb.RetrieveRequest(exclude=[-3])),
    ("exclude", lambda n: pb.RetrieveRequest(exclude=[2**62])),
    ("exclude", lambda n: pb.RetrieveRequest(exclude=[0] * (MAX_RETRIEVE_EXCLUDE + 1))),
    ("num_candidates", lambda n: pb.RetrieveRequest(num_candidates=MAX_RETRIEVE_CANDIDATES + 1)),
    ("num_candidates", lambda n: pb.RetrieveRequest(num_candidates=-1)),
    ("quotas", lambda n: pb.RetrieveRequest(quotas={"bert": -1})),
])
def test_bad_requests_are_invalid_argument_naming_the_field(serving, field, request_of):
    code, details = refused(serving.servicer.Retrieve, request_of(serving.retriever.total))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(f"{field}:"), details


def test_indices_this_replica_does_not_know_yet_are_dropped_and_counted(serving):
    """A caller ahead of this replica in the item log may name online items it has not applied."""
    servicer, n = serving.servicer, serving.retriever.total
    before = unknown_count("history"), unknown_count("exclude")
    response, context = call(servicer.Retrieve, pb.RetrieveRequest(
        user_id=user_id(1), history=[3, n, 7, n + 4], exclude=[n + 1, 5], num_candidates=20))
    assert context.code() is None
    plain, _ = call(servicer.Retrieve, pb.RetrieveRequest(user_id=user_id(1), history=[3, 7], exclude=[5],
                                                          num_candidates=20))
    assert items_of(response) == items_of(plain)
    assert (unknown_count("history"), unknown_count("exclude")) == (before[0] + 2, before[1] + 1)


def test_unknown_artifact_version_is_failed_precondition(serving):
    code, details = refused(serving.servicer.Retrieve, pb.RetrieveRequest(artifact_version="999"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "artifact_version" in details and "999" in details


def test_an_upsert_in_the_log_is_retrievable_and_a_delete_never_returns(serving, item_log, tiny_artifacts):
    servicer, retriever = serving.servicer, serving.retriever
    n = retriever.total
    history = [7]
    before, _ = call(servicer.Retrieve, pb.RetrieveRequest(user_id=user_id(1), history=history, num_candidates=n - 1))
    removed = items_of(before)[0]
    # The new item's vector is the history item's own: the bert channel's best match.
    vector = tiny_artifacts.npy("item_text.npy")[7]

    async def scenario():
        await item_log.append([upsert("fresh", vector), delete(item_id(removed))])
        assert await serving.follower.sync()
        after, context = await acall(servicer.Retrieve, pb.RetrieveRequest(
            user_id=user_id(1), history=history, num_candidates=n))
        assert context.code() is None
        items = items_of(after)
        assert n in items and removed not in items
        bert = next(c for c in after.candidates.channels if c.channel == "bert")
        assert bert.ranks[items.index(n)] == 1
        # The online item is a valid index now: a history may name it, and it is not "unknown".
        unknown = unknown_count("history")
        _, context = await acall(servicer.Retrieve, pb.RetrieveRequest(user_id=user_id(1), history=[n]))
        assert context.code() is None and unknown_count("history") == unknown
    asyncio.run(scenario())
    assert retriever.overlay.index_of("fresh") == n


def test_a_deleted_item_never_returns_from_any_channel_and_the_request_carries_no_list(serving, item_log):
    servicer, retriever = serving.servicer, serving.retriever
    users = [(user_id(u), np.array([u + 10], np.int64)) for u in range(6)]
    # Delete what each channel would answer first for these users: their best items are gone.
    doomed = set(retriever.popular.ranked_items[:5].tolist())
    for user, history in users:
        results = retriever.channel_results(user, history, np.zeros(0, np.int64), 5)
        for channel in ("bert", "cf"):
            doomed |= set(results[channel].items[:3].tolist())

    async def scenario():
        await item_log.append([delete(item_id(j)) for j in sorted(doomed)])
        assert await serving.follower.sync()
    asyncio.run(scenario())
    assert set(retriever.overlay.deleted_indices().tolist()) == doomed
    for user, history in users:
        for channel in ("bert", "cf", "popular"):
            request = pb.RetrieveRequest(user_id=user, history=history.tolist(), num_candidates=20,
                                         quotas={c: (20 if c == channel else 0) for c in ("bert", "cf", "popular")})
            assert not request.exclude   # the caller's exclusions only: deleted items are retrieval's own filter
            response, context = call(servicer.Retrieve, request)
            assert context.code() is None and len(items_of(response)) == 20
            assert not set(items_of(response)) & doomed, channel
        # The channels skip deleted items inside their search: the last-guard filter finds none.
        out = retriever.retrieve(user, history, np.zeros(0, np.int64), 40)
        assert out.removed.get("deleted", 0) == 0
        for channel, result in retriever.channel_results(user, history, np.zeros(0, np.int64), 30).items():
            if channel == "sequential":   # its query vector comes from Triton, absent here: nothing proposed
                assert len(result) == 0
                continue
            # item2item proposes only the history's neighbours (the tiny set keeps 8 per item).
            # The tiny catalog may hold fewer than 30 items that are neither deleted nor seen.
            available = retriever.total - len(doomed | set(history.tolist()))
            assert len(result) == min(30, available) or (channel == "item2item" and len(result) > 0), channel
            assert not set(result.items.tolist()) & doomed, channel


def test_with_10000_deleted_items_the_search_asks_for_k_plus_the_request_exclusions(tmp_path, monkeypatch):
    artifacts = open_artifacts(write_tiny_artifacts(tmp_path / "big", n_items=10_600, n_users=20))
    item_log = SqliteItemLog(tmp_path / "items.db")
    deleted = 10_000
    asked: list[tuple[int, int]] = []
    search = core.channels.search

    def spy(index, query, fetch, max_k=None, blocked=None, params=None):
        asked.append((fetch, len(blocked)))
        return search(index, query, fetch, max_k, blocked, params)
    monkeypatch.setattr(core.channels, "search", spy)

    async def scenario():
        await item_log.append([delete(item_id(j)) for j in range(deleted)])
        replica = await Serving(artifacts, item_log).start()
        history, exclude = [10_100, 10_200, 10_300], [10_400, 10_401, 10_100]
        response, context = await acall(replica.servicer.Retrieve, pb.RetrieveRequest(
            user_id=user_id(1), history=history, exclude=exclude, num_candidates=100,
            quotas={"bert": 100, "cf": 100, "popular": 100}))
        assert context.code() is None
        return replica, response, len(set(history) | set(exclude))
    replica, response, blocked_by_request = asyncio.run(scenario())
    assert len(replica.retriever.overlay.deleted_indices()) == deleted
    assert asked and all(fetch == 100 + blocked_by_request for fetch, _ in asked), asked
    assert all(n_blocked == deleted for _, n_blocked in asked)   # the selector held all of them
    items = items_of(response)
    assert len(items) == 100 and min(items) >= deleted   # filled from the 600 live items only
    # Each FAISS channel alone fills its list from k results: FAISS skipped the deleted inside the search.
    results = replica.retriever.channel_results(user_id(1), np.array([10_100]), np.zeros(0, np.int64), 100)
    for channel, result in results.items():
        if channel == "sequential":   # its query vector comes from Triton, absent here: nothing proposed
            assert len(result) == 0
            continue
        if channel == "item2item":   # only the history's neighbours (8 random ones here), the deleted masked
            assert not len(result) or result.items.min() >= deleted
            continue
        assert len(result) == 100 and result.items.min() >= deleted, channel
    assert asked[-1][0] == 100 + 1


def test_two_replicas_fed_the_same_log_agree_on_indices(tiny_artifacts, tmp_path):
    path = tmp_path / "shared.db"
    rng = np.random.default_rng(3)

    def vector() -> np.ndarray:
        v = rng.standard_normal(16).astype(np.float32)
        return v / np.linalg.norm(v)

    async def scenario():
        writer_a, writer_b = SqliteItemLog(path), SqliteItemLog(path)   # two gateways appending
        a = await Serving(tiny_artifacts, SqliteItemLog(path)).start()
        await writer_a.append([upsert("a1", vector()), upsert("a2", vector())])
        await writer_b.append([upsert("b1", vector()), delete(item_id(4)), upsert("a1", vector())])
        await a.follower.sync()
        await writer_a.append([upsert("a3", vector()), delete("b1"), upsert(item_id(9), vector())])
        await a.follower.sync()
        b = await Serving(tiny_artifacts, SqliteItemLog(path)).start()   # a replica started later replays
        return a, b
    a, b = asyncio.run(scenario())
    oa, ob = a.retriever.overlay, b.retriever.overlay
    n = oa.n_items
    assert oa.online_ids == ob.online_ids == ["a1", "a2", "b1", "a3"]
    assert [oa.index_of(i) for i in oa.online_ids] == [ob.index_of(i) for i in ob.online_ids] == [n, n + 1, n + 2, n + 3]
    assert oa.deleted_indices().tolist() == ob.deleted_indices().tolist() == [4, n + 2]
    assert np.array_equal(oa.vectors, ob.vectors)
    assert a.follower.applied_seq == b.follower.applied_seq == 8
    for user in range(4):
        request = pb.RetrieveRequest(user_id=user_id(user), history=[n, 9, user], num_candidates=30)
        ra, _ = call(a.servicer.Retrieve, request)
        rb, _ = call(b.servicer.Retrieve, request)
        assert items_of(ra) == items_of(rb) and not {4, n + 2} & set(items_of(ra))


def test_a_replica_behind_the_requests_log_position_catches_up_first(serving, item_log, tiny_artifacts, tmp_path):
    servicer, retriever = serving.servicer, serving.retriever
    n = retriever.total
    vector = tiny_artifacts.npy("item_text.npy")[7]

    async def scenario():
        other = SqliteItemLog(tmp_path / "items.db")   # another gateway's handle on the same log
        seq = await other.append([upsert("hot", vector)])
        assert serving.follower.applied_seq < seq   # no tailing task here: this replica is behind
        unknown = unknown_count("history")
        response, context = await acall(servicer.Retrieve, pb.RetrieveRequest(
            user_id=user_id(1), history=[n], num_candidates=10, min_item_log_seq=seq), time_remaining_s=0.5)
        assert context.code() is None
        assert serving.follower.applied_seq == seq and unknown_count("history") == unknown
        # The history named the new item, whose vector is item 7's: the bert channel's best is 7.
        bert = next(c for c in response.candidates.channels if c.channel == "bert")
        assert items_of(response)[list(bert.ranks).index(1)] == 7
    asyncio.run(scenario())


def test_a_catch_up_the_store_cannot_serve_in_time_answers_with_what_it_has(tiny_artifacts, item_log):
    async def scenario():
        gated = GatedLog(item_log)
        replica = await Serving(tiny_artifacts, gated).start()
        seq = await item_log.append([delete(item_id(1))])
        gated.gate.clear()   # the store hangs
        loop = asyncio.get_running_loop()
        started = loop.time()
        response, context = await acall(replica.servicer.Retrieve, pb.RetrieveRequest(
            user_id=user_id(1), history=[2], num_candidates=10, min_item_log_seq=seq), time_remaining_s=0.04)
        assert context.code() is None and len(items_of(response)) == 10
        assert loop.time() - started < 0.5 and replica.follower.applied_seq < seq
        gated.down, gated.gate = True, asyncio.Event()   # the store is down: no wait at all
        gated.gate.set()
        response, context = await acall(replica.servicer.Retrieve, pb.RetrieveRequest(
            user_id=user_id(1), history=[2], num_candidates=10, min_item_log_seq=seq))
        assert context.code() is None and len(items_of(response)) == 10
        status, _ = await acall(replica.servicer.Status, pb.StatusRequest())
        assert not status.item_log_ok
    asyncio.run(scenario())


def test_status_reports_versions_and_log_position(tiny_artifacts, item_log, tmp_path):
    async def scenario():
        gated = GatedLog(item_log)
        replica = await Serving(tiny_artifacts, gated).start()
        status, context = await acall(replica.servicer.Status, pb.StatusRequest())
        assert context.code() is None
        version = replica.retriever.version
        assert (list(status.loaded_versions), status.newest_version) == ([version], version)
        assert (status.item_log_seq, status.item_log_ok) == (0, True)
        seq = await item_log.append([upsert("s1", np.ones(16, np.float32) / 4), delete(item_id(2))])
        await replica.follower.sync()
        status, _ = await acall(replica.servicer.Status, pb.StatusRequest())
        assert (status.item_log_seq, status.item_log_ok) == (seq, True) == (2, True)
        gated.down = True
        await replica.follower.sync()
        status, _ = await acall(replica.servicer.Status, pb.StatusRequest())
        assert (status.item_log_seq, status.item_log_ok) == (seq, False)
        # A second version loaded side by side: both listed, oldest first.
        newer = load_retriever(replica.artifacts)
        newer.version = str(int(version) + 1)
        gated.down = False
        await offer_followed(replica.versions, replica.follower, newer.version, newer, newer.apply, 0)
        status, _ = await acall(replica.servicer.Status, pb.StatusRequest())
        assert list(status.loaded_versions) == [version, newer.version] and status.newest_version == newer.version
        assert status.item_log_seq == seq and newer.overlay.index_of("s1") == newer.total - 1
    asyncio.run(scenario())


def test_a_version_is_offered_only_after_its_replay(tiny_artifacts, item_log):
    """The load function applies the log before the version is offered, even across a store outage."""
    async def scenario():
        seq = await item_log.append([upsert("early", np.ones(16, np.float32) / 4), delete(item_id(0))])
        gated = GatedLog(item_log)
        gated.down = True
        replica = Serving(tiny_artifacts, gated)
        loading = asyncio.create_task(replica.start())
        await asyncio.sleep(0.1)
        assert not loading.done() and not replica.versions.loaded and gated.reads >= 2   # retrying
        status, _ = await acall(replica.servicer.Status, pb.StatusRequest())
        assert not status.loaded_versions and not status.item_log_ok
        code = (await acall(replica.servicer.Retrieve, pb.RetrieveRequest(history=[1])))[1].code()
        assert code == grpc.StatusCode.FAILED_PRECONDITION   # nothing half-replayed is served
        gated.down = False
        await asyncio.wait_for(loading, 2)
        overlay = replica.versions.get().overlay
        assert overlay.applied_seq == seq and overlay.index_of("early") == overlay.n_items
        assert overlay.deleted_indices().tolist() == [0]
    asyncio.run(scenario())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_service_reports_serving_only_after_the_replay_then_tails_the_log(tiny_artifacts, tmp_path, monkeypatch):
    """retrieval.server.run in process: health NOT_SERVING while the replay waits for the store."""
    path = tmp_path / "items.db"
    gated = GatedLog(SqliteItemLog(path))
    monkeypatch.setattr(retrieval.server, "open_item_log", lambda spec: gated)
    port = _free_port()
    config = RetrievalConfig(port=port, artifacts=tiny_artifacts.folder, item_log=f"sqlite:{path}", grace_s=0.1,
                             insecure_dev=True)   # plaintext: this test is about the replay

    async def health(stub) -> int | None:
        try:
            return (await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)).status
        except grpc.aio.AioRpcError:
            return None   # not bound yet

    async def scenario():
        writer = SqliteItemLog(path)
        seq = await writer.append([upsert("before-start", np.ones(16, np.float32) / 4)])
        gated.gate.clear()   # the replay's read hangs
        server = asyncio.create_task(retrieval.server.run(config))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub, status_stub = health_pb2_grpc.HealthStub(channel), pb_grpc.RetrievalStub(channel)
            for _ in range(100):
                if await health(stub) is not None:
                    break
                await asyncio.sleep(0.05)
            assert await health(stub) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert not (await status_stub.Status(pb.StatusRequest(), timeout=1)).loaded_versions
            gated.gate.set()
            for _ in range(100):
                if await health(stub) == health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0.05)
            assert await health(stub) == health_pb2.HealthCheckResponse.SERVING
            status = await status_stub.Status(pb.StatusRequest(), timeout=1)
            assert list(status.loaded_versions) == [tiny_artifacts.version] and status.item_log_seq == seq
            later = await writer.append([delete("before-start")])   # tailed in the background
            for _ in range(100):
                status = await status_stub.Status(pb.StatusRequest(), timeout=1)
                if status.item_log_seq == later:
                    break
                await asyncio.sleep(0.05)
            assert status.item_log_seq == later and status.item_log_ok
        os.kill(os.getpid(), signal.SIGTERM)   # serve() handles it: a graceful stop
        await asyncio.wait_for(server, 10)
        await writer.close()
    asyncio.run(scenario())


def test_an_item_deleted_then_upserted_again_is_retrievable_again(serving, item_log, tiny_artifacts):
    servicer, retriever = serving.servicer, serving.retriever
    top = int(retriever.popular.ranked_items[0])
    request = pb.RetrieveRequest(user_id=user_id(1), num_candidates=5, quotas={"bert": 0, "cf": 0, "popular": 5})

    async def scenario():
        await item_log.append([delete(item_id(top))])
        await serving.follower.sync()
        gone, _ = await acall(servicer.Retrieve, request)
        await item_log.append([upsert(item_id(top), tiny_artifacts.npy("item_text.npy")[top])])
        await serving.follower.sync()
        back, _ = await acall(servicer.Retrieve, request)
        return items_of(gone), items_of(back)
    gone, back = asyncio.run(scenario())
    assert top not in gone and back[0] == top


def test_a_malformed_record_in_the_log_is_skipped_alike_by_every_replica(tiny_artifacts, item_log, tmp_path):
    async def scenario():
        a = await Serving(tiny_artifacts, item_log).start()
        seq = await item_log.append([upsert("short", np.ones(3, np.float32)),   # another text dim: garbage here
                                     upsert("good", np.ones(16, np.float32) / 4)])
        assert await a.follower.sync()
        b = await Serving(tiny_artifacts, SqliteItemLog(tmp_path / "items.db")).start()
        return a, b, seq
    a, b, seq = asyncio.run(scenario())
    for replica in (a, b):
        overlay = replica.retriever.overlay
        assert overlay.index_of("short") is None and overlay.index_of("good") == overlay.n_items
        assert replica.follower.applied_seq == seq and replica.follower.ok
        response, context = call(replica.servicer.Retrieve, pb.RetrieveRequest(
            user_id=user_id(1), history=[overlay.n_items], num_candidates=10))
        assert context.code() is None and len(items_of(response)) == 10
