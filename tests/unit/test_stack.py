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


def test_a_nicer_child_keeps_its_pid_and_runs_at_the_lower_priority(tmp_path):
    from tools.stack import Stack
    stack = Stack(tmp_path, tmp_path, tmp_path)
    stack._spawn("sleeper", ["sleep", "30"], dict(os.environ), {}, nice=5)
    popen = stack.processes["sleeper"].popen
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _command(popen.pid) != b"sleep":
            time.sleep(0.02)
        assert _command(popen.pid) == b"sleep"   # setpriv and nice exec'd it in place
        stat = Path(f"/proc/{popen.pid}/stat").read_text()
        assert int(stat[stat.rindex(")") + 2:].split()[16]) == os.nice(0) + 5   # field 19: nice
    finally:
        popen.kill()
        popen.wait()


def test_the_backends_run_nicer_than_the_gateway(tmp_path):
    stack, _ = _recording_stack(tmp_path, insecure_dev=True)
    for name in ("retrieval", "ranking", "gateway"):
        stack.start_service(name)
    assert stack.niceness == {"retrieval": 5, "ranking": 5, "gateway": 0}
    colocated, _ = _recording_stack(tmp_path, colocated=True, insecure_dev=True, backend_nice=0)
    colocated.start_service("gateway")
    assert colocated.niceness == {"gateway": 0}


def _recording_stack(tmp_path, **kwargs):
    """A Stack whose _spawn records argv instead of starting anything."""
    from tools.stack import Stack
    stack = Stack(tmp_path, tmp_path, tmp_path, **kwargs)
    spawned: dict[str, list[str]] = {}
    stack.niceness = {}

    def spawn(name, argv, env, ports, nice=0):
        spawned[name] = argv
        stack.niceness[name] = nice
        stack._ports[name] = ports
    stack._spawn = spawn
    stack._ports["triton"] = {"grpc": 1, "http": 2, "metrics": 3}
    return stack, spawned


def _flags(argv: list[str]) -> dict[str, str]:
    return {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}


def test_one_replica_keeps_the_service_names_and_plain_addresses(tmp_path):
    stack, spawned = _recording_stack(tmp_path)
    for name in ("retrieval", "ranking", "gateway"):
        assert stack.names(name) == [name]
        stack.start_service(name)
    gw = _flags(spawned["gateway"])
    assert gw["--retrieval-addr"] == stack.addr("retrieval") and "," not in gw["--retrieval-addr"]
    assert gw["--state"] == gw["--item-log"] == f"sqlite:{tmp_path / 'state.db'}"
    assert gw["--event-log"] == str(tmp_path / "events")
    for name in ("retrieval", "ranking"):
        assert _flags(spawned[name])["--item-log"] == gw["--item-log"]


def test_replicas_get_their_own_ports_and_gateways_a_multi_address_target(tmp_path):
    store = "redis://127.0.0.1:6399/0"
    stack, spawned = _recording_stack(tmp_path, replicas={"retrieval": 2, "ranking": 2, "gateway": 2}, store=store)
    assert stack.names("retrieval") == ["retrieval-0", "retrieval-1"]
    for service in ("retrieval", "ranking", "gateway"):
        for name in stack.names(service):
            stack.start_service(name)
    ports = [stack.addr(n) for n in stack.names("retrieval") + stack.names("ranking") + stack.names("gateway")]
    assert len(set(ports)) == 6
    target = stack.target("retrieval")
    assert target == f"ipv4:{stack.addr('retrieval-0')},{stack.addr('retrieval-1')}"
    for gateway in stack.names("gateway"):
        flags = _flags(spawned[gateway])
        assert flags["--retrieval-addr"] == target and flags["--ranking-addr"] == stack.target("ranking")
        assert flags["--state"] == flags["--item-log"] == store
    assert _flags(spawned["gateway-0"])["--event-log"] != _flags(spawned["gateway-1"])["--event-log"]
    assert all(_flags(spawned[n])["--item-log"] == store for n in stack.names("ranking"))


def test_a_restarted_replica_keeps_its_ports(tmp_path):
    stack, spawned = _recording_stack(tmp_path, replicas={"retrieval": 2})
    stack.start_service("retrieval-1")
    before = dict(stack._ports["retrieval-1"])
    stack.kill = lambda name, sig=None: None
    stack.wait_healthy = lambda name, timeout_s: None
    stack.restart("retrieval-1")
    assert stack._ports["retrieval-1"] == before
    assert _flags(spawned["retrieval-1"])["--port"] == str(before["grpc"])


def test_bad_replica_counts_are_refused(tmp_path):
    import pytest
    from tools.stack import Stack
    with pytest.raises(ValueError, match="unknown services"):
        Stack(tmp_path, tmp_path, tmp_path, replicas={"triton": 2})
    with pytest.raises(ValueError, match="at least 1"):
        Stack(tmp_path, tmp_path, tmp_path, replicas={"gateway": 0})


def test_a_colocated_stack_starts_gateways_that_hold_retrieval_and_ranking(tmp_path):
    import pytest
    from tools.stack import Stack
    stack, spawned = _recording_stack(tmp_path, colocated=True, replicas={"gateway": 2}, insecure_dev=True)
    assert stack.names("retrieval") == stack.names("ranking") == []
    for name in stack.names("gateway"):
        stack.start_service(name)
    assert sorted(spawned) == ["gateway-0", "gateway-1"]
    for argv in spawned.values():
        assert argv[argv.index("-m") + 1] == "tools.colocated"
        flags = _flags(argv)
        assert "--retrieval-addr" not in flags and "--ranking-addr" not in flags
        assert flags["--triton-url"] == stack.addr("triton") and flags["--item-log"] == flags["--state"]
    with pytest.raises(ValueError, match="colocated"):
        Stack(tmp_path, tmp_path, tmp_path, colocated=True, replicas={"ranking": 2})


def test_a_stopped_tritons_orphaned_backend_stubs_are_reaped(tmp_path):
    """A stub ignores SIGTERM and outlives a tritonserver killed before its graceful exit; the
    stack kills the ones naming that server's pid, and only those."""
    from tools.stack import reap_backend_stubs
    stub = tmp_path / "triton_python_backend_stub"
    stub.symlink_to(sys.executable)   # a process whose argv[0] is the stub's name
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    mine = subprocess.Popen([str(stub), "-c", code, "model.py", "424242"])
    other = subprocess.Popen([str(stub), "-c", code, "model.py", "434343"])
    try:
        time.sleep(0.3)
        assert reap_backend_stubs(424242) == 1
        assert mine.wait(5) == -signal.SIGKILL
        assert other.poll() is None
    finally:
        for p in (mine, other):
            p.kill()
            p.wait()
