"""Events, new items and deletions on a live stack of its own (these tests change its state)."""
from __future__ import annotations

import signal
import time

import grpc
import numpy as np
import pytest

from tools.stack import Stack
from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def live(built, tmp_path_factory):
    with Stack(*built, tmp_path_factory.mktemp("realtime")) as stack:
        yield stack


@pytest.fixture(scope="module")
def stub(live):
    with live.gateway_channel() as channel:
        yield pb_grpc.RecommenderStub(channel)


@pytest.fixture(scope="module")
def catalog(artifacts):
    return artifacts.json("catalog.json")


def clicks(user: str, items: list[str], start: float | None = None) -> pb.EventBatch:
    now = start or time.time() - 100
    return pb.EventBatch(events=[pb.Event(user_id=user, item_id=i, type="click", timestamp=now + j)
                                 for j, i in enumerate(items)])


def share(response: pb.RecommendResponse, category: str) -> float:
    return float(np.mean([i.category == category for i in response.items]))


def test_clicks_move_the_next_slate_towards_their_category(synthetic_built, tmp_path):
    """On the planted-topic data: a new user's slate is popular items; after ten clicks on one
    topic, the next slate is mostly that topic (history updated at once, through every stage)."""
    from common.artifacts import open_artifacts
    catalog = open_artifacts(synthetic_built).json("catalog.json")
    cats = np.array(catalog["categories"])
    model_repo = synthetic_built.parent / "model_repository"
    with Stack(synthetic_built, model_repo, tmp_path) as stack, stack.gateway_channel() as ch:
        stub = pb_grpc.RecommenderStub(ch)
        popular = stub.Recommend(pb.RecommendRequest(user_id="rt-probe", k=10), timeout=5)
        # The topics the popular slate shows least: where a move is visible.
        for target in sorted(set(cats), key=lambda c: share(popular, c))[:2]:
            user = f"rt-topic-{target}"
            before = stub.Recommend(pb.RecommendRequest(user_id=user, k=10), timeout=5)
            picked = [catalog["item_ids"][j] for j in np.flatnonzero(cats == target)[:10]]
            reply = stub.ReportEventBatch(clicks(user, picked), timeout=5)
            assert reply.accepted == 10 and reply.history_updates == 10
            after = stub.Recommend(pb.RecommendRequest(user_id=user, k=10), timeout=5)
            assert all(list(i.channels) == ["popular"] for i in before.items)
            assert share(after, target) >= 0.6 and share(after, target) >= share(before, target) + 0.3
            assert not {i.item_id for i in after.items} & set(picked)   # clicked items count as seen


def test_streamed_batches_apply_in_order(stub, catalog):
    ids = catalog["item_ids"]
    reply = stub.ReportEvents(iter([clicks("rt-user-2", ids[:3]), clicks("rt-user-2", ids[3:5])]), timeout=5)
    assert reply.accepted == 5 and reply.history_updates == 5
    slate = stub.Recommend(pb.RecommendRequest(user_id="rt-user-2", k=30), timeout=5)
    assert not {i.item_id for i in slate.items} & set(ids[:5])


@pytest.mark.parametrize("mutate, field", [
    (lambda e: setattr(e, "item_id", "no-such-item"), "events[2].item_id"),
    (lambda e: setattr(e, "timestamp", time.time() + 86400), "events[2].timestamp"),
    (lambda e: setattr(e, "timestamp", 12.0), "events[2].timestamp"),
    (lambda e: setattr(e, "type", "teleport"), "events[2].type"),
])
def test_a_bad_event_fails_its_whole_batch(stub, catalog, live, mutate, field):
    user = f"rt-bad-{field}-{id(mutate)}"
    batch = clicks(user, catalog["item_ids"][:4])
    mutate(batch.events[2])
    log_before = _log_lines(live)
    with pytest.raises(grpc.RpcError) as info:
        stub.ReportEventBatch(batch, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field)
    assert _log_lines(live) == log_before                      # nothing logged
    fresh = stub.Recommend(pb.RecommendRequest(user_id=user, k=5), timeout=5)
    assert all(list(i.channels) == ["popular"] for i in fresh.items)   # history untouched


