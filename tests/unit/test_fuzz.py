"""Fuzzing every method of every service, in process, bounded in time.

The three real servicers (gateway Recommender, retrieval, ranking) run over the tiny artifact set
on real grpc.aio servers built with common.server.standard_interceptors (what production runs:
tracing, strict decode, admission) plus health and reflection, each on its own loopback port.
Fakes stand in only for what is outside a process: Retrieval/Ranking stubs behind the gateway
(tests/unit/test_gateway_recommend.py), Triton's text encoder and the fused ranker's scorer.
The item log, the event log and the user-state store are real (SQLite / files in tmp).

(a) random and near-miss bytes at every method: only OK or INVALID_ARGUMENT (FAILED_PRECONDITION
    when the bytes happen to name an artifact version that is not loaded), never UNKNOWN or
    INTERNAL, no exception text in the details;
(b) hypothesis-generated messages (control characters, huge ints, NaN/inf floats, long lists):
    OK or INVALID_ARGUMENT naming a field, never INTERNAL; every service answers a valid request
    afterwards.
"""
from __future__ import annotations

import asyncio
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.config import GatewayConfig, RankingConfig, RetrievalConfig
from common.followed_versions import offer_followed
from common.item_follower import ItemLogFollower
from common.item_log import SqliteItemLog
from common.server import MAX_MESSAGE_BYTES, standard_interceptors
from common.versions import VersionSet
from core.events import EVENT_TYPES
from core.text_rules import has_control
from gateway.erase import UserEraser
from gateway.event_log import EventLog
from gateway.events import EventIngester
from gateway.items import ItemWriter
from gateway.server import RecommenderServicer
from gateway.serving_state import ServingState
from gateway.state_store import open_store
from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc
from ranking.ranker import Ranker
from ranking.server import RankingServicer
from tests.tiny_artifacts import FakeScorer, item_id, user_id
from tests.unit.test_gateway_items_events import FakeTriton
from tests.unit.test_gateway_recommend import make
from tests.unit.test_retrieval_servicer import Serving as RetrievalReplica

CALL_TIMEOUT_S = 5.0
SERVICES = {"gateway": "Recommender", "retrieval": "Retrieval", "ranking": "Ranking"}
# What a refusal must look like: the field first ("events[3].item_id: ...", "request: not a valid
# ..."; ReportEvents prefixes the batch), never an exception's text.
FIELD_FIRST = re.compile(r"^(batch \d+: )?[a-z_]+(\[\d+\])?(\.[a-z_]+(\[\d+\])?)*: ")
EXCEPTION_TEXT = ("Traceback", "Exception", "Error", "Unexpected", "<class", "File \"")


@dataclass
class Server:
    port: int
    server: grpc.aio.Server


