"""deploy/compose*.yaml against the vendored Compose Specification schema, plus wiring checks."""
from __future__ import annotations

import json
import socket
from concurrent import futures
from pathlib import Path

import grpc
import jsonschema
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from offline.serving.export import SERVED_MODELS

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
REPO = DEPLOY.parent
SERVICES = {"gateway", "retrieval", "ranking", "triton", "redis", "prometheus", "grafana"}
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"


def _validator() -> jsonschema.Draft201909Validator:
    # The schema's $schema URL is not one jsonschema recognises: name the draft explicitly.
    schema = json.loads((DEPLOY / "schemas" / "compose-spec.json").read_text())
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


def _compose(name: str = "compose.yaml") -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def _flags(command: list[str]) -> dict[str, str]:
    return {command[i]: command[i + 1] for i in range(len(command) - 1)
            if command[i].startswith("--")}


@pytest.mark.parametrize("name", ["compose.yaml", "compose.gpu.yaml"])
def test_compose_file_matches_the_compose_schema(name: str) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in _validator().iter_errors(_compose(name))]
    assert not errors, "\n".join(errors)


def test_schema_validation_rejects_a_broken_file() -> None:
    """Guards against a validator that accepts anything (wrong draft, empty schema)."""
    doc = _compose()
    doc["services"]["gateway"]["commnad"] = ["typo"]
    doc["services"]["ranking"]["depends_on"]["triton"]["condition"] = 3
    messages = " ".join(e.message for e in _validator().iter_errors(doc))
    assert "commnad" in messages
    assert "{'triton': {'condition': 3}, 'redis'" in messages and "is not valid" in messages


def test_services_and_commands() -> None:
    services = _compose()["services"]
    assert set(services) == SERVICES
    for name in ("gateway", "retrieval", "ranking"):
        cmd = services[name]["command"]
        assert cmd[:3] == ["python", "-m", f"{name}.server"]
        assert {"--port", "--metrics-port", "--artifacts"} <= set(_flags(cmd))
        # ServerConfig binds 127.0.0.1 by default: unreachable from other containers.
        assert _flags(cmd)["--host"] == "0.0.0.0", name
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile"
    gw = _flags(services["gateway"]["command"])
    assert gw["--retrieval-addr"] == f"retrieval:{_flags(services['retrieval']['command'])['--port']}"
    assert gw["--ranking-addr"] == f"ranking:{_flags(services['ranking']['command'])['--port']}"
    assert _flags(services["ranking"]["command"])["--triton-url"] == "triton:8001"
    assert _flags(services["retrieval"]["command"])["--triton-url"] == "triton:8001"   # seq_encoder


