"""Open-loop load generator for the gateway's Recommender/Recommend.

Open loop: request i is sent at t0 + i/rate whatever the responses do, so a slow server shows up
as latency and errors instead of quietly lowering the offered rate (no coordinated omission).
The tool measures its own scheduling lag (send time minus scheduled time) so that a result from
an overloaded client can be recognised and discarded.

    fusionrec loadtest --target 127.0.0.1:50051 --rate 100 --duration 20 --warmup 3
    fusionrec loadtest --target ... --ramp --rate 50 --ramp-step 25 --ramp-max 300
    fusionrec loadtest --selfcheck      # can this process offer 500 rps on this machine?
    fusionrec loadtest --stack --ramp   # start Triton + services on loopback first (make loadtest)

With --stack the tool starts the whole system itself (tools.stack.Stack on the --artifacts and
--model-repo given, ports chosen at run time), draws users from the artifact's user histories
unless --users-file is given, drives it, and stops it.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import grpc

from protos import fusionrec_pb2, fusionrec_pb2_grpc
from tools import loadtest_overload as overload
from tools import loadtest_report as report
from tools.stack_args import add_stack_arguments

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

    def summary(self) -> dict:
        return report.summarize(self)


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


def _connector(args: argparse.Namespace) -> tuple[Callable[[str], grpc.aio.Channel], Metadata | None]:
    """TLS + the recommend token from --credentials (its gateway unless --target), or plaintext
    with --insecure-dev; sets args.target when the credentials name the gateway."""
    from common.security import Security
    from tools.credentials import Credentials, CredentialsError
    if args.insecure_dev:
        if not args.target:
            raise CredentialsError("--target is required with --insecure-dev")
        return lean_connector(Security.plaintext(), None)
    credentials = Credentials.load(args.credentials)
    args.target = args.target or credentials.gateway
    return lean_connector(credentials.security, credentials.token("recommend"))


async def run_open_loop(target: str, rate: float, duration: float,
                        make_request: Callable[[int], RecommendRequest], warmup: float = 0,
                        deadline_s: float | None = None, *, drain_s: float = 10.0,
                        progress: TextIO | None = None,
                        connect: Callable[[str], grpc.aio.Channel] | None = None,
                        metadata: Metadata | None = None,
                        on_answer: Callable[[int, Any], None] | None = None) -> LoadResult:
    """Offer `rate` requests/s for warmup + duration seconds; only the last `duration` count.

    make_request(i) builds request number i (i counts from 0, warm-up included). Sending stops at
    the end of the window even if the client fell behind (the rest is `not_sent`); calls still in
    flight get up to max(drain_s, deadline_s) to finish, then are cancelled as NOT_ANSWERED.
    on_answer(i, response) is called for each OK answer inside the window (the overload mode
    scores them). connect / metadata: the channel and per-call metadata (default: set_connector's).
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


# ---------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None, help="gateway host:port (default: the --credentials file's gateway)")
    p.add_argument("--credentials", type=Path, default=Path("run/credentials.json"),
                   help="CA, client cert and tokens written by `fusionrec run` (default: %(default)s)")
    p.add_argument("--insecure-dev", action="store_true",
                   help="plaintext, no token (a gateway run with --insecure-dev; with --stack: start it so)")
    p.add_argument("--rate", type=float, default=100.0, help="requests/s (ramp: start rate)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds (per ramp step)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds sent first and not counted")
    p.add_argument("--deadline-ms", type=float, default=None, help="per-request gRPC deadline")
    p.add_argument("--users-file", default=None, help="user ids, one per line (default 1..600)")
    p.add_argument("--k", type=int, default=10, help="items per request")
    p.add_argument("--surface", default="home")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--drain-s", type=float, default=10.0,
                   help="max wait for answers after the last send")
    p.add_argument("--out", default=None,
                   help="JSON report path (default reports/loadtest/<timestamp>.json; PNG beside it)")
    p.add_argument("--quiet", action="store_true", help="no live progress line on stderr")
    p.add_argument("--ramp", action="store_true",
                   help="step the rate from --rate by --ramp-step up to --ramp-max; report the "
                        "highest rate whose p99 and error rate hold")
    p.add_argument("--ramp-step", type=float, default=25.0)
    p.add_argument("--ramp-max", type=float, default=500.0)
    p.add_argument("--p99-target-ms", type=float, default=None,
                   help="p99 a ramp step must hold (default 40; with --overload 100)")
    p.add_argument("--max-error-rate", type=float, default=0.01,
                   help="largest share of non-OK answers a ramp step may have")
    p.add_argument("--selfcheck", action="store_true",
                   help="drive a trivial server in a subprocess at 500 rps and print the figures")
    p.add_argument("--stack", action="store_true",
                   help="start Triton, retrieval, ranking and gateway on loopback first (--target is "
                        "ignored); users come from the artifact's histories unless --users-file")
    overload.add_arguments(p)
    add_stack_arguments(p, Path("run/loadtest"), "process logs and user state", note="with --stack: ")


