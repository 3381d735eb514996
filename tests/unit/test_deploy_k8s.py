"""deploy/k8s manifests: schema-valid (kubernetes-validate, offline, strict) and wired together."""
from __future__ import annotations

import socket
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
# 1.27: first release with GA gRPC probes; 1.37: newest schemas kubernetes-validate ships.
K8S_VERSIONS = ["1.27.0", "1.37.0"]
GRPC_TIERS = {"gateway": 50051, "retrieval": 50052, "ranking": 50053}


def _docs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":  # kustomize's own format, not an API object
            continue
        out += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def _by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in _docs() if d["kind"] == kind}


def _containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("validation tried to use the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_strictly_offline(version: str, no_network: None) -> None:
    docs = _docs()
    assert len(docs) >= 15
    for name, doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name} {doc['kind']}/{doc['metadata']['name']}: {e}")


def test_validation_rejects_a_broken_manifest() -> None:
    _, deploy = next((n, d) for n, d in _docs() if d["kind"] == "Deployment")
    deploy["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deploy, K8S_VERSIONS[-1], strict=True)


def test_expected_objects_exist() -> None:
    assert set(_by_kind("Deployment")) == set(GRPC_TIERS) | {"triton"}
    assert set(_by_kind("Service")) == set(GRPC_TIERS) | {"triton"}
    assert set(_by_kind("PodDisruptionBudget")) == set(GRPC_TIERS) | {"triton"}
    assert set(_by_kind("HorizontalPodAutoscaler")) == {"gateway", "ranking"}
    assert set(_by_kind("ConfigMap")) == {"fusionrec-config"}
    assert set(_by_kind("PersistentVolumeClaim")) == {"fusionrec-store"}
    assert {d["metadata"].get("namespace") for _, d in _docs() if d["kind"] != "Namespace"} == {"fusionrec"}


@pytest.mark.parametrize("name", sorted(GRPC_TIERS))
def test_grpc_tiers_probe_with_grpc_on_their_port(name: str) -> None:
    (c,) = _by_kind("Deployment")[name]["spec"]["template"]["spec"]["containers"]
    port = GRPC_TIERS[name]
    assert {"name": "grpc", "containerPort": port} in c["ports"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": port}, probe
    assert c["command"] == ["python", "-m", f"{name}.server"]
    flags = dict(zip(c["args"][::2], c["args"][1::2]))
    assert flags["--port"] == str(port) and "--metrics-port" in flags and "--artifacts" in flags
    assert flags["--host"] == "0.0.0.0"  # probes and other pods connect to the pod IP


def test_service_flags_point_at_the_other_tiers() -> None:
    config = _by_kind("ConfigMap")["fusionrec-config"]["data"]
    deployments = _by_kind("Deployment")
    args = {n: dict(zip(c["args"][::2], c["args"][1::2])) for n, d in deployments.items()
            for c in d["spec"]["template"]["spec"]["containers"] if n in GRPC_TIERS}
    assert args["gateway"]["--retrieval-addr"] == "$(RETRIEVAL_ADDR)"
    assert args["gateway"]["--ranking-addr"] == "$(RANKING_ADDR)"
    assert args["ranking"]["--triton-url"] == "$(TRITON_URL)"
    assert config["RETRIEVAL_ADDR"].endswith(f"retrieval.fusionrec.svc.cluster.local:{GRPC_TIERS['retrieval']}")
    assert config["RANKING_ADDR"].endswith(f"ranking.fusionrec.svc.cluster.local:{GRPC_TIERS['ranking']}")
    assert config["TRITON_URL"] == "triton.fusionrec.svc.cluster.local:8001"


def test_env_from_configmap_uses_existing_keys_and_every_arg_variable_is_defined() -> None:
    keys = set(_by_kind("ConfigMap")["fusionrec-config"]["data"])
    for name, d in _by_kind("Deployment").items():
        for c in d["spec"]["template"]["spec"]["containers"]:
            env = {e["name"] for e in c.get("env", [])}
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    assert ref["name"] == "fusionrec-config" and ref["key"] in keys, (name, ref)
            for arg in c.get("args", []):
                if arg.startswith("$("):
                    assert arg[2:-1] in env, f"{name}: {arg} is not an env var of the container"


def test_triton_uses_http_health_and_a_gpu() -> None:
    (c,) = _by_kind("Deployment")["triton"]["spec"]["template"]["spec"]["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "--model-repository=/models" in c["args"]
    assert {"--load-model=fused_ranker", "--load-model=text_encoder"} <= set(c["args"])


def test_every_container_has_requests_and_limits() -> None:
    for name, d in _by_kind("Deployment").items():
        for c in _containers(d["spec"]["template"]["spec"]):
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{name}/{c['name']} {kind}"


def test_selectors_match_pod_labels() -> None:
    deployments = _by_kind("Deployment")
    for name, d in deployments.items():
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
        svc = _by_kind("Service")[name]["spec"]["selector"]
        assert svc.items() <= labels.items()
        pdb = _by_kind("PodDisruptionBudget")[name]["spec"]
        assert pdb["selector"]["matchLabels"].items() <= labels.items()
        # a PDB that allows no eviction at all would block node drains forever
        replicas = d["spec"]["replicas"] if "replicas" in d["spec"] else _hpa_min(name)
        assert pdb["minAvailable"] < replicas


def _hpa_min(name: str) -> int:
    return _by_kind("HorizontalPodAutoscaler")[name]["spec"]["minReplicas"]


def test_hpas_own_the_replica_count_of_their_deployment() -> None:
    deployments = _by_kind("Deployment")
    for name, hpa in _by_kind("HorizontalPodAutoscaler").items():
        assert hpa["apiVersion"] == "autoscaling/v2"
        ref = hpa["spec"]["scaleTargetRef"]
        assert ref["kind"] == "Deployment" and ref["name"] in deployments
        # with replicas set, every `kubectl apply` would undo the autoscaler
        assert "replicas" not in deployments[ref["name"]]["spec"]
        assert 1 < hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


def test_artifacts_reach_every_pod_from_the_pvc_read_only() -> None:
    (claim,) = _by_kind("PersistentVolumeClaim")
    for name, d in _by_kind("Deployment").items():
        spec = d["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        store = [n for n, v in volumes.items()
                 if v.get("persistentVolumeClaim", {}).get("claimName") == claim]
        assert store, name
        assert volumes[store[0]]["persistentVolumeClaim"]["readOnly"] is True
        assert spec["initContainers"], f"{name}: waits for artifacts in an init container"
        for c in _containers(spec):
            mounts = [m for m in c["volumeMounts"] if m["name"] in store]
            assert mounts and all(m["readOnly"] for m in mounts), f"{name}/{c['name']}"


def test_kustomization_lists_existing_files() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kust["resources"]:
        assert (K8S / resource).is_file(), resource
    listed = set(kust["resources"])
    # the build Job is run on demand, everything else is applied together
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml",
                                                             "build-artifacts-job.yaml"}


CONFIGS = {"gateway": "GatewayConfig", "retrieval": "RetrievalConfig", "ranking": "RankingConfig"}


def _env(name: str) -> dict[str, dict]:
    (c,) = _by_kind("Deployment")[name]["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e for e in c.get("env", [])}


def test_every_replica_follows_one_shared_item_log_and_gateways_share_user_state() -> None:
    config = _by_kind("ConfigMap")["fusionrec-config"]["data"]
    assert config["FUSIONREC_ITEM_LOG"].startswith("redis://redis.fusionrec.svc.cluster.local:")
    assert config["FUSIONREC_STATE"] == config["FUSIONREC_ITEM_LOG"]
    for name in GRPC_TIERS:
        ref = _env(name)["FUSIONREC_ITEM_LOG"]["valueFrom"]["configMapKeyRef"]
        assert ref == {"name": "fusionrec-config", "key": "FUSIONREC_ITEM_LOG"}, name
    assert _env("gateway")["FUSIONREC_STATE"]["valueFrom"]["configMapKeyRef"]["key"] == "FUSIONREC_STATE"


def test_every_fusionrec_variable_is_a_flag_of_its_service() -> None:
    """FUSIONREC_<FLAG> is read as --<flag>: a variable naming no flag is silently ignored."""
    import dataclasses
    from common import config as service_config
    for name, cls in CONFIGS.items():
        fields = {f"FUSIONREC_{f.name.upper()}" for f in dataclasses.fields(getattr(service_config, cls))}
        for var in _env(name):
            if var.startswith("FUSIONREC_"):
                assert var in fields, f"{name}: {var} is no flag of {cls}"
