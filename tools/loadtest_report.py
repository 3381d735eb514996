"""Summaries, JSON and PNG for tools.loadtest results (kept apart so the sender stays small)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tools.loadtest_engine import LoadResult

PERCENTILES = {"p50": 50, "p90": 90, "p99": 99, "p99.9": 99.9}
# A client whose sends run this late is measuring itself, not the server: the summary says so.
LAG_WARN_MS = 5.0


def _pcts(values_s: list[float], which: dict[str, float]) -> dict[str, float | None]:
    if not values_s:
        return {name: None for name in which}
    arr = np.asarray(values_s) * 1000.0
    return {name: round(float(np.percentile(arr, q)), 3) for name, q in which.items()}


def summarize(result: "LoadResult") -> dict:
    """Everything a report needs, in milliseconds and requests/s; JSON-ready."""
    samples = result.samples
    answered = [s for s in samples if s.latency is not None]
    ok = [s for s in answered if s.code == "OK"]
    codes = Counter(s.code for s in samples)
    errors = {code: n for code, n in sorted(codes.items()) if code != "OK"}
    stage_sum: Counter[str] = Counter()
    stage_n: Counter[str] = Counter()
    for s in ok:
        for stage, ms in s.stage_ms.items():
            stage_sum[stage] += ms
            stage_n[stage] += 1
    lags = [s.lag for s in samples]
    lag = _pcts(lags, {"p50": 50, "p99": 99})
    lag["max"] = round(max(lags) * 1000.0, 3) if lags else None
    sent = len(samples)
    return {
        "target": result.target,
        "rate": result.rate,
        "duration_s": result.duration,
        "warmup_s": result.warmup,
        "deadline_ms": result.deadline_s * 1000.0 if result.deadline_s else None,
        "scheduled": sent + result.not_sent,
        "sent": sent,
        "not_sent": result.not_sent,
        "answered": len(answered),
        "ok": len(ok),
        "offered_rps": round(sent / result.duration, 2),
        "achieved_rps": round(len(answered) / result.wall_s, 2),
        # Latency of every answered call, errors included: a fast error is still an answer.
        "latency_ms": _pcts([s.latency for s in answered], PERCENTILES),
        "latency_ok_ms": _pcts([s.latency for s in ok], PERCENTILES),
        "errors": errors,
        "error_rate": round(sum(errors.values()) / sent, 6) if sent else 0.0,
        "degraded_share": round(sum(s.degraded for s in ok) / len(ok), 6) if ok else 0.0,
        "stage_ms_mean": {k: round(stage_sum[k] / stage_n[k], 3) for k in sorted(stage_sum)},
        "schedule_lag_ms": lag,
        "client_limited": bool(result.not_sent or (lag["p99"] or 0.0) > LAG_WARN_MS),
    }


def step_holds(summary: dict, p99_target_ms: float, max_error_rate: float) -> bool:
    """A ramp step holds when p99 and the error share meet the targets and the client kept up."""
    p99 = summary["latency_ms"]["p99"]
    return (p99 is not None and p99 <= p99_target_ms and summary["error_rate"] <= max_error_rate
            and not summary["client_limited"])


def best_rate(steps: list[dict], p99_target_ms: float, max_error_rate: float) -> float | None:
    held = [s["rate"] for s in steps if step_holds(s, p99_target_ms, max_error_rate)]
    return max(held) if held else None


def format_summary(s: dict) -> str:
    lat, lag = s["latency_ms"], s["schedule_lag_ms"]
    lines = [
        f"rate {s['rate']:g} rps: sent {s['sent']} (not sent {s['not_sent']}), answered "
        f"{s['answered']}, achieved {s['achieved_rps']:.1f} rps",
        "  latency ms " + " ".join(f"{k}={v}" for k, v in lat.items()),
        f"  errors {s['errors'] or 'none'} (rate {s['error_rate']:.2%}), "
        f"degraded {s['degraded_share']:.2%}",
        "  stage means ms " + (" ".join(f"{k}={v}" for k, v in s["stage_ms_mean"].items()) or "-"),
        f"  schedule lag ms p50={lag['p50']} p99={lag['p99']} max={lag['max']}"
        + ("  [client-limited: figures are not trustworthy]" if s["client_limited"] else ""),
    ]
    if "holds" in s:
        lines[0] += "  HOLDS" if s["holds"] else "  FAILS"
    return "\n".join(lines)


def write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt
    return plt


def plot_latency(path: Path, result: "LoadResult") -> None:
    """Each answered request as a dot (errors in red) plus per-second p50/p99 lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ok = [(s.at, s.latency * 1000) for s in result.samples if s.latency is not None and s.code == "OK"]
    bad = [(s.at, s.latency * 1000) for s in result.samples
           if s.latency is not None and s.code != "OK"]
    if ok:
        ax.scatter(*zip(*ok), s=2, alpha=0.3, color="tab:blue", label="OK")
    if bad:
        ax.scatter(*zip(*bad), s=4, alpha=0.6, color="tab:red", label="error")
    # ~20 windows per run (0.1 s to 5 s wide) so short and long runs both show a trend.
    width = min(max(result.duration / 20, 0.1), 5.0)
    bins: dict[int, list[float]] = {}
    for at, ms in ok + bad:
        bins.setdefault(int(at / width), []).append(ms)
    if bins:
        xs = sorted(bins)
        for q, style in ((50, "-"), (99, "--")):
            ax.plot([(x + 0.5) * width for x in xs], [np.percentile(bins[x], q) for x in xs],
                    style, color="black", label=f"p{q} per {width:g} s")
    ax.set_xlabel("seconds since the end of warm-up (scheduled send time)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"{result.target} at {result.rate:g} rps")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_ramp(path: Path, steps: list[dict], p99_target_ms: float) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    rates = [s["rate"] for s in steps]
    for key, style in (("p50", "o-"), ("p99", "s-")):
        ax.plot(rates, [s["latency_ms"][key] or np.nan for s in steps], style, label=key)
    ax.axhline(p99_target_ms, color="tab:red", linestyle=":", label="p99 target")
    ax.set_xlabel("offered rate (requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
