"""tools/supervisor.py on fake processes and a fake clock: restart on exit, backoff schedule,
crash loops capped and reported, the backoff reset after a stable run, stop."""
from __future__ import annotations

import json
import logging
import threading

import pytest

from tools.supervisor import Backoff, Supervisor, exit_description


class FakePopen:
    _next_pid = 1000

    def __init__(self) -> None:
        FakePopen._next_pid += 1
        self.pid = FakePopen._next_pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode


class FakeProcess:
    def __init__(self) -> None:
        self.popen = FakePopen()


class FakeStack:
    """What the supervisor uses of tools.stack.Stack; records every start."""

    def __init__(self, names=("triton", "retrieval", "ranking", "gateway")) -> None:
        self.processes = {n: FakeProcess() for n in names}
        self.started: list[tuple[str, dict]] = []
        self.fail_starts: set[str] = set()

    def start_service(self, name: str) -> None:
        self._started(name, {})

    def start_triton(self, wait: bool = True) -> None:
        self._started("triton", {"wait": wait})

    def _started(self, name: str, kwargs: dict) -> None:
        self.started.append((name, kwargs))
        if name in self.fail_starts:
            raise OSError("cannot start")
        self.processes[name] = FakeProcess()

    def crash(self, name: str, code: int = -9) -> None:
        self.processes[name].popen.returncode = code


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup():
    stack, clock = FakeStack(), Clock()
    return stack, clock, Supervisor(stack, clock=clock, sleep=lambda s: None)


def restart_times(stack: FakeStack, sup: Supervisor, clock: Clock, name: str, exits: int,
                  step: float = 0.125, up_s: float = 0.0) -> list[float]:
    """Crash `name` `exits` times (each new process after `up_s`); the waits before each restart."""
    waits = []
    for _ in range(exits):
        clock.now += up_s
        stack.crash(name)
        sup.check()
        crashed, before = clock.now, len(stack.started)
        while len(stack.started) == before:
            clock.now += step
            sup.check()
        waits.append(round(clock.now - crashed, 2))
    return waits


def test_backoff_doubles_to_the_cap():
    b = Backoff(initial_s=0.5, max_s=30.0)
    assert [b.delay(n) for n in range(1, 10)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


def test_exited_child_restarted_after_initial_backoff_others_untouched(setup):
    stack, clock, sup = setup
    others = {n: stack.processes[n].popen for n in ("triton", "retrieval", "gateway")}
    stack.crash("ranking")
    sup.check()
    assert stack.started == []                   # not before the backoff
    clock.now += 0.49
    sup.check()
    assert stack.started == []
    clock.now += 0.02
    sup.check()
    assert stack.started == [("ranking", {})]
    assert stack.processes["ranking"].popen.poll() is None
    assert {n: stack.processes[n].popen for n in others} == others   # the rest kept running
    assert sup.children["ranking"].restarts == 1


def test_quick_exits_back_off_exponentially_and_stay_at_the_cap(setup):
    stack, clock, sup = setup
    waits = restart_times(stack, sup, clock, "retrieval", exits=9)
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert sup.children["retrieval"].restarts == 9   # a crash loop keeps being retried


def test_backoff_resets_after_staying_up(setup):
    stack, clock, sup = setup
    assert restart_times(stack, sup, clock, "ranking", exits=3) == [0.5, 1.0, 2.0]
    # up longer than stable_s: the next exit is a first one again
    assert restart_times(stack, sup, clock, "ranking", exits=2, up_s=61.0) == [0.5, 0.5]


def test_triton_restarts_without_waiting(setup):
    stack, clock, sup = setup
    stack.crash("triton", code=1)
    sup.check()
    clock.now += 0.5
    sup.check()
    assert stack.started == [("triton", {"wait": False})]


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_crash_loop_is_logged_structured(setup):
    stack, clock, sup = setup
    logger, seen = logging.getLogger("fusionrec.supervisor"), Records()
    logger.addHandler(seen)
    try:
        restart_times(stack, sup, clock, "ranking", exits=4)
    finally:
        logger.removeHandler(seen)
    exits = [r for r in seen.records if r.msg.startswith("child exited") or "crash" in r.msg]
    assert [r.levelname for r in exits] == ["WARNING", "WARNING", "ERROR", "ERROR"]
    last = exits[-1]
    assert last.component == "ranking" and last.exit == "signal SIGKILL" and last.quick_exits == 4
    assert last.restart_in_s == 4.0
    from common.logs import JsonFormatter
    entry = json.loads(JsonFormatter().format(last))   # one JSON object, the fields as keys
    assert entry["component"] == "ranking" and entry["level"] == "error"


def test_failed_start_counts_as_a_quick_exit(setup):
    stack, clock, sup = setup
    stack.fail_starts.add("ranking")
    stack.crash("ranking")
    waits = restart_times_failing(stack, sup, clock, "ranking", starts=3)
    assert waits == [0.5, 1.0, 2.0]                  # each failed start backs off further
    stack.fail_starts.clear()
    clock.now += 4.0
    sup.check()
    assert stack.processes["ranking"].popen.poll() is None


def restart_times_failing(stack, sup, clock, name, starts):
    sup.check()
    waits, last = [], clock.now
    while len(waits) < starts:
        before = len(stack.started)
        clock.now += 0.125   # exact in binary: the sums below stay exact
        sup.check()
        if len(stack.started) > before:
            waits.append(round(clock.now - last, 2))
            last = clock.now
    return waits


def test_stop_ends_run_and_no_restart_after_it():
    stack, clock = FakeStack(), Clock()
    sup = Supervisor(stack, clock=clock, poll_s=0.01)
    runner = threading.Thread(target=sup.run, daemon=True)
    runner.start()
    sup.stop()
    runner.join(2)
    assert not runner.is_alive()
    stack.crash("gateway")
    clock.now += 60
    sup.check()   # a stopped supervisor starts nothing (the stack is being stopped)
    assert stack.started == []


def test_run_until():
    stack, clock = FakeStack(), Clock()
    calls = []
    sup = Supervisor(stack, clock=clock, sleep=lambda s: calls.append(s), poll_s=0.2)
    sup.run(until=lambda: len(calls) >= 3)
    assert calls == [0.2, 0.2, 0.2]


def test_exit_description():
    assert exit_description(-9) == "signal SIGKILL"
    assert exit_description(1) == "exit 1"
    assert exit_description(None) == "start failed"


def test_every_client_channel_retries_a_returning_dependency_within_a_second():
    """Our channels and the Triton clients carry the capped backoff; with gRPC's +-20% jitter
    the longest wait between connect attempts stays under 1 s."""
    from common.client import RECONNECT_OPTIONS, channel_options, triton_channel_args
    options = dict(RECONNECT_OPTIONS)
    assert options["grpc.max_reconnect_backoff_ms"] * 1.2 < 1000
    assert options["grpc.initial_reconnect_backoff_ms"] <= options["grpc.max_reconnect_backoff_ms"]
    for opts in (channel_options(), triton_channel_args()):
        assert set(RECONNECT_OPTIONS) <= set(opts)
