"""A real Prometheus server (Debian's package) scrapes the running stack, Triton included."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from common.stack import free_port
from protos import fusionrec_pb2 as pb

pytestmark = pytest.mark.integration
JOBS = ("gateway", "retrieval", "ranking", "triton")


@pytest.fixture(scope="module")
def prometheus(stack, tmp_path_factory):
    binary = shutil.which("prometheus")
    assert binary, "Debian's prometheus package is required (deploy/apt-packages.txt; .ci/run installs it)"
    folder = tmp_path_factory.mktemp("prometheus")
    scrape = "\n".join(
        f"  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{stack.processes[job].ports['metrics']}']"
        for job in JOBS)
    (folder / "prometheus.yml").write_text(f"global:\n  scrape_interval: 1s\nscrape_configs:\n{scrape}\n")
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={folder / 'prometheus.yml'}",
                             f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(folder / "prometheus.log", "wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, (folder / "prometheus.log").read_text()[-2000:]
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def query(url: str, expr: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}), timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_for(url: str, expr: str, timeout_s: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = query(url, expr)
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"no data for {expr} after {timeout_s}s")


def test_every_component_is_scraped(prometheus, gateway, known_user):
    for _ in range(5):
        gateway.Recommend(pb.RecommendRequest(user_id=known_user[0], k=10), timeout=5)
    up = wait_for(prometheus, "up == 1")
    deadline = time.monotonic() + 30
    while {s["metric"]["job"] for s in up} != set(JOBS) and time.monotonic() < deadline:
        time.sleep(0.5)
        up = query(prometheus, "up == 1")
    assert {s["metric"]["job"] for s in up} == set(JOBS)
    ok = wait_for(prometheus, 'fusionrec_grpc_requests_total{service="gateway",method="Recommend",code="OK"} > 0')
    assert ok
    p99 = wait_for(prometheus, 'histogram_quantile(0.99, sum by (le, stage) (fusionrec_stage_seconds_bucket{service="ranking"}))')
    assert {s["metric"]["stage"] for s in p99} >= {"triton", "rerank"}
    assert wait_for(prometheus, 'nv_inference_request_success{model="fused_ranker"} > 0')
