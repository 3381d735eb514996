"""The open-loop sender of tools.loadtest: results, the gateway connection, the loop itself, and the
users and requests it sends. The CLI (tools/loadtest.py), the overload mode, the self-check and
`fusionrec bench` build on it; summaries and plots of its results are tools/loadtest_report.py.
"""
from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import grpc

from protos import fusionrec_pb2, fusionrec_pb2_grpc

RecommendRequest = fusionrec_pb2.RecommendRequest
RECOMMEND_METHOD = "/fusionrec.v1.Recommender/Recommend"


@dataclass
class Sample:
    """One request sent inside the measured window (times in seconds, relative to the window start)."""
    at: float                 # scheduled send time
    lag: float                # actual send time minus scheduled send time
    latency: float | None     # send -> answer; None when never answered (drained/cancelled)
    code: str                 # gRPC status code name, or NOT_ANSWERED
    degraded: bool = False
    stage_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class LoadResult:
    target: str
    rate: float
    duration: float
    warmup: float
    deadline_s: float | None
    samples: list[Sample]
    not_sent: int             # scheduled in the window but dropped: the client fell too far behind
    wall_s: float             # from window start to the last answer


Metadata = tuple[tuple[str, str], ...]

# How a channel to the gateway is opened: (target) -> aio channel, and the metadata every call
# sends (the bearer token). The CLI sets them from --credentials / --insecure-dev or a started
# stack (lean_connector); None = plaintext, no metadata.
_connect: Callable[[str], grpc.aio.Channel] | None = None
_metadata: Metadata | None = None


def set_connector(connect: Callable[[str], grpc.aio.Channel] | None, metadata: Metadata | None = None) -> None:
    global _connect, _metadata
    _connect, _metadata = connect, metadata


def lean_connector(security: Any, token: str | None) -> tuple[Callable[[str], grpc.aio.Channel], Metadata | None]:
    """The load client's channel: what common.client.open_channel opens, minus its per-call Python:
    no tracing interceptors (the gateway starts a trace per call, as for any caller without one)
    and the token as metadata built once instead of call credentials (a Python plugin run per
    call). The client shares the CPUs with the system it measures: measured against a server that
    refuses every call at once (TLS), 0.68-0.70 -> 0.35-0.45 client core-ms per call.
    security: a common.security.Security (plaintext: no TLS, no token sent)."""
    from common.client import channel_options, tls_name_override
    plaintext = security is None or security.insecure

    def connect(target: str) -> grpc.aio.Channel:
        if plaintext:
            return grpc.aio.insecure_channel(target, options=channel_options())
        return grpc.aio.secure_channel(target, security.channel_credentials(),
                                       options=channel_options(tls_name_override(target)))
    return connect, (None if plaintext or not token else (("authorization", f"Bearer {token}"),))


