"""tools.loadtest_overload (`fusionrec loadtest --overload`): the figures on hand-made results, and a
whole run against a fake gateway on a free loopback port that sheds above a fixed concurrency.

Behaviour only: counts, shares, nDCG of scripted answers. No latency figure is asserted."""
from __future__ import annotations

import asyncio
import math

import grpc
import pytest

from protos import fusionrec_pb2, fusionrec_pb2_grpc
from tools.loadtest_engine import LoadResult, Sample
from tools.loadtest_overload import (Replay, ReplayUser, compare, format_table, holds, phase_figures,
                                     run_overload)

USERS = [ReplayUser(f"u{n}", ("h1", "h2"), (), frozenset({f"p{n}"})) for n in range(20)]


class SheddingRecommender(fusionrec_pb2_grpc.RecommenderServicer):
    """Answers after delay_s with the user's positive at rank 2 of 3; RESOURCE_EXHAUSTED at once
    when `capacity` calls are already in flight."""

    def __init__(self, capacity: int, delay_s: float) -> None:
        self.capacity, self.delay_s = capacity, delay_s
        self.inflight = 0
        self.requests: list[fusionrec_pb2.RecommendRequest] = []

    async def Recommend(self, request, context):
        if self.inflight >= self.capacity:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded; retry with backoff")
        self.inflight += 1
        try:
            self.requests.append(request)
            await asyncio.sleep(self.delay_s)
            n = request.user_id[1:]
            return fusionrec_pb2.RecommendResponse(request_id=request.request_id, items=[
                fusionrec_pb2.RecommendedItem(item_id=item, rank=r) for r, item in
                enumerate(["x", f"p{n}", "y"], start=1)])
        finally:
            self.inflight -= 1


def sample(code: str, degraded: bool = False, latency: float | None = 0.01) -> Sample:
    return Sample(at=0.0, lag=0.0, latency=latency, code=code, degraded=degraded)


def test_replay_requests_carry_the_test_users_history_and_score_ndcg():
    replay = Replay(USERS, k=10, seed=1)
    request = replay.request(7)
    user = USERS[replay.user_of(7)]
    assert request.user_id == user.user_id and list(request.history_item_ids) == ["h1", "h2"]
    assert request.k == 10 and replay.user_of(7) == Replay(USERS, seed=1).user_of(7)   # seeded
    scores, on_answer = replay.scorer()
    response = fusionrec_pb2.RecommendResponse(items=[
        fusionrec_pb2.RecommendedItem(item_id=i) for i in ("x", sorted(user.positives)[0])])
    on_answer(7, response)
    assert scores == {7: pytest.approx(1 / math.log2(3))}
    with pytest.raises(ValueError):
        Replay([])


def test_phase_figures_goodput_shed_share_and_quality():
    samples = ([sample("OK")] * 6 + [sample("OK", degraded=True)] * 2 + [sample("RESOURCE_EXHAUSTED", latency=0.002)] * 10
               + [sample("DEADLINE_EXCEEDED", latency=0.2)] * 2)
    result = LoadResult("t", rate=10.0, duration=2.0, warmup=0.0, deadline_s=0.2, samples=samples,
                        not_sent=0, wall_s=2.0)
    scores = {0: 1.0, 1: 0.5, 2: 0.0, 3: 0.5, 4: 1.0, 5: 1.0, 6: 0.0, 7: 0.0}   # the 8 OK answers
    figures, per_user = phase_figures(result, scores, lambda i: i % 3, factor=2.0)
    assert figures["goodput_rps"] == 3.0 and figures["ok_rps"] == 4.0       # 6 good of 8 OK, over 2 s
    assert figures["shed_share"] == 0.5 and figures["shed_latency_ms"]["p50"] == pytest.approx(2.0)
    assert figures["degraded_share"] == 0.25 and figures["errors"] == {"DEADLINE_EXCEEDED": 2, "RESOURCE_EXHAUSTED": 10}
    assert figures["ndcg_served"] == pytest.approx(4.0 / 8) and figures["ndcg_offered"] == pytest.approx(4.0 / 20)
    assert per_user == {0: pytest.approx((1.0 + 0.5 + 0.0) / 3), 1: pytest.approx((0.5 + 1.0 + 0.0) / 3),
                        2: pytest.approx((0.0 + 1.0) / 2)}
    assert figures["users_served"] == 3


