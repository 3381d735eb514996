"""Token auth on the public API (gateway/auth.py), in process: a real grpc.aio server with the
TokenAuth interceptor, health and reflection, and a recording fake Recommender servicer
registered through the generated add_RecommenderServicer_to_server (so every method name and
streaming kind is the real one). The channel is plaintext: the interceptor works on any channel;
tokens go as explicit call metadata.

Covers: no/junk/malformed token -> UNAUTHENTICATED; a token without the method's scope ->
PERMISSION_DENIED naming the scope and nothing reaches the servicer; scopes allow exactly their
methods (admin implies nothing else); health and reflection open; a method not mapped (an internal
API) denied even for the all-scope token; per-token rate limits with an injected clock; the tokens
file (hashes only, 0600, strict checks); metrics and logs carry token names, never tokens; the CLI.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import stat
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from common.config import GatewayConfig, parse_config
from gateway.auth import (ALL, METHOD_SCOPES, SCOPES, TokenAuth, TokenEntry, TokenFileError, add_token,
                          auth_interceptors, bearer_metadata, hash_token, issue_tokens, load_tokens, write_tokens)
from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(60)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RecordingRecommender(pb_grpc.RecommenderServicer):
    """Answers every public method and records what reached it (what would have been written)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def Recommend(self, request, context):
        self.calls.append("Recommend")
        return pb.RecommendResponse(request_id="served")

    async def ReportEvents(self, request_iterator, context):
        accepted = 0
        async for batch in request_iterator:
            accepted += len(batch.events)
        self.calls.append("ReportEvents")
        return pb.ReportEventsResponse(accepted=accepted)

    async def ReportEventBatch(self, request, context):
        self.calls.append("ReportEventBatch")
        return pb.ReportEventsResponse(accepted=len(request.events))

    async def UpsertItems(self, request, context):
        self.calls.append("UpsertItems")
        return pb.UpsertItemsResponse(added=len(request.items))

    async def DeleteItems(self, request, context):
        self.calls.append("DeleteItems")
        return pb.DeleteItemsResponse(deleted=len(request.item_ids))

    async def DeleteUserData(self, request, context):
        self.calls.append("DeleteUserData")
        return pb.DeleteUserDataResponse(history_entries_removed=1)


