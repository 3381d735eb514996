"""Prometheus config, alert rules and the Grafana dashboard, checked offline with promtool.

promtool is required (Debian package `prometheus`, see deploy/apt-packages.txt): the tests fail,
they do not skip, when it is missing.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

import common.metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
JOBS = {"gateway", "retrieval", "ranking", "triton"}

# Label vocabularies the services use (see common/metrics.py and deploy/README.md).
LABEL_VALUES = {
    "service": {"gateway", "retrieval", "ranking"},
    "method": {"Recommend", "Retrieve", "Rank"},
    "stage": {"retrieve", "rank", "fallback", "channel_bert", "channel_cf", "channel_popular",
              "merge", "triton", "rerank"},
    "channel": {"bert", "cf", "popular", "merged"},
    "job": JOBS,
}
TRITON_METRICS = {"nv_inference_request_success", "nv_inference_request_failure",
                  "nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us",
                  "nv_inference_count", "nv_inference_exec_count"}
TRITON_LABELS = {"model", "version"}
TARGET_LABELS = {"job", "instance"}
# Grafana macros are not PromQL: replaced by a plain duration before promtool parses an expr.
GRAFANA_MACROS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}


def _known_metrics() -> dict[str, set[str]]:
    """Series name -> label names, for FusionRec's metrics, process_* defaults, Triton and up."""
    known: dict[str, set[str]] = {}
    for obj in vars(common.metrics).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        labels = set(obj._labelnames) | TARGET_LABELS
        if obj._type == "counter":
            known[obj._name + "_total"] = labels
        elif obj._type == "histogram":
            known[obj._name + "_bucket"] = labels | {"le"}
            known[obj._name + "_sum"] = labels
            known[obj._name + "_count"] = labels
        else:
            known[obj._name] = labels
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "up"):
        known[name] = set(TARGET_LABELS)
    for name in TRITON_METRICS:
        known[name] = TRITON_LABELS | TARGET_LABELS
    return known


# A name not followed by "(" (that would be a function), with its optional {matchers}.
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()\s*(\{[^}]*\})?")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
PROMQL_WORDS = {"by", "without", "and", "or", "unless", "on", "ignoring", "group_left",
                "group_right", "bool", "offset"}


def _check_series_refs(expr: str, where: str) -> None:
    """Every metric an expr selects exists, with existing label names and known label values."""
    known = _known_metrics()
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", expr)  # grouping labels
    bare = re.sub(r"\[[^\]]*\]", " ", bare)                               # range selectors
    names = [(m.group(1), m.group(2) or "") for m in SELECTOR.finditer(bare)
             if m.group(1) not in PROMQL_WORDS and not re.fullmatch(r"[0-9.e]+", m.group(1))]
    assert names, f"{where}: no metric found in {expr!r}"
    for name, selector in names:
        assert name in known, f"{where}: unknown metric {name}"
        for label, op, value in MATCHER.findall(selector):
            assert label in known[name], f"{where}: {name} has no label {label}"
            if op == "=" and label in LABEL_VALUES:
                assert value in LABEL_VALUES[label], f"{where}: {label}={value!r} is never emitted"
            if op in ("=~", "!~") and label in LABEL_VALUES:
                for alt in value.split("|"):
                    assert alt in LABEL_VALUES[label], f"{where}: {label}=~{alt!r} never emitted"


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: apt-get install prometheus (deploy/apt-packages.txt)")
    return path


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


# ---------------------------------------------------------------- Prometheus

@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus.compose.yml"])
def test_promtool_check_config(promtool: str, config: str) -> None:
    _run([promtool, "check", "config", config], PROM)


def test_promtool_check_rules(promtool: str) -> None:
    out = _run([promtool, "check", "rules", "alerts.yml"], PROM).stdout
    assert "SUCCESS" in out


def test_promtool_rule_unit_tests_pass(promtool: str) -> None:
    _run([promtool, "test", "rules", "alerts_test.yml"], PROM)


def test_promtool_rule_unit_tests_catch_a_broken_rule(promtool: str, tmp_path: Path) -> None:
    """The unit tests are not vacuous: a rule with a wrong threshold makes them fail."""
    rules = (PROM / "alerts.yml").read_text().replace(") > 0.040", ") > 0.100")
    assert rules != (PROM / "alerts.yml").read_text()
    (tmp_path / "alerts.yml").write_text(rules)
    shutil.copy(PROM / "alerts_test.yml", tmp_path / "alerts_test.yml")
    proc = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "FusionRecGatewayP99High" in proc.stdout + proc.stderr


