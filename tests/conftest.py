"""Shared fixtures. A small artifact set is built once per session from the MovieLens data shipped
in data/ (tests never read ../shared), with the real BERT encoder, implicit ALS, FAISS, torch and
LightGBM; integration tests start the real Triton and services on it."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DATA = f"movielens:{REPO / 'data' / 'ml-latest-small'}"


@pytest.fixture(scope="session", autouse=True)
def _servers_in_process_leave_the_gc_as_found():
    """A test that runs a service's server in this process (common.server.serve) times its GC
    pauses and freezes what it loaded: undone at the end, before pytest closes the streams."""
    yield
    import gc
    from common.gc_pauses import unwatch_pauses
    unwatch_pauses()
    gc.unfreeze()


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(artifact root, model repository) of a small but real build: 600 items, 150 users, with the
    opt-in sequential channel."""
    from offline.build import BuildOptions, build
    root = tmp_path_factory.mktemp("build")
    build(BuildOptions(data=DATA, artifacts=root / "artifacts", model_repo=root / "model_repository",
                       cache_dir=REPO / ".cache", max_items=600, max_users=150, epochs=2, progress=False,
                       sequential=True))   # the tests cover the opt-in channel too
    return root / "artifacts", root / "model_repository"


@pytest.fixture(scope="session")
def artifacts(built):
    from common.artifacts import open_artifacts
    return open_artifacts(built[0])


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory):
    """A tiny synthetic artifact set (tests/tiny_artifacts.py: 60 items, 20 users, seeded noise, no
    Triton model), written in about a second, opened and verified: for in-process unit tests."""
    from common.artifacts import open_artifacts
    from tests.tiny_artifacts import write_tiny_artifacts
    return open_artifacts(write_tiny_artifacts(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def synthetic_built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Artifact root of a build on the planted-topic synthetic MIND data (impressions included), in
    MIND's train/dev layout (dev = the last round of impressions), so the build uses MIND's own split."""
    from offline.build import BuildOptions, build
    from offline.datasets.synthetic import generate_mind
    root = tmp_path_factory.mktemp("synthetic")
    generate_mind(root / "data", dev_rounds=1)
    build(BuildOptions(data=f"synthetic:{root / 'data'}", artifacts=root / "artifacts",
                       model_repo=root / "model_repository", cache_dir=REPO / ".cache", epochs=2,
                       progress=False))
    return root / "artifacts"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    """A real redis-server (Debian package) on a free loopback port, for the Redis backend."""
    import shutil
    import socket
    import subprocess
    import time
    binary = shutil.which("redis-server")
    assert binary, "redis-server is required (deploy/apt-packages.txt; make test installs it)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                assert proc.poll() is None, "redis-server exited"
                time.sleep(0.05)
        else:
            raise AssertionError("redis-server did not start")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
