"""The throwaway PKI and the TLS rules built on it (common/pki.py, common/security.py), on real
in-process gRPC servers: who may call an internal service, the public port, plaintext, tokens."""
from __future__ import annotations

import importlib.util
import json
import stat
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.client import open_channel, tls_name_override
from common.config import GatewayConfig, RetrievalConfig
from common.pki import CLIENT, COMPONENTS, ensure_pki
from common.security import Security, SecurityConfigError, add_port

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return ensure_pki(tmp_path_factory.mktemp("pki"), dns_names=["retrieval.fusionrec.svc"])


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_each_cert_is_signed_by_its_own_ca_only(pki):
    service_ca, client_ca = _cert(pki.service_ca), _cert(pki.client_ca)
    for name in COMPONENTS:
        cert = _cert(pki.cert(name))
        cert.verify_directly_issued_by(service_ca)
        with pytest.raises((ValueError, InvalidSignature)):
            cert.verify_directly_issued_by(client_ca)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "localhost" in sans.get_values_for_type(x509.DNSName)
        assert "retrieval.fusionrec.svc" in sans.get_values_for_type(x509.DNSName)
        assert "127.0.0.1" in {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    client = _cert(pki.cert(CLIENT))
    client.verify_directly_issued_by(client_ca)
    with pytest.raises((ValueError, InvalidSignature)):
        client.verify_directly_issued_by(service_ca)
    usages = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert [u.dotted_string for u in usages] == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH.dotted_string]


def test_private_keys_are_owner_only_and_a_complete_folder_is_reused(pki):
    for key in [*pki.root.glob("*.key")]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert len(list(pki.root.glob("*.key"))) == len(COMPONENTS) + 3   # + client and the two CAs
    before = pki.cert("gateway").read_bytes()
    assert ensure_pki(pki.root, dns_names=["retrieval.fusionrec.svc"]).cert("gateway").read_bytes() == before


def test_other_dns_names_make_a_new_pki(tmp_path):
    first = ensure_pki(tmp_path).service_ca.read_bytes()
    assert ensure_pki(tmp_path, dns_names=["ranking"]).service_ca.read_bytes() != first


# -- real servers

def _server(security: Security, require_client_auth: bool, seen: list | None = None):
    class Recording(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            if seen is not None:
                seen.append(dict(details.invocation_metadata))
            return continuation(details)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[Recording()])
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = add_port(server, "127.0.0.1:0", security, require_client_auth)
    server.start()
    return server, f"127.0.0.1:{port}"


def _as(pki, name: str) -> Security:
    return Security(pki.service_ca, pki.cert(name), pki.key(name))


def _check(channel: grpc.Channel) -> str:
    with channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name


def test_an_internal_service_accepts_service_certs_only(pki):
    server, target = _server(_as(pki, "retrieval"), require_client_auth=True)
    try:
        assert _check(open_channel(target, aio=False, security=_as(pki, "gateway"))) == "OK"
        assert _check(open_channel(target, aio=False, security=_as(pki, "operator"))) == "OK"
        # The API caller's cert (client CA) is refused: it cannot call Retrieve/Rank directly.
        assert _check(open_channel(target, aio=False, security=_as(pki, CLIENT))) == "UNAVAILABLE"
        no_cert = grpc.ssl_channel_credentials(root_certificates=pki.service_ca.read_bytes())
        assert _check(grpc.secure_channel(target, no_cert)) == "UNAVAILABLE"
        assert _check(grpc.insecure_channel(target)) == "UNAVAILABLE"   # plaintext on a TLS port
    finally:
        server.stop(None)


def test_a_client_that_does_not_trust_the_service_ca_refuses_the_server(pki):
    server, target = _server(_as(pki, "retrieval"), require_client_auth=True)
    try:
        wrong = Security(pki.client_ca, pki.cert("gateway"), pki.key("gateway"))
        assert _check(open_channel(target, aio=False, security=wrong)) == "UNAVAILABLE"
    finally:
        server.stop(None)


def test_the_public_port_serves_tls_and_can_require_caller_certs(pki):
    server, target = _server(_as(pki, "gateway"), require_client_auth=False)
    try:
        no_cert = grpc.ssl_channel_credentials(root_certificates=pki.service_ca.read_bytes())
        assert _check(grpc.secure_channel(target, no_cert)) == "OK"
        assert _check(grpc.insecure_channel(target)) == "UNAVAILABLE"
    finally:
        server.stop(None)
    strict = Security(pki.service_ca, pki.cert("gateway"), pki.key("gateway"), client_ca=pki.gateway_clients_ca)
    server, target = _server(strict, require_client_auth=False)
    try:
        assert _check(open_channel(target, aio=False, security=_as(pki, CLIENT))) == "OK"
        assert _check(open_channel(target, aio=False, security=_as(pki, "operator"))) == "OK"
        assert _check(grpc.secure_channel(target, no_cert)) == "UNAVAILABLE"
    finally:
        server.stop(None)


def test_a_token_travels_as_a_bearer_header_over_tls_only(pki):
    seen: list[dict] = []
    server, target = _server(_as(pki, "gateway"), require_client_auth=False, seen=seen)
    try:
        assert _check(open_channel(target, aio=False, security=_as(pki, CLIENT), token="t0k3n")) == "OK"
        assert seen[-1]["authorization"] == "Bearer t0k3n"
    finally:
        server.stop(None)


