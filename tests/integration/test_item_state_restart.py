"""Online item state outlives every process on one machine (SQLite item log): a gateway, ranking
or retrieval SIGKILLed and restarted replays the log before SERVING and knows every upserted item.

The bug this guards: a restarted gateway forgot upserted items (history naming one ignored, a click
on one INVALID_ARGUMENT) and answered INTERNAL when retrieval returned an index it did not know.
Runs on a stack of its own (it kills processes); the store-down case runs on the Redis-backed
replica stack (tests/integration/test_replicas.py::test_store_down_*).
"""
from __future__ import annotations

import signal
import time
from collections import Counter

import grpc
import numpy as np
import pytest

from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc
from tools.stack import Stack

from .helpers import bert_top, click, rank, upsert

pytestmark = pytest.mark.integration

NEW = [f"rs-{j}" for j in range(5)]
TEXT = "A lighthouse keeper on a storm-bound island finds a message in a bottle from her future self."


@pytest.fixture(scope="module")
def live(built, tmp_path_factory):
    with Stack(*built, tmp_path_factory.mktemp("item-state")) as stack:
        yield stack


@pytest.fixture(scope="module")
def catalog_ids(artifacts) -> list[str]:
    return artifacts.json("catalog.json")["item_ids"]


@pytest.fixture(scope="module")
def upserted(live, catalog_ids) -> int:
    """Five items with the same text, upserted once; their indices are n..n+4 (log order)."""
    with live.gateway_channel() as ch:
        reply = upsert(pb_grpc.RecommenderStub(ch), NEW, TEXT)
    assert reply.added == 5 and reply.updated == 0 and reply.item_log_seq >= 5
    return reply.item_log_seq


def _stub(stack: Stack) -> tuple[grpc.Channel, pb_grpc.RecommenderStub]:
    channel = stack.gateway_channel()
    return channel, pb_grpc.RecommenderStub(channel)


def _reconnected(stub: pb_grpc.RecommenderStub, request: pb.RecommendRequest, timeout_s: float = 30.0) -> float:
    """Seconds until the gateway's channels reach a restarted backend again (an undegraded answer)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if not stub.Recommend(request, timeout=5).degraded:
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"still degraded {timeout_s}s after the restart")


def test_upserted_items_survive_a_gateway_sigkill(live, upserted, catalog_ids):
    live.restart("gateway", signal.SIGKILL)
    channel, stub = _stub(live)
    with channel:
        session = stub.Recommend(pb.RecommendRequest(history_item_ids=["rs-0"], k=10), timeout=5)
        assert not session.degraded, list(session.degraded_reasons)
        # Honoured: an ignored history would be empty, i.e. popular items only.
        assert any("bert" in i.channels for i in session.items)
        assert "rs-0" not in {i.item_id for i in session.items}          # seen items are not proposed
        reply = stub.ReportEventBatch(click("rs-user", "rs-2"), timeout=5)  # known: not INVALID_ARGUMENT
        assert reply.accepted == 1 and reply.history_updates == 1
        again = upsert(stub, ["rs-4"], TEXT)                              # the restarted gateway knows it
        assert again.added == 0 and again.updated == 1


def test_online_and_catalog_history_never_answer_internal(live, upserted, catalog_ids):
    """The issue's reproduction: 2 of 500 such requests were INTERNAL after a gateway restart."""
    channel, stub = _stub(live)
    codes: Counter[str] = Counter()
    online_items = 0
    with channel:
        for j in range(200):
            request = pb.RecommendRequest(history_item_ids=[NEW[j % 5], catalog_ids[j % 50]], k=100)
            try:
                r = stub.Recommend(request, timeout=5)
                codes["OK"] += 1
                online_items += sum(i.item_id.startswith("rs-") for i in r.items)
            except grpc.RpcError as e:
                codes[e.code().name] += 1
    assert codes == Counter(OK=200), codes
    assert online_items > 0   # the other online items are retrieved and resolved, not dropped


@pytest.mark.parametrize("service", ["ranking", "retrieval"])
def test_a_restarted_backend_replays_the_items_before_serving(live, upserted, catalog_ids, service):
    n = len(catalog_ids)
    live.restart(service, signal.SIGKILL)
    # Straight after SERVING, before any request reached it: the replica has replayed the log.
    if service == "retrieval":
        assert bert_top(live, "retrieval", [n], 4) == {n + 1, n + 2, n + 3, n + 4}
    else:
        ranked = rank(live, "ranking", [n], [n + 1, n + 2, 0, 1])
        assert not ranked.degraded and set(ranked.items) == {n + 1, n + 2, 0, 1}
        assert np.isfinite(ranked.scores).all()
    channel, stub = _stub(live)
    with channel:
        request = pb.RecommendRequest(history_item_ids=["rs-0", catalog_ids[3]], k=20)
        waited = _reconnected(stub, request)
        reasons: Counter[str] = Counter()
        for _ in range(15):
            r = stub.Recommend(request, timeout=5)
            reasons.update(r.degraded_reasons)
            assert len(r.items) == 20
        assert not reasons, (reasons, f"reconnected after {waited:.1f}s")