def _alerts() -> dict[str, dict]:
    groups = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def test_every_alert_fires_in_one_test_and_is_quiet_in_another() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = set(_alerts())
    assert alerts == {"FusionRecGatewayP99High", "FusionRecErrorRateHigh",
                      "FusionRecDegradedShareHigh", "FusionRecServiceDown",
                      "FusionRecTritonDown", "FusionRecTritonQueueHigh"}
    assert alerts <= fired, f"never shown firing: {alerts - fired}"
    assert alerts <= quiet, f"never shown quiet: {alerts - quiet}"


@pytest.mark.parametrize("name", sorted(_alerts()))
def test_alert_uses_real_metrics_and_labels(name: str) -> None:
    rule = _alerts()[name]
    _check_series_refs(rule["expr"], name)
    assert rule["labels"]["severity"] in {"page", "warn"}
    assert rule["annotations"]["summary"]


def _jobs(config: str) -> dict[str, list[str]]:
    doc = yaml.safe_load((PROM / config).read_text())
    return {j["job_name"]: [t for sc in j["static_configs"] for t in sc["targets"]]
            for j in doc["scrape_configs"]}


def test_scrape_jobs_are_loopback_placeholders_and_compose_matches() -> None:
    local, compose = _jobs("prometheus.yml"), _jobs("prometheus.compose.yml")
    assert set(local) == set(compose) == JOBS
    for job in JOBS:
        (host, port), = [t.rsplit(":", 1) for t in local[job]]
        assert host == "127.0.0.1"
        assert compose[job] == [f"{job}:{port}"], "compose targets = service name, same port"


def test_scrape_targets_can_be_rewritten(promtool: str, tmp_path: Path) -> None:
    """What an integration test does: point each job at the ports it chose, still valid."""
    doc = yaml.safe_load((PROM / "prometheus.yml").read_text())
    for i, job in enumerate(doc["scrape_configs"]):
        job["static_configs"] = [{"targets": [f"127.0.0.1:{41000 + i}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(doc))
    shutil.copy(PROM / "alerts.yml", tmp_path / "alerts.yml")
    _run([promtool, "check", "config", "prometheus.yml"], tmp_path)


# ---------------------------------------------------------------- Grafana

def _dashboard() -> dict:
    return json.loads((GRAFANA / "dashboards" / "fusionrec.json").read_text())


def _targets() -> list[tuple[str, str]]:
    return [(f"{p['title']} / {t['refId']}", t["expr"])
            for p in _dashboard()["panels"] if p["type"] != "row" for t in p["targets"]]


def test_dashboard_panels_have_targets_on_the_provisioned_datasource() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    dash = _dashboard()
    assert dash["uid"] == "fusionrec"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in panels:
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == source["uid"]
        assert all(t["datasource"]["uid"] == source["uid"] for t in p["targets"])


def test_dashboard_covers_the_required_views() -> None:
    exprs = " ".join(e for _, e in _targets())
    for needle in ("fusionrec_grpc_requests_total", "histogram_quantile(0.5",
                   "histogram_quantile(0.95", "histogram_quantile(0.99",
                   "fusionrec_stage_seconds_bucket", 'code!="OK"', "fusionrec_degraded_total",
                   "fusionrec_candidates_sum", "nv_inference_queue_duration_us",
                   "nv_inference_compute_infer_duration_us", "process_cpu_seconds_total",
                   "process_resident_memory_bytes"):
        assert needle in exprs, needle


def test_dashboard_exprs_use_real_metrics_and_labels() -> None:
    for where, expr in _targets():
        _check_series_refs(expr, where)


def test_dashboard_exprs_parse_as_promql(promtool: str, tmp_path: Path) -> None:
    """promtool parses each expr as a recording rule: the offline PromQL parser."""
    rules = []
    for i, (_, expr) in enumerate(_targets()):
        for macro, value in GRAFANA_MACROS.items():
            expr = expr.replace(macro, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
        rules.append({"record": f"dashboard:expr_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = _run([promtool, "check", "rules", str(path)], tmp_path).stdout
    assert f"SUCCESS: {len(rules)} rules found" in out


def test_dashboard_provider_points_at_the_mounted_folder() -> None:
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "fusionrec.yml").read_text())
    (provider,) = prov["providers"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
