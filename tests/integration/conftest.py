from __future__ import annotations

import grpc
import pytest

from tools.stack import Stack
from protos import fusionrec_pb2_grpc as pb_grpc


@pytest.fixture(scope="session")
def stack(built, tmp_path_factory):
    """The real system: Triton (fused_ranker), retrieval (FAISS), ranking (LightGBM), gateway."""
    artifacts, model_repo = built
    # No per-token rate limit on the shared stack: tests here drive thousands of calls with one
    # token (label cardinality, overload); rate limits are tested on gateways of their own.
    with Stack(artifacts, model_repo, tmp_path_factory.mktemp("run"),
               gateway_args=["--token-rate-per-s", "0"]) as running:
        yield running


@pytest.fixture(scope="session")
def gateway(stack):
    channel = stack.gateway_channel()
    yield pb_grpc.RecommenderStub(channel)
    channel.close()


@pytest.fixture(scope="session")
def known_user(artifacts):
    from gateway.user_state import ArtifactHistoryStore
    store = ArtifactHistoryStore(artifacts)
    user = next(u for u in store.users() if len(store.history(u)) >= 20)
    catalog = artifacts.json("catalog.json")["item_ids"]
    return user, [catalog[i] for i in store.history(user)]


class RedisServer:
    """A real redis-server of one test module's own (Debian package), on a port kept across
    restarts, with AOF persistence (appendfsync always): a test may kill it and start it again
    and find every acknowledged write (the shared `redis_url` fixture must never be stopped)."""

    def __init__(self, folder) -> None:
        import shutil
        from tools.stack import free_port
        self.binary = shutil.which("redis-server")
        assert self.binary, "redis-server is required (deploy/apt-packages.txt; make test installs it)"
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None

    def start(self) -> "RedisServer":
        import socket
        import subprocess
        import time
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.folder)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                assert self.proc.poll() is None, "redis-server exited"
                time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def kill(self) -> None:
        import signal
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("own-redis")).start()
    try:
        yield server
    finally:
        server.kill()
