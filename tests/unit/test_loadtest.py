"""tools.loadtest (`fusionrec loadtest`) against trivial grpc.aio Recommender servers on free loopback ports.

Behaviour only: counts, codes, shares, files. No latency figure is asserted.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from protos import fusionrec_pb2, fusionrec_pb2_grpc
from tools import loadtest_report
from tools.cli import main
from tools.loadtest_engine import LoadResult, Sample, load_users, request_factory, run_open_loop

REPO = Path(__file__).resolve().parents[2]


class ScriptedRecommender(fusionrec_pb2_grpc.RecommenderServicer):
    """user "n": INVALID_ARGUMENT when n % 5 == 0, degraded when n % 4 == 0, fixed stage_ms."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls = 0
        self.inflight = 0
        self.max_inflight = 0

    async def Recommend(self, request, context):
        self.calls += 1
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            n = int(request.user_id)
            if n % 5 == 0:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "user_id: multiple of 5")
            return fusionrec_pb2.RecommendResponse(
                request_id=request.request_id, degraded=n % 4 == 0,
                items=[fusionrec_pb2.RecommendedItem(item_id="1", score=1.0, rank=1)],
                stage_ms={"retrieve": 2.0, "rank": 3.0})
        finally:
            self.inflight -= 1


async def _serve(servicer: ScriptedRecommender) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    fusionrec_pb2_grpc.add_RecommenderServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")  # free port chosen by the OS
    await server.start()
    return server, f"127.0.0.1:{port}"


def _by_index(i: int) -> fusionrec_pb2.RecommendRequest:
    return fusionrec_pb2.RecommendRequest(user_id=str(i), k=5)


async def _drive(servicer: ScriptedRecommender, **kwargs) -> LoadResult:
    server, target = await _serve(servicer)
    try:
        return await run_open_loop(target, make_request=_by_index, **kwargs)
    finally:
        await server.stop(None)


def test_open_loop_sends_rate_times_duration_and_counts_codes() -> None:
    rate, duration, warmup = 100.0, 2.0, 0.5
    servicer = ScriptedRecommender()
    result = asyncio.run(_drive(servicer, rate=rate, duration=duration, warmup=warmup))
    s = loadtest_report.summarize(result)

    n_warm = int(warmup * rate)
    assert s["scheduled"] == rate * duration
    assert s["sent"] >= 0.98 * rate * duration and s["sent"] + s["not_sent"] == s["scheduled"]
    assert servicer.calls == n_warm + s["sent"]          # warm-up requests were sent, not counted
    assert s["answered"] == s["sent"]

    measured = range(n_warm, n_warm + s["sent"])
    invalid = sum(1 for i in measured if i % 5 == 0)
    ok = [i for i in measured if i % 5 != 0]
    assert s["errors"] == {"INVALID_ARGUMENT": invalid}
    assert s["ok"] == len(ok)
    assert s["error_rate"] == pytest.approx(invalid / s["sent"], abs=1e-6)
    assert s["degraded_share"] == pytest.approx(sum(i % 4 == 0 for i in ok) / len(ok), abs=1e-6)
    assert s["stage_ms_mean"] == {"rank": 3.0, "retrieve": 2.0}
    assert set(s["latency_ms"]) == {"p50", "p90", "p99", "p99.9"}
    assert set(s["schedule_lag_ms"]) == {"p50", "p99", "max"}


def test_the_window_opens_once_after_the_warm_up_sends_and_before_the_first_measured_one() -> None:
    """The bench reads the processes' CPU when the window opens: every warm-up call is sent by
    then and no measured one yet."""
    servicer = ScriptedRecommender()
    at_open: list[int] = []
    result = asyncio.run(_drive(servicer, rate=100.0, duration=0.3, warmup=0.2,
                                on_window=lambda: at_open.append(servicer.calls)))
    assert len(at_open) == 1 and 0 < at_open[0] <= 20     # the calls that reached the server by then: warm-up only
    assert len(result.samples) == 30 and servicer.calls == 50
    assert asyncio.run(_drive(ScriptedRecommender(), rate=100.0, duration=0.1, on_window=lambda: at_open.append(-1))).samples
    assert at_open[-1] == -1                              # no warm-up: it opens before the first send


