"""The replica resolver (common/replicas.py), each replica probed on its own channel (real
in-process gRPC servers with a fake Status), and the gateway's swap gate and lag detection
(gateway/replica_monitor.py) on fake probes."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from prometheus_client import REGISTRY

from common.replicas import BadTarget, ReplicaStatus, probe_replicas, resolve_addresses, static_addresses
from gateway.replica_monitor import ReplicaMonitor, ReplicaService, lagging_replicas
from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc


@pytest.mark.parametrize("target, addresses", [
    ("127.0.0.1:5000", ["127.0.0.1:5000"]),
    ("retrieval:50051", ["retrieval:50051"]),
    ("ipv4:127.0.0.1:1,127.0.0.2:2", ["ipv4:127.0.0.1:1", "ipv4:127.0.0.2:2"]),
    ("ipv6:[::1]:7", ["ipv6:[::1]:7"]),
])
def test_static_targets(target, addresses):
    assert static_addresses(target) == addresses
    assert asyncio.run(resolve_addresses(target)) == addresses


def test_dns_targets_resolve_every_address():
    got = asyncio.run(resolve_addresses("dns:///localhost:6000"))
    assert got and all(a.endswith(":6000") for a in got) and ("127.0.0.1:6000" in got or "ipv6:[::1]:6000" in got)
    assert asyncio.run(resolve_addresses("dns:localhost:6000")) == got
    assert static_addresses("dns:///localhost:6000") is None


@pytest.mark.parametrize("target", ["nohost", "host:", "host:0", "host:99999", "ipv4:", "ipv4:1.2.3.4", ":80"])
def test_bad_targets_name_the_target(target):
    with pytest.raises(BadTarget, match="expected host:port|no addresses"):
        static_addresses(target)


class StatusServicer(pb_grpc.RetrievalServicer):
    def __init__(self, versions: list[str], seq: int, ok: bool = True) -> None:
        self.versions, self.seq, self.ok = versions, seq, ok

    async def Status(self, request, context):
        return pb.ServiceStatus(loaded_versions=self.versions, newest_version=self.versions[-1],
                                item_log_seq=self.seq, item_log_ok=self.ok)


def test_each_replica_is_probed_on_its_own_channel():
    """Two real servers behind one ipv4: target, plus an address nobody listens on."""
    async def go():
        servers, ports = [], []
        for servicer in (StatusServicer(["1", "2"], 7), StatusServicer(["1"], 3, ok=False)):
            server = grpc.aio.server()
            pb_grpc.add_RetrievalServicer_to_server(servicer, server)
            ports.append(server.add_insecure_port("127.0.0.1:0"))
            await server.start()
            servers.append(server)
        dead = grpc.aio.server()
        dead_port = dead.add_insecure_port("127.0.0.1:0")   # bound, never started: nothing answers
        try:
            target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in [*ports, dead_port])
            return await probe_replicas(target, pb_grpc.RetrievalStub, timeout_s=0.5)
        finally:
            for server in servers:
                await server.stop(0)
    found = asyncio.run(go())
    assert [(r.reachable, r.loaded_versions, r.item_log_seq, r.item_log_ok) for r in found] == [
        (True, ("1", "2"), 7, True), (True, ("1",), 3, False), (False, (), 0, False)]


def status(address: str, versions: tuple[str, ...] = ("1", "2"), seq: int = 10, ok: bool = True,
           reachable: bool = True) -> ReplicaStatus:
    return ReplicaStatus(address, reachable, versions, versions[-1] if versions else "", seq, ok)


def test_lagging_replicas():
    good, old = status("a"), status("b", versions=("1",))
    behind, blind, down = status("c", seq=4), status("d", ok=False), status("e", reachable=False)
    assert lagging_replicas([good, old, behind, blind, down], "2", min_seq=5) == [old, behind, blind]
    assert lagging_replicas([old], "1", 0) == []                     # the newest anyone has
    assert lagging_replicas([old], "2", 0) == [old]                  # the gateway is ahead of it


class FakeProbe:
    def __init__(self, by_target: dict[str, list[ReplicaStatus]]) -> None:
        self.by_target = by_target
        self.calls = 0

    async def __call__(self, target, stub_factory, timeout_s):
        self.calls += 1
        return list(self.by_target[target])


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def monitor_for(probe: FakeProbe, seq: list[int], health: list[bool]) -> ReplicaMonitor:
    async def on_health(healthy: bool) -> None:
        health.append(healthy)
    return ReplicaMonitor([ReplicaService("retrieval", "r", pb_grpc.RetrievalStub),
                           ReplicaService("ranking", "k", pb_grpc.RankingStub)],
                          applied_seq=lambda: seq[0], serving_version=lambda: "2", on_health=on_health, probe=probe)


def test_lag_is_reported_in_gauges_and_the_replicas_health():
    probe = FakeProbe({"r": [status("r1"), status("r2", versions=("1",))], "k": [status("k1")]})
    seq, health = [10], []
    monitor = monitor_for(probe, seq, health)
    asyncio.run(monitor.check())
    assert metric("fusionrec_replicas_lagging", service="retrieval") == 1
    assert metric("fusionrec_replicas_lagging", service="ranking") == 0
    assert metric("fusionrec_replicas_reachable", service="retrieval") == 2 and health == [False]
    probe.by_target["r"] = [status("r1"), status("r2")]
    asyncio.run(monitor.check())
    assert metric("fusionrec_replicas_lagging", service="retrieval") == 0 and health == [False, True]
    # The log: a replica that has not reached, by this probe, the gateway's position of the last one.
    seq[0] = 25
    asyncio.run(monitor.check())                                     # judged against 10, the last position: fine
    assert health == [False, True]
    asyncio.run(monitor.check())                                     # now they must have reached 25
    assert health == [False, True, False] and metric("fusionrec_replicas_lagging", service="ranking") == 1


def test_a_swap_waits_for_every_reachable_replica():
    probe = FakeProbe({"r": [status("r1", versions=("1",)), status("r2", reachable=False)],
                       "k": [status("k1")]})
    monitor = monitor_for(probe, [0], [])

    async def go():
        waiting = asyncio.create_task(monitor.wait_for_version("2", timeout_s=5, interval_s=0.01))
        await asyncio.sleep(0.1)
        assert not waiting.done()                                    # r1 has not loaded 2 yet
        probe.by_target["r"][0] = status("r1")                       # the unreachable one does not hold it up
        await asyncio.wait_for(waiting, 2)
    asyncio.run(go())
    with pytest.raises(RuntimeError, match="ranking: no reachable replica"):
        probe.by_target["k"] = [status("k1", reachable=False)]
        asyncio.run(monitor.wait_for_version("2", timeout_s=0.05, interval_s=0.01))


def test_monitor_probes_faster_while_a_replica_is_down(monkeypatch):
    """A replica down (or lagging): probed every recovering_s, not interval_s, until it is back."""
    import gateway.replica_monitor as replica_monitor
    probe = FakeProbe({"r": [status("r1"), status("r2", reachable=False)], "k": [status("k1")]})
    monitor = monitor_for(probe, [0], [])
    slept: list[float] = []

    async def fake_sleep(s: float) -> None:
        slept.append(s)
        if len(slept) == 2:
            probe.by_target["r"][1] = status("r2")   # back up
        if len(slept) == 4:
            raise asyncio.CancelledError

    monkeypatch.setattr(replica_monitor.asyncio, "sleep", fake_sleep)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(monitor.run(interval_s=2.0, recovering_s=0.5))
    assert slept == [0.5, 0.5, 2.0, 2.0]
