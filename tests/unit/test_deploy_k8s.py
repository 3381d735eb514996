"""deploy/k8s manifests: schema-valid (kubernetes-validate, offline, strict) and wired together."""
from __future__ import annotations

import re
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
    deploy["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["command"] = "python"
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


def _flags(c: dict) -> dict[str, str]:
    """--flag value pairs and --flag=value arguments of a container."""
    args, out = c.get("args", []), {}
    for i, arg in enumerate(args):
        if arg.startswith("--") and "=" in arg:
            out.update([arg.split("=", 1)])
        elif arg.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[arg] = args[i + 1]
    return out


@pytest.mark.parametrize("name", sorted(GRPC_TIERS))
def test_grpc_tiers_probe_health_over_tls_on_their_port(name: str) -> None:
    """kubelet's native gRPC probe cannot speak TLS: the probes exec the health check with the
    pod's own cert, against the port the service binds."""
    (c,) = _by_kind("Deployment")[name]["spec"]["template"]["spec"]["containers"]
    port = GRPC_TIERS[name]
    assert {"name": "grpc", "containerPort": port} in c["ports"]
    flags = _flags(c)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["exec"]["command"] == [
            "python", "deploy/grpc_health_check.py", "--ca", flags["--tls-ca"], "--cert", flags["--tls-cert"],
            "--key", flags["--tls-key"], f"127.0.0.1:{port}"], probe
        assert c[probe]["timeoutSeconds"] >= 2, probe   # a python start under load takes more than 1 s
    assert c["command"] == ["python", "-m", f"{name}.server"]
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
    assert args["retrieval"]["--triton-url"] == "$(TRITON_URL)"   # seq_encoder
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


def test_triton_grpc_is_mtls_http_loopback_and_model_control_restricted() -> None:
    d = _by_kind("Deployment")["triton"]
    (c,) = d["spec"]["template"]["spec"]["containers"]
    flags = _flags(c)
    for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
        assert f"'http://127.0.0.1:8000{path}'" in " ".join(c[probe]["exec"]["command"])
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "--model-repository=/models" in c["args"]
    assert {"--load-model=fused_ranker", "--load-model=text_encoder"} <= set(c["args"])
    assert flags["--grpc-use-ssl-mutual"] == "true" and flags["--grpc-port"] == "8001"
    assert flags["--allow-http"] == "true" and flags["--http-address"] == "127.0.0.1"
    assert flags["--metrics-address"] == "0.0.0.0" and flags["--metrics-port"] == "8002"
    # HTTP is neither a container port nor a Service port: nothing outside the pod reaches it
    assert 8000 not in {p["containerPort"] for p in c["ports"]}
    assert 8000 not in {p["port"] for p in _by_kind("Service")["triton"]["spec"]["ports"]}
    restricted = "model-repository:fusionrec-triton-admin=$(TRITON_ADMIN_SECRET)"
    assert flags["--grpc-restricted-protocol"] == flags["--http-restricted-api"] == restricted
    (env,) = [e for e in c["env"] if e["name"] == "TRITON_ADMIN_SECRET"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "fusionrec-triton-admin", "key": "secret"}
    # ranking holds the same secret (its model-control calls send the header)
    ranking = _by_kind("Deployment")["ranking"]["spec"]["template"]["spec"]
    (rc,) = ranking["containers"]
    mounted = _secret_mounts(ranking, rc)
    assert Path(_flags(rc)["--triton-admin-secret-file"]) == mounted["fusionrec-triton-admin"] / "secret"


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


# -- security: secrets, NetworkPolicies

SECRETS = K8S / "secrets"
PROMETHEUS = "prometheus"   # the peer name _peers() gives the monitoring namespace's Prometheus pods
# Each pod's allowed ingress: (peer, port); peer "any" = every source.
EXPECTED_INGRESS = {
    "gateway": {("any", 50051), (PROMETHEUS, 9101)},
    "retrieval": {("gateway", 50052), (PROMETHEUS, 9102)},
    "ranking": {("gateway", 50053), (PROMETHEUS, 9103)},
    "triton": {("ranking", 8001), ("gateway", 8001), ("retrieval", 8001), (PROMETHEUS, 8002)},
}


def _secret_mounts(pod_spec: dict, c: dict) -> dict[str, Path]:
    """secret name -> where the container mounts it (read-only)."""
    volumes = {v["name"]: v["secret"] for v in pod_spec["volumes"] if "secret" in v}
    out = {}
    for m in c["volumeMounts"]:
        if m["name"] in volumes:
            assert m.get("readOnly") is True, f"{c['name']}: secret {m['name']} mounted writable"
            out[volumes[m["name"]]["secretName"]] = Path(m["mountPath"])
    return out


def _generated_secrets() -> dict[str, dict[str, str]]:
    """secretGenerator: name -> {key in the secret: source file}."""
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return {g["name"]: dict(f.split("=", 1) for f in g["files"]) for g in kust["secretGenerator"]}


def _tls_files(name: str, c: dict) -> tuple[str, str, str]:
    flags = _flags(c)
    if name == "triton":
        return flags["--grpc-root-cert"], flags["--grpc-server-cert"], flags["--grpc-server-key"]
    return flags["--tls-ca"], flags["--tls-cert"], flags["--tls-key"]


@pytest.mark.parametrize("name", sorted(EXPECTED_INGRESS))
def test_every_deployment_mounts_its_cert_and_the_ca_from_secrets(name: str) -> None:
    spec = _by_kind("Deployment")[name]["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    mounts = _secret_mounts(spec, c)
    ca, cert, key = map(Path, _tls_files(name, c))
    assert ca == mounts["fusionrec-ca"] / "ca.crt"
    assert cert == mounts[f"fusionrec-tls-{name}"] / "tls.crt"
    assert key == mounts[f"fusionrec-tls-{name}"] / "tls.key"
    generated = _generated_secrets()
    assert set(generated[f"fusionrec-tls-{name}"]) == {"tls.crt", "tls.key"}
    assert set(generated["fusionrec-ca"]) == {"ca.crt"}
    modes = {v["secret"]["secretName"]: v["secret"]["defaultMode"] for v in spec["volumes"] if "secret" in v}
    assert modes[f"fusionrec-tls-{name}"] & 0o007 == 0, "a private key readable by every user of the node's pod"
    assert set(mounts) <= set(generated), f"{name} mounts a secret nothing creates"


def test_gateway_reads_hashed_tokens_and_ranking_the_triton_secret_from_secrets() -> None:
    deployments = _by_kind("Deployment")
    gw = deployments["gateway"]["spec"]["template"]["spec"]
    (c,) = gw["containers"]
    assert Path(_flags(c)["--tokens"]) == _secret_mounts(gw, c)["fusionrec-tokens"] / "tokens.json"
    generated = _generated_secrets()
    assert generated["fusionrec-tokens"] == {"tokens.json": "secrets/tokens.json"}
    assert generated["fusionrec-triton-admin"] == {"secret": "secrets/triton-admin-secret"}
    for name in ("retrieval", "triton"):   # the token hashes and Triton's admin header stay where needed
        spec = deployments[name]["spec"]["template"]["spec"]
        assert not {"fusionrec-tokens", "fusionrec-triton-admin"} & set(_secret_mounts(spec, spec["containers"][0]))


def test_secret_material_is_never_committed() -> None:
    """The generator's sources live under secrets/, whose .gitignore ignores everything but itself."""
    for files in _generated_secrets().values():
        for source in files.values():
            assert source.startswith("secrets/") and "/" not in source[len("secrets/"):], source
    ignore = (SECRETS / ".gitignore").read_text().split()
    assert "*" in ignore and "!.gitignore" in ignore


def test_every_flag_in_args_is_a_flag_of_its_service() -> None:
    """A misspelt flag (--token, --tls-certs) would stop the pod at start; an embedded $(VAR) must be defined."""
    import dataclasses
    from common import config as service_config
    for name, cls in CONFIGS.items():
        (c,) = _by_kind("Deployment")[name]["spec"]["template"]["spec"]["containers"]
        known = {f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(getattr(service_config, cls))}
        assert set(_flags(c)) <= known, f"{name}: {sorted(set(_flags(c)) - known)}"
    for name, d in _by_kind("Deployment").items():
        for c in d["spec"]["template"]["spec"]["containers"]:
            env = {e["name"] for e in c.get("env", [])}
            for arg in c.get("args", []):
                for var in re.findall(r"\$\(([A-Z_]+)\)", arg):
                    assert var in env, f"{name}: $({var}) is not an env var of the container"


def _selects(policy: dict, labels: dict) -> bool:
    return policy["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()


def _peers(rule: dict) -> set[str]:
    """A rule's sources as names: "any", a pod name of this namespace, or "prometheus"."""
    if "from" not in rule:
        return {"any"}
    out = set()
    for peer in rule["from"]:
        assert set(peer) <= {"podSelector", "namespaceSelector"}, f"unexpected peer {peer}"
        pods = peer.get("podSelector", {}).get("matchLabels", {})
        if "namespaceSelector" in peer:
            assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
            assert pods == {"app.kubernetes.io/name": "prometheus"}
            out.add(PROMETHEUS)
        else:
            assert set(pods) == {"app.kubernetes.io/name"}, f"peer must name one pod kind: {peer}"
            out.add(pods["app.kubernetes.io/name"])
    return out


def _allowed(labels: dict) -> set[tuple[str, int]] | None:
    """Union of the ingress the policies selecting these labels allow (None: no policy isolates them)."""
    policies = [p for p in _by_kind("NetworkPolicy").values() if _selects(p, labels)]
    if not policies:
        return None
    allowed = set()
    for p in policies:
        assert p["spec"]["policyTypes"] == ["Ingress"]
        for rule in p["spec"].get("ingress", []):
            ports = [port["port"] for port in rule["ports"]]   # every rule names its ports
            assert all(isinstance(port, int) for port in ports)
            allowed |= {(peer, port) for peer in _peers(rule) for port in ports}
    return allowed


def test_default_deny_isolates_every_pod_of_the_namespace() -> None:
    assert set(_by_kind("NetworkPolicy")) == {"default-deny-ingress", "redis-ingress",
                                              *(f"{n}-ingress" for n in EXPECTED_INGRESS)}
    deny = _by_kind("NetworkPolicy")["default-deny-ingress"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}
    assert _allowed({"app.kubernetes.io/name": "build-artifacts"}) == set()   # the Job: nothing reaches it
    assert _allowed({"app.kubernetes.io/name": "anything-else"}) == set()


@pytest.mark.parametrize("name", sorted(EXPECTED_INGRESS))
def test_each_service_admits_exactly_the_expected_peers(name: str) -> None:
    d = _by_kind("Deployment")[name]
    labels = d["spec"]["template"]["metadata"]["labels"]
    allowed = _allowed(labels)
    assert allowed == EXPECTED_INGRESS[name]
    (c,) = d["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert {port for _, port in allowed} == set(ports.values()), "a port open to no one, or a policy for a closed one"
    scraped = int(d["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"])
    assert {port for peer, port in allowed if peer == PROMETHEUS} == {scraped} == {ports["metrics"]}


def test_internal_services_are_reached_only_by_the_gateway_and_triton_also_by_ranking() -> None:
    """The issue's rule in words: no one but the gateway reaches retrieval or ranking gRPC; Triton's
    gRPC only ranking, the gateway (text_encoder for UpsertItems) and retrieval (seq_encoder);
    nothing reaches another's metrics."""
    for name, grpc_port in (("retrieval", 50052), ("ranking", 50053), ("triton", 8001)):
        labels = _by_kind("Deployment")[name]["spec"]["template"]["metadata"]["labels"]
        callers = {peer for peer, port in _allowed(labels) if port == grpc_port}
        assert "any" not in callers and PROMETHEUS not in callers
        assert callers == ({"gateway", "ranking", "retrieval"} if name == "triton" else {"gateway"})


def test_redis_in_the_namespace_is_reachable_by_the_services_only() -> None:
    assert _allowed({"app.kubernetes.io/name": "redis"}) == {(s, 6379) for s in GRPC_TIERS}
