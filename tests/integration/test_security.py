"""Security on the real stack (TLS + mTLS + tokens, on by default): what a caller without the
right credentials can no longer do, and that run/credentials.json is enough for a client."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from tritonclient.utils import InferenceServerException

from common.client import open_channel
from common.triton import admin_headers
from core.features import FUSED_RANKER_NAME
from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc
from tools.credentials import Credentials
from tests.integration.helpers import code_of

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def credentials(stack) -> Credentials:
    return Credentials.load(stack.credentials_path)


def test_plaintext_to_the_gateway_fails(stack, known_user):
    with grpc.insecure_channel(stack.addr("gateway")) as channel:
        code = code_of(pb_grpc.RecommenderStub(channel).Recommend, pb.RecommendRequest(user_id=known_user[0], k=5),
                     timeout=3)
    assert code == "UNAVAILABLE"


def test_credentials_json_lets_a_client_recommend(stack, credentials, known_user):
    assert credentials.gateway == stack.addr("gateway")
    with credentials.channel(scope="recommend") as channel:
        reply = pb_grpc.RecommenderStub(channel).Recommend(pb.RecommendRequest(user_id=known_user[0], k=5), timeout=5)
    assert len(reply.items) == 5 and not reply.degraded, list(reply.degraded_reasons)
    cli = subprocess.run([sys.executable, "-m", "tools.cli", "recommend", "--credentials", str(stack.credentials_path),
                          "--user", known_user[0], "--k", "3", "--json"], cwd=REPO, capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert cli.returncode == 0 and '"items"' in cli.stdout, cli.stderr


def test_the_api_callers_cert_cannot_call_the_internal_services(stack, credentials, known_user):
    """Even with the gateway's every-scope token, a client cert (client CA) is refused by retrieval
    and ranking: the TLS handshake fails, no handler runs, nothing changes."""
    with stack.channel("retrieval") as ch:
        before = pb_grpc.RetrievalStub(ch).Status(pb.StatusRequest(), timeout=5)
    def slate() -> list[str]:
        """The user's ranked slate. A degraded answer (a hop late on a loaded machine: the retrieval
        order instead of the ranked one) says nothing about the refused calls: asked again."""
        with stack.gateway_channel("recommend") as channel:
            for _ in range(10):
                reply = pb_grpc.RecommenderStub(channel).Recommend(pb.RecommendRequest(user_id=known_user[0], k=10),
                                                                   timeout=5)
                if not reply.degraded:
                    return [i.item_id for i in reply.items]
                time.sleep(0.3)
        raise AssertionError(f"10 degraded answers in a row: {list(reply.degraded_reasons)}")
    first = slate()
    for name, stub_class, method, request in (
            ("retrieval", pb_grpc.RetrievalStub, "Retrieve", pb.RetrieveRequest(history=[1, 2, 3])),
            ("retrieval", pb_grpc.RetrievalStub, "Status", pb.StatusRequest()),
            ("ranking", pb_grpc.RankingStub, "Rank", pb.RankRequest(history=[1], k=1, candidates=pb.Candidates(items=[2]))),
            ("ranking", pb_grpc.RankingStub, "Status", pb.StatusRequest())):
        with open_channel(stack.addr(name), aio=False, security=credentials.security,
                          token=credentials.token("all")) as channel:
            assert code_of(getattr(stub_class(channel), method), request, timeout=3) == "UNAVAILABLE", (name, method)
    with stack.channel("retrieval") as ch:
        after = pb_grpc.RetrievalStub(ch).Status(pb.StatusRequest(), timeout=5)
    assert after.item_log_seq == before.item_log_seq and list(after.loaded_versions) == list(before.loaded_versions)
    assert slate() == first


def test_triton_refuses_model_control_without_the_admin_header(stack, known_user):
    client = stack.triton_client()
    try:
        for headers in (None, admin_headers("wrong-secret")):
            with pytest.raises(InferenceServerException, match="restricted"):
                client.unload_model(FUSED_RANKER_NAME, headers=headers)
        assert client.is_model_ready(FUSED_RANKER_NAME)
        # The stack's own header is accepted (what ranking sends when it loads a new version).
        assert client.get_model_repository_index(headers=stack.triton_admin_headers()) is not None
    finally:
        client.close()
    with stack.gateway_channel("recommend") as channel:
        stub = pb_grpc.RecommenderStub(channel)
        replies = [stub.Recommend(pb.RecommendRequest(user_id=known_user[0], k=10), timeout=5) for _ in range(20)]
    assert sum(r.degraded for r in replies) == 0, [list(r.degraded_reasons) for r in replies if r.degraded]


def test_the_api_callers_cert_cannot_reach_triton(stack, credentials):
    import tritonclient.grpc as triton
    client = triton.InferenceServerClient(stack.addr("triton"), ssl=True, root_certificates=str(credentials.ca),
                                          private_key=str(credentials.key), certificate_chain=str(credentials.cert))
    try:
        with pytest.raises(InferenceServerException):
            client.is_server_live()
    finally:
        client.close()


def _listening_ports(pid: int) -> set[int]:
    """TCP ports a process listens on: its socket inodes matched against /proc/net/tcp{,6}."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:   # 0A = LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_triton_listens_on_grpc_and_metrics_only(stack):
    ports = stack.processes["triton"].ports
    assert _listening_ports(stack.processes["triton"].popen.pid) == {ports["grpc"], ports["metrics"]}