def test_a_multi_address_target_checks_the_cert_against_its_first_host():
    assert tls_name_override("ipv4:127.0.0.1:5001,127.0.0.1:5002") == [("grpc.ssl_target_name_override", "127.0.0.1")]
    assert tls_name_override("ipv6:[::1]:5001,[::1]:5002") == [("grpc.ssl_target_name_override", "::1")]
    assert tls_name_override("127.0.0.1:5001") == [] and tls_name_override("dns:///retrieval:50051") == []


# -- configuration

def test_missing_tls_files_without_insecure_dev_name_the_flags(pki, tmp_path):
    with pytest.raises(SecurityConfigError, match="--tls-ca, --tls-cert, --tls-key not given.*--insecure-dev"):
        Security.from_config(RetrievalConfig(port=1))
    with pytest.raises(SecurityConfigError, match=r"--tls-cert: .*missing\.pem is not a readable file"):
        Security.from_config(RetrievalConfig(port=1, tls_ca=str(pki.service_ca), tls_cert=str(tmp_path / "missing.pem"),
                                             tls_key=str(pki.key("retrieval"))))
    with pytest.raises(SecurityConfigError, match="--tls-client-ca"):
        Security.from_config(GatewayConfig(port=1, tls_ca=str(pki.service_ca), tls_cert=str(pki.cert("gateway")),
                                           tls_key=str(pki.key("gateway")), tls_client_ca=str(tmp_path / "nope")))
    assert Security.from_config(RetrievalConfig(port=1, insecure_dev=True)).insecure


def test_a_service_without_tls_files_exits_at_start_naming_the_flags():
    proc = subprocess.run([sys.executable, "-m", "retrieval.server", "--port", "1", "--artifacts", "/nonexistent"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "--tls-ca" in proc.stderr and "--insecure-dev" in proc.stderr and "Traceback" not in proc.stderr


def test_insecure_dev_logs_a_warning_at_start():
    proc = subprocess.run([sys.executable, "-m", "retrieval.server", "--port", "1", "--insecure-dev",
                           "--artifacts", "/nonexistent"], cwd=REPO, capture_output=True, text=True, timeout=60)
    lines = [json.loads(line) for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("{")]
    assert any(line["level"] == "warning" and "--insecure-dev" in line["msg"] for line in lines), proc.stderr


def test_the_health_check_script_speaks_tls(pki):
    spec = importlib.util.spec_from_file_location("grpc_health_check", REPO / "deploy" / "grpc_health_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    server, target = _server(_as(pki, "ranking"), require_client_auth=True)
    try:
        assert module.check(target, ca=str(pki.service_ca), cert=str(pki.cert("ranking")), key=str(pki.key("ranking")))
        assert not module.check(target, timeout_s=1)   # plaintext
    finally:
        server.stop(None)


# -- the stack's wiring (argv recorded, nothing started)

def _recording_stack(tmp_path, **kwargs):
    from tools.stack import Stack
    stack = Stack(tmp_path, tmp_path, tmp_path / "run", **kwargs)
    spawned: dict[str, list[str]] = {}

    def spawn(name, argv, env, ports, nice=0):
        spawned[name] = argv
        stack._ports[name] = ports
    stack._spawn = spawn
    stack.wait_triton = lambda timeout_s: None
    return stack, spawned


def _flags(argv: list[str]) -> dict[str, str]:
    return {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}


def test_the_stack_gives_every_child_tls_and_writes_credentials(tmp_path):
    stack, spawned = _recording_stack(tmp_path)
    stack.start_triton()
    for name in ("retrieval", "ranking", "gateway"):
        stack.start_service(name)
    triton = " ".join(spawned["triton"])
    assert "--grpc-use-ssl-mutual=true" in triton and "--allow-http=false" in triton
    assert "--grpc-restricted-protocol=model-repository:" in triton
    for name in ("retrieval", "ranking", "gateway"):
        flags = _flags(spawned[name])
        assert flags["--tls-cert"].endswith(f"{name}.pem") and flags["--tls-ca"].endswith("service-ca.pem"), name
        assert "--insecure-dev" not in spawned[name]
    secret = Path(_flags(spawned["ranking"])["--triton-admin-secret-file"])
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and secret.read_text() in triton
    gateway = _flags(spawned["gateway"])
    assert Path(gateway["--tokens"]).exists() and gateway["--tls-client-ca"].endswith("gateway-clients-ca.pem")
    path = stack.write_credentials()
    doc = json.loads(path.read_text())
    assert doc["gateway"] == stack.addr("gateway") and set(doc["tokens"]) >= {"recommend", "events", "items", "admin", "all"}
    assert Path(doc["cert"]).name == "client.pem" and stat.S_IMODE(path.stat().st_mode) == 0o600
    from tools.credentials import Credentials
    assert Credentials.load(path).token("recommend") == doc["tokens"]["recommend"]


def test_an_insecure_dev_stack_has_no_pki_and_no_tokens(tmp_path):
    stack, spawned = _recording_stack(tmp_path, insecure_dev=True)
    stack.start_triton()
    for name in ("retrieval", "ranking", "gateway"):
        stack.start_service(name)
        assert "--insecure-dev" in spawned[name] and "--tls-cert" not in spawned[name]
    assert "--tokens" not in spawned["gateway"] and not any("ssl" in a for a in spawned["triton"])
    assert stack.write_credentials() is None and not (tmp_path / "run" / "pki").exists()
