"""Every retrieval and ranking replica the gateway can reach, asked on its own (Status RPC).

- Version swaps: the gateway offers a new artifact version only once every reachable replica of
  both services reports it loaded (requests name their version: a replica without it would fail
  them). An unreachable replica does not hold the swap up: it replays the log and loads the
  newest version before it reports SERVING again.
- Lag: a reachable replica lags when it does not serve the newest version any replica of its
  service (or the gateway) has, when it cannot read the item log, or when it has not reached,
  by this probe, the item-log position the gateway had applied at the previous probe (a healthy
  replica tails the log every ~100 ms; one probe interval is ample). Lagging replicas are counted
  in fusionrec_replicas_lagging{service} and turn the health service `fusionrec.replicas`
  NOT_SERVING (the main health stays SERVING: the gateway still answers, degraded at worst).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

from common.logs import get_logger
from common.metrics import REPLICAS_LAGGING, REPLICAS_REACHABLE
from common.replicas import ReplicaStatus, StatusStubFactory, probe_replicas

REPLICAS_HEALTH = "fusionrec.replicas"   # health service name: NOT_SERVING while a replica lags
log = get_logger("replica_monitor")

Probe = Callable[[str, StatusStubFactory, float], Awaitable[list[ReplicaStatus]]]


@dataclass(frozen=True)
class ReplicaService:
    name: str                       # "retrieval", "ranking": the metric label
    target: str                     # host:port, ipv4:h1:p1,h2:p2 or dns:///name:port
    stub_factory: StatusStubFactory


@dataclass(frozen=True)
class ReplicaReport:
    service: str
    replicas: list[ReplicaStatus]
    lagging: list[ReplicaStatus]

    @property
    def reachable(self) -> list[ReplicaStatus]:
        return [r for r in self.replicas if r.reachable]


def _newest(versions: Sequence[str]) -> str:
    numbered = [v for v in versions if v.isdigit()]
    return max(numbered, key=int) if numbered else ""


def lagging_replicas(replicas: Sequence[ReplicaStatus], gateway_version: str, min_seq: int) -> list[ReplicaStatus]:
    """The reachable replicas that lag (see the module docstring)."""
    reachable = [r for r in replicas if r.reachable]
    newest = _newest([gateway_version, *(r.newest_version for r in reachable)])
    return [r for r in reachable
            if (newest and not r.serves(newest)) or not r.item_log_ok or r.item_log_seq < min_seq]


class ReplicaMonitor:
    def __init__(self, services: Sequence[ReplicaService], applied_seq: Callable[[], int],
                 serving_version: Callable[[], str],
                 on_health: Callable[[bool], Awaitable[None]] | None = None,
                 probe: Probe = probe_replicas, timeout_s: float = 1.0) -> None:
        self.services = list(services)
        self.applied_seq = applied_seq           # the gateway's log position (serving version)
        self.serving_version = serving_version
        self.on_health = on_health               # called with True (none lags) / False on changes
        self.probe = probe
        self.timeout_s = timeout_s
        self._previous_seq = 0                   # the gateway's position at the previous check
        self._healthy: bool | None = None

    async def reports(self) -> list[ReplicaReport]:
        """One probe of every replica; no metric or health change."""
        found = await asyncio.gather(*(self.probe(s.target, s.stub_factory, self.timeout_s) for s in self.services))
        min_seq, version = self._previous_seq, self.serving_version()
        return [ReplicaReport(s.name, replicas, lagging_replicas(replicas, version, min_seq))
                for s, replicas in zip(self.services, found)]

    async def check(self) -> list[ReplicaReport]:
        """Probe, then publish: gauges per service and the replicas health."""
        seq_now = self.applied_seq()
        reports = await self.reports()
        self._previous_seq = seq_now
        for report in reports:
            REPLICAS_REACHABLE.labels(report.service).set(len(report.reachable))
            REPLICAS_LAGGING.labels(report.service).set(len(report.lagging))
        healthy = not any(r.lagging for r in reports)
        if healthy != self._healthy:
            if not healthy:
                log.warning("replicas lag", extra={r.service: [x.address for x in r.lagging] for r in reports})
            self._healthy = healthy
            if self.on_health is not None:
                await self.on_health(healthy)
        return reports

    async def wait_for_version(self, version: str, timeout_s: float = 300.0, interval_s: float = 0.2) -> None:
        """Until every reachable replica of every service serves `version` (at least one each);
        RuntimeError after timeout_s (the version is then refused, the old one keeps serving)."""
        deadline = time.monotonic() + timeout_s
        while True:
            reports = await self.reports()
            missing = {r.service: [x.address for x in r.reachable if not x.serves(version)] or
                       ([] if r.reachable else ["no reachable replica"]) for r in reports}
            if not any(missing.values()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"replicas did not load version {version}: "
                                   + "; ".join(f"{s}: {', '.join(a)}" for s, a in missing.items() if a))
            await asyncio.sleep(interval_s)

    async def run(self, interval_s: float = 2.0, recovering_s: float = 0.5) -> None:
        """Check forever (cancel to stop): every interval_s while every replica answers and none
        lags, every recovering_s otherwise, so the replicas health and gauges follow a restarted
        replica within a fraction of a second (requests never wait for this: their channels
        reconnect on their own, common/client.py). A failing check is logged, never fatal."""
        while True:
            settled = False
            try:
                settled = all_settled(await self.check())
            except Exception as e:  # noqa: BLE001 - monitoring must not take the gateway down
                log.warning("replica check failed", extra={"reason": type(e).__name__})
            await asyncio.sleep(interval_s if settled else recovering_s)


def all_settled(reports: Sequence[ReplicaReport]) -> bool:
    """Every service has replicas, every one answered, none lags."""
    return all(r.replicas and len(r.reachable) == len(r.replicas) and not r.lagging for r in reports)
