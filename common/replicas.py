"""The replicas behind a service address, and what each one serves.

A target is `host:port`, gRPC's multi-address form `ipv4:h1:p1,h2:p2` (`ipv6:[::1]:p,...`; the
tests' supervisor uses it), or `dns:///name:port` / `dns:name:port` (every A/AAAA record: a
Kubernetes headless Service). The gateway's request channels balance over all of them
(round_robin); for a version swap it must ask each replica on its own, so each probe opens a
short-lived channel to one address and closes it again.
"""
from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Callable

import grpc

from common.client import open_channel

from protos import fusionrec_pb2 as pb

DNS_PREFIXES = ("dns:///", "dns:")


class BadTarget(ValueError):
    """A target string this resolver cannot read (the message names it and the forms it knows)."""


def _split_host_port(address: str, target: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadTarget(f"{target!r}: expected host:port, ipv4:h1:p1,h2:p2 or dns:///name:port")
    return host, int(port)


def static_addresses(target: str) -> list[str] | None:
    """The addresses a target names without a lookup; None for a dns: target."""
    if target.startswith(DNS_PREFIXES):
        return None
    if target.startswith(("ipv4:", "ipv6:")):
        scheme, _, rest = target.partition(":")
        out = []
        for address in filter(None, (a.strip() for a in rest.split(","))):
            _split_host_port(address, target)
            out.append(f"{scheme}:{address}")   # an ipv6 literal must keep its scheme for grpc
        if not out:
            raise BadTarget(f"{target!r}: no addresses after {scheme}:")
        return out
    _split_host_port(target, target)
    return [target]


async def resolve_addresses(target: str) -> list[str]:
    """Every address of the target, in a stable order (deduplicated)."""
    static = static_addresses(target)
    if static is not None:
        return static
    name = target.removeprefix("dns:///") if target.startswith("dns:///") else target.removeprefix("dns:")
    if name.startswith("//"):   # dns://authority/name:port: the authority (a DNS server) is not used
        name = name[2:].partition("/")[2]
    host, port = _split_host_port(name, target)
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out = []
    for family, _, _, _, sockaddr in infos:
        ip = sockaddr[0]
        address = f"ipv6:[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
        if address not in out:
            out.append(address)
    return sorted(out)


@dataclass(frozen=True)
class ReplicaStatus:
    """One replica's answer to Status; reachable=False when it did not answer in time."""
    address: str
    reachable: bool
    loaded_versions: tuple[str, ...] = ()
    newest_version: str = ""
    item_log_seq: int = 0
    item_log_ok: bool = False

    def serves(self, version: str) -> bool:
        return version in self.loaded_versions

    @classmethod
    def answered(cls, address: str, status: pb.ServiceStatus) -> "ReplicaStatus":
        return cls(address, True, tuple(status.loaded_versions), status.newest_version,
                   int(status.item_log_seq), bool(status.item_log_ok))


StatusStubFactory = Callable[[grpc.aio.Channel], object]   # channel -> a stub with Status()


async def probe_address(address: str, stub_factory: StatusStubFactory, timeout_s: float) -> ReplicaStatus:
    """Ask one replica, on a channel of its own (closed again: no pooled channel balances it away)."""
    try:
        async with open_channel(address) as channel:
            status: pb.ServiceStatus = await stub_factory(channel).Status(pb.StatusRequest(), timeout=timeout_s)
    except (grpc.aio.AioRpcError, OSError, asyncio.TimeoutError):
        return ReplicaStatus(address, reachable=False)
    return ReplicaStatus.answered(address, status)


async def probe_replicas(target: str, stub_factory: StatusStubFactory,
                         timeout_s: float = 1.0) -> list[ReplicaStatus]:
    """Every replica of the target, asked in parallel. A DNS failure reads as no replicas."""
    try:
        addresses = await resolve_addresses(target)
    except OSError:
        return []
    return list(await asyncio.gather(*(probe_address(a, stub_factory, timeout_s) for a in addresses)))