def test_oversize_batch_is_refused(stub, catalog):
    batch = clicks("rt-big", [catalog["item_ids"][0]] * 1001)
    with pytest.raises(grpc.RpcError) as info:
        stub.ReportEventBatch(batch, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "1000" in info.value.details()


def _log_lines(stack: Stack) -> int:
    return sum(len(p.read_text().splitlines()) for p in (stack.run_dir / "events").glob("*.csv"))


def test_new_item_is_retrievable_and_rankable_within_a_second(stub, live):
    """Two new items with the same text: for a session user who clicked one, the BERT channel
    proposes the other first, and the ranker scores it (content-only path), right after the upsert."""
    text = "A quiet submarine crew drifts under arctic ice while a storm rages above."
    started = time.monotonic()
    reply = stub.UpsertItems(pb.UpsertItemsRequest(items=[
        pb.NewItem(item_id=f"new-{j}", title="Under the Ice", text=text, category="Drama") for j in range(2)]),
        timeout=5)
    assert reply.added == 2 and reply.updated == 0
    with live.channel("retrieval") as r, live.channel("ranking") as k:
        n = len(live_catalog_ids(live))
        # Another process follows the item log: name the upsert's position to read it (as the gateway does).
        retrieved = pb_grpc.RetrievalStub(r).Retrieve(
            pb.RetrieveRequest(history=[n], min_item_log_seq=reply.item_log_seq), timeout=5)
        bert = next(c for c in retrieved.candidates.channels if c.channel == "bert")
        assert retrieved.candidates.items[0] == n + 1 and bert.ranks[0] == 1
        top = pb.Candidates(items=retrieved.candidates.items[:50], channels=[
            pb.ChannelColumn(channel=c.channel, scores=c.scores[:50], ranks=c.ranks[:50])
            for c in retrieved.candidates.channels])
        ranked = pb_grpc.RankingStub(k).Rank(pb.RankRequest(history=[n], candidates=top, k=50,
                                                             min_item_log_seq=reply.item_log_seq), timeout=5)
    elapsed = time.monotonic() - started
    assert n + 1 in ranked.items and not ranked.degraded
    assert np.isfinite(ranked.scores[list(ranked.items).index(n + 1)])
    assert elapsed < 1.0
    slate = stub.Recommend(pb.RecommendRequest(history_item_ids=["new-0"], k=10), timeout=5)
    assert "new-0" not in {i.item_id for i in slate.items} and not slate.degraded
    again = stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.NewItem(item_id="new-1", title="Under the Ice II")]),
                             timeout=5)
    assert again.added == 0 and again.updated == 1


def live_catalog_ids(stack: Stack) -> list[str]:
    from common.artifacts import open_artifacts
    return open_artifacts(stack.artifacts).json("catalog.json")["item_ids"]


def test_upsert_validation(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.NewItem(item_id="x", title="")]), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("items[0].title")


def test_deleted_items_never_appear_again(stub, catalog):
    user = "rt-del"
    first = stub.Recommend(pb.RecommendRequest(user_id=user, k=10), timeout=5)
    doomed = [i.item_id for i in first.items[:3]]
    assert stub.DeleteItems(pb.DeleteItemsRequest(item_ids=doomed), timeout=5).deleted == 3
    for request in (pb.RecommendRequest(user_id=user, k=50),
                    pb.RecommendRequest(history_item_ids=catalog["item_ids"][:3], k=50)):
        assert not {i.item_id for i in stub.Recommend(request, timeout=5).items} & set(doomed)
    with pytest.raises(grpc.RpcError) as info:   # events on a deleted item are refused
        stub.ReportEventBatch(clicks(user, doomed[:1]), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_acknowledged_events_survive_a_gateway_kill(built, catalog, tmp_path):
    with Stack(*built, tmp_path) as stack:
        with stack.gateway_channel() as channel:
            reply = pb_grpc.RecommenderStub(channel).ReportEventBatch(
                clicks("rt-kill", catalog["item_ids"][10:15]), timeout=5)
        assert reply.accepted == 5
        stack.kill("gateway", signal.SIGKILL)
        logged = "".join(p.read_text() for p in (tmp_path / "events").glob("*.csv"))
        assert logged.count("rt-kill") == 5
        stack.start_service("gateway", stack.artifacts)
        stack.wait_healthy("gateway", 60)
        with stack.gateway_channel() as channel:
            slate = pb_grpc.RecommenderStub(channel).Recommend(pb.RecommendRequest(user_id="rt-kill", k=20), timeout=5)
        assert not {i.item_id for i in slate.items} & set(catalog["item_ids"][10:15])   # history kept
        assert any("bert" in i.channels for i in slate.items)
