"""Start and stop the whole system on loopback: Triton, and one or more replicas of retrieval,
ranking and gateway.

Ports are chosen at run time, once per process: a replica restarted with `restart(name)` keeps
its ports, so the gateways' multi-address channels reconnect to it. Children get PR_SET_PDEATHSIG
so none outlives the supervisor, and each is checked to be our own process and up (gRPC health
SERVING, Triton model ready).

Names: with one replica of a service its process is named after the service (`gateway`); with
several, `gateway-0`, `gateway-1`, ... Every service opens the same item log (`--item-log`) and
the gateways the same user-state store (`--state`): a SQLite file in the run folder by default,
or the `store` given (e.g. `redis://127.0.0.1:6379/0`, needed once the replicas share a store
across machines; SQLite works for processes of one machine). Each gateway gets the gRPC target
`ipv4:127.0.0.1:p0,127.0.0.1:p1` naming every retrieval (ranking) replica, and spreads calls over
them round-robin; each gateway writes its own event-log folder (one writer per folder).

Security is on unless `insecure_dev=True`: a throwaway PKI in `run_dir/pki` (common/pki.py), TLS
flags for every child and mTLS for Triton (HTTP off, model control behind a per-stack header
secret only ranking gets), a tokens file for the gateways, and `run_dir/credentials.json` for API
callers. `channel()` (operator cert) and `gateway_channel()` (client cert + token) carry it.
"""
from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.artifacts import latest_dir
from common.pki import Pki, ensure_pki
from common.security import Security
from core.features import FUSED_RANKER_NAME, SEQ_ENCODER_NAME, TEXT_ENCODER_NAME
from common.logs import get_logger
from common.triton import REPO, admin_headers, triton_command

log = get_logger("stack")
HOST = "127.0.0.1"
TRITON_MODELS = (FUSED_RANKER_NAME, TEXT_ENCODER_NAME)
# Loaded too when the model repository has it (a build before the sequential channel has not).
OPTIONAL_TRITON_MODELS = (SEQ_ENCODER_NAME,)
SERVICES = ("retrieval", "ranking", "gateway")   # start order: the gateway needs the other two
BACKENDS = ("retrieval", "ranking")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# Children get PR_SET_PDEATHSIG from util-linux's setpriv rather than a preexec_fn: a preexec_fn
# forces fork(), and gRPC's fork handlers can block fork() forever while its threads are busy
# (seen in the test suite); without one, subprocess uses vfork and no fork handler runs.
SETPRIV = shutil.which("setpriv")
NICE = shutil.which("nice")
# On one host the gateway must get the CPU first: it is where overload is refused. With every
# process at one priority, a saturated host queued calls before the gateway's admission gate saw
# them, and refusals came after 5-29 ms; with retrieval, ranking and Triton 5 nice levels down,
# after 3.4-4.1 ms at 2-6x the sustainable rate, which did not change (README "Overload"). Below
# saturation the priority changes nothing. (In Kubernetes each pod has its own CPU request.)
BACKEND_NICE = 5


