"""Two gateways, two retrieval and two ranking replicas sharing one real redis-server (item log +
user state), one Triton: what one gateway writes every replica serves; SIGKILL any one replica
under load and no request fails, no upsert is lost, nothing answers INTERNAL.

Online items get indices from the log order (n, n+1, ... for a catalog of n items), and this
module's stack starts with an empty log, so the tests below run in file order and know them.
"""
from __future__ import annotations

import json
import re
import signal
import threading
import time
import urllib.request
from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc
from tools.stack import Stack

from .helpers import bert_top, click, code_of, rank, service_status, upsert

pytestmark = pytest.mark.integration

REPLICAS = {"retrieval": 2, "ranking": 2, "gateway": 2}
TEXT = "Two rival beekeepers in a mountain village race to save the last hive before winter."
# What a backend team would configure in front of several gateways: round robin over every
# address, retry a call that found its gateway gone (UNAVAILABLE: nothing was answered).
CLIENT_SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{"name": [{"service": "fusionrec.v1.Recommender"}],
                      "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.05s", "maxBackoff": "0.5s",
                                      "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]})


@pytest.fixture(scope="module")
def stack(built, own_redis, tmp_path_factory):
    with Stack(*built, tmp_path_factory.mktemp("replicas"), replicas=REPLICAS, store=own_redis.url) as running:
        yield running


@pytest.fixture(scope="module")
def catalog_ids(artifacts) -> list[str]:
    return artifacts.json("catalog.json")["item_ids"]


@pytest.fixture(scope="module")
def n_items(catalog_ids) -> int:
    return len(catalog_ids)


@pytest.fixture
def gateways(stack):
    """A stub per gateway replica, each on its own channel (no retries: what each one answers)."""
    channels = [stack.gateway_channel(name=name) for name in stack.names("gateway")]
    yield [pb_grpc.RecommenderStub(c) for c in channels]
    for c in channels:
        c.close()


def ids(response: pb.RecommendResponse) -> list[str]:
    return [i.item_id for i in response.items]


def test_an_upsert_through_one_gateway_is_recommendable_through_the_other_within_a_second(
        stack, gateways, n_items, catalog_ids):
    a, b = gateways
    reply = upsert(a, ["rp-0", "rp-1"], TEXT)
    acknowledged = time.monotonic()
    assert reply.added == 2 and reply.item_log_seq == 2
    # Designed to retrieve it: history = its twin (same text), every catalog item excluded, so the
    # answer is rp-1 exactly when B resolves rp-0 (history) and index n+1 (candidate) to rp-1.
    request = pb.RecommendRequest(history_item_ids=["rp-0"], exclude_item_ids=catalog_ids, k=10)
    while ids(b.Recommend(request, timeout=5)) != ["rp-1"]:
        assert time.monotonic() - acknowledged < 1.0, "gateway B did not recommend rp-1 within 1 s"
        time.sleep(0.02)
    seen = time.monotonic() - acknowledged
    assert b.ReportEventBatch(click("rp-user", "rp-1"), timeout=5).accepted == 1   # B resolves the id
    # Every replica retrieves it (BERT: same text, rank 1) and scores it (content-only path); asked
    # directly, so the request names the upsert's log position as the gateway's do.
    for name in stack.names("retrieval"):
        assert bert_top(stack, name, [n_items], 1, reply.item_log_seq) == {n_items + 1}, name
    for name in stack.names("ranking"):
        ranked = rank(stack, name, [n_items], [n_items + 1, 0, 1], reply.item_log_seq)
        assert not ranked.degraded and n_items + 1 in ranked.items, name
    print(f"rp-1 recommended through gateway B {seen * 1000:.0f} ms after gateway A acknowledged it")


def test_deletes_hold_on_every_gateway(stack, gateways, known_user, n_items):
    a, b = gateways
    user, _ = known_user
    doomed = ids(b.Recommend(pb.RecommendRequest(user_id=user, k=10), timeout=5))[:3] + ["rp-1"]
    deleted = a.DeleteItems(pb.DeleteItemsRequest(item_ids=doomed), timeout=5)
    acknowledged = time.monotonic()
    assert deleted.deleted == 4 and deleted.item_log_seq == 2 + 4   # one record per item
    while code_of(b.ReportEventBatch, click("rp-user", doomed[0]), timeout=5) != "INVALID_ARGUMENT":
        assert time.monotonic() - acknowledged < 1.0, "gateway B still accepts events on a deleted item"
        time.sleep(0.02)
    requests = [pb.RecommendRequest(user_id=user, k=50), pb.RecommendRequest(history_item_ids=["rp-0"], k=50)]
    for stub in gateways:
        for _ in range(10):   # round robin: both retrieval and both ranking replicas answer
            for request in requests:
                assert not set(ids(stub.Recommend(request, timeout=5))) & set(doomed)
        assert code_of(stub.ReportEventBatch, click("rp-user", "rp-1"), timeout=5) == "INVALID_ARGUMENT"
    for name in stack.names("retrieval"):
        assert n_items + 1 not in bert_top(stack, name, [n_items], 50, deleted.item_log_seq), name


def test_store_down_refuses_upserts_whole_and_recommend_degrades(stack, gateways, own_redis, known_user):
    """Redis killed: UpsertItems is UNAVAILABLE and leaves nothing behind (after Redis is back, the
    same items are new: `added`), Recommend answers degraded `item_state_unavailable`; events follow
    gateway/events.py's rule. Redis restarts from its AOF: every replica catches up."""
    a, b = gateways
    user, _ = known_user
    before = service_status(stack, "retrieval-0").item_log_seq
    own_redis.kill()
    try:
        codes = Counter(code_of(a.UpsertItems, pb.UpsertItemsRequest(items=[pb.NewItem(
            item_id=f"sd-{j}", title="Store down", text=TEXT)]), timeout=5) for j in range(3))
        assert codes == Counter(UNAVAILABLE=3), codes
        for stub in gateways:   # not known anywhere: nothing was half-applied
            assert code_of(stub.ReportEventBatch, click("sd-user", "sd-0"), timeout=5) == "INVALID_ARGUMENT"
        reasons: Counter[str] = Counter()
        deadline = time.monotonic() + 3.0
        while "item_state_unavailable" not in reasons and time.monotonic() < deadline:
            for stub in gateways:
                r = stub.Recommend(pb.RecommendRequest(user_id=user, k=10), timeout=5)
                assert len(r.items) == 10
                reasons.update(r.degraded_reasons)
            time.sleep(0.1)
        assert "item_state_unavailable" in reasons, reasons
        event_code = code_of(a.ReportEventBatch, click("sd-user", "rp-0"), timeout=5)   # asserted last
    finally:
        own_redis.start()
    deadline = time.monotonic() + 10.0
    while code_of(a.UpsertItems, pb.UpsertItemsRequest(items=[pb.NewItem(item_id="sd-probe", title="probe", text=TEXT)]),
                  timeout=5) != "OK":
        assert time.monotonic() < deadline, "UpsertItems still failing 10 s after Redis came back"
        time.sleep(0.2)
    reply = upsert(a, ["sd-0", "sd-1", "sd-2"], TEXT)
    assert reply.added == 3 and reply.updated == 0          # the refused upserts left no trace
    assert reply.item_log_seq == before + 1 + 3              # sd-probe, then this batch
    deadline = time.monotonic() + 5.0
    while True:
        statuses = {n: service_status(stack, n) for n in
                    stack.names("retrieval") + stack.names("ranking")}
        if all(s.item_log_ok and s.item_log_seq >= reply.item_log_seq for s in statuses.values()):
            break
        assert time.monotonic() < deadline, statuses
        time.sleep(0.1)
    for stub in gateways:
        r = stub.Recommend(pb.RecommendRequest(user_id=user, k=10), timeout=5)
        assert "item_state_unavailable" not in r.degraded_reasons
    assert event_code in EVENTS_WITH_STORE_DOWN, f"ReportEventBatch with the store down: {event_code}"


# With the user-state store down an event batch is acknowledged (it is in the durable event
# log; the history update is what is lost), never INTERNAL or UNAVAILABLE: the rule documented
# in gateway/events.py.
EVENTS_WITH_STORE_DOWN = {"OK"}


class OpenLoop(threading.Thread):
    """Recommend at a fixed rate whatever the answers take (calls are futures); every outcome counted."""

    def __init__(self, stub: pb_grpc.RecommenderStub, rate: float, requests: "RequestMix") -> None:
        super().__init__(daemon=True)
        self.stub, self.interval, self.requests = stub, 1.0 / rate, requests
        self.outcomes: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.details: list[str] = []
        self.stopped = threading.Event()
        self.pending: list[grpc.Future] = []
        self._lock = threading.Lock()

    def _done(self, future: grpc.Future) -> None:
        with self._lock:
            error = future.exception()
            if error is None:
                self.outcomes["OK"] += 1
                self.reasons.update(future.result().degraded_reasons)
            else:
                self.outcomes[error.code().name] += 1
                self.details.append(f"{error.code().name}: {error.details()}")

    def run(self) -> None:
        next_send = time.monotonic()
        while not self.stopped.is_set():
            future = self.stub.Recommend.future(self.requests.next(), timeout=3.0)
            future.add_done_callback(self._done)
            self.pending.append(future)
            next_send += self.interval
            time.sleep(max(next_send - time.monotonic(), 0.0))

    def stop(self) -> Counter[str]:
        self.stopped.set()
        self.join(10)
        for future in self.pending:
            try:
                future.result(timeout=10)
            except grpc.RpcError:
                pass
        time.sleep(0.1)   # done callbacks run on gRPC's threads
        return self.outcomes


class RequestMix:
    """Known users, and session users whose history names an online item upserted a while ago."""

    def __init__(self, users: list[str], upserts: "Upserter") -> None:
        self.users, self.upserts, self.i = users, upserts, 0

    def next(self) -> pb.RecommendRequest:
        self.i += 1
        settled = self.upserts.settled(1.0)
        if self.i % 2 and settled:
            return pb.RecommendRequest(history_item_ids=[settled[self.i % len(settled)], "rp-0"], k=10)
        return pb.RecommendRequest(user_id=self.users[self.i % len(self.users)], k=10)


class Upserter(threading.Thread):
    """One new item every `interval_s` through the client channel; acknowledged ids are kept."""

    def __init__(self, stub: pb_grpc.RecommenderStub, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.stub, self.interval_s = stub, interval_s
        self.acked: list[tuple[str, int, float]] = []   # (item id, log seq, when)
        self.failed: Counter[str] = Counter()
        self.stopped = threading.Event()

    def settled(self, age_s: float) -> list[str]:
        now = time.monotonic()
        return [item for item, _, when in list(self.acked) if now - when >= age_s]

    def run(self) -> None:
        j = 0
        while not self.stopped.wait(self.interval_s):
            item = f"ld-{j}"
            try:
                reply = upsert(self.stub, [item], f"{TEXT} Episode {j}.")
                self.acked.append((item, reply.item_log_seq, time.monotonic()))
            except grpc.RpcError as e:
                self.failed[e.code().name] += 1
            j += 1

    def stop(self) -> None:
        self.stopped.set()
        self.join(15)


def served_calls(stack: Stack, name: str) -> float:
    """gRPC calls a process has answered since it started (its own Prometheus counter)."""
    method = {"gateway": "Recommend", "retrieval": "Retrieve", "ranking": "Rank"}[name.split("-")[0]]
    text = urllib.request.urlopen(stack.metrics_url(name), timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("fusionrec_grpc_requests_total{") and re.search(f'method="{method}"', line))


def gauges(stack: Stack, gateway: str) -> dict[tuple[str, str], float]:
    """A gateway's fusionrec_replicas_{reachable,lagging}{service=...} gauges."""
    text = urllib.request.urlopen(stack.metrics_url(gateway), timeout=5).read().decode()
    found = re.findall(r'^fusionrec_replicas_(reachable|lagging)\{service="(\w+)"\} (\S+)$', text, flags=re.M)
    return {(kind, service): float(value) for kind, service, value in found}


def test_sigkill_and_restart_every_replica_in_turn_under_load(stack, known_user, artifacts):
    from gateway.user_state import ArtifactHistoryStore
    users = ArtifactHistoryStore(artifacts).users()[:50]
    channel = stack.gateway_channel(options=[("grpc.service_config", CLIENT_SERVICE_CONFIG), ("grpc.enable_retries", 1)])
    stub = pb_grpc.RecommenderStub(channel)
    upserts = Upserter(stub, 0.5)
    load = OpenLoop(stub, 20.0, RequestMix(users, upserts))
    back_in_service: dict[str, float] = {}
    upserts.start()
    load.start()
    try:
        time.sleep(1.5)
        for name in stack.names("retrieval") + stack.names("ranking") + stack.names("gateway"):
            stack.restart(name, signal.SIGKILL)
            started = time.monotonic()
            # Before the next kill, the restarted replica takes traffic again (its callers reconnected).
            while served_calls(stack, name) < 3:
                assert time.monotonic() - started < 30, f"{name} got no calls 30 s after SERVING"
                time.sleep(0.2)
            back_in_service[name] = round(time.monotonic() - started, 2)
        time.sleep(1.0)
    finally:
        upserts.stop()
        outcomes = load.stop()
    print(f"load outcomes {dict(outcomes)}, degraded {dict(load.reasons)}, "
          f"seconds from SERVING to traffic {back_in_service}, upserts {len(upserts.acked)}")
    try:
        assert outcomes["OK"] > 0 and set(outcomes) == {"OK"}, (outcomes, load.details[:5])
        assert not upserts.failed and len(upserts.acked) >= 10, upserts.failed
        # No upsert lost: every replica applied the log past the last acknowledged position, and
        # both gateways (restarted last) resolve every acknowledged id.
        last_seq = max(seq for _, seq, _ in upserts.acked)
        for name in stack.names("retrieval") + stack.names("ranking"):
            status = service_status(stack, name)
            assert status.item_log_ok and status.item_log_seq >= last_seq, (name, status)
        for name in stack.names("gateway"):   # each gateway sees both replicas of each tier, none lagging
            deadline = time.monotonic() + 10.0
            while gauges(stack, name) != {("reachable", "retrieval"): 2, ("reachable", "ranking"): 2,
                                          ("lagging", "retrieval"): 0, ("lagging", "ranking"): 0}:
                assert time.monotonic() < deadline, (name, gauges(stack, name))
                time.sleep(0.2)
            with stack.gateway_channel(name=name) as ch:
                replicas_health = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service="fusionrec.replicas"), timeout=5).status
            assert replicas_health == health_pb2.HealthCheckResponse.SERVING, name
        acked = [item for item, _, _ in upserts.acked]
        for name in stack.names("gateway"):
            with stack.gateway_channel(name=name) as ch:
                direct = pb_grpc.RecommenderStub(ch)
                batch = pb.EventBatch(events=[click("ld-user", item).events[0] for item in acked])
                assert direct.ReportEventBatch(batch, timeout=10).accepted == len(acked), name
                r = direct.Recommend(pb.RecommendRequest(history_item_ids=acked[-1:], k=10), timeout=5)
                assert not r.degraded and any("bert" in i.channels for i in r.items), name
    finally:
        channel.close()