def test_sends_keep_their_schedule_while_answers_are_slow() -> None:
    """Open loop: a slow server does not hold the next send back, so calls pile up in flight."""
    servicer = ScriptedRecommender(delay_s=0.5)
    result = asyncio.run(_drive(servicer, rate=50.0, duration=1.0))
    s = loadtest_report.summarize(result)
    assert s["sent"] == 50 and s["answered"] == 50
    assert servicer.max_inflight >= 10   # closed loop with one worker would never exceed 1
    ats = [x.at for x in result.samples]
    assert ats == sorted(ats) and ats[1] - ats[0] == pytest.approx(1 / 50.0)


def test_deadline_exceeded_is_counted_by_code() -> None:
    servicer = ScriptedRecommender(delay_s=1.0)
    result = asyncio.run(_drive(servicer, rate=20.0, duration=0.5, deadline_s=0.05))
    s = loadtest_report.summarize(result)
    assert s["errors"] == {"DEADLINE_EXCEEDED": s["sent"]} and s["sent"] == 10
    assert s["ok"] == 0 and s["error_rate"] == 1.0


def test_unanswered_calls_are_cancelled_after_the_drain_and_reported() -> None:
    servicer = ScriptedRecommender(delay_s=5.0)
    result = asyncio.run(_drive(servicer, rate=10.0, duration=0.3, drain_s=0.2))
    s = loadtest_report.summarize(result)
    assert s["errors"] == {"NOT_ANSWERED": 3} and s["answered"] == 0


def test_summary_of_synthetic_samples() -> None:
    samples = [Sample(at=i / 10, lag=0.001 * i, latency=0.010, code="OK", degraded=i < 2,
                      stage_ms={"rank": float(i)}) for i in range(8)]
    samples += [Sample(at=0.8, lag=0.0, latency=0.002, code="UNAVAILABLE"),
                Sample(at=0.9, lag=0.0, latency=None, code="NOT_ANSWERED")]
    s = loadtest_report.summarize(LoadResult(target="x", rate=10, duration=1, warmup=0, deadline_s=None,
                                             samples=samples, not_sent=2, wall_s=1.0))
    assert (s["scheduled"], s["sent"], s["answered"], s["ok"]) == (12, 10, 9, 8)
    assert s["errors"] == {"NOT_ANSWERED": 1, "UNAVAILABLE": 1}
    assert s["degraded_share"] == 0.25
    assert s["stage_ms_mean"] == {"rank": 3.5}
    assert s["latency_ok_ms"]["p50"] == pytest.approx(10.0)
    assert s["schedule_lag_ms"]["max"] == pytest.approx(7.0)
    assert s["client_limited"] is True           # requests were dropped: the client fell behind
    assert "client-limited" in loadtest_report.format_summary(s)


def test_ramp_picks_the_highest_holding_step() -> None:
    def step(rate, p99, err=0.0, limited=False):
        return {"rate": rate, "latency_ms": {"p99": p99}, "error_rate": err,
                "client_limited": limited}
    steps = [step(50, 10), step(75, 20), step(100, 39), step(125, 90)]
    assert loadtest_report.best_rate(steps, 40, 0.01) == 100
    assert loadtest_report.best_rate([step(50, 10, err=0.5)], 40, 0.01) is None
    assert loadtest_report.best_rate([step(50, 10, limited=True)], 40, 0.01) is None


def test_users_file_and_request_factory(tmp_path: Path) -> None:
    assert load_users(None) == [str(i) for i in range(1, 601)]
    path = tmp_path / "users.txt"
    path.write_text("# users\nalice\n\n  bob \n")
    users = load_users(str(path))
    assert users == ["alice", "bob"]
    make = request_factory(users, k=7, surface="home", seed=1)
    reqs = [make(i) for i in range(50)]
    assert {r.user_id for r in reqs} == {"alice", "bob"}
    assert all(r.k == 7 and r.surface == "home" for r in reqs)
    assert [r.user_id for r in reqs] == [request_factory(users, 7, "home", 1)(i).user_id
                                         for i in range(50)]
    with pytest.raises(SystemExit):
        (tmp_path / "empty.txt").write_text("\n# nothing\n")
        load_users(str(tmp_path / "empty.txt"))


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["loadtest", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--target", "--rate", "--duration", "--warmup", "--deadline-ms", "--users-file",
                 "--ramp", "--p99-target-ms", "--out", "--selfcheck"):
        assert flag in out


