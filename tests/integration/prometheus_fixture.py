"""A real Prometheus (Debian's package) scraping a running Stack with the shipped config.

deploy/prometheus/prometheus.yml is used as it is, with three changes: each job's targets are
rewritten to the metrics port the stack chose, and the scrape and evaluation intervals drop to
1 s so a test sees rates and alert evaluations within seconds. The rule files it names
(deploy/prometheus/alerts.yml) are copied beside it, so the alert rules are loaded and evaluated.

Test modules import `prometheus` (a module-scoped fixture) and the `query`/`wait_for` helpers.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from tools.stack import Stack, free_port

DEPLOY_PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
JOBS = ("gateway", "retrieval", "ranking", "triton")
INTERVAL = "1s"


def live_config(stack: Stack, folder: Path) -> Path:
    """Write prometheus.yml (+ its rule files) into folder, targets pointing at the stack."""
    doc = yaml.safe_load((DEPLOY_PROMETHEUS / "prometheus.yml").read_text())
    doc.setdefault("global", {}).update(scrape_interval=INTERVAL, evaluation_interval=INTERVAL)
    jobs = {job["job_name"] for job in doc["scrape_configs"]}
    assert jobs == set(JOBS), f"deploy/prometheus/prometheus.yml jobs {jobs} != stack components {JOBS}"
    for job in doc["scrape_configs"]:
        port = stack.processes[job["job_name"]].ports["metrics"]
        job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    for rule_file in doc.get("rule_files", []):
        shutil.copy(DEPLOY_PROMETHEUS / rule_file, folder / rule_file)
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@contextmanager
def running_prometheus(stack: Stack, folder: Path, timeout_s: float = 20.0) -> Iterator[str]:
    """Start Prometheus on a free loopback port; yield its base URL; stop it."""
    binary = shutil.which("prometheus")
    assert binary, "Debian's prometheus package is required (deploy/apt-packages.txt; make test installs it)"
    config = live_config(stack, folder)
    port = free_port()
    log_path = folder / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, log_path.read_text(errors="replace")[-2000:]
                assert time.monotonic() < deadline, f"prometheus not ready:\n{log_path.read_text()[-2000:]}"
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def prometheus(stack, tmp_path_factory) -> Iterator[str]:
    """Base URL of a Prometheus scraping the session stack with deploy/prometheus's config and rules."""
    with running_prometheus(stack, tmp_path_factory.mktemp("prometheus")) as url:
        yield url


def api(url: str, path: str, **params: str) -> dict:
    """GET url/api/v1/<path>; the decoded body, whatever its status (errors come back as 400/422)."""
    full = f"{url}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    try:
        with urllib.request.urlopen(full, timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:   # bad_data / execution errors carry a JSON body too
        return json.load(e)


def query(url: str, expr: str) -> list[dict]:
    body = api(url, "query", query=expr)
    assert body["status"] == "success", f"{expr!r}: {body}"
    return body["data"]["result"]


def wait_for(url: str, expr: str, timeout_s: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = query(url, expr)
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"no data for {expr} after {timeout_s}s")
