"""Metric label cardinality stays bounded whatever callers send.

10,000 Recommend calls, each with its own random user id, request id, surface and excluded item
id (valid and invalid ones), go through the gateway of the session stack. The series every
process exports (Triton included) must not grow with them, and none of those strings may appear
in any /metrics body.
"""
from __future__ import annotations

import asyncio
import re
import urllib.request
import uuid
from collections import Counter

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.metrics import DEGRADED_REASONS
from protos import fusionrec_pb2 as pb
from protos import fusionrec_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

COMPONENTS = ("gateway", "retrieval", "ranking", "triton")
TOTAL, CHECKPOINT = 10_000, 1_000
IN_FLIGHT = 8   # the admission starting limit (INITIAL_LIMIT): the exact counts below hold only unshed
# One call in VALID_EVERY goes through retrieval and ranking (~100/s with both cores busy); the
# others break one validation rule each and stop in the gateway (~2,000/s): about 30 s in all.
VALID_EVERY = 4
MARK = "zqcard"               # every random string starts with it: one substring check finds leaks
MAX_SERIES_PER_FAMILY = 200   # samples (histogram buckets included) per metric family
MAX_CHILDREN_PER_FAMILY = 40  # label sets (le ignored) per metric family
MAX_GROWTH = 3                # label sets that may first appear between 1,000 and 10,000 calls
VOCABULARY = (set(DEGRADED_REASONS) | {c.name for c in grpc.StatusCode}
              | {"gateway", "retrieval", "ranking"})


def _rand(prefix: str) -> str:
    return f"{MARK}{prefix}{uuid.uuid4().hex}"


def _request(i: int) -> pb.RecommendRequest:
    """Request i: random ids everywhere; all but one in VALID_EVERY break one rule (INVALID_ARGUMENT)."""
    req = pb.RecommendRequest(user_id=_rand("u"), k=1 + i % 10, surface=_rand("s")[:64],
                              request_id=_rand("r"), exclude_item_ids=[_rand("x"), _rand("x")])
    if i % VALID_EVERY == 0:
        return req
    breakers = [
        lambda r: setattr(r, "k", 0),
        lambda r: setattr(r, "k", 101),
        lambda r: setattr(r, "user_id", _rand("u") * 8),                 # > 256 characters
        lambda r: setattr(r, "surface", _rand("s") * 2),                 # > 64 characters
        lambda r: setattr(r, "request_id", _rand("r") * 4),              # > 128 characters
        lambda r: r.exclude_item_ids.append(""),                         # empty item id
        lambda r: (r.ClearField("user_id"), None)[1],                    # no user, no history
        lambda r: r.history_item_ids.extend([_rand("h")] * 1001),        # > 1,000 history ids
    ]
    invalid_index = i - i // VALID_EVERY - 1     # 0, 1, 2, ... over the invalid calls
    breakers[invalid_index % len(breakers)](req)
    return req


def _strings(req: pb.RecommendRequest) -> list[str]:
    return [req.user_id, req.surface, req.request_id, *req.exclude_item_ids, *req.history_item_ids[:1]]


async def _send(stack, start: int, stop: int, sent: list[str], codes: Counter) -> None:
    async with stack.gateway_channel(aio=True) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        limit = asyncio.Semaphore(IN_FLIGHT)

        async def one(i: int) -> None:
            req = _request(i)
            sent.extend(s for s in _strings(req) if s)
            async with limit:
                try:
                    await stub.Recommend(req, timeout=10)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as e:
                    codes[e.code().name] += 1

        await asyncio.gather(*(one(i) for i in range(start, stop)))


def _bodies(stack) -> dict[str, str]:
    out = {}
    for name in COMPONENTS:
        url = f"http://127.0.0.1:{stack.processes[name].ports['metrics']}/metrics"
        out[name] = urllib.request.urlopen(url, timeout=5).read().decode()
    return out


def _families(bodies: dict[str, str]) -> dict[str, tuple[int, set]]:
    """'component/family' -> (number of samples, set of label sets without le)."""
    out = {}
    for name, body in bodies.items():
        for family in text_string_to_metric_families(body):
            children = {tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
                        for s in family.samples}
            out[f"{name}/{family.name}"] = (len(family.samples), children)
    return out


def _assert_bounded(families: dict[str, tuple[int, set]]) -> None:
    for key, (samples, children) in families.items():
        assert samples < MAX_SERIES_PER_FAMILY, f"{key}: {samples} series"
        assert len(children) < MAX_CHILDREN_PER_FAMILY, f"{key}: {len(children)} label sets"


def _assert_no_leak(bodies: dict[str, str], sent: list[str]) -> None:
    for name, body in bodies.items():
        assert MARK not in body, f"{name} /metrics carries a caller string: " \
            f"{body[max(body.index(MARK) - 200, 0):body.index(MARK) + 100]}"
        # Also a fragment of one (a truncated or re-encoded id): the hex parts as tokens.
        tokens = set(re.findall(r"[0-9a-f]{12,}", body))
        hexes = {s[len(MARK) + 1:len(MARK) + 33] for s in sent}
        assert not tokens & hexes, f"{name} /metrics carries part of a caller string"


def test_random_ids_do_not_grow_series_or_reach_metrics(stack):
    sent: list[str] = []
    codes: Counter[str] = Counter()
    asyncio.run(_send(stack, 0, CHECKPOINT, sent, codes))
    early_bodies = _bodies(stack)
    early = _families(early_bodies)
    asyncio.run(_send(stack, CHECKPOINT, TOTAL, sent, codes))
    bodies = _bodies(stack)
    late = _families(bodies)

    assert sum(codes.values()) == TOTAL
    valid = len(range(0, TOTAL, VALID_EVERY))
    assert codes["INVALID_ARGUMENT"] == TOTAL - valid, codes
    assert codes["OK"] >= 0.95 * valid, codes            # overload may shed a few, never crash
    assert len(set(sent)) == len(sent) >= 4 * TOTAL       # every string distinct

    _assert_bounded(early)
    _assert_bounded(late)
    # A label set may first appear late only when every value in it comes from a fixed vocabulary
    # (e.g. the first ranking_timeout under load); anything else counts against MAX_GROWTH.
    new_sets = [(key, child) for key in late for child in late[key][1] - early.get(key, (0, set()))[1]]
    unexpected = [(key, child) for key, child in new_sets if any(v not in VOCABULARY for _, v in child)]
    assert len(unexpected) <= MAX_GROWTH, unexpected
    total_early = sum(n for n, _ in early.values())
    total_late = sum(n for n, _ in late.values())
    assert total_late - total_early <= MAX_GROWTH * 25, \
        f"{total_early} series after {CHECKPOINT:,} calls, {total_late} after {TOTAL:,}"

    _assert_no_leak(early_bodies, sent)
    _assert_no_leak(bodies, sent)
