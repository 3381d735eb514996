"""The shipped monitoring works on the live system, not only in promtool.

A real Prometheus scrapes the session stack with deploy/prometheus/prometheus.yml (targets
rewritten, 1 s intervals) and loads deploy/prometheus/alerts.yml. After traffic that includes
invalid requests, degraded answers (a tiny caller deadline) and events, every Grafana panel query
must return data, every alert expression must evaluate, and Prometheus must evaluate each rule
without error. The README's metrics table is compared with what the processes really export.
"""
from __future__ import annotations

import json
import math
import re
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from protos import fusionrec_pb2 as pb

from .prometheus_fixture import JOBS, api, prometheus, query, wait_for  # noqa: F401  (prometheus: fixture)

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "fusionrec.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
# Grafana variables replaced before a panel query is sent to Prometheus. With a 1 s scrape interval
# Grafana's own $__rate_interval would be 4 s; 30 s spans both traffic rounds below.
GRAFANA_VARS = {"$__rate_interval": "30s", "$__interval": "5s", "$__range": "5m"}
# Panel queries allowed to come back empty on a healthy stack, "title / refId" -> why.
# Keep it short and explained: an entry here is a panel an operator sees blank.
NO_DATA_EXPECTED: dict[str, str] = {}
TINY_DEADLINES_S = (0.004, 0.006, 0.008)   # too short for retrieval + ranking, long enough for a fallback
PROBE_USER = "monitoring-live-probe"   # a user id only this module uses (impressions only)


# ---------------------------------------------------------------- what is checked

def _dashboard_targets() -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(f"{p['title']} / {t['refId']}", t["expr"]) for p in panels if p["type"] != "row"
            for t in p["targets"]]


