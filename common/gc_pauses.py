"""Garbage-collector pauses of a serving process: measured, and kept off what was loaded at start.

A full (generation 2) collection walks every tracked object of the process, and it runs on the
event loop's thread, so every request in flight waits for it. `freeze_loaded()` (after a
service's first version is loaded) moves what exists then to the permanent generation, as the
Python docs advise for servers: the catalog, tables and models are never walked again;
`refreeze()` after each version swap collects what was let go of (frozen objects in reference
cycles would otherwise never be freed) and freezes the new state. Every
collection is timed: `fusionrec_gc_pause_seconds{generation}`, and one of 50 ms or more is
logged.
"""
from __future__ import annotations

import gc
import time

from prometheus_client import Histogram

from common.logs import get_logger

log = get_logger("gc")
GC_PAUSE = Histogram("fusionrec_gc_pause_seconds", "Garbage-collector pauses of this process, by generation",
                     ["generation"], buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
SLOW_S = 0.05
_started: list[float] = []


def _on_gc(phase: str, info: dict) -> None:
    if phase == "start":
        _started.append(time.perf_counter())
    elif _started:
        elapsed = time.perf_counter() - _started.pop()
        GC_PAUSE.labels(str(info.get("generation", ""))).observe(elapsed)
        if elapsed >= SLOW_S:
            log.warning("slow gc pause", extra={"generation": info.get("generation"), "ms": round(elapsed * 1000, 1),
                                                "collected": info.get("collected")})


def watch_pauses() -> None:
    """Time every collection of this process (idempotent)."""
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)


def freeze_loaded() -> None:
    """What the process holds now is never collected again: collect once, then freeze."""
    gc.collect()
    gc.freeze()


def refreeze() -> None:
    """After a version swap: what the process no longer holds is collected, cycles included (a
    frozen object in a reference cycle is never collected), then what it holds now is frozen.
    No-op while nothing is frozen (a process that never reported SERVING, or a test)."""
    if gc.get_freeze_count():
        gc.unfreeze()
        freeze_loaded()


def unwatch_pauses() -> None:
    """Stop timing (a test process that ran a server in process, before its streams close)."""
    if _on_gc in gc.callbacks:
        gc.callbacks.remove(_on_gc)
