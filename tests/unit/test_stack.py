"""The stack supervisor's children never outlive it, and starting them never forks the supervisor."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SUPERVISOR = """
import os, sys, time
from tools.stack import Stack
stack = Stack(sys.argv[1], sys.argv[1], sys.argv[1])
stack._spawn("sleeper", ["sleep", "120"], dict(os.environ), {})
print(stack.processes["sleeper"].popen.pid, flush=True)
time.sleep(120)
"""


def _command(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]


def test_children_die_with_a_killed_supervisor(tmp_path):
    supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(tmp_path)], cwd=REPO,
                                  stdout=subprocess.PIPE, text=True)
    child = int(supervisor.stdout.readline())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _command(child) != b"sleep":
        time.sleep(0.02)
    assert _command(child) == b"sleep"   # setpriv exec'd it in place: same pid, no wrapper left
    os.kill(supervisor.pid, signal.SIGKILL)   # no cleanup code runs: only PDEATHSIG can stop the child
    supervisor.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{child}").exists() and \
            Path(f"/proc/{child}/stat").read_text().split()[2] != "Z":
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists() or Path(f"/proc/{child}/stat").read_text().split()[2] == "Z"


def test_children_start_without_a_preexec_fn():
    """A preexec_fn forces fork(), which gRPC's fork handlers can block forever (see tools/stack.py)."""
    from tools.stack import SETPRIV
    assert SETPRIV, "setpriv (util-linux) is required to start children"