async def run_open_loop(target: str, rate: float, duration: float,
                        make_request: Callable[[int], RecommendRequest], warmup: float = 0,
                        deadline_s: float | None = None, *, drain_s: float = 10.0,
                        progress: TextIO | None = None,
                        connect: Callable[[str], grpc.aio.Channel] | None = None,
                        metadata: Metadata | None = None,
                        on_answer: Callable[[int, Any], None] | None = None,
                        on_window: Callable[[], None] | None = None) -> LoadResult:
    """Offer `rate` requests/s for warmup + duration seconds; only the last `duration` count.

    make_request(i) builds request number i (i counts from 0, warm-up included). Sending stops at
    the end of the window even if the client fell behind (the rest is `not_sent`); calls still in
    flight get up to max(drain_s, deadline_s) to finish, then are cancelled as NOT_ANSWERED.
    on_answer(i, response) is called for each OK answer inside the window (the overload mode
    scores them). on_window() is called once, right before the first measured send (the bench reads
    the processes' CPU there, so warm-up and whatever the stack still did after its start do not
    count). connect / metadata: the channel and per-call metadata (default: set_connector's).
    A sample's latency runs from its actual send, not its scheduled time (lag: the difference).
    """
    if rate <= 0 or duration <= 0 or warmup < 0:
        raise ValueError("rate and duration must be > 0 and warmup >= 0")
    loop = asyncio.get_running_loop()
    n_warm = int(round(warmup * rate))
    n_total = n_warm + int(round(duration * rate))
    samples: list[Sample] = []
    if connect is None:
        connect, metadata = (_connect, _metadata) if _connect else (grpc.aio.insecure_channel, None)
    async with connect(target) as channel:
        stub = fusionrec_pb2_grpc.RecommenderStub(channel)
        # Connect before the clock starts: the first sends must not pay for the handshake.
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout=max(drain_s, 5.0))
        except asyncio.TimeoutError:
            raise ConnectionError(f"cannot connect to {target}") from None
        t0 = loop.time() + 0.05
        t_window = t0 + n_warm / rate
        stop_sending = t0 + (warmup + duration) + 1.0  # grace: late sends count, very late are dropped
        pending: set[asyncio.Task] = set()
        last_done = [t_window]

        async def call(i: int, scheduled: float, sample: Sample | None) -> None:
            sent = loop.time()   # when the call really starts (its task may run later than created)
            if sample is not None:
                sample.lag = sent - scheduled
            try:
                resp = await stub.Recommend(make_request(i), timeout=deadline_s, metadata=metadata)
                code, degraded, stage = "OK", resp.degraded, dict(resp.stage_ms)
            except grpc.aio.AioRpcError as e:
                code, degraded, stage = e.code().name, False, {}
            done = loop.time()
            if sample is not None:
                sample.latency, sample.code = done - sent, code
                sample.degraded, sample.stage_ms = degraded, stage
                last_done[0] = max(last_done[0], done)
                if on_answer is not None and code == "OK":
                    on_answer(i, resp)

        sent_count = [0]  # all sends, warm-up included, for the progress line
        ticker = asyncio.create_task(_progress(progress, samples, sent_count, lambda: len(pending),
                                               t_window, loop)) if progress else None
        not_sent = 0
        for i in range(n_total):
            scheduled = t0 + i / rate
            now = loop.time()
            if now > stop_sending:
                not_sent = sum(1 for j in range(i, n_total) if j >= n_warm)
                break
            if scheduled > now:
                await asyncio.sleep(scheduled - now)
            sent_count[0] += 1
            sample = None
            if i == n_warm and on_window is not None:
                on_window()
            if i >= n_warm:  # recorded at send time, so a call that never answers still counts
                sample = Sample(at=scheduled - t_window, lag=loop.time() - scheduled, latency=None,
                                code="NOT_ANSWERED")
                samples.append(sample)
            task = loop.create_task(call(i, scheduled, sample))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(set(pending), timeout=max(drain_s, deadline_s or 0.0))
            for task in list(pending):
                task.cancel()  # counted as NOT_ANSWERED: the sample keeps its default code
            await asyncio.gather(*pending, return_exceptions=True)
        if ticker:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
            progress.write("\n")
    return LoadResult(target=target, rate=rate, duration=duration, warmup=warmup,
                      deadline_s=deadline_s, samples=samples, not_sent=not_sent,
                      wall_s=max(last_done[0] - t_window, 1e-9))


async def _progress(out: TextIO, samples: list[Sample], sent_count: list[int],
                    inflight: Callable[[], int], t_window: float,
                    loop: asyncio.AbstractEventLoop) -> None:
    """One status line per second on `out` (carriage return: it overwrites itself on a tty)."""
    seen, sent_before = 0, 0
    while True:
        await asyncio.sleep(1.0)
        new = samples[seen:]
        seen = len(samples)
        sent_now, sent_before = sent_count[0] - sent_before, sent_count[0]
        lat = sorted(s.latency for s in new if s.latency is not None)
        errors = sum(1 for s in samples if s.code not in ("OK", "NOT_ANSWERED"))
        p99 = f"{lat[int(0.99 * (len(lat) - 1))] * 1000:.1f}ms" if lat else "-"
        phase = "warmup" if loop.time() < t_window else f"t={loop.time() - t_window:5.1f}s"
        out.write(f"\r{phase} sent/s={sent_now:5d} p99={p99:>8} inflight={inflight():4d} "
                  f"errors={errors}   ")
        out.flush()


# ---------------------------------------------------------------- requests from a user list

def load_users(path: str | None, default_count: int = 600) -> list[str]:
    """User ids, one per line (blank lines and #comments skipped); default "1".."600"."""
    if path is None:
        return [str(i) for i in range(1, default_count + 1)]
    users = [ln.strip() for ln in Path(path).read_text().splitlines()]
    users = [u for u in users if u and not u.startswith("#")]
    if not users:
        raise SystemExit(f"--users-file {path}: no user ids")
    return users


def request_factory(users: Sequence[str], k: int, surface: str,
                    seed: int = 0) -> Callable[[int], RecommendRequest]:
    """Request i asks for a user drawn uniformly (seeded, so runs are repeatable)."""
    rng = random.Random(seed)
    picks = [rng.randrange(len(users)) for _ in range(1 << 16)]

    def make(i: int) -> RecommendRequest:
        return RecommendRequest(user_id=users[picks[i % len(picks)]], k=k, surface=surface,
                                request_id=f"loadtest-{i}")
    return make