@dataclass
class Served:
    """The three services on a background event loop; `run` executes a coroutine there."""
    loop: asyncio.AbstractEventLoop
    ports: dict[str, int]
    events: EventIngester
    item_log: SqliteItemLog
    triton: FakeTriton
    gateway: RecommenderServicer
    servers: list[Server] = field(default_factory=list)
    channels: dict[str, grpc.Channel] = field(default_factory=dict)

    def run(self, coro, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def channel(self, service: str) -> grpc.Channel:
        """An in-process plaintext channel (the servers here have no TLS; the transport does not
        matter to what is tested)."""
        if service not in self.channels:
            self.channels[service] = grpc.insecure_channel(
                f"127.0.0.1:{self.ports[service]}",
                options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                         ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        return self.channels[service]

    def event_log_text(self) -> str:
        return "".join(p.read_text() for p in self.events.log.files())

    def item_log_seq(self) -> int:
        return self.run(self.item_log.last_seq())


async def _serve(config, service: str, add: Callable[[grpc.aio.Server], None], names: list[str]) -> Server:
    server = grpc.aio.server(interceptors=standard_interceptors(config, service),
                             options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    add(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                         reflection.SERVICE_NAME], server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return Server(port, server)


async def _build(artifacts, folder, write_deadline_s: float = 30.0, triton: FakeTriton | None = None) -> dict:
    item_log = SqliteItemLog(folder / "items.db")
    # gateway: the real servicer, pipeline, event ingester, item writer and eraser
    state = ServingState.load(artifacts)
    store = open_store(f"sqlite:{folder / 'state.db'}")
    pipeline, _, _ = make(state, store=store)
    follower = ItemLogFollower(item_log)
    follower.subscribe(state.version, state.catalog.apply, state.catalog.folded_seq)
    triton = triton or FakeTriton(artifacts.manifest["dims"]["text"])
    events = EventIngester(pipeline.states, EventLog(folder / "events"), store)
    gateway = RecommenderServicer(pipeline, events, ItemWriter(pipeline.states, triton, item_log, follower),
                                  default_deadline_s=0.25, users=UserEraser(store, events.log, events.log_lock),
                                  write_deadline_s=write_deadline_s)
    # retrieval and ranking: the real servicers over the same log
    retrieval = await RetrievalReplica(artifacts, item_log).start()
    ranker = Ranker(artifacts, FakeScorer())
    versions: VersionSet[Ranker] = VersionSet()
    ranking_follower = ItemLogFollower(item_log)
    await offer_followed(versions, ranking_follower, ranker.version, ranker, ranker.apply, ranker.overlay.folded_seq)
    ranking = RankingServicer(versions, ranking_follower, 0.5)
    full = {name: pb.DESCRIPTOR.services_by_name[s].full_name for name, s in SERVICES.items()}
    servers = {
        "gateway": await _serve(GatewayConfig(port=1), "gateway",
                                lambda s: pb_grpc.add_RecommenderServicer_to_server(gateway, s), [full["gateway"]]),
        "retrieval": await _serve(RetrievalConfig(port=1), "retrieval",
                                  lambda s: pb_grpc.add_RetrievalServicer_to_server(retrieval.servicer, s),
                                  [full["retrieval"]]),
        "ranking": await _serve(RankingConfig(port=1), "ranking",
                                lambda s: pb_grpc.add_RankingServicer_to_server(ranking, s), [full["ranking"]]),
    }
    return {"servers": servers, "events": events, "item_log": item_log, "triton": triton, "gateway": gateway,
            "store": store}


def start_services(artifacts, folder, **kw) -> tuple[Served, Callable[[], None]]:
    """-> (Served, stop). The servers run on their own thread's loop; callers use sync channels."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-servers", daemon=True)
    thread.start()
    built = asyncio.run_coroutine_threadsafe(_build(artifacts, folder, **kw), loop).result(60)
    served = Served(loop, {n: s.port for n, s in built["servers"].items()}, built["events"], built["item_log"],
                    built["triton"], built["gateway"], list(built["servers"].values()))

    def stop() -> None:
        for channel in served.channels.values():
            channel.close()

        async def close() -> None:
            for s in served.servers:
                await s.server.stop(None)
            await built["item_log"].close()
            await built["store"].close()
        asyncio.run_coroutine_threadsafe(close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    return served, stop


@pytest.fixture(scope="module")
def served(tiny_artifacts, tmp_path_factory):
    s, stop = start_services(tiny_artifacts, tmp_path_factory.mktemp("fuzz"))
    yield s
    stop()


# ---------------------------------------------------------------- calling any method with bytes

@dataclass(frozen=True)
class Method:
    service: str          # which server: gateway, retrieval, ranking
    path: str             # /package.Service/Method
    input: Any            # the request message class
    client_streaming: bool
    server_streaming: bool


def methods() -> list[Method]:
    """Every method each server serves: its own service, health and reflection."""
    from grpc_reflection.v1alpha import reflection_pb2
    out = []
    for service, name in SERVICES.items():
        for descriptor in (pb.DESCRIPTOR.services_by_name[name], health_pb2.DESCRIPTOR.services_by_name["Health"],
                           reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]):
            module = pb if descriptor.file is pb.DESCRIPTOR else (
                health_pb2 if descriptor.file is health_pb2.DESCRIPTOR else reflection_pb2)
            for m in descriptor.methods:
                out.append(Method(service, f"/{descriptor.full_name}/{m.name}", getattr(module, m.input_type.name),
                                  m.client_streaming, m.server_streaming))
    return out


METHODS = methods()


def call_raw(served: Served, method: Method, messages: list[bytes]) -> tuple[grpc.StatusCode, str]:
    """Send raw bytes (identity serializer: they reach the server as they are) -> (code, details).
    A server stream is read up to its first message (Health.Watch never ends by itself)."""
    channel = served.channel(method.service)
    try:
        if not method.client_streaming and not method.server_streaming:
            channel.unary_unary(method.path)(messages[0], timeout=CALL_TIMEOUT_S)
        elif method.client_streaming and not method.server_streaming:
            channel.stream_unary(method.path)(iter(messages), timeout=CALL_TIMEOUT_S)
        else:
            call = (channel.stream_stream(method.path)(iter(messages), timeout=CALL_TIMEOUT_S)
                    if method.client_streaming else channel.unary_stream(method.path)(messages[0], timeout=CALL_TIMEOUT_S))
            for _ in call:
                call.cancel()
                return grpc.StatusCode.OK, ""
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.CANCELLED:   # our own cancel after the first message
            return grpc.StatusCode.OK, ""
        return e.code(), e.details() or ""


def assert_clean(code: grpc.StatusCode, details: str, what: str) -> None:
    if code == grpc.StatusCode.NOT_FOUND and what.startswith("/grpc.health.v1.Health/Check"):
        return   # a service name health does not know: gRPC's documented answer, no details
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT) or (
        code == grpc.StatusCode.FAILED_PRECONDITION and details.startswith("artifact_version:")), (what, code, details)
    if code != grpc.StatusCode.OK:
        assert FIELD_FIRST.match(details), (what, details)
        assert not any(t in details for t in EXCEPTION_TEXT), (what, details)
        assert not has_control(details), (what, details)


# Bytes no message type can parse: an invalid wire type, a length past the end, a truncated varint.
UNDECODABLE = (b"\x0f", b"\x0a\x05ab", b"\x08\xff\xff\xff")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", METHODS, ids=lambda m: f"{m.service}{m.path}")
def test_undecodable_bytes_are_invalid_argument_at_every_method(served, method):
    name = method.input.DESCRIPTOR.full_name
    for data in UNDECODABLE:
        code, details = call_raw(served, method, [data])
        assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid {name}"
                                   + (" (stream message 0; the messages before it were handled)"
                                      if method.client_streaming else "")), data


def near_misses() -> st.SearchStrategy[bytes]:
    """Bytes close to a message: a valid one truncated, with a byte flipped, or with invalid UTF-8
    in a string field (field 1 is a string in most of our requests)."""
    valid = pb.RecommendRequest(user_id="u1", k=5, exclude_item_ids=["a", "b"]).SerializeToString()
    return st.one_of(
        st.integers(1, len(valid) - 1).map(lambda n: valid[:n]),
        st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)).map(
            lambda t: valid[:t[0]] + bytes([t[1]]) + valid[t[0] + 1:]),
        st.binary(min_size=1, max_size=8).map(lambda b: b"\x0a" + bytes([len(b) + 1]) + b"\xff" + b),
    )


@pytest.mark.timeout(90)
@settings(max_examples=1_000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(method=st.sampled_from(METHODS), data=st.one_of(st.binary(max_size=64), near_misses()))
def test_random_bytes_at_any_method_are_ok_or_invalid_argument(served, method, data):
    code, details = call_raw(served, method, [data])
    assert_clean(code, details, f"{method.path} {data!r}")


# ---------------------------------------------------------------- hypothesis messages

N_ITEMS = 60   # tests/tiny_artifacts.py default
NASTY = "\x00\n\r\t\x1b\x7f\u0085\u2028 a,\"é"
ids = st.one_of(st.sampled_from([item_id(j) for j in range(N_ITEMS)]),
                st.text(alphabet=NASTY, max_size=6),
                st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12),
                st.integers(250, 2_000).map(lambda n: "x" * n))
users = st.one_of(st.sampled_from([user_id(j) for j in range(20)]), ids)
int32s = st.one_of(st.integers(-2, 120), st.integers(-2**31, 2**31 - 1))
int64s = st.one_of(st.integers(-2, 100), st.integers(-2**63, 2**63 - 1))
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
doubles = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                    st.floats(time.time() - 1e6, time.time()))


def lists(elements: st.SearchStrategy, filler: Any = "x") -> st.SearchStrategy[list]:
    """Short lists of anything, or lists just past a limit (1,000 histories, 10,000 excludes)."""
    return st.one_of(st.lists(elements, max_size=8),
                     st.sampled_from([1_001, 10_001]).map(lambda n: [filler] * n))


def mixed(cls, valid: dict[str, st.SearchStrategy], nasty: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """A request whose fields are valid except a few drawn from `nasty` (often none): the
    examples reach the servicer's work, not only its first check."""
    @st.composite
    def build(draw):
        fields = {name: draw(strategy) for name, strategy in valid.items()}
        for name in draw(st.lists(st.sampled_from(sorted(nasty)), max_size=3, unique=True)):
            fields[name] = draw(nasty[name])
        return cls(**fields)
    return build()


catalog_ids = st.sampled_from([item_id(j) for j in range(N_ITEMS)])
known_users = st.sampled_from([user_id(j) for j in range(20)])
labels = st.text(alphabet="abc-_ 09", max_size=10)
catalog_indices = st.integers(0, N_ITEMS - 1)

recommend_requests = mixed(pb.RecommendRequest,
                           {"user_id": known_users, "k": st.integers(1, 100),
                            "exclude_item_ids": st.lists(catalog_ids, max_size=5),
                            "history_item_ids": st.lists(catalog_ids, max_size=5), "surface": labels,
                            "request_id": labels, "explain": st.booleans()},
                           {"user_id": users, "k": int32s, "exclude_item_ids": lists(ids),
                            "history_item_ids": lists(ids), "surface": ids, "request_id": ids})
events = mixed(pb.Event, {"user_id": known_users, "item_id": catalog_ids, "type": st.sampled_from(EVENT_TYPES),
                          "timestamp": st.floats(time.time() - 1e6, time.time()), "value": st.floats(0, 5)},
               {"user_id": users, "item_id": ids, "type": ids, "timestamp": doubles, "value": floats})
event_batches = st.builds(pb.EventBatch, events=st.lists(events, max_size=6))
new_items = mixed(pb.NewItem, {"item_id": labels.map(lambda t: "new-" + t), "title": labels.map(lambda t: "T " + t),
                               "text": st.text(max_size=40).filter(lambda t: "\x00" not in t), "category": labels},
                  {"item_id": ids, "title": ids, "text": ids, "category": ids})
upserts = st.builds(pb.UpsertItemsRequest, items=st.lists(new_items, max_size=4))
# Never a catalog id: a delete that succeeds would shrink the catalog under the later examples.
deletes = st.builds(pb.DeleteItemsRequest, item_ids=lists(st.text(alphabet=NASTY, max_size=6)))
erasures = st.builds(pb.DeleteUserDataRequest, user_id=users)
versions = st.one_of(st.just(""), st.just("1"), ids)
indices = st.one_of(catalog_indices, int64s)


@st.composite
def candidates(draw) -> pb.Candidates:
    items = draw(st.lists(catalog_indices if draw(st.booleans()) else indices, max_size=30))
    out = pb.Candidates(items=items)
    aligned = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        n = len(items) if aligned or draw(st.booleans()) else draw(st.integers(0, 31))
        out.channels.add(channel=draw(st.one_of(st.sampled_from(["bert", "cf", "popular", "item2item"]), ids)),
                         scores=draw(st.lists(st.floats(-1, 1, width=32) if aligned else floats, min_size=n, max_size=n)),
                         ranks=draw(st.lists(st.integers(0, 40) if aligned else int32s, min_size=n, max_size=n)))
    return out


retrieve_requests = mixed(pb.RetrieveRequest,
                          {"user_id": known_users, "history": st.lists(catalog_indices, max_size=5),
                           "exclude": st.lists(catalog_indices, max_size=5), "num_candidates": st.integers(0, 50),
                           "artifact_version": st.just("")},
                          {"user_id": users, "history": lists(indices, 0), "exclude": lists(indices, 0),
                           "num_candidates": int32s, "quotas": st.dictionaries(ids, int32s, max_size=4),
                           "artifact_version": versions, "min_item_log_seq": int64s})
rank_requests = mixed(pb.RankRequest,
                      {"history": st.lists(catalog_indices, max_size=5), "candidates": candidates(),
                       "k": st.integers(1, 100), "explain": st.booleans()},
                      {"history": lists(indices, 0), "k": int32s, "artifact_version": versions,
                       "min_item_log_seq": int64s})

CASES = [("gateway", "Recommend", recommend_requests), ("gateway", "ReportEventBatch", event_batches),
         ("gateway", "ReportEvents", event_batches), ("gateway", "UpsertItems", upserts),
         ("gateway", "DeleteItems", deletes), ("gateway", "DeleteUserData", erasures),
         ("retrieval", "Retrieve", retrieve_requests), ("ranking", "Rank", rank_requests)]


def call_message(served: Served, service: str, method: str, request) -> tuple[grpc.StatusCode, str, Any]:
    stub = {"gateway": pb_grpc.RecommenderStub, "retrieval": pb_grpc.RetrievalStub,
            "ranking": pb_grpc.RankingStub}[service](served.channel(service))
    try:
        if method == "ReportEvents":
            return grpc.StatusCode.OK, "", stub.ReportEvents(iter([request]), timeout=CALL_TIMEOUT_S)
        return grpc.StatusCode.OK, "", getattr(stub, method)(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as e:
        return e.code(), e.details() or "", None


def valid_requests_still_answer(served: Served) -> None:
    _, _, reply = call_message(served, "gateway", "Recommend", pb.RecommendRequest(user_id=user_id(1), k=5))
    assert reply is not None and len(reply.items) == 5
    _, _, candidates = call_message(served, "retrieval", "Retrieve",
                                    pb.RetrieveRequest(user_id=user_id(1), history=[1, 2, 3], num_candidates=20))
    assert candidates is not None and len(candidates.candidates.items) == 20
    _, _, ranked = call_message(served, "ranking", "Rank", pb.RankRequest(history=[1, 2], candidates=candidates.candidates, k=5))
    assert ranked is not None and len(ranked.items) == 5


@pytest.mark.timeout(120)
@pytest.mark.parametrize("service, method, strategy", CASES, ids=[f"{s}.{m}" for s, m, _ in CASES])
def test_generated_messages_are_ok_or_invalid_argument_naming_a_field(served, service, method, strategy):
    seen: set[str] = set()

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(request=strategy)
    def fuzz(request) -> None:
        code, details, _ = call_message(served, service, method, request)
        assert_clean(code, details, f"{method} {request!r:.300}")
        seen.add(code.name)

    fuzz()
    valid_requests_still_answer(served)
    assert {"OK", "INVALID_ARGUMENT"} <= seen, seen   # the examples reached both the servicer and the checks


def test_the_harness_can_fail(served):
    """assert_clean is not vacuous: an UNKNOWN with exception text, or a bare message, fails it."""
    for code, details in ((grpc.StatusCode.UNKNOWN, "Unexpected <class 'DecodeError'>"),
                          (grpc.StatusCode.INTERNAL, "Recommend: internal error"),
                          (grpc.StatusCode.INVALID_ARGUMENT, "Error parsing message"),
                          (grpc.StatusCode.INVALID_ARGUMENT, "user_id: bad \x00 value")):
        with pytest.raises(AssertionError):
            assert_clean(code, details, "self-check")