def test_gpu_overlay_puts_triton_and_faiss_on_a_gpu() -> None:
    overlay = _compose("compose.gpu.yaml")["services"]
    assert set(overlay) == {"triton", "retrieval"}
    for name in overlay:
        (device,) = overlay[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    retrieval = overlay["retrieval"]
    assert retrieval["build"]["args"]["FAISS_PACKAGE"].startswith("faiss-gpu")
    assert retrieval["environment"]["FUSIONREC_FAISS_GPU"] == "on"   # no silent CPU fallback
    assert "ARG FAISS_PACKAGE" in (DEPLOY / "Dockerfile").read_text()


def test_prometheus_scrapes_the_metrics_ports_the_services_open() -> None:
    services = _compose()["services"]
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.compose.yml").read_text())
    targets = {j["job_name"]: j["static_configs"][0]["targets"] for j in prom["scrape_configs"]}
    for name in ("gateway", "retrieval", "ranking"):
        port = _flags(services[name]["command"])["--metrics-port"]
        assert targets[name] == [f"{name}:{port}"]
    assert "--metrics-port=8002" in services["triton"]["command"]
    assert targets["triton"] == ["triton:8002"]


def test_referenced_files_exist() -> None:
    services = _compose()["services"]
    for name, svc in services.items():
        if "build" in svc:
            context = (DEPLOY / svc["build"]["context"]).resolve()
            assert (context / svc["build"]["dockerfile"]).is_file(), name
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            # ../artifacts and ../model_repository are written by `make artifacts`, not committed.
            if source.startswith(".") and source not in ("../artifacts", "../model_repository"):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"


def test_dockerfiles_copy_existing_files() -> None:
    for name in ("Dockerfile", "triton.Dockerfile"):
        for line in (DEPLOY / name).read_text().splitlines():
            if line.startswith("COPY "):
                for src in line.split()[1:-1]:
                    assert (REPO / src.rstrip("/")).exists(), f"deploy/{name} copies missing {src}"


def test_triton_image_and_models() -> None:
    triton = (DEPLOY / "triton.Dockerfile").read_text()
    assert f"FROM {TRITON_IMAGE}" in triton
    assert "requirements-triton.txt" in triton  # same pins as the embedded Triton
    cmd = _compose()["services"]["triton"]["command"]
    loaded = {c.split("=", 1)[1] for c in cmd if c.startswith("--load-model=")}
    assert loaded == set(SERVED_MODELS)


def test_service_image_copies_every_package() -> None:
    """The image installs the project with `pip install -e .`: every package pyproject lists must be in it."""
    import tomllib
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    copied = {line.split()[-1].rstrip("/") for line in (DEPLOY / "Dockerfile").read_text().splitlines()
              if line.startswith("COPY ")}   # destinations: protos/ gets the .proto, stubs are built there
    assert set(packages) <= copied, f"deploy/Dockerfile does not copy {sorted(set(packages) - copied)}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_grpc_health_check_script() -> None:
    """The compose healthcheck helper: True only for SERVING."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("grpc_health_check", DEPLOY / "grpc_health_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert module.check(f"127.0.0.1:{port}") is False
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert module.check(f"127.0.0.1:{port}") is True
    finally:
        server.stop(None)
    assert module.check(f"127.0.0.1:{_free_port()}", timeout_s=0.5) is False


def test_every_service_follows_the_item_log_in_redis_and_gateways_share_state() -> None:
    import dataclasses
    from common import config as service_config
    services = _compose()["services"]
    classes = {"gateway": "GatewayConfig", "retrieval": "RetrievalConfig", "ranking": "RankingConfig"}
    for name, cls in classes.items():
        env = services[name]["environment"]
        assert env["FUSIONREC_ITEM_LOG"] == "redis://redis:6379/0", name
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy", name
        flags = {f"FUSIONREC_{f.name.upper()}" for f in dataclasses.fields(getattr(service_config, cls))}
        assert {v for v in env if v.startswith("FUSIONREC_")} <= flags, name
    assert services["gateway"]["environment"]["FUSIONREC_STATE"] == "redis://redis:6379/0"
    assert "--appendonly" in services["redis"]["command"]   # the item log survives a Redis restart


# -- security: secrets, networks standing in for NetworkPolicies, the health check over mTLS

SECRET_DIR = "/run/secrets/"
# Who shares a network with whom (compose isolates by network membership, not by port).
EXPECTED_NEIGHBOURS = {
    "gateway": {"retrieval", "ranking", "triton", "redis", "prometheus", "grafana"},
    "retrieval": {"gateway", "triton", "redis", "prometheus"},   # triton: seq_encoder
    "ranking": {"gateway", "triton", "redis", "prometheus"},
    "triton": {"ranking", "gateway", "retrieval", "prometheus"},
    "redis": {"gateway", "retrieval", "ranking"},
}


def _neighbours(services: dict, name: str) -> set[str]:
    mine = set(services[name].get("networks", ["default"]))
    return {other for other, svc in services.items()
            if other != name and mine & set(svc.get("networks", ["default"]))}


@pytest.mark.parametrize("name", sorted(EXPECTED_NEIGHBOURS))
def test_networks_let_each_service_reach_only_its_peers(name: str) -> None:
    doc = _compose()
    services = doc["services"]
    assert _neighbours(services, name) == EXPECTED_NEIGHBOURS[name]
    for network in services[name]["networks"]:
        assert network in doc["networks"], network
        assert doc["networks"][network].get("internal") is (None if network == "public" else True), network
    if name != "gateway":
        assert "ports" not in services[name], f"{name} publishes a port on the host"


def _secret_path(services: dict, doc: dict, name: str, path: str) -> str:
    """The source file of the secret mounted at `path` in service `name` (which must mount it)."""
    assert path.startswith(SECRET_DIR), path
    secret = path[len(SECRET_DIR):]
    assert secret in services[name]["secrets"], f"{name} does not mount {secret}"
    return doc["secrets"][secret]["file"]


@pytest.mark.parametrize("name", ["gateway", "retrieval", "ranking"])
def test_each_service_gets_tls_files_from_its_own_secrets(name: str) -> None:
    doc = _compose()
    services = doc["services"]
    env = services[name]["environment"]
    assert _secret_path(services, doc, name, env["FUSIONREC_TLS_CA"]) == "./secrets/service-ca.pem"
    assert _secret_path(services, doc, name, env["FUSIONREC_TLS_CERT"]) == f"./secrets/{name}.pem"
    assert _secret_path(services, doc, name, env["FUSIONREC_TLS_KEY"]) == f"./secrets/{name}.key"
    others = {s for s in ("gateway", "retrieval", "ranking", "triton") if s != name}
    assert not {f"{o}.key" for o in others} & set(services[name]["secrets"]), "another component's key"
    assert "--insecure-dev" not in services[name]["command"] and "FUSIONREC_INSECURE_DEV" not in env


def test_gateway_tokens_triton_secret_and_triton_tls() -> None:
    doc = _compose()
    services = doc["services"]
    gw = _flags(services["gateway"]["command"])
    assert _secret_path(services, doc, "gateway", gw["--tokens"]) == "./secrets/tokens.json"
    assert gw["--triton-url"] == "triton:8001"     # text_encoder for UpsertItems
    admin = services["ranking"]["environment"]["FUSIONREC_TRITON_ADMIN_SECRET_FILE"]
    assert _secret_path(services, doc, "ranking", admin) == "./secrets/triton-admin-secret"
    triton = services["triton"]
    args = dict(a.split("=", 1) for a in triton["command"] if a.startswith("--") and "=" in a)
    assert args["--grpc-use-ssl-mutual"] == "true" and args["--http-address"] == "127.0.0.1"
    assert args["--metrics-address"] == "0.0.0.0"
    for flag, source in (("--grpc-server-cert", "triton.pem"), ("--grpc-server-key", "triton.key"),
                         ("--grpc-root-cert", "service-ca.pem")):
        assert _secret_path(services, doc, "triton", args[flag]) == f"./secrets/{source}"
    script = triton["entrypoint"][2]
    for flag in ("--grpc-restricted-protocol", "--http-restricted-api"):
        assert f'{flag}=model-repository:fusionrec-triton-admin="$$(cat /run/secrets/triton-admin-secret)"' in script
    assert "triton-admin-secret" in triton["secrets"]
    ignore = (DEPLOY / "secrets" / ".gitignore").read_text().split()
    assert "*" in ignore and "!.gitignore" in ignore
    for secret in doc["secrets"].values():
        assert secret["file"].startswith("./secrets/")


def test_grpc_health_check_script_speaks_mtls(tmp_path: Path) -> None:
    """The exec probe / healthcheck against a server that requires a client cert of the service CA."""
    import importlib.util
    from common.pki import ensure_pki
    spec = importlib.util.spec_from_file_location("grpc_health_check", DEPLOY / "grpc_health_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pki = ensure_pki(tmp_path / "pki", components=("retrieval",))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [(pki.key("retrieval").read_bytes(), pki.cert("retrieval").read_bytes())],
        root_certificates=pki.service_ca.read_bytes(), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    tls = ["--ca", str(pki.service_ca), "--cert", str(pki.cert("retrieval")),
           "--key", str(pki.key("retrieval"))]
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert module.main([*tls, f"127.0.0.1:{port}"]) == 0
        assert module.main([f"127.0.0.1:{port}", "--timeout-s", "1"]) == 1           # plaintext: refused
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert module.main([*tls, f"127.0.0.1:{port}"]) == 1
    finally:
        server.stop(None)