def run(args: argparse.Namespace) -> int:
    try:
        return _run_mode(args)
    except ConnectionError as e:
        print(f"loadtest: {e}", file=sys.stderr)
        return 2


def _run_mode(args: argparse.Namespace) -> int:
    if args.selfcheck:
        from tools.loadtest_selfcheck import selfcheck
        return selfcheck()
    if args.stack:
        return _on_fresh_stack(args)
    set_connector(*_connector(args))
    return _drive(args, load_users(args.users_file))


def _on_fresh_stack(args: argparse.Namespace) -> int:
    """Start the whole system, load-test its gateway, stop it (also on Ctrl-C or an error)."""
    from common.artifacts import open_artifacts
    from gateway.user_state import ArtifactHistoryStore
    from tools.stack import Stack

    users = (load_users(args.users_file) if args.users_file or args.overload
             else ArtifactHistoryStore(open_artifacts(args.artifacts)).users())
    if not users:
        raise SystemExit(f"{args.artifacts}: the artifact set has no users; pass --users-file")
    print(f"starting Triton, retrieval, ranking and gateway (logs in {args.run_dir}/) ...",
          file=sys.stderr, flush=True)
    with Stack(args.artifacts, args.model_repo, args.run_dir, insecure_dev=args.insecure_dev) as stack:
        args.target = stack.addr("gateway")
        # Not stack.gateway_channel: the lean channel (same certs and token) costs the client less.
        set_connector(*lean_connector(stack.security("client"),
                                      None if args.insecure_dev else stack.tokens["recommend"]))
        print(f"gateway at {args.target}; {len(users)} users from "
              f"{args.users_file or 'the artifact histories'}", file=sys.stderr, flush=True)
        return _drive(args, users, cpu_seconds=lambda: overload.processes_cpu_s(stack.pids().values()))


def _drive(args: argparse.Namespace, users: Sequence[str],
           cpu_seconds: Callable[[], float] | None = None) -> int:
    """cpu_seconds: CPU used so far by the system under test (with --stack), for core-ms per request."""
    if args.overload:   # its requests replay the build's test users (--artifacts), not `users`
        return overload.drive(args, cpu_seconds)
    if args.p99_target_ms is None:
        args.p99_target_ms = 40.0
    make = request_factory(users, args.k, args.surface, args.seed)
    deadline = args.deadline_ms / 1000.0 if args.deadline_ms else None
    progress = None if args.quiet else sys.stderr
    out = Path(args.out or f"reports/loadtest/{time.strftime('%Y%m%d-%H%M%S')}.json")

    if not args.ramp:
        result = asyncio.run(run_open_loop(args.target, args.rate, args.duration, make,
                                           args.warmup, deadline, drain_s=args.drain_s,
                                           progress=progress))
        summary = result.summary()
        report.write_json(out, summary)
        report.plot_latency(out.with_suffix(".png"), result)
        print(report.format_summary(summary))
        print(f"wrote {out} and {out.with_suffix('.png')}")
        return 0

    steps = asyncio.run(_ramp(args, make, deadline, progress))
    best = report.best_rate(steps, args.p99_target_ms, args.max_error_rate)
    doc = {"mode": "ramp", "target": args.target, "p99_target_ms": args.p99_target_ms,
           "max_error_rate": args.max_error_rate, "max_sustained_rps": best, "steps": steps}
    report.write_json(out, doc)
    report.plot_ramp(out.with_suffix(".png"), steps, args.p99_target_ms)
    for s in steps:
        print(report.format_summary(s))
    print(f"highest rate holding p99 <= {args.p99_target_ms:g} ms and errors <= "
          f"{args.max_error_rate:.1%}: {best if best is not None else 'none'} rps")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


async def _ramp(args: argparse.Namespace, make: Callable[[int], RecommendRequest],
                deadline: float | None, progress: TextIO | None) -> list[dict]:
    """Run one step per rate; stop after the first step that misses the target."""
    steps: list[dict] = []
    rate = args.rate
    while rate <= args.ramp_max + 1e-9:
        if progress:
            progress.write(f"ramp step: {rate:g} rps\n")
        result = await run_open_loop(args.target, rate, args.duration, make, args.warmup,
                                     deadline, drain_s=args.drain_s, progress=progress)
        summary = result.summary()
        summary["holds"] = report.step_holds(summary, args.p99_target_ms, args.max_error_rate)
        steps.append(summary)
        if not summary["holds"]:
            break
        rate += args.ramp_step
    return steps
