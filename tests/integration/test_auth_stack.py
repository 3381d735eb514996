"""Bearer tokens and scopes on the real gateway (TLS on, tokens from Stack's issue_tokens): the
answers a caller gets without a token, with a junk one and with the wrong scope, that a refused
write changes nothing, and that health stays open for probes."""
from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.auth import bearer_metadata
from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc
from tests.integration.helpers import code_of

pytestmark = pytest.mark.integration


def test_no_token_or_a_junk_one_is_unauthenticated_and_health_stays_open(stack, known_user):
    request = pb.RecommendRequest(user_id=known_user[0], k=5)
    with stack.gateway_channel(scopes=None) as channel:   # TLS, client cert, no token
        stub = pb_grpc.RecommenderStub(channel)
        assert code_of(stub.Recommend, request, timeout=5) == "UNAUTHENTICATED"
        assert code_of(stub.Recommend, request, timeout=5, metadata=bearer_metadata("x" * 43)) == "UNAUTHENTICATED"
        assert code_of(stub.Recommend, request, timeout=5,
                     metadata=bearer_metadata(stack.tokens["recommend"])) == "OK"   # the same call, a real token
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_a_read_token_cannot_write_and_the_write_is_not_applied(stack, known_user):
    item = f"auth-probe-{time.time_ns()}"
    upsert = pb.UpsertItemsRequest(items=[pb.NewItem(item_id=item, title="Buy cheap pills")])
    with stack.gateway_channel(scopes="recommend") as channel:
        stub = pb_grpc.RecommenderStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.UpsertItems(upsert, timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "'items'" in e.value.details()
        assert code_of(stub.DeleteUserData, pb.DeleteUserDataRequest(user_id=known_user[0]), timeout=5) == "PERMISSION_DENIED"
    with stack.gateway_channel(scopes="items") as channel:
        # nothing was written: deleting the id now finds no live item
        assert pb_grpc.RecommenderStub(channel).DeleteItems(pb.DeleteItemsRequest(item_ids=[item]), timeout=10).deleted == 0


def test_the_events_token_reports_events_and_nothing_else(stack, known_user):
    batch = pb.EventBatch(events=[pb.Event(user_id=known_user[0], item_id=known_user[1][0], type="click",
                                           timestamp=time.time())])
    with stack.gateway_channel(scopes="events") as channel:
        stub = pb_grpc.RecommenderStub(channel)
        assert stub.ReportEventBatch(batch, timeout=10).accepted == 1
        assert code_of(stub.Recommend, pb.RecommendRequest(user_id=known_user[0], k=5), timeout=5) == "PERMISSION_DENIED"


def test_a_token_added_to_the_running_gateways_file_works_and_a_revoked_one_stops_without_a_restart(stack, known_user):
    """Rotation on the real gateway: the tokens file changes under it; within ~1 s the new token is
    taken and the revoked one refused. The stack's own tokens are restored afterwards."""
    from gateway.auth import add_token, load_tokens, write_tokens
    path = stack.run_dir / "tokens.json"
    original = load_tokens(path)
    request = pb.RecommendRequest(user_id=known_user[0], k=5)

    def code_within(token: str, want: str, seconds: float = 5.0) -> str:
        deadline = time.monotonic() + seconds
        while True:
            with stack.gateway_channel(scopes=None) as channel:
                got = code_of(pb_grpc.RecommenderStub(channel).Recommend, request, timeout=5,
                              metadata=bearer_metadata(token))
            if got == want or time.monotonic() > deadline:
                return got
            time.sleep(0.2)

    try:
        rotated = add_token(path, f"rotated-{time.time_ns()}", ["recommend"])
        assert code_within(rotated, "OK") == "OK"
        write_tokens(path, original)                  # revoke it again
        assert code_within(rotated, "UNAUTHENTICATED") == "UNAUTHENTICATED"
        assert code_within(stack.tokens["recommend"], "OK", seconds=0) == "OK"   # the others never stopped
    finally:
        write_tokens(path, original)
