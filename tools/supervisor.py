"""Keep every child of a Stack running (`fusionrec run`): a child that exits is started again on
the ports it had, after a backoff, while the others keep serving.

Backoff per child: 0.5 s before the first restart, doubling with each quick exit up to 30 s; a
child that stayed up `stable_s` counts as healthy again (its next exit waits 0.5 s). From the
third quick exit on, each exit is logged as a crash loop (error level) and the child keeps being
retried at the backoff (30 s at most): a dependency it needs may come back (ranking exits at
start while Triton is down). Restarts do not wait for the child to be ready, so one slow start
(Triton: tens of seconds) never delays noticing another exit. Triton restarts with its
--load-model list and loads the models itself; ranking's and the gateways' channels reconnect
to the same ports (common/client.py).

Children get PR_SET_PDEATHSIG, which Linux ties to the *thread* that started them: run() must
run on a thread that lives as long as the children (the main thread in `fusionrec run`).
"""
from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

from common.logs import get_logger
from tools.stack import reap_backend_stubs

log = get_logger("supervisor")


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 0.5
    max_s: float = 30.0
    stable_s: float = 60.0        # up this long: the next exit counts as the first again
    crash_loop_after: int = 3     # this many quick exits in a row: reported as a crash loop

    def delay(self, failures: int) -> float:
        """The wait before restarting after the `failures`-th quick exit in a row (1-based)."""
        return min(self.initial_s * 2 ** max(failures - 1, 0), self.max_s)


@dataclass
class Child:
    started_at: float
    failures: int = 0                 # quick exits in a row (reset by staying up stable_s)
    restart_at: float | None = None   # set while the child is down: when it starts again
    restarts: int = 0


def exit_description(code: int | None) -> str:
    """`signal SIGKILL`, `exit 1`, or `start failed` (code None)."""
    if code is None:
        return "start failed"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit {code}"


class Supervisor:
    """stack: a started tools.stack.Stack (anything with `.processes` {name: Process with .popen},
    `.start_service(name)` and `.start_triton(wait=False)`). clock/sleep: injectable for tests.
    start: how one child is started again (default: the stack's own start calls, same ports)."""

    def __init__(self, stack, backoff: Backoff = Backoff(), poll_s: float = 0.2,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] | None = None,
                 start: Callable[[str], None] | None = None) -> None:
        self.stack = stack
        self.backoff = backoff
        self.poll_s = poll_s
        self.clock = clock
        self._stopped = threading.Event()
        self.sleep = sleep or self._stopped.wait   # stop() cuts a real wait short
        self.start = start or self._start
        now = clock()
        self.children: dict[str, Child] = {name: Child(now) for name in stack.processes}

    def _start(self, name: str) -> None:
        if name == "triton":
            reap_backend_stubs(self.stack.processes[name].popen.pid)   # the dead server's orphans
            self.stack.start_triton(wait=False)
        else:
            self.stack.start_service(name)

    def check(self) -> None:
        """One pass: note the children that exited, start those whose backoff is over."""
        for name, child in self.children.items():
            if self._stopped.is_set():
                return
            now = self.clock()
            if child.restart_at is None:
                code = self.stack.processes[name].popen.poll()
                if code is None:
                    continue
                self._exited(name, child, code, now)
            if child.restart_at is not None and now >= child.restart_at:
                self._restart(name, child)

    def _exited(self, name: str, child: Child, code: int | None, now: float) -> None:
        up_s = now - child.started_at
        child.failures = 1 if up_s >= self.backoff.stable_s else child.failures + 1
        delay = self.backoff.delay(child.failures)
        child.restart_at = now + delay
        extra = {"component": name, "exit": exit_description(code), "up_s": round(up_s, 2),
                 "restart_in_s": delay, "quick_exits": child.failures, "restarts": child.restarts}
        if child.failures >= self.backoff.crash_loop_after:
            log.error("child crash-looping; retrying at backoff", extra=extra)
        else:
            log.warning("child exited; restarting", extra=extra)

    def _restart(self, name: str, child: Child) -> None:
        child.restart_at = None
        child.started_at = self.clock()
        child.restarts += 1
        try:
            self.start(name)
        except Exception as e:  # noqa: BLE001 - a failed start is one more quick exit, never fatal
            log.error("child restart failed", extra={"component": name, "reason": type(e).__name__})
            self._exited(name, child, None, self.clock())
            return
        log.info("child restarted", extra={"component": name, "pid": self.stack.processes[name].popen.pid,
                                            "restarts": child.restarts})

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Check every poll_s until stop() (or `until()` is true)."""
        while not self._stopped.is_set() and not (until is not None and until()):
            self.check()
            self.sleep(self.poll_s)

    def stop(self) -> None:
        """No more restarts (then the caller stops the stack)."""
        self._stopped.set()