class InternalRetrieval(pb_grpc.RetrievalServicer):
    """An internal API on the same server: mapped to no scope, so denied to every token."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    async def Status(self, request, context):
        self.calls.append("Retrieval.Status")
        return pb.ServiceStatus()


@dataclasses.dataclass
class Running:
    stub: pb_grpc.RecommenderStub
    channel: grpc.aio.Channel
    servicer: RecordingRecommender


@asynccontextmanager
async def serving(auth: TokenAuth) -> AsyncIterator[Running]:
    servicer = RecordingRecommender()
    server = grpc.aio.server(interceptors=[auth])
    pb_grpc.add_RecommenderServicer_to_server(servicer, server)
    pb_grpc.add_RetrievalServicer_to_server(InternalRetrieval(servicer.calls), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([pb.DESCRIPTOR.services_by_name["Recommender"].full_name,
                                         reflection.SERVICE_NAME], server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    # In-process plaintext server: a plain channel (the interceptor does not care about the transport).
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Running(pb_grpc.RecommenderStub(channel), channel, servicer)
    finally:
        await channel.close()
        await server.stop(None)


def _batch() -> pb.EventBatch:
    return pb.EventBatch(events=[pb.Event(user_id="u1", item_id="i1", type="click", timestamp=time.time())])


async def call(stub: pb_grpc.RecommenderStub, method: str, token: str | None = None, metadata=None):
    """One call of `method` with a small valid request; -> the reply, or the AioRpcError."""
    md = metadata if metadata is not None else (bearer_metadata(token) if token is not None else None)
    requests = {"Recommend": pb.RecommendRequest(user_id="u1", k=3),
                "ReportEventBatch": _batch(),
                "UpsertItems": pb.UpsertItemsRequest(items=[pb.NewItem(item_id="new", title="New")]),
                "DeleteItems": pb.DeleteItemsRequest(item_ids=["i1"]),
                "DeleteUserData": pb.DeleteUserDataRequest(user_id="u1")}
    try:
        if method == "ReportEvents":
            async def batches():
                yield _batch()
                yield _batch()
            return await stub.ReportEvents(batches(), metadata=md, timeout=5)
        return await getattr(stub, method)(requests[method], metadata=md, timeout=5)
    except grpc.aio.AioRpcError as e:
        return e


PUBLIC = [m.rsplit("/", 1)[1] for m in METHOD_SCOPES]


@pytest.fixture
def tokens(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    path = tmp_path / "tokens.json"
    return path, issue_tokens(path)


def _auth(path: Path, **kw) -> TokenAuth:
    return TokenAuth.from_file(path, **kw)


def test_method_map_covers_exactly_the_public_service() -> None:
    service = pb.DESCRIPTOR.services_by_name["Recommender"]
    assert set(METHOD_SCOPES) == {f"/{service.full_name}/{m.name}" for m in service.methods}
    assert set(METHOD_SCOPES.values()) == set(SCOPES)


def test_no_token_and_junk_tokens_are_unauthenticated(tokens) -> None:
    path, issued = tokens
    bad = [None,                                              # no metadata at all
           [("authorization", "Bearer " + "x" * 43)],         # well-formed, unknown
           [("authorization", "Basic dXNlcjpwYXNz")],         # another scheme
           [("authorization", "Bearer")],                     # no token
           [("authorization", issued["all"])],                # the token without "Bearer "
           [("authorization", "Bearer " + issued["all"] + "x")],
           [("authorization", "Bearer " + issued["all"]), ("authorization", "Bearer " + issued["all"])]]

    async def go():
        async with serving(_auth(path)) as s:
            for md in bad:
                for method in PUBLIC:
                    err = await call(s.stub, method, metadata=md if md is not None else ())
                    assert isinstance(err, grpc.aio.AioRpcError), (md, method)
                    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (md, method)
                    assert "Bearer <token>" in err.details()
                    assert issued["all"] not in err.details()
            assert s.servicer.calls == []      # nothing reached the servicer
    asyncio.run(go())


@pytest.mark.parametrize("method", ["UpsertItems", "DeleteItems", "ReportEventBatch", "ReportEvents", "DeleteUserData"])
def test_recommend_token_cannot_write_and_nothing_is_written(tokens, method: str) -> None:
    path, issued = tokens

    async def go():
        async with serving(_auth(path)) as s:
            err = await call(s.stub, method, issued["recommend"])
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            assert f"scope '{METHOD_SCOPES['/fusionrec.v1.Recommender/' + method]}'" in err.details()
            assert issued["recommend"] not in err.details()
            assert s.servicer.calls == []
            reply = await call(s.stub, "Recommend", issued["recommend"])
            assert reply.request_id == "served" and s.servicer.calls == ["Recommend"]
    asyncio.run(go())


def test_each_scope_allows_exactly_its_methods(tokens) -> None:
    path, issued = tokens

    async def go():
        async with serving(_auth(path)) as s:
            for scope in SCOPES:
                for method in PUBLIC:
                    s.servicer.calls.clear()
                    reply = await call(s.stub, method, issued[scope])
                    needed = METHOD_SCOPES[f"/fusionrec.v1.Recommender/{method}"]
                    if needed == scope:
                        assert not isinstance(reply, grpc.aio.AioRpcError), (scope, method, reply)
                        assert s.servicer.calls == [method]
                    else:   # admin implies nothing else either
                        assert reply.code() == grpc.StatusCode.PERMISSION_DENIED, (scope, method)
                        assert s.servicer.calls == []
    asyncio.run(go())


def test_events_token_reports_events_on_both_methods(tokens) -> None:
    path, issued = tokens

    async def go():
        async with serving(_auth(path)) as s:
            assert (await call(s.stub, "ReportEventBatch", issued["events"])).accepted == 1
            assert (await call(s.stub, "ReportEvents", issued["events"])).accepted == 2   # client stream
            assert (await call(s.stub, "DeleteUserData", issued["events"])).code() == grpc.StatusCode.PERMISSION_DENIED
            assert (await call(s.stub, "DeleteUserData", issued["admin"])).history_entries_removed == 1
            assert s.servicer.calls == ["ReportEventBatch", "ReportEvents", "DeleteUserData"]
    asyncio.run(go())


def test_all_token_reaches_every_public_method(tokens) -> None:
    path, issued = tokens

    async def go():
        async with serving(_auth(path)) as s:
            for method in PUBLIC:
                assert not isinstance(await call(s.stub, method, issued[ALL]), grpc.aio.AioRpcError), method
            assert sorted(s.servicer.calls) == sorted(PUBLIC)
    asyncio.run(go())


def test_lowercase_bearer_scheme_is_accepted(tokens) -> None:
    """RFC 6750: the auth scheme is case-insensitive."""
    path, issued = tokens

    async def go():
        async with serving(_auth(path)) as s:
            reply = await call(s.stub, "Recommend", metadata=[("authorization", f"bearer {issued['recommend']}")])
            assert reply.request_id == "served"
    asyncio.run(go())


def test_unmapped_method_is_denied_even_with_every_scope(tokens) -> None:
    path, issued = tokens

    async def go():
        async with serving(_auth(path)) as s:
            internal = pb_grpc.RetrievalStub(s.channel)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await internal.Status(pb.StatusRequest(), metadata=bearer_metadata(issued[ALL]), timeout=5)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await internal.Status(pb.StatusRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert s.servicer.calls == []
    asyncio.run(go())


def test_health_and_reflection_stay_open_without_a_token(tokens) -> None:
    path, _ = tokens

    async def go():
        async with serving(_auth(path)) as s:
            reply = await health_pb2_grpc.HealthStub(s.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

            async def ask():
                yield reflection_pb2.ServerReflectionRequest(list_services="")
            stream = reflection_pb2_grpc.ServerReflectionStub(s.channel).ServerReflectionInfo(ask(), timeout=5)
            names = [svc.name async for r in stream for svc in r.list_services_response.service]
            assert "fusionrec.v1.Recommender" in names
    asyncio.run(go())


def test_rate_limit_per_token_exhausts_after_the_burst_and_refills(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    limited = add_token(path, "limited", ["recommend"], rate_per_s=2.0, burst=3)
    other = add_token(path, "other", ["recommend"])   # the gateway default applies: 0 here = no limit
    clock = FakeClock()

    async def go():
        async with serving(_auth(path, default_rate_per_s=0.0, clock=clock)) as s:
            for _ in range(3):
                assert (await call(s.stub, "Recommend", limited)).request_id == "served"
            err = await call(s.stub, "Recommend", limited)
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "rate limit" in err.details() and limited not in err.details()
            for _ in range(20):                                       # another token is not affected
                assert (await call(s.stub, "Recommend", other)).request_id == "served"
            clock.now += 0.5                                           # 2/s: one call's worth back
            assert (await call(s.stub, "Recommend", limited)).request_id == "served"
            assert (await call(s.stub, "Recommend", limited)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            clock.now += 60.0                                          # refills up to the burst, not beyond
            results = [await call(s.stub, "Recommend", limited) for _ in range(4)]
            assert [isinstance(r, grpc.aio.AioRpcError) for r in results] == [False, False, False, True]
            assert s.servicer.calls.count("Recommend") == 3 + 20 + 1 + 3
    asyncio.run(go())


def test_gateway_default_rate_applies_to_tokens_without_their_own(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    token = issue_tokens(path)["recommend"]
    auth = _auth(path, default_rate_per_s=5.0, default_burst=0.0, clock=FakeClock())   # burst 0: one second's worth
    outcomes = [auth.decide("/fusionrec.v1.Recommender/Recommend", bearer_metadata(token)).outcome for _ in range(7)]
    assert outcomes == ["ok"] * 5 + ["rate_limited"] * 2


def test_tokens_are_added_and_revoked_without_a_restart_and_a_bad_edit_keeps_the_last_good_set(
        tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    old = add_token(path, "old", ["recommend"], rate_per_s=0.1, burst=2)   # 1 s refills a tenth of a call
    clock = FakeClock()
    auth = _auth(path, clock=clock)
    recommend = "/fusionrec.v1.Recommender/Recommend"

    def outcome(token: str) -> str:
        return auth.decide(recommend, bearer_metadata(token)).outcome

    assert [outcome(old) for _ in range(3)] == ["ok", "ok", "rate_limited"]
    new = add_token(path, "new", ["recommend"])
    assert outcome(new) == "unauthenticated"          # checked at most once per interval
    clock.now += TokenAuth.RELOAD_INTERVAL_S
    assert outcome(new) == "ok"
    assert outcome(old) == "rate_limited"             # its bucket survived the reload (same limits)
    write_tokens(path, [e for e in load_tokens(path) if e.name != "old"])   # revoke
    clock.now += TokenAuth.RELOAD_INTERVAL_S
    assert outcome(old) == "unauthenticated" and outcome(new) == "ok"
    path.write_text("{ not json")                     # a bad edit: the last good set stays
    clock.now += TokenAuth.RELOAD_INTERVAL_S
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("fusionrec.gateway.auth").addHandler(handler)
    try:
        assert outcome(new) == "ok" and outcome(old) == "unauthenticated"
    finally:
        logging.getLogger("fusionrec.gateway.auth").removeHandler(handler)
    assert [r.levelname for r in records if "keeping the previous tokens" in r.getMessage()] == ["ERROR"]
    assert new not in " ".join(str(vars(r)) for r in records)
    path.unlink()                                     # gone: still the last good set
    clock.now += TokenAuth.RELOAD_INTERVAL_S
    assert outcome(new) == "ok"


def test_issue_tokens_writes_hashes_only_owner_readable(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "tokens.json"
    issued = issue_tokens(path, rate_per_s=50.0)
    assert set(issued) == {*SCOPES, ALL}
    assert len(set(issued.values())) == 5 and all(len(t) >= 43 for t in issued.values())
    text = path.read_text()
    for token in issued.values():
        assert token not in text
        assert hash_token(token) in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    entries = {e.name: e for e in load_tokens(path)}
    assert entries[ALL].scopes == frozenset(SCOPES)
    assert entries["admin"].scopes == frozenset({"admin"})
    assert {e.rate_per_s for e in entries.values()} == {50.0}
    again = issue_tokens(path)               # replaces the file: the old tokens stop working
    auth = _auth(path)
    assert auth.authenticate(bearer_metadata(issued["all"])) is None
    assert auth.authenticate(bearer_metadata(again["all"])).name == ALL


def _write(path: Path, tokens) -> Path:
    path.write_text(json.dumps({"format": "fusionrec-tokens/1", "tokens": tokens}))
    return path


GOOD = {"name": "web", "sha256": "a" * 64, "scopes": ["recommend"]}


@pytest.mark.parametrize("broken, message", [
    ({k: v for k, v in GOOD.items() if k != "sha256"}, "tokens[0]: missing field 'sha256'"),
    ({k: v for k, v in GOOD.items() if k != "scopes"}, "tokens[0]: missing field 'scopes'"),
    ({**GOOD, "scopes": ["read"]}, "tokens[0] (web).scopes: must be a non-empty list of recommend, events"),
    ({**GOOD, "scopes": []}, "tokens[0] (web).scopes"),
    ({**GOOD, "scopes": "recommend"}, "tokens[0] (web).scopes"),
    ({**GOOD, "sha256": "not-a-hash"}, "tokens[0] (web).sha256: must be 64 lowercase hex digits"),
    ({**GOOD, "name": "has space"}, "tokens[0].name"),
    ({**GOOD, "rate_per_s": -1}, "tokens[0] (web).rate_per_s: must be a finite number >= 0"),
    ({**GOOD, "burst": "10"}, "tokens[0] (web).burst"),
    ({**GOOD, "scope": ["recommend"]}, "unknown field(s) ['scope']"),
    ("web", "tokens[0]: must be an object"),
])
def test_a_broken_tokens_file_names_the_entry_and_field(tmp_path: Path, broken, message: str) -> None:
    path = _write(tmp_path / "tokens.json", [broken])
    with pytest.raises(TokenFileError) as e:
        load_tokens(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_whole_file_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="not found"):
        load_tokens(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenFileError, match="not JSON"):
        load_tokens(tmp_path / "bad.json")
    (tmp_path / "old.json").write_text(json.dumps({"tokens": []}))
    with pytest.raises(TokenFileError, match="fusionrec-tokens/1"):
        load_tokens(tmp_path / "old.json")
    with pytest.raises(TokenFileError, match=r"name must be unique, repeated: \['web'\]"):
        load_tokens(_write(tmp_path / "dup.json", [GOOD, {**GOOD, "sha256": "b" * 64}]))
    with pytest.raises(TokenFileError, match="sha256 must be unique"):
        load_tokens(_write(tmp_path / "dup2.json", [GOOD, {**GOOD, "name": "web2"}]))


def _config(*argv: str) -> GatewayConfig:
    return parse_config(GatewayConfig, ["--port", "1", *argv])


def test_gateway_start_needs_tokens_unless_insecure_dev(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="--tokens is required") as e:
        auth_interceptors(_config())
    assert "--insecure-dev" in str(e.value)
    assert auth_interceptors(_config("--insecure-dev")) == []
    with pytest.raises(TokenFileError, match=r"^--tokens: tokens file .*missing.json: not found"):
        auth_interceptors(_config("--tokens", str(tmp_path / "missing.json")))
    broken = _write(tmp_path / "broken.json", [{"name": "x", "scopes": ["recommend"]}])
    with pytest.raises(TokenFileError, match=r"^--tokens: .*missing field 'sha256'"):
        auth_interceptors(_config("--tokens", str(broken)))
    good = tmp_path / "good.json"
    issue_tokens(good)
    (auth,) = auth_interceptors(_config("--tokens", str(good), "--token-rate-per-s", "7"))
    assert isinstance(auth, TokenAuth) and {b.rate for b in auth.buckets.values()} == {7.0}


def _auth_count(method: str, outcome: str, token: str) -> float:
    return REGISTRY.get_sample_value("fusionrec_auth_total", {"method": method, "outcome": outcome,
                                                              "token": token}) or 0.0


def test_metrics_and_logs_name_the_token_never_the_secret(tokens) -> None:
    path, issued = tokens
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("fusionrec.gateway.auth")
    logger.addHandler(handler)
    before = {k: _auth_count(*k) for k in [("Recommend", "ok", "recommend"),
                                           ("UpsertItems", "permission_denied", "recommend"),
                                           ("Recommend", "unauthenticated", "")]}
    try:
        async def go():
            async with serving(_auth(path)) as s:
                await call(s.stub, "Recommend", issued["recommend"])
                await call(s.stub, "UpsertItems", issued["recommend"])
                await call(s.stub, "Recommend", "junk-" + issued["admin"])
        asyncio.run(go())
    finally:
        logger.removeHandler(handler)
    for key, value in before.items():
        assert _auth_count(*key) == value + 1, key
    # no label value anywhere in the auth series is a token
    labels = [v for m in REGISTRY.collect() if m.name == "fusionrec_auth" for s in m.samples for v in s.labels.values()]
    assert labels and not set(labels) & set(issued.values())
    refused = [r for r in records if r.getMessage() == "call refused"]
    assert {(r.method, r.outcome) for r in refused} == {("UpsertItems", "permission_denied"),
                                                       ("Recommend", "unauthenticated")}
    dumped = " ".join(str(vars(r)) for r in records)
    assert not any(token in dumped for token in issued.values())


def test_refusal_logs_are_throttled(tokens) -> None:
    path, _ = tokens
    clock = FakeClock()
    auth = _auth(path, clock=clock)
    allowed = [auth._throttle.allow(("Recommend", "unauthenticated", "")) for _ in range(5)]
    assert allowed == [0, None, None, None, None]
    clock.now += 1.5
    assert auth._throttle.allow(("Recommend", "unauthenticated", "")) == 4   # reports what it held back


def test_cli_mints_a_token_once_and_lists_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tools.cli import main
    path = tmp_path / "tokens.json"
    assert main(["tokens", "--file", str(path), "--name", "web", "--scopes", "recommend", "events",
                 "--rate-per-s", "20"]) == 0
    out = capsys.readouterr()
    token = out.out.strip()
    assert len(token) >= 43 and "\n" not in token and token not in path.read_text()
    assert "shown only now" in out.err
    (entry,) = load_tokens(path)
    assert entry == TokenEntry("web", hash_token(token), frozenset({"recommend", "events"}), 20.0, None)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert main(["tokens", "--file", str(path), "--name", "web", "--scopes", "items"]) == 1
    assert "exists already" in capsys.readouterr().err
    assert main(["tokens", "--file", str(path), "--name", "ops", "--scopes", "admin"]) == 0
    capsys.readouterr()
    assert main(["tokens", "--file", str(path), "--list"]) == 0
    listed = capsys.readouterr().out
    assert "web\tscopes=events,recommend\trate=20/s" in listed and "ops\tscopes=admin\trate=default" in listed
    assert token not in listed and hash_token(token) not in listed
    assert _auth(path).authenticate(bearer_metadata(token)).name == "web"
    with pytest.raises(SystemExit):
        main(["tokens", "--file", str(path), "--name", "x", "--scopes", "write"])   # argparse: unknown scope


def test_gateway_process_fails_at_start_naming_tokens(tmp_path: Path) -> None:
    """The real entry point: TLS files given, no --tokens (then a broken file) -> exit 1 at once with
    a one-line message, before any artifact is loaded or port bound."""
    import subprocess
    import sys
    from common.pki import ensure_pki
    pki = ensure_pki(tmp_path / "pki", components=("gateway",))
    base = [sys.executable, "-m", "gateway.server", "--port", "1", "--artifacts", str(tmp_path / "none"),
            "--tls-ca", str(pki.service_ca), "--tls-cert", str(pki.cert("gateway")), "--tls-key", str(pki.key("gateway"))]
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(base, cwd=repo, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("gateway: --tokens is required")
    assert "Traceback" not in proc.stderr
    broken = _write(tmp_path / "tokens.json", [{"name": "web", "sha256": "a" * 64, "scopes": ["read"]}])
    proc = subprocess.run([*base, "--tokens", str(broken)], cwd=repo, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "tokens[0] (web).scopes" in proc.stderr.strip().splitlines()[-1]
