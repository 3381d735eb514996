"""The colocated gateway (tools/colocated.py: retrieval and ranking inside the gateway process) on
the real stack: the same ranked slates as the three-process stack on the same artifacts, its
writes followed by the in-process services and kept across a SIGKILL, bad input refused, Triton's
death degrading the answers instead of failing them, and recovery once Triton is back.

Runs on stacks of its own (it writes, kills and restarts), TLS and tokens on.
"""
from __future__ import annotations

import time
import urllib.request
from collections import Counter

import grpc
import pytest

from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc
from tools.stack import Stack

from .helpers import Load

pytestmark = pytest.mark.integration


# The sequential channel's Triton call is capped at 20 ms by default and skipped (silently: the
# answer is not marked degraded) when late, as the first calls after a start are on a loaded CI
# machine: the slates compared here would then differ by that channel. A cap no call reaches.
SEQ_TIMEOUT_ENV = {"FUSIONREC_TRITON_TIMEOUT_MS": "2000", "FUSIONREC_TRITON_DEADLINE_SHARE": "1.0"}


@pytest.fixture(scope="module")
def colocated(built, tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        for name, value in SEQ_TIMEOUT_ENV.items():
            env.setenv(name, value)
        stack = Stack(*built, tmp_path_factory.mktemp("colocated"), colocated=True).start()
    try:
        yield stack
    finally:
        stack.stop()


def ranked(stack: Stack, request: pb.RecommendRequest, tries: int = 10) -> pb.RecommendResponse:
    """A non-degraded answer (a hop late on a loaded machine serves the retrieval order: asked again)."""
    with stack.gateway_channel("recommend") as channel:
        for _ in range(tries):
            reply = pb_grpc.RecommenderStub(channel).Recommend(request, timeout=5)
            if not reply.degraded:
                return reply
            time.sleep(0.3)
    raise AssertionError(f"{tries} degraded answers in a row: {list(reply.degraded_reasons)}")


def requests_of(stack: Stack) -> list[pb.RecommendRequest]:
    from common.artifacts import open_artifacts
    from gateway.user_state import ArtifactHistoryStore
    artifacts = open_artifacts(stack.artifacts)
    users = ArtifactHistoryStore(artifacts).users()
    catalog = artifacts.json("catalog.json")["item_ids"]
    return [*(pb.RecommendRequest(user_id=u, k=10) for u in users[:4]),
            pb.RecommendRequest(history_item_ids=catalog[:5], k=20, exclude_item_ids=catalog[5:8])]


def usual(stack: Stack, request: pb.RecommendRequest, asks: int = 3) -> pb.RecommendResponse:
    """The answer most of `asks` non-degraded answers give. A channel that misses its share of the
    deadline on a loaded machine (the sequential channel's Triton call) is skipped without marking
    the answer degraded, and changes a slate's tail: one answer alone may be that one."""
    answers = [ranked(stack, request) for _ in range(asks)]
    slates = Counter(tuple(i.item_id for i in a.items) for a in answers)
    most = slates.most_common(1)[0][0]
    return next(a for a in answers if tuple(i.item_id for i in a.items) == most)


def test_the_slates_are_the_three_process_stacks(built, colocated, tmp_path, monkeypatch):
    requests = requests_of(colocated)
    for r in requests:                                    # warm: first calls after a start are slow
        ranked(colocated, r)
    together = [usual(colocated, r) for r in requests]   # before any write of this module
    for name, value in SEQ_TIMEOUT_ENV.items():
        monkeypatch.setenv(name, value)
    with Stack(*built, tmp_path) as split:
        for r in requests:
            ranked(split, r)
        apart = [usual(split, r) for r in requests]
    for a, b in zip(together, apart):
        assert [i.item_id for i in a.items] == [i.item_id for i in b.items]
        assert [i.score for i in a.items] == pytest.approx([i.score for i in b.items], rel=1e-5, abs=1e-6)
        assert [list(i.channels) for i in a.items] == [list(i.channels) for i in b.items]
        assert dict(a.versions) == dict(b.versions)


def test_one_process_serves_all_three_and_exports_their_metrics(colocated):
    assert sorted(colocated.processes) == ["gateway", "triton"]
    ranked(colocated, requests_of(colocated)[0])
    body = urllib.request.urlopen(colocated.metrics_url("gateway"), timeout=5).read().decode()
    for service in ("gateway", "retrieval", "ranking"):
        assert f'fusionrec_artifact_info{{service="{service}"' in body, service
    assert 'fusionrec_grpc_requests_total{code="OK",method="Retrieve",service="retrieval"}' in body
    assert 'fusionrec_grpc_requests_total{code="OK",method="Rank",service="ranking"}' in body


@pytest.mark.parametrize("request_, field", [(pb.RecommendRequest(user_id="u", k=0), "k"),
                                             (pb.RecommendRequest(user_id="u\n", k=5), "user_id")])
def test_bad_input_is_invalid_argument_naming_the_field(colocated, request_, field):
    with colocated.gateway_channel("recommend") as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.RecommenderStub(channel).Recommend(request_, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith(field)


def test_an_upserted_item_is_served_and_survives_a_kill_of_the_process(colocated):
    text = "A lighthouse keeper on a remote island finds a message in a bottle from a drowned ship."
    with colocated.gateway_channel("items") as channel:
        reply = pb_grpc.RecommenderStub(channel).UpsertItems(pb.UpsertItemsRequest(items=[
            pb.NewItem(item_id=f"colo-{j}", title="The Keeper", text=text, category="Drama") for j in range(2)]),
            timeout=30)
    assert reply.added == 2
    request = pb.RecommendRequest(history_item_ids=["colo-0"], k=100)
    assert "colo-1" in [i.item_id for i in ranked(colocated, request).items]   # retrieved and ranked in process
    colocated.restart("gateway")   # SIGKILL, then SERVING again: the item log replayed by all three
    after = ranked(colocated, request)
    assert "colo-1" in [i.item_id for i in after.items] and "colo-0" not in [i.item_id for i in after.items]


def test_triton_dying_degrades_the_answers_and_its_return_ends_it(colocated):
    user = requests_of(colocated)[0].user_id
    load = Load(colocated.gateway_channel("recommend"), user)
    load.start()
    try:
        colocated.kill("triton")
        with colocated.gateway_channel("recommend") as channel:
            reply = pb_grpc.RecommenderStub(channel).Recommend(pb.RecommendRequest(user_id=user, k=10), timeout=5)
        assert reply.degraded and "triton_unavailable" in reply.degraded_reasons and len(reply.items) == 10
        colocated.start_triton()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with colocated.gateway_channel("recommend") as channel:
                reply = pb_grpc.RecommenderStub(channel).Recommend(pb.RecommendRequest(user_id=user, k=10), timeout=5)
            if not reply.degraded:
                break
            time.sleep(0.5)
        assert not reply.degraded, list(reply.degraded_reasons)
    finally:
        load.stop()
    assert set(load.outcomes) == {"OK"}, load.outcomes   # not one call failed
    assert "triton_unavailable" in load.reasons