def _promql(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def _alert_rules() -> dict[str, dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}


def _finite(result: list[dict]) -> list[dict]:
    return [s for s in result if math.isfinite(float(s["value"][1]))]


def _metrics_body(stack, name: str) -> str:
    url = f"http://127.0.0.1:{stack.processes[name].ports['metrics']}/metrics"
    return urllib.request.urlopen(url, timeout=5).read().decode()


# ---------------------------------------------------------------- traffic

def _drive(gateway, user: str, history: list[str]) -> None:
    """One round: OK answers (known, cold-start, session users), INVALID_ARGUMENT, degraded
    answers, an accepted and a rejected event batch."""
    for _ in range(8):
        gateway.Recommend(pb.RecommendRequest(user_id=user, k=10, surface="home"), timeout=5)
    gateway.Recommend(pb.RecommendRequest(user_id="monitoring-cold-user", k=5), timeout=5)
    gateway.Recommend(pb.RecommendRequest(history_item_ids=history[:5], k=5), timeout=5)
    for bad in (pb.RecommendRequest(user_id=user, k=0), pb.RecommendRequest(k=5),
                pb.RecommendRequest(user_id=user, k=5, surface="s" * 65)):
        with pytest.raises(grpc.RpcError) as info:
            gateway.Recommend(bad, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A caller deadline too small for retrieval + ranking: the gateway answers degraded
    # (retrieval_timeout -> popular, or ranking_timeout -> retrieval order) or, when even that
    # is late, the caller sees DEADLINE_EXCEEDED. Both are what the error/degraded panels show.
    degraded, tries = 0, 0
    while tries < 12 or (degraded == 0 and tries < 100):
        try:
            answer = gateway.Recommend(pb.RecommendRequest(user_id=user, k=10),
                                       timeout=TINY_DEADLINES_S[tries % len(TINY_DEADLINES_S)])
            degraded += answer.degraded
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        tries += 1
    assert degraded, f"no degraded answer in {tries} calls with deadlines {TINY_DEADLINES_S}"
    now = time.time()
    # Impressions are logged and counted but do not change a user's recent history.
    accepted = gateway.ReportEventBatch(pb.EventBatch(events=[
        pb.Event(user_id=PROBE_USER, item_id=history[0], type="impression", timestamp=now)]), timeout=5)
    assert accepted.accepted == 1 and accepted.history_updates == 0
    with pytest.raises(grpc.RpcError) as info:
        gateway.ReportEventBatch(pb.EventBatch(events=[
            pb.Event(user_id=PROBE_USER, item_id=history[0], type="teleport", timestamp=now)]), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _gateway_requests(stack) -> float:
    for family in text_string_to_metric_families(_metrics_body(stack, "gateway")):
        if family.name == "fusionrec_grpc_requests":
            return sum(s.value for s in family.samples if s.name.endswith("_total"))
    return 0.0


@pytest.fixture(scope="module")
def evaluated_at(prometheus, stack, gateway, known_user) -> float:
    """Drive two rounds of traffic a few scrapes apart (the first creates the series, the second
    makes them move, so rates are not 0 / 0), wait until Prometheus has scraped the result, and
    return that time: every query of this module is evaluated at it."""
    user, history = known_user
    _drive(gateway, user, history)
    wait_for(prometheus, 'fusionrec_events_total{outcome="rejected"}')
    time.sleep(2.5)
    _drive(gateway, user, history)
    total = _gateway_requests(stack)
    wait_for(prometheus, f'sum(fusionrec_grpc_requests_total{{service="gateway"}}) >= {total}')
    time.sleep(2.5)   # two more scrape intervals: the other targets have been scraped too
    return time.time()


def _query_at(url: str, expr: str, at: float) -> list[dict]:
    body = api(url, "query", query=expr, time=f"{at:.3f}")
    assert body["status"] == "success", f"{expr!r}: {body}"
    return body["data"]["result"]


# ---------------------------------------------------------------- Grafana

def test_no_data_exemptions_stay_few_and_explained():
    names = {where for where, _ in _dashboard_targets()}
    assert set(NO_DATA_EXPECTED) <= names, "exemption for a query that no longer exists"
    assert len(NO_DATA_EXPECTED) <= 2 and all(len(why) > 20 for why in NO_DATA_EXPECTED.values())


@pytest.mark.parametrize("where, expr", _dashboard_targets(), ids=[w for w, _ in _dashboard_targets()])
def test_dashboard_query_returns_data(prometheus, evaluated_at, where, expr):
    result = _query_at(prometheus, _promql(expr), evaluated_at)   # parses and evaluates
    if where in NO_DATA_EXPECTED:
        return
    assert result, f"panel {where!r} shows no data: {expr}"
    assert _finite(result), f"panel {where!r} shows only NaN: {expr} -> {result}"


# ---------------------------------------------------------------- alerts

def _without_threshold(expr: str) -> str:
    """The alert's measured quantity: the expr without its final `> 0.05`-style comparison."""
    bare, n = re.subn(r"\s*(==|!=|>=|<=|>|<)\s*[0-9.eE+-]+\s*$", "", expr.strip())
    assert n == 1, f"alert expr does not end in a comparison with a number: {expr!r}"
    return bare


@pytest.mark.parametrize("name", sorted(_alert_rules()))
def test_alert_expr_evaluates_on_live_series(prometheus, evaluated_at, name):
    rule = _alert_rules()[name]
    _query_at(prometheus, rule["expr"], evaluated_at)               # the whole rule parses
    measured = _query_at(prometheus, _without_threshold(rule["expr"]), evaluated_at)
    assert measured, f"{name}: {_without_threshold(rule['expr'])} selects no live series"
    assert _finite(measured), f"{name}: only NaN on the live stack: {measured}"
    # Every $labels.x an annotation prints is a label the alert's series really carry.
    used = set(re.findall(r"\$labels\.(\w+)", json.dumps(rule["annotations"])))
    for series in measured:
        assert used <= set(series["metric"]), f"{name}: annotations use {used}, series have {series['metric']}"


def test_prometheus_loads_and_evaluates_every_rule(prometheus, evaluated_at):
    deadline = time.monotonic() + 15
    while True:
        body = api(prometheus, "rules")
        assert body["status"] == "success", body
        rules = {r["name"]: r for g in body["data"]["groups"] for r in g["rules"]}
        evaluated = all(not r["lastEvaluation"].startswith("0001") for r in rules.values())
        if evaluated or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert set(rules) == set(_alert_rules())
    for name, rule in rules.items():
        assert rule["health"] == "ok" and not rule.get("lastError"), (name, rule.get("lastError"))


def test_healthy_stack_has_no_down_alert(prometheus, evaluated_at):
    active = {a["labels"]["alertname"] for a in api(prometheus, "alerts")["data"]["alerts"]}
    assert not active & {"FusionRecServiceDown", "FusionRecTritonDown"}, active
    up = _query_at(prometheus, "up", evaluated_at)
    assert {s["metric"]["job"]: s["value"][1] for s in up} == {job: "1" for job in JOBS}


# ---------------------------------------------------------------- names the processes export

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s")


def _exported(body: str) -> dict[str, set[str]]:
    """Series name -> label names (le excluded), read from one /metrics body as written (the
    prometheus_client parser would rename Triton's counters, which lack the _total suffix);
    a histogram also appears under its base name."""
    histograms = {n for n, kind in re.findall(r"^# TYPE (\S+) (\S+)$", body, flags=re.M) if kind == "histogram"}
    out: dict[str, set[str]] = {}
    for line in body.splitlines():
        match = SAMPLE.match(line)
        if not match:
            continue
        name, labels = match.group(1), set(re.findall(r'(\w+)="', match.group(2) or "")) - {"le"}
        out.setdefault(name, set()).update(labels)
        base = re.sub(r"_(bucket|count|sum)$", "", name)
        if base in histograms:
            out.setdefault(base, set()).update(labels)
    return out


def test_triton_exports_the_names_dashboard_and_alerts_use(stack, evaluated_at):
    live = _exported(_metrics_body(stack, "triton"))
    text = DASHBOARD.read_text() + ALERTS.read_text()
    used = set(re.findall(r"\bnv_[a-z_]+", text))
    assert used, "the dashboard and alerts watch Triton"
    assert used <= set(live), f"not exported by this Triton: {sorted(used - set(live))}"


def _readme_metrics() -> dict[str, set[str]]:
    """deploy/README.md metrics table: name -> labels. `a_success` / `_failure` names two series."""
    text = (DEPLOY / "README.md").read_text()
    table = text.split("## Metrics", 1)[1].split("###", 1)[0]
    out: dict[str, set[str]] = {}
    for row in re.findall(r"^\| (`.*)$", table, flags=re.M):
        cells = [c.strip() for c in row.split("|")]
        names = re.findall(r"`([a-z_]+)`", cells[0])
        labels = {l.strip() for l in cells[2].split(",") if l.strip() not in ("", "—")}
        for name in names:
            if name.startswith("_"):   # suffix variant of the previous name
                name = names[0].rsplit("_", 1)[0] + name
            out[name] = labels
    return out


def test_readme_metrics_table_matches_live_metrics(stack, evaluated_at):
    """Every metric in deploy/README.md is exported with exactly those labels, and every
    fusionrec_* metric the services export is in the table."""
    live: dict[str, set[str]] = {}
    for name in JOBS:
        for series, labels in _exported(_metrics_body(stack, name)).items():
            live.setdefault(series, set()).update(labels)
    documented = _readme_metrics()
    for name, labels in documented.items():
        assert name in live, f"README documents {name}, no process exports it"
        assert live[name] == labels, f"{name}: README says {sorted(labels)}, exported {sorted(live[name])}"
    ours = {n for n in live if n.startswith("fusionrec_")
            and not n.endswith(("_bucket", "_count", "_sum", "_created"))}
    assert ours <= set(documented), f"exported but not in README: {sorted(ours - set(documented))}"