def test_compare_pairs_users_with_the_1x_phase_and_judges_3x_and_6x():
    def phase(factor, goodput, ndcg):
        return {"factor": factor, "goodput_rps": goodput, "ndcg_served": ndcg}
    phases = [phase(1, 100.0, 0.08), phase(2, 110.0, 0.07), phase(3, 100.0, 0.06), phase(6, 99.5, 0.04)]
    per_user = [{1: 0.1, 2: 0.0}, {1: 0.1, 3: 0.2}, {1: 0.0, 2: 0.0}, {}]
    verdict = compare(phases, per_user)
    assert verdict["peak_goodput_rps"] == 110.0 and verdict["target_met"]      # 100/110 and 99.5/110 >= 90%
    assert phases[3]["goodput_vs_peak"] == pytest.approx(99.5 / 110, abs=1e-4)
    assert phases[1]["ndcg_vs_1x_paired"] == pytest.approx(0.0) and phases[1]["ndcg_vs_1x_users"] == 1
    assert phases[2]["ndcg_vs_1x_paired"] == pytest.approx(-0.05) and phases[3]["ndcg_vs_1x_paired"] is None
    assert phases[3]["ndcg_served_vs_1x"] == pytest.approx(0.5)
    phases[3]["goodput_rps"] = 90.0
    assert not compare(phases, per_user)["target_met"]                        # 90/110 < 90%


def test_holds_counts_degraded_answers_as_bad():
    summary = {"latency_ms": {"p99": 50.0}, "sent": 100, "ok": 100, "errors": {}, "degraded_share": 0.0,
               "client_limited": False}
    assert holds(summary, 100.0, 0.01)
    assert not holds({**summary, "degraded_share": 0.05}, 100.0, 0.01)
    assert not holds({**summary, "errors": {"RESOURCE_EXHAUSTED": 5}, "ok": 95}, 100.0, 0.01)
    assert not holds({**summary, "latency_ms": {"p99": 150.0}}, 100.0, 0.01)
    assert not holds({**summary, "client_limited": True}, 100.0, 0.01)


def test_run_overload_on_a_fake_gateway_that_sheds():
    async def go():
        servicer = SheddingRecommender(capacity=2, delay_s=0.02)   # ~100 answers/s at most
        server = grpc.aio.server()
        fusionrec_pb2_grpc.add_RecommenderServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            doc = await run_overload(f"127.0.0.1:{port}", Replay(USERS), start_rate=20, step=20, max_rate=60,
                                     search_duration=0.5, duration=1.0, warmup=0.2, deadline_s=0.5,
                                     factors=(1.0, 4.0), pause_s=0.05, drain_s=1.0)
            return doc, servicer
        finally:
            await server.stop(None)

    doc, servicer = asyncio.run(go())
    assert doc["mode"] == "overload" and [p["factor"] for p in doc["phases"]] == [1.0, 4.0]
    assert doc["search"] and doc["search"][0]["rate"] == 20
    assert doc["base_rate"] in {s["rate"] for s in doc["search"] if s["holds"]} or not doc["base_rate_held"]
    one, four = doc["phases"]
    assert one["rate"] == doc["base_rate"] and four["rate"] == 4 * doc["base_rate"]
    assert four["shed_share"] > 0 and four["errors"].get("RESOURCE_EXHAUSTED", 0) > 0
    assert one["ndcg_served"] == pytest.approx(1 / math.log2(3))             # positive at rank 2, always
    assert four["ndcg_served"] == pytest.approx(1 / math.log2(3))
    assert four["ndcg_offered"] < four["ndcg_served"]                        # refused requests score 0
    assert four["ndcg_vs_1x_paired"] == pytest.approx(0.0)
    assert all(r.user_id.startswith("u") and list(r.history_item_ids) == ["h1", "h2"] for r in servicer.requests)
    assert "goodput" in format_table(doc) and ("met" in format_table(doc) or "MISSED" in format_table(doc))


def test_processes_cpu_counts_children_and_ignores_gone_ones():
    import os
    import subprocess
    import sys
    from tools.loadtest_overload import processes_cpu_s
    # a child that burns ~0.3 s of CPU: counted through its parent (this process)
    before = processes_cpu_s([os.getpid()])
    child = subprocess.Popen([sys.executable, "-c", "import time\nt=time.process_time()\n"
                              "while time.process_time()-t<0.3: pass\ntime.sleep(5)"])
    try:
        import time
        deadline = time.monotonic() + 10
        while processes_cpu_s([os.getpid()]) - before < 0.25 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_cpu_s([os.getpid()]) - before >= 0.25
    finally:
        child.kill()
        child.wait()
    assert processes_cpu_s([2 ** 22 + 12345]) == 0.0