def write_secret(path: Path, text: str) -> None:
    """A file only its owner can read (created 0600, then filled)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def service_of(name: str) -> str:
    """`retrieval-1` -> `retrieval`; `gateway` -> `gateway`; `gateway-redis` -> `gateway`."""
    return name.split("-", 1)[0]


def reap_backend_stubs(triton_pid: int) -> int:
    """SIGKILL the python-backend stubs a stopped tritonserver left behind; how many. A
    tritonserver killed before its graceful exit (SIGKILL, or SIGTERM past our wait while requests
    were in flight) orphans its stubs, which ignore SIGTERM and outlive the stack. A stub names
    its server's pid among its arguments."""
    reaped = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"triton_python_backend_stub") and str(triton_pid).encode() in argv[1:]:
            try:
                os.kill(int(entry), signal.SIGKILL)
                reaped += 1
            except OSError:
                pass
    return reaped


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
                 gateway_args: list[str] | None = None, ranking_args: list[str] | None = None,
                 retrieval_args: list[str] | None = None, replicas: dict[str, int] | None = None,
                 store: str | None = None, insecure_dev: bool = False, colocated: bool = False,
                 backend_nice: int = BACKEND_NICE) -> None:
        self.artifacts = Path(artifacts).resolve()
        self.model_repo = Path(model_repo).resolve()
        self.run_dir = Path(run_dir).resolve()
        self.extra_args = {"gateway": gateway_args or [], "ranking": ranking_args or [],
                           "retrieval": retrieval_args or []}
        unknown = set(replicas or {}) - set(SERVICES)
        if unknown:
            raise ValueError(f"replicas: unknown services {sorted(unknown)} (known: {', '.join(SERVICES)})")
        # colocated: each gateway process hosts retrieval and ranking (tools/colocated.py).
        self.colocated = colocated
        self.backend_nice = backend_nice   # retrieval, ranking and Triton run this much nicer (0: as the gateway)
        self.replicas = {s: int((replicas or {}).get(s, 1)) for s in SERVICES}
        if colocated:
            if any(self.replicas[s] != 1 for s in BACKENDS if s in (replicas or {})):
                raise ValueError("replicas: a colocated stack runs retrieval and ranking inside each gateway")
            self.replicas.update({s: 0 for s in BACKENDS})
        if min(self.replicas[s] for s in SERVICES if not (colocated and s in BACKENDS)) < 1:
            raise ValueError(f"replicas: every service needs at least 1, got {self.replicas}")
        # One spec for the item log and the user state: SQLite in the run folder, or the given store.
        self.store = store or f"sqlite:{self.run_dir / 'state.db'}"
        self.processes: dict[str, Process] = {}
        self._ports: dict[str, dict[str, int]] = {}   # kept across restarts of a process
        # Security (on unless insecure_dev): a throwaway PKI in run_dir/pki, a Triton admin secret,
        # one bearer token per scope; made once per Stack, on first start (see _secure).
        self.insecure_dev = insecure_dev
        self.pki: Pki | None = None
        self.tokens: dict[str, str] = {}
        self._admin_secret: str | None = None

    # -- names and addresses
    def names(self, service: str) -> list[str]:
        """The process names of a service's replicas, in start order."""
        n = self.replicas[service]
        return [service] if n == 1 else [f"{service}-{i}" for i in range(n)]

    def addr(self, name: str) -> str:
        """host:port of one process (a replica name, or a service with one replica)."""
        return f"{HOST}:{self._ports[name]['grpc']}"

    def target(self, service: str) -> str:
        """The gRPC target naming every replica of a service (what a gateway is given)."""
        names = self.names(service)
        if len(names) == 1:
            return self.addr(names[0])
        return "ipv4:" + ",".join(self.addr(n) for n in names)

    def channel(self, name: str, aio: bool = False) -> grpc.Channel:
        """An operator's channel to one process (a replica name or service name, or "triton"):
        mTLS with the operator's service-CA cert. Tests and tools open channels only through this
        and gateway_channel: security lives here."""
        from common.client import open_channel
        return open_channel(self.addr(name), aio=aio, security=self.security("operator"))

    def gateway_channel(self, scopes: str | None = "all", aio: bool = False, name: str | None = None,
                        options: list | None = None) -> grpc.Channel:
        """A client's channel to the public API (the one gateway, or `name`; all gateway replicas
        round-robin when there are several and no name), with the API caller's client cert
        (client CA) and a bearer token with `scopes` (recommend, events, items, admin or all;
        None: no token). With insecure_dev: plaintext, no token."""
        from common.client import open_channel
        target = self.addr(name) if name else self.target("gateway")
        token = None
        if scopes and not self.insecure_dev:
            self._secure()
            if scopes not in self.tokens:
                raise ValueError(f"scopes: one of {', '.join(sorted(self.tokens))}, got {scopes!r}")
            token = self.tokens[scopes]
        return open_channel(target, aio=aio, options=options or (), security=self.security("client"),
                            token=token)

    def security(self, component: str) -> Security:
        """The TLS files of one component of this stack (gateway, retrieval, ranking, triton,
        operator, or client: the API caller's cert); plaintext with insecure_dev."""
        if self.insecure_dev:
            return Security.plaintext()
        pki = self._secure()
        return Security(pki.service_ca, pki.cert(component), pki.key(component))

    def triton_client(self, aio: bool = False):
        """An operator's tritonclient (gRPC, mTLS) to this stack's Triton."""
        if aio:
            from tritonclient.grpc.aio import InferenceServerClient
        else:
            from tritonclient.grpc import InferenceServerClient
        return InferenceServerClient(self.addr("triton"), **self.security("operator").triton_client_kwargs())

    def triton_admin_headers(self) -> dict[str, str] | None:
        """What Triton's model-control API (load/unload) requires of a caller; None when open."""
        self._secure()
        return admin_headers(self._admin_secret)

    @property
    def credentials_path(self) -> Path:
        return self.run_dir / "credentials.json"

    def _secure(self) -> Pki | None:
        """Once per Stack: the PKI (reused from run_dir/pki when complete), the Triton admin secret
        and the tokens file (fresh tokens each time). None with insecure_dev."""
        if self.insecure_dev:
            return None
        if self.pki is None:
            from gateway.auth import issue_tokens
            self.run_dir.mkdir(parents=True, exist_ok=True)
            pki = ensure_pki(self.run_dir / "pki")
            self._admin_secret = secrets.token_urlsafe(24)
            write_secret(pki.root / "triton-admin.secret", self._admin_secret)
            self.tokens = issue_tokens(self.run_dir / "tokens.json")
            self.pki = pki
        return self.pki

    def _tls_args(self, component: str) -> list[str]:
        if self.insecure_dev:
            return ["--insecure-dev"]
        sec = self.security(component)
        return ["--tls-ca", str(sec.ca), "--tls-cert", str(sec.cert), "--tls-key", str(sec.key)]

    def write_credentials(self) -> Path | None:
        """run_dir/credentials.json for API callers (tools/credentials.py): the gateway address, the
        CA, the client cert and key, a token per scope. None with insecure_dev (nothing to write)."""
        if self.insecure_dev:
            return None
        client = self.security("client")
        doc = {"gateway": self.target("gateway"), "ca": str(client.ca), "cert": str(client.cert),
               "key": str(client.key), "tokens": dict(self.tokens)}
        write_secret(self.credentials_path, json.dumps(doc, indent=2))
        return self.credentials_path

    def metrics_url(self, name: str) -> str:
        return f"http://{HOST}:{self._ports[name]['metrics']}/metrics"

    def event_dir(self, name: str) -> Path:
        """A gateway's event-log folder: `events/` with one gateway, `events-<name>/` with several."""
        return self.run_dir / ("events" if name == "gateway" else f"events-{name}")

    # -- lifecycle
    def start(self, timeout_s: float = 180.0) -> "Stack":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        latest_dir(self.artifacts)   # fail early, with the hint, when nothing is built
        try:
            self.start_triton(timeout_s)
            backends = self.names("retrieval") + self.names("ranking")
            for name in backends:
                self.start_service(name, self.artifacts)   # services follow LATEST (hot swap)
            self.wait_all_healthy(backends, timeout_s)
            for name in self.names("gateway"):
                self.start_service(name, self.artifacts)
            self.wait_all_healthy(self.names("gateway"), timeout_s)
            self.write_credentials()
        except BaseException:
            self.stop()
            raise
        return self

    def start_triton(self, timeout_s: float = 180.0, wait: bool = True) -> None:
        """Start Triton (again: same ports); wait=False returns once spawned (the supervisor)."""
        ports = self._ports.setdefault("triton", {"grpc": free_port(), "metrics": free_port()})
        self._secure()
        argv, env = triton_command(self.model_repo, ports["grpc"], ports["metrics"], self.triton_models(), HOST,
                                   security=self.security("triton"), admin_secret=self._admin_secret)
        self._spawn("triton", argv, env, ports, nice=self.backend_nice)
        if wait:
            self.wait_triton(timeout_s)

    def triton_models(self) -> list[str]:
        """The models Triton loads at start (explicit model control): every version its config keeps."""
        return [*TRITON_MODELS, *(m for m in OPTIONAL_TRITON_MODELS if (self.model_repo / m / "config.pbtxt").exists())]

    def start_service(self, name: str, artifacts: Path | None = None) -> None:
        """Start one replica (again: with the ports it had before). Does not wait for SERVING."""
        service = service_of(name)
        if service not in SERVICES:
            raise ValueError(f"{name}: not a replica of {', '.join(SERVICES)}")
        store = self.store
        ports = self._ports.setdefault(name, {"grpc": free_port(), "metrics": free_port()})
        module = "tools.colocated" if service == "gateway" and self.colocated else f"{service}.server"
        argv = [sys.executable, "-m", module, "--port", str(ports["grpc"]),
                "--metrics-port", str(ports["metrics"]), "--artifacts", str(artifacts or self.artifacts),
                "--item-log", store]
        argv += self._tls_args(service)
        if service == "retrieval":
            argv += ["--triton-url", self.addr("triton")]   # seq_encoder (the sequential channel)
        if service == "ranking":
            argv += ["--triton-url", self.addr("triton"), *self._admin_secret_args()]
        if service == "gateway":
            argv += ["--triton-url", self.addr("triton"), "--state", store, "--event-log", str(self.event_dir(name))]
            if self.colocated:   # the ranking inside it loads Triton's models
                argv += self._admin_secret_args()
            else:
                argv += ["--retrieval-addr", self.target("retrieval"), "--ranking-addr", self.target("ranking")]
            if not self.insecure_dev:
                argv += ["--tokens", str(self.run_dir / "tokens.json"),
                         "--tls-client-ca", str(self.pki.root / "gateway-clients-ca.pem")]
        argv += self.extra_args[service]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        self._spawn(name, argv, env, ports, nice=0 if service == "gateway" else self.backend_nice)

    def _admin_secret_args(self) -> list[str]:
        return ["--triton-admin-secret-file", str(self.pki.root / "triton-admin.secret")] if self._admin_secret else []

    def restart(self, name: str, sig: int = signal.SIGKILL, timeout_s: float = 120.0) -> float:
        """Stop one replica with `sig` (SIGKILL: no cleanup runs), start it on the same ports and
        wait until it is SERVING again; returns the seconds it was gone."""
        started = time.monotonic()
        self.kill(name, sig)
        if name == "triton":
            self.start_triton(timeout_s)
        else:
            self.start_service(name)
            self.wait_healthy(name, timeout_s)
        return time.monotonic() - started

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], ports: dict[str, int], nice: int = 0) -> None:
        log_path = self.run_dir / f"{name}.log"
        if nice and NICE:   # nice execs the command: the pid stays the process's own
            argv = [NICE, "-n", str(nice), *argv]
        command, preexec = ([SETPRIV, "--pdeathsig", "TERM", *argv], None) if SETPRIV else (argv, _die_with_parent)
        with open(log_path, "ab") as out:
            popen = subprocess.Popen(command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=preexec)
        self._ports[name] = ports
        self.processes[name] = Process(name, popen, log_path, ports)
        log.info("started", extra={"component": name, "pid": popen.pid, "ports": ports})

    def _check_alive(self, name: str) -> None:
        proc = self.processes[name]
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.popen.returncode}; last log lines:\n{proc.tail()}")

    def wait_triton(self, timeout_s: float) -> None:
        client = self.triton_client()
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                self._check_alive("triton")
                try:
                    if client.is_server_ready() and all(client.is_model_ready(m) for m in self.triton_models()):
                        return
                except Exception:  # not listening yet
                    pass
                time.sleep(0.25)
        finally:
            client.close()
        raise TimeoutError(f"triton not ready after {timeout_s}s:\n{self.processes['triton'].tail()}")

    def wait_healthy(self, name: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self.channel(name) as channel:
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

    def wait_all_healthy(self, names: list[str], timeout_s: float) -> None:
        """Wait for several processes at once (they load in parallel); the first failure raises."""
        if len(names) <= 1:
            return self.wait_healthy(names[0], timeout_s) if names else None
        with ThreadPoolExecutor(len(names)) as pool:
            for waited in [pool.submit(self.wait_healthy, n, timeout_s) for n in names]:
                waited.result()

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
        if name == "triton":
            reap_backend_stubs(proc.popen.pid)

    def stop(self) -> None:
        """Gateways first (they call the rest), then the backends, then Triton; the replicas of
        a tier drain in parallel."""
        by_service = {s: [n for n in self.processes if service_of(n) == s] for s in (*SERVICES, "triton")}
        for tier in (by_service["gateway"], by_service["ranking"] + by_service["retrieval"], ["triton"]):
            running = [self.processes[n].popen for n in tier if n in self.processes]
            running = [p for p in running if p.poll() is None]
            for popen in running:
                popen.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 15.0
            for popen in running:
                try:
                    popen.wait(max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    popen.kill()
                    popen.wait()
        if "triton" in self.processes:
            reap_backend_stubs(self.processes["triton"].popen.pid)

    def pids(self) -> dict[str, int]:
        return {n: p.popen.pid for n, p in self.processes.items() if p.popen.poll() is None}

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
