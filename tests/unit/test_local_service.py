"""A servicer called in process (common/local_service.py) answers as over gRPC: the same
response, the callee's status code and details as AioRpcError, the timeout as its deadline, no
exception text. Also what the colocated gateway gives the services (tools/colocated.py) and the
artifact-info gauge three services share in one registry."""
from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from common.config import ColocatedConfig, parse_config
from common.item_log import SqliteItemLog
from common.local_service import NO_DEADLINE_S, LocalStub
from common.metrics import set_artifact_info
from common.server import observed
from common.wire import candidates_from_proto
from protos import fusionrec_pb2 as pb
from tests.tiny_artifacts import user_id
from tests.unit.test_retrieval_servicer import Serving, acall
from tools.colocated import service_configs


class Toy:
    """A servicer shaped like ours (observed, aborts naming the field)."""

    def __init__(self) -> None:
        self.remaining: list[float] = []
        self.cancelled = False

    @observed("toy", "Echo")
    async def Echo(self, request: pb.StatusRequest, context) -> pb.ServiceStatus:
        self.remaining.append(context.time_remaining())
        return pb.ServiceStatus(newest_version="7")

    @observed("toy", "Refuse")
    async def Refuse(self, request, context):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "k: must be in 1..100, got 0")

    @observed("toy", "Crash")
    async def Crash(self, request, context):
        raise RuntimeError("secret internals /etc/passwd")

    @observed("toy", "Slow")
    async def Slow(self, request, context):
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            self.cancelled = True
            raise


def error_of(coro) -> grpc.aio.AioRpcError:
    async def go():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await coro
        return caught.value
    return asyncio.run(go())


def test_a_response_comes_back_and_the_timeout_is_the_callees_deadline():
    toy = Toy()
    stub = LocalStub(toy)
    assert asyncio.run(stub.Echo(pb.StatusRequest(), timeout=0.5)).newest_version == "7"
    asyncio.run(stub.Echo(pb.StatusRequest()))
    assert 0 < toy.remaining[0] <= 0.5
    assert toy.remaining[1] == NO_DEADLINE_S   # as grpc: huge without a deadline


def test_an_abort_reaches_the_caller_with_its_code_and_details():
    e = error_of(LocalStub(Toy()).Refuse(pb.StatusRequest(), timeout=1))
    assert e.code() is grpc.StatusCode.INVALID_ARGUMENT and e.details() == "k: must be in 1..100, got 0"


def test_an_unexpected_error_is_internal_without_its_text():
    before = REGISTRY.get_sample_value("fusionrec_grpc_requests_total",
                                       {"service": "toy", "method": "Crash", "code": "INTERNAL"}) or 0
    e = error_of(LocalStub(Toy()).Crash(pb.StatusRequest(), timeout=1))
    assert e.code() is grpc.StatusCode.INTERNAL
    assert "secret" not in e.details() and "passwd" not in e.details()
    assert REGISTRY.get_sample_value("fusionrec_grpc_requests_total",
                                     {"service": "toy", "method": "Crash", "code": "INTERNAL"}) == before + 1


def test_a_call_past_its_timeout_is_deadline_exceeded_and_the_callee_is_cancelled():
    toy = Toy()
    e = error_of(LocalStub(toy).Slow(pb.StatusRequest(), timeout=0.05))
    assert e.code() is grpc.StatusCode.DEADLINE_EXCEEDED and toy.cancelled


def test_the_retrieval_servicer_in_process_answers_as_called_directly(tiny_artifacts, tmp_path):
    serving = asyncio.run(Serving(tiny_artifacts, SqliteItemLog(tmp_path / "items.db")).start())
    request = pb.RetrieveRequest(user_id=user_id(2), history=[3, 1, 4], exclude=[5], num_candidates=18)
    direct, context = asyncio.run(acall(serving.servicer.Retrieve, request))
    local = asyncio.run(LocalStub(serving.servicer).Retrieve(request, timeout=5))
    assert context.code() is None and len(local.candidates.items) == 18
    a, b = candidates_from_proto(direct.candidates), candidates_from_proto(local.candidates)
    assert a[0].tolist() == b[0].tolist()
    assert all(np.array_equal(a[1][c][1], b[1][c][1]) for c in a[1])
    bad = error_of(LocalStub(serving.servicer).Retrieve(pb.RetrieveRequest(num_candidates=10 ** 6), timeout=5))
    assert bad.code() is grpc.StatusCode.INVALID_ARGUMENT and bad.details().startswith("num_candidates")


def test_the_colocated_services_get_the_gateways_shared_flags_and_only_ranking_the_secret(monkeypatch):
    monkeypatch.setenv("FUSIONREC_FRESH_SLOTS", "2")   # a service's own setting, from the environment
    config = parse_config(ColocatedConfig, ["--port", "7000", "--artifacts", "/a", "--item-log", "redis://h:1/0",
                                            "--triton-url", "t:8001", "--tls-ca", "ca.pem", "--tls-cert", "c.pem",
                                            "--tls-key", "k.pem", "--triton-admin-secret-file", "s.secret"])
    retrieval, ranking = service_configs(config)
    for c in (retrieval, ranking):
        assert (str(c.artifacts), c.item_log, c.triton_url, c.tls_ca, c.tls_cert, c.tls_key, c.insecure_dev) == \
            ("/a", "redis://h:1/0", "t:8001", "ca.pem", "c.pem", "k.pem", False)
        assert c.metrics_port == 0   # the gateway's metrics server exports all three
    assert ranking.triton_admin_secret_file == "s.secret" and ranking.fresh_slots == 2
    assert not hasattr(retrieval, "triton_admin_secret_file")
    insecure = parse_config(ColocatedConfig, ["--port", "7000", "--insecure-dev"])
    assert all(c.insecure_dev for c in service_configs(insecure))


def test_each_service_names_its_own_artifact_version_in_one_registry():
    def info(service: str, version: str):
        return REGISTRY.get_sample_value("fusionrec_artifact_info", {"service": service, "version": version})
    set_artifact_info("t_gateway", "1")
    set_artifact_info("t_ranking", "1")
    set_artifact_info("t_ranking", "2")
    assert info("t_gateway", "1") == 1 and info("t_ranking", "2") == 1
    assert info("t_ranking", "1") is None
