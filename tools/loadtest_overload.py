"""`fusionrec loadtest --overload`: what overload costs, in answers and in recommendations.

1. Search: open-loop steps from --rate by --ramp-step (then one step halfway into the first miss)
   for the highest rate that holds: p99 <= --p99-target-ms (100), errors + degraded answers <= 1%,
   the client keeping up.
2. Phases: that rate times each --factors (1, 2, 3, 6), --duration seconds each, and per phase:
   goodput (OK and not degraded answers/s), the share shed early (RESOURCE_EXHAUSTED) and how fast
   it came, p50/p99, and the quality of what was served: every request replays a held-out test
   user (the build's split, as `make eval` sends them: user id, newest history, older items
   excluded) and each answer gets its nDCG@10 against the user's test positives. Quality per
   phase: the mean over served answers, the mean over everything sent (a refused or failed
   request scores 0), and the paired difference per user against the same users at 1x.
Figures go to reports/loadtest/overload.json (or --out) and a table is printed.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TextIO

import numpy as np

from offline.metrics import ndcg_at_k
from protos import fusionrec_pb2
from tools import loadtest_report as report
from tools.loadtest_engine import run_open_loop

SHED_CODE = "RESOURCE_EXHAUSTED"
NDCG_K = 10
DEFAULT_FACTORS = (1.0, 2.0, 3.0, 6.0)
GOODPUT_TARGET = 0.9          # issue 13: at 3x and 6x, non-degraded goodput >= 90% of the peak
TARGET_FACTORS = (3.0, 6.0)


@dataclass(frozen=True)
class ReplayUser:
    user_id: str
    history: tuple[str, ...]      # item ids, oldest first (what the gateway is sent)
    exclude: tuple[str, ...]      # older items, excluded (the API's limits)
    positives: frozenset[str]     # held-out test items


class Replay:
    """Request i replays test user `user_of(i)` (seeded draw); its answer is scored by nDCG@10."""

    def __init__(self, users: Sequence[ReplayUser], k: int = NDCG_K, seed: int = 0) -> None:
        if not users:
            raise ValueError("no test users to replay")
        self.users = list(users)
        self.k = k
        rng = random.Random(seed)
        self._picks = [rng.randrange(len(self.users)) for _ in range(1 << 16)]

    def user_of(self, i: int) -> int:
        return self._picks[i % len(self._picks)]

    def request(self, i: int) -> fusionrec_pb2.RecommendRequest:
        u = self.users[self.user_of(i)]
        return fusionrec_pb2.RecommendRequest(user_id=u.user_id, k=self.k, history_item_ids=u.history,
                                              exclude_item_ids=u.exclude, request_id=f"overload-{i}")

    def scorer(self) -> tuple[dict[int, float], Callable[[int, Any], None]]:
        """(request index -> nDCG@k of its answer, the on_answer hook that fills it)."""
        scores: dict[int, float] = {}

        def on_answer(i: int, response: Any) -> None:
            ranked = [item.item_id for item in response.items]
            scores[i] = ndcg_at_k(ranked, set(self.users[self.user_of(i)].positives), NDCG_K)
        return scores, on_answer


def load_replay_users(artifacts_root: Path, data: str | None = None,
                      max_users: int | None = None) -> list[ReplayUser]:
    """The held-out test users of the artifact set, as tools.eval_replay sends them."""
    from common.artifacts import open_artifacts
    from offline.eval_testset import load_eval_set, sample, served_history

    artifacts = open_artifacts(artifacts_root)
    manifest = artifacts.manifest
    build = manifest.get("build_options", {})
    evalset = load_eval_set(artifacts, data or manifest["data_spec"], build.get("max_items"), build.get("max_users"))
    ids = evalset.item_ids
    out = []
    for u in sample(evalset.users, max_users):
        history, older = served_history(u.history)
        out.append(ReplayUser(u.user_id, tuple(ids[i] for i in history), tuple(ids[i] for i in older),
                              frozenset(ids[i] for i in u.positives)))
    return out


# ---------------------------------------------------------------- figures

def _ms(values_s: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(values_s) * 1000.0, q)), 3) if values_s else None


def phase_figures(result: Any, scores: dict[int, float], user_of: Callable[[int], int],
                  factor: float) -> tuple[dict, dict[int, float]]:
    """One phase's figures, and user -> mean nDCG of that user's served answers (for pairing).

    result: a tools.loadtest_engine.LoadResult; scores: request index -> nDCG of each OK answer."""
    summary = report.summarize(result)
    samples = result.samples
    ok = [s for s in samples if s.code == "OK"]
    good = [s for s in ok if not s.degraded]
    shed = [s.latency for s in samples if s.code == SHED_CODE and s.latency is not None]
    sent = len(samples)
    by_user: dict[int, list[float]] = {}
    for i, value in scores.items():
        by_user.setdefault(user_of(i), []).append(value)
    figures = {
        "factor": factor,
        "rate": result.rate,
        "sent": sent,
        "goodput_rps": round(len(good) / result.duration, 2),
        "ok_rps": round(len(ok) / result.duration, 2),
        "shed_share": round(len(shed) / sent, 4) if sent else 0.0,
        "shed_latency_ms": {"p50": _ms(shed, 50), "p99": _ms(shed, 99)},
        "latency_ms": {"p50": summary["latency_ms"]["p50"], "p99": summary["latency_ms"]["p99"]},
        "latency_ok_ms": {"p50": summary["latency_ok_ms"]["p50"], "p99": summary["latency_ok_ms"]["p99"]},
        "degraded_share": summary["degraded_share"],
        "errors": summary["errors"],
        "ndcg_served": round(float(np.mean(list(scores.values()))), 5) if scores else None,
        "ndcg_offered": round(sum(scores.values()) / sent, 5) if sent else None,
        "users_served": len(by_user),
        "client_limited": summary["client_limited"],
        "schedule_lag_ms": summary["schedule_lag_ms"],
    }
    return figures, {u: float(np.mean(v)) for u, v in by_user.items()}


def compare(phases: list[dict], per_user: list[dict[int, float]]) -> dict:
    """Goodput against the peak, quality against the 1x phase (paired by user); the verdict."""
    peak = max((p["goodput_rps"] for p in phases), default=0.0)
    base = per_user[0] if per_user else {}
    base_ndcg = phases[0]["ndcg_served"] if phases else None
    for phase, users in zip(phases, per_user):
        phase["goodput_vs_peak"] = round(phase["goodput_rps"] / peak, 4) if peak else None
        common = sorted(set(users) & set(base))
        phase["ndcg_vs_1x_paired"] = (round(float(np.mean([users[u] - base[u] for u in common])), 5)
                                      if common else None)
        phase["ndcg_vs_1x_users"] = len(common)
        phase["ndcg_served_vs_1x"] = (round(phase["ndcg_served"] / base_ndcg, 4)
                                      if base_ndcg and phase["ndcg_served"] is not None else None)
    judged = [p for p in phases if p["factor"] in TARGET_FACTORS]
    met = bool(judged) and all((p["goodput_vs_peak"] or 0.0) >= GOODPUT_TARGET for p in judged)
    return {"peak_goodput_rps": peak, "goodput_target": GOODPUT_TARGET,
            "target_factors": list(TARGET_FACTORS), "target_met": met}


def holds(summary: dict, p99_target_ms: float, max_bad_share: float) -> bool:
    """A search step holds: p99 on target, errors + degraded answers within the share, client kept up."""
    p99 = summary["latency_ms"]["p99"]
    sent = summary["sent"] or 1
    bad = sum(summary["errors"].values()) + summary["degraded_share"] * summary["ok"]
    return p99 is not None and p99 <= p99_target_ms and bad / sent <= max_bad_share and not summary["client_limited"]


def format_table(doc: dict) -> str:
    security = {True: ", TLS + tokens", False: ", plaintext (--insecure-dev)"}.get(doc.get("tls_and_auth"), "")
    lines = [f"highest rate holding p99 <= {doc['p99_target_ms']:g} ms: {doc['base_rate']:g} rps "
             f"(deadline {doc['deadline_ms']:g} ms{security})",
             f"{'x':>4} {'offered':>8} {'goodput/s':>9} {'vs peak':>7} {'shed':>6} {'shed p50':>8} "
             f"{'p50 ms':>7} {'p99 ms':>7} {'degr':>6} {'nDCG srv':>8} {'nDCG off':>8} {'d vs 1x':>8} {'core-ms':>7} "
             f"{'client':>6}"]
    for p in doc["phases"]:
        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"
        lines.append(
            f"{p['factor']:>4g} {p['rate']:>8.0f} {p['goodput_rps']:>9.1f} {f(p['goodput_vs_peak'], '.0%'):>7} "
            f"{p['shed_share']:>6.1%} {f(p['shed_latency_ms']['p50'], '.1f'):>8} "
            f"{f(p['latency_ms']['p50'], '.1f'):>7} {f(p['latency_ms']['p99'], '.1f'):>7} "
            f"{p['degraded_share']:>6.1%} {f(p['ndcg_served'], '.4f'):>8} {f(p['ndcg_offered'], '.4f'):>8} "
            f"{f(p['ndcg_vs_1x_paired'], '+.4f'):>8} {f(p.get('core_ms_per_request'), '.1f'):>7} "
            f"{f(p.get('client_core_ms_per_request'), '.2f'):>6}"
            + ("  [client-limited]" if p["client_limited"] else ""))
    v = doc["verdict"]
    lines.append(f"non-degraded goodput at {' and '.join(f'{x:g}x' for x in v['target_factors'])} >= "
                 f"{v['goodput_target']:.0%} of the peak ({v['peak_goodput_rps']:.1f}/s): "
                 + ("met" if v["target_met"] else "MISSED"))
    return "\n".join(lines)


# ---------------------------------------------------------------- driving

async def run_overload(target: str, replay: Replay, *, start_rate: float, step: float, max_rate: float,
                       search_duration: float, duration: float, warmup: float, deadline_s: float,
                       factors: Sequence[float] = DEFAULT_FACTORS, p99_target_ms: float = 100.0,
                       max_bad_share: float = 0.01, drain_s: float = 5.0, pause_s: float = 1.0,
                       progress: TextIO | None = None, cpu_seconds: Callable[[], float] | None = None) -> dict:
    """The search, then one phase per factor; the JSON document (see the module docstring).
    cpu_seconds: CPU used so far by the system under test; each phase then reports core-ms per
    request sent and per good answer (warm-up included: its CPU and its requests)."""

    def say(text: str) -> None:
        if progress:
            progress.write(text + "\n")
            progress.flush()

    async def step_at(rate: float, seconds: float, warm: float, on_answer=None):
        result = await run_open_loop(target, rate, seconds, replay.request, warm, deadline_s,
                                     drain_s=drain_s, progress=progress, on_answer=on_answer)
        await asyncio.sleep(pause_s)   # let queues drain between steps
        return result

    search: list[dict] = []
    best, missed = None, None
    rate = start_rate
    while rate <= max_rate + 1e-9:
        say(f"search: {rate:g} rps")
        summary = report.summarize(await step_at(rate, search_duration, min(warmup, 1.0)))
        summary["holds"] = holds(summary, p99_target_ms, max_bad_share)
        search.append(summary)
        if not summary["holds"]:
            missed = rate
            break
        best = rate
        rate += step
    if best is not None and missed is not None and missed - best > step / 4:
        middle = round((best + missed) / 2)
        say(f"search: {middle:g} rps")
        summary = report.summarize(await step_at(middle, search_duration, min(warmup, 1.0)))
        summary["holds"] = holds(summary, p99_target_ms, max_bad_share)
        search.append(summary)
        best = middle if summary["holds"] else best
    base = best if best is not None else start_rate   # nothing held: overload the first step's rate
    phases, per_user = [], []
    for factor in factors:
        say(f"phase {factor:g}x: {base * factor:g} rps")
        scores, on_answer = replay.scorer()
        cpu_before = cpu_seconds() if cpu_seconds else None
        client_before = own_cpu_s()
        result = await step_at(base * factor, duration, warmup, on_answer)
        client_ms = (own_cpu_s() - client_before) * 1000.0
        figures, users = phase_figures(result, scores, replay.user_of, factor)
        # The load client's own CPU (it shares the machine with the system under test).
        figures["client_core_ms_per_request"] = round(client_ms / max(round(base * factor * (warmup + duration)), 1), 3)
        if cpu_before is not None:
            used_ms = (cpu_seconds() - cpu_before) * 1000.0
            sent = max(round(base * factor * (warmup + duration)), 1)
            good = figures["goodput_rps"] * (warmup + duration)   # warm-up served alike
            figures["core_ms_per_request"] = round(used_ms / sent, 3)
            figures["core_ms_per_good_answer"] = round(used_ms / good, 3) if good else None
        phases.append(figures)
        per_user.append(users)
    verdict = compare(phases, per_user)
    return {"mode": "overload", "target": target, "p99_target_ms": p99_target_ms,
            "deadline_ms": deadline_s * 1000.0, "base_rate": base, "base_rate_held": best is not None,
            "test_users": len(replay.users), "phases": phases, "verdict": verdict,
            "search": [{k: s[k] for k in ("rate", "sent", "errors", "degraded_share", "latency_ms",
                                          "client_limited", "holds")} for s in search]}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overload", action="store_true",
                   help="find the highest rate holding --p99-target-ms (default 100 here), then run "
                        "--factors times it and report goodput, shed share, latency and nDCG@10 of the "
                        "test users replayed (writes reports/loadtest/overload.json)")
    p.add_argument("--factors", default="1,2,3,6", help="overload: multiples of the held rate")
    p.add_argument("--search-duration", type=float, default=4.0, help="overload: measured seconds per search step")
    p.add_argument("--test-users", type=int, default=None, help="overload: at most this many test users replayed")
    p.add_argument("--data", default=None, help="overload: <kind>:<path> the build read (default: the manifest's)")


def own_cpu_s() -> float:
    """User + system CPU seconds of this process so far (gRPC's C-core threads included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def processes_cpu_s(pids: Iterable[int]) -> float:
    """User + system CPU seconds so far of these processes and their descendants (Triton runs
    its python backends as child processes). Linux /proc; processes gone count 0."""
    stats: dict[int, tuple[int, int]] = {}   # pid -> (parent pid, CPU ticks)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))   # ppid, utime + stime
    wanted, frontier = set(), set(pids)
    while frontier:
        wanted |= frontier
        frontier = {pid for pid, (parent, _) in stats.items() if parent in frontier} - wanted
    return sum(stats[pid][1] for pid in wanted if pid in stats) / os.sysconf("SC_CLK_TCK")


def drive(args: argparse.Namespace, cpu_seconds: Callable[[], float] | None = None) -> int:
    """The overload mode of `fusionrec loadtest` against args.target (the stack already running);
    cpu_seconds: CPU used so far by the system under test (then each phase reports core-ms)."""
    users = load_replay_users(args.artifacts, args.data, args.test_users)
    replay = Replay(users, args.k, args.seed)
    factors = tuple(float(x) for x in args.factors.split(",") if x.strip())
    if not factors or min(factors) <= 0:
        raise SystemExit(f"--factors: positive numbers, got {args.factors!r}")
    doc = asyncio.run(run_overload(
        args.target, replay, start_rate=args.rate, step=args.ramp_step, max_rate=args.ramp_max,
        search_duration=args.search_duration, duration=args.duration, warmup=args.warmup,
        deadline_s=(args.deadline_ms or 200.0) / 1000.0, factors=factors,
        p99_target_ms=args.p99_target_ms or 100.0, max_bad_share=args.max_error_rate,
        drain_s=args.drain_s, progress=None if args.quiet else sys.stderr, cpu_seconds=cpu_seconds))
    doc["tls_and_auth"] = not getattr(args, "insecure_dev", False)
    out = Path(args.out or "reports/loadtest/overload.json")
    report.write_json(out, doc)
    print(format_table(doc))
    print(f"wrote {out}")
    return 0
