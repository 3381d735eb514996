"""Declared pipelines: a request runs a fixed list of named steps, top to bottom.

Each step has a policy. A fail-open step that raises is recorded (its degraded reason) and the
pipeline goes on without its output; a fail-closed step's error propagates. Every step is timed
into `stage_ms[name]`, so the list of steps is also the list of stages a response reports.
"""
from __future__ import annotations

import asyncio
import inspect
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

C = TypeVar("C")   # the request's context object, which the steps read and fill in


class StepFailed(Exception):
    """Raised by a step to fail with a specific degraded reason (else the step's own is used)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


@dataclass(frozen=True)
class Step(Generic[C]):
    name: str                        # stage name: metric label and stage_ms key
    run: Callable[[C], Any]          # may be a coroutine function
    fail_open: bool                  # True: a failure degrades the answer; False: it fails the call
    reason: str = ""                 # degraded reason when it fails open (default: "<name>_error")

    def failure_reason(self, error: BaseException) -> str:
        return error.reason if isinstance(error, StepFailed) else (self.reason or f"{self.name}_error")


@contextmanager
def _policy(step: Step, stage_ms: dict[str, float], degraded: list[str]) -> Iterator[None]:
    """Time one step; a fail-open step's error becomes its degraded reason, a fail-closed one propagates."""
    start = time.perf_counter()
    try:
        yield
    except Exception as e:   # noqa: BLE001 - the policy decides
        if not step.fail_open:
            raise
        degraded.append(step.failure_reason(e))
    finally:
        stage_ms[step.name] = (time.perf_counter() - start) * 1000.0


def run_steps(steps: list[Step[C]], ctx: C, stage_ms: dict[str, float],
              degraded: list[str]) -> C:
    """Synchronous steps (retrieval, offline): degraded collects the reasons of fail-open failures."""
    for step in steps:
        with _policy(step, stage_ms, degraded):
            step.run(ctx)
    return ctx


async def run_steps_yielding(steps: list[Step[C]], ctx: C, stage_ms: dict[str, float],
                             degraded: list[str]) -> C:
    """As run_steps, inside an event loop: it yields to the loop after each step, so a loop that
    also accepts and refuses other calls (a service's own, or the colocated gateway's) is never
    held for a whole retrieval, only for one step."""
    for step in steps:
        with _policy(step, stage_ms, degraded):
            step.run(ctx)
        await asyncio.sleep(0)
    return ctx


async def run_steps_async(steps: list[Step[C]], ctx: C, stage_ms: dict[str, float],
                          degraded: list[str]) -> C:
    """As run_steps; a step may be a coroutine function (gateway hops)."""
    for step in steps:
        with _policy(step, stage_ms, degraded):
            result = step.run(ctx)
            if inspect.isawaitable(result):
                await result
    return ctx