@pytest.fixture
def trivial_server() -> str:
    """The selfcheck's trivial Recommender in its own process; it prints its port."""
    proc = subprocess.Popen([sys.executable, "-m", "tools.loadtest_selfcheck"], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()


def _cli(*args: str) -> subprocess.CompletedProcess:
    # --insecure-dev: the trivial server is plaintext (TLS and tokens are tested elsewhere)
    return subprocess.run([sys.executable, "-m", "tools.cli", "loadtest", "--insecure-dev", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_writes_json_and_png(trivial_server: str, tmp_path: Path) -> None:
    users = tmp_path / "users.txt"
    users.write_text("a\nb\nc\n")
    out = tmp_path / "run.json"
    proc = _cli("--target", trivial_server, "--rate", "50", "--duration", "2", "--warmup", "0.2",
                "--users-file", str(users), "--deadline-ms", "1000", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["sent"] == 100 and report["errors"] == {}
    assert report["stage_ms_mean"] == {"rank": 0.0, "retrieve": 0.0}
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sent/s=" in proc.stderr                  # the live progress line
    assert "schedule lag" in proc.stdout


def test_cli_ramp_reports_steps(trivial_server: str, tmp_path: Path) -> None:
    out = tmp_path / "ramp.json"
    proc = _cli("--target", trivial_server, "--ramp", "--rate", "20", "--ramp-step", "20",
                "--ramp-max", "40", "--duration", "0.5", "--warmup", "0", "--p99-target-ms",
                "1000", "--quiet", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["mode"] == "ramp" and report["steps"][0]["rate"] == 20
    assert [s["rate"] for s in report["steps"]] in ([20], [20, 40])
    held = [s["rate"] for s in report["steps"] if s["holds"]]
    assert report["max_sustained_rps"] == (max(held) if held else None)
    assert out.with_suffix(".png").is_file()
    assert "highest rate holding p99" in proc.stdout


def test_selfcheck_runs_against_a_subprocess_server() -> None:
    """Prints the figures; PASS/FAIL depends on the machine's load, so it is not asserted."""
    proc = subprocess.run([sys.executable, "-c",
                           "from tools.loadtest_selfcheck import selfcheck;"
                           "raise SystemExit(selfcheck(rate=100, duration=1, warmup=0.2))"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr
    assert "achieved" in proc.stdout and "schedule lag" in proc.stdout


def test_lean_connector_sends_the_token_over_tls_without_trace_headers(tmp_path: Path) -> None:
    """The load client's channel: TLS with the client cert, the bearer token as per-call metadata,
    and no tracing interceptors (no traceparent: the gateway starts each trace)."""
    from common.pki import ensure_pki
    from common.security import Security, add_port
    from tools.loadtest_engine import lean_connector

    pki = ensure_pki(tmp_path / "pki")
    seen: list[dict[str, str]] = []

    class Recording(ScriptedRecommender):
        async def Recommend(self, request, context):
            seen.append({k: v for k, v in context.invocation_metadata()})
            return fusionrec_pb2.RecommendResponse(request_id=request.request_id)

    async def go() -> LoadResult:
        server = grpc.aio.server()
        fusionrec_pb2_grpc.add_RecommenderServicer_to_server(Recording(), server)
        port = add_port(server, "127.0.0.1:0", Security(pki.service_ca, pki.cert("gateway"), pki.key("gateway"),
                                                        client_ca=pki.gateway_clients_ca), require_client_auth=True)
        await server.start()
        try:
            connect, metadata = lean_connector(Security(pki.service_ca, pki.cert("client"), pki.key("client")), "tok-1")
            return await run_open_loop(f"127.0.0.1:{port}", 50, 0.2, _by_index, connect=connect, metadata=metadata)
        finally:
            await server.stop(None)

    result = asyncio.run(go())
    assert {s.code for s in result.samples} == {"OK"} and seen
    assert all(md.get("authorization") == "Bearer tok-1" and "traceparent" not in md for md in seen)
    plain_connect, plain_metadata = lean_connector(None, "tok-1")
    assert plain_metadata is None   # never a token over plaintext
