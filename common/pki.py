"""A throwaway PKI for one deployment (`make run`, the tests, a k8s secret): two CAs and the certs
they sign, written as PEM files into one folder.

- the SERVICE CA signs one cert per component (gateway, retrieval, ranking, triton, operator),
  each valid as server and as client: retrieval, ranking and Triton accept only callers holding
  one of these (mTLS inside the system);
- the CLIENT CA signs the API callers' cert (`client`): the gateway can require it on its public
  port, and because the internal services do not trust this CA, an API caller's cert cannot call
  Retrieve/Rank/UpdateItems directly.

Keys are EC P-256, written 0600. Certs name 127.0.0.1, ::1 and localhost, plus the DNS names given
(Kubernetes Service names). `ensure_pki(folder)` reuses a complete folder made for the same names.

    python -m common.pki OUT_DIR [--dns retrieval --dns ranking ...]
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

COMPONENTS = ("gateway", "retrieval", "ranking", "triton", "operator")
CLIENT = "client"
VALID_DAYS = 30          # throwaway: a month is plenty for a dev stack or a test run
MANIFEST = "pki.json"


@dataclass(frozen=True)
class Pki:
    """Paths of one PKI folder (the files exist once `ensure_pki` returned it)."""
    root: Path

    @property
    def service_ca(self) -> Path:
        return self.root / "service-ca.pem"

    @property
    def client_ca(self) -> Path:
        return self.root / "client-ca.pem"

    @property
    def gateway_clients_ca(self) -> Path:
        """What the gateway's public port trusts: API callers (client CA) and operators/probes
        (service CA)."""
        return self.root / "gateway-clients-ca.pem"

    def cert(self, name: str) -> Path:
        return self.root / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.root / f"{name}.key"

    def files(self, components: Iterable[str] = COMPONENTS) -> list[Path]:
        names = [*components, CLIENT]
        return [self.service_ca, self.client_ca, self.gateway_clients_ca,
                self.root / "service-ca.key", self.root / "client-ca.key",
                *(self.cert(n) for n in names), *(self.key(n) for n in names)]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write_private(path: Path, data: bytes) -> None:
    """Create with 0600 from the start (no window where the key is world-readable)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FusionRec throwaway PKI"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(name: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
          dns_names: Iterable[str], usages: list) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    sans = [x509.DNSName("localhost"), *(x509.DNSName(d) for d in dns_names),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def _complete(pki: Pki, dns_names: list[str], components: tuple[str, ...]) -> bool:
    try:
        made = json.loads((pki.root / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if made.get("dns_names") != dns_names or not set(components) <= set(made.get("components", [])):
        return False
    if not all(p.exists() for p in pki.files(components)):
        return False
    expires = x509.load_pem_x509_certificate(pki.service_ca.read_bytes()).not_valid_after_utc
    return expires - _now() > datetime.timedelta(days=1)


def ensure_pki(root: Path, dns_names: Iterable[str] = (), components: Iterable[str] = COMPONENTS) -> Pki:
    """The PKI in `root`: reused when complete (same DNS names, not about to expire), else made anew."""
    pki = Pki(Path(root).resolve())
    names, parts = sorted(set(dns_names)), tuple(components)
    if _complete(pki, names, parts):
        return pki
    pki.root.mkdir(parents=True, exist_ok=True)
    os.chmod(pki.root, 0o700)
    service_key, service_ca = _ca("FusionRec service CA")
    client_key, client_ca = _ca("FusionRec client CA")
    pem = serialization.Encoding.PEM
    _write_private(pki.root / "service-ca.key", _key_pem(service_key))
    _write_private(pki.root / "client-ca.key", _key_pem(client_key))
    pki.service_ca.write_bytes(service_ca.public_bytes(pem))
    pki.client_ca.write_bytes(client_ca.public_bytes(pem))
    pki.gateway_clients_ca.write_bytes(client_ca.public_bytes(pem) + service_ca.public_bytes(pem))
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    for name in parts:   # a component serves (its port) and calls (the next hop)
        key, cert = _leaf(name, service_key, service_ca, names, both)
        _write_private(pki.key(name), _key_pem(key))
        pki.cert(name).write_bytes(cert.public_bytes(pem))
    key, cert = _leaf(CLIENT, client_key, client_ca, [], [ExtendedKeyUsageOID.CLIENT_AUTH])
    _write_private(pki.key(CLIENT), _key_pem(key))
    pki.cert(CLIENT).write_bytes(cert.public_bytes(pem))
    (pki.root / MANIFEST).write_text(json.dumps({"dns_names": names, "components": list(parts),
                                                 "valid_days": VALID_DAYS}))
    return pki


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="write a throwaway FusionRec PKI (service CA, client CA, certs)")
    p.add_argument("out", type=Path)
    p.add_argument("--dns", action="append", default=[], help="extra DNS name in every component cert")
    args = p.parse_args(argv)
    pki = ensure_pki(args.out, args.dns)
    print(pki.root)


if __name__ == "__main__":
    main()
