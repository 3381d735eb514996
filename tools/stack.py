"""Start and stop the whole system on loopback: Triton, retrieval, ranking, gateway.

Ports are chosen at run time. Children get PR_SET_PDEATHSIG so none outlives the supervisor,
and each is checked to be our own process and up (gRPC health SERVING, Triton model ready).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.artifacts import latest_dir
from core.features import FUSED_RANKER_NAME, TEXT_ENCODER_NAME
from common.logs import get_logger
from common.triton import REPO, triton_command

log = get_logger("stack")
HOST = "127.0.0.1"
TRITON_MODELS = (FUSED_RANKER_NAME, TEXT_ENCODER_NAME)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# Children get PR_SET_PDEATHSIG from util-linux's setpriv rather than a preexec_fn: a preexec_fn
# forces fork(), and gRPC's fork handlers can block fork() forever while its threads are busy
# (seen in the test suite); without one, subprocess uses vfork and no fork handler runs.
SETPRIV = shutil.which("setpriv")


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log_path: Path
    ports: dict[str, int] = field(default_factory=dict)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Stack:
    def __init__(self, artifacts: Path, model_repo: Path, run_dir: Path,
                 gateway_args: list[str] | None = None, ranking_args: list[str] | None = None) -> None:
        self.artifacts = Path(artifacts).resolve()
        self.model_repo = Path(model_repo).resolve()
        self.run_dir = Path(run_dir).resolve()
        self.gateway_args = gateway_args or []
        self.ranking_args = ranking_args or []
        self.processes: dict[str, Process] = {}

    # -- addresses
    def addr(self, name: str) -> str:
        return f"{HOST}:{self.processes[name].ports['grpc']}"

    def metrics_url(self, name: str) -> str:
        return f"http://{HOST}:{self.processes[name].ports['metrics']}/metrics"

    # -- lifecycle
    def start(self, timeout_s: float = 180.0) -> "Stack":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        latest_dir(self.artifacts)   # fail early, with the hint, when nothing is built
        try:
            self.start_triton(timeout_s)
            for name in ("retrieval", "ranking"):
                self.start_service(name, self.artifacts)   # services follow LATEST (hot swap)
            for name in ("retrieval", "ranking"):
                self.wait_healthy(name, timeout_s)
            self.start_service("gateway", self.artifacts)
            self.wait_healthy("gateway", timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def start_triton(self, timeout_s: float = 180.0) -> None:
        ports = {"grpc": free_port(), "http": free_port(), "metrics": free_port()}
        argv, env = triton_command(self.model_repo, ports["grpc"], ports["http"], ports["metrics"],
                                   list(TRITON_MODELS), HOST)
        self._spawn("triton", argv, env, ports)
        self.wait_triton(timeout_s)

    def start_service(self, name: str, artifacts: Path) -> None:
        ports = {"grpc": free_port(), "metrics": free_port()}
        argv = [sys.executable, "-m", f"{name}.server", "--port", str(ports["grpc"]),
                "--metrics-port", str(ports["metrics"]), "--artifacts", str(artifacts)]
        if name == "ranking":
            argv += ["--triton-url", self.addr("triton"), *self.ranking_args]
        if name == "gateway":
            argv += ["--retrieval-addr", self.addr("retrieval"), "--ranking-addr", self.addr("ranking"),
                     "--triton-url", self.addr("triton"), "--state", f"sqlite:{self.run_dir / 'state.db'}",
                     "--event-log", str(self.run_dir / "events"), *self.gateway_args]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        self._spawn(name, argv, env, ports)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], ports: dict[str, int]) -> None:
        log_path = self.run_dir / f"{name}.log"
        command, preexec = ([SETPRIV, "--pdeathsig", "TERM", *argv], None) if SETPRIV else (argv, _die_with_parent)
        with open(log_path, "ab") as out:
            popen = subprocess.Popen(command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=preexec)
        self.processes[name] = Process(name, popen, log_path, ports)
        log.info("started", extra={"component": name, "pid": popen.pid, "ports": ports})

    def _check_alive(self, name: str) -> None:
        proc = self.processes[name]
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.popen.returncode}; last log lines:\n{proc.tail()}")

    def wait_triton(self, timeout_s: float) -> None:
        import tritonclient.grpc as triton_grpc
        client = triton_grpc.InferenceServerClient(self.addr("triton"))
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                self._check_alive("triton")
                try:
                    if client.is_server_ready() and all(client.is_model_ready(m) for m in TRITON_MODELS):
                        return
                except Exception:  # not listening yet
                    pass
                time.sleep(0.25)
        finally:
            client.close()
        raise TimeoutError(f"triton not ready after {timeout_s}s:\n{self.processes['triton'].tail()}")

    def wait_healthy(self, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.addr(name)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                self._check_alive(name)
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"{name} not SERVING after {timeout_s}s:\n{self.processes[name].tail()}")

    def kill(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> None:
        proc = self.processes.get(name)
        if proc is None or proc.popen.poll() is not None:
            return
        proc.popen.send_signal(sig)
        try:
            proc.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait()

    def stop(self) -> None:
        for name in ("gateway", "ranking", "retrieval", "triton"):
            self.kill(name)

    def pids(self) -> dict[str, int]:
        return {n: p.popen.pid for n, p in self.processes.items() if p.popen.poll() is None}

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
