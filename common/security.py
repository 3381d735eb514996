"""TLS for every gRPC port and mTLS between the services, from one process's configuration.

On by default: a service refuses to start without --tls-ca/--tls-cert/--tls-key unless
--insecure-dev is given (and then logs a warning). Internal services (retrieval, ranking) require
a client certificate signed by the service CA (`tls_ca`): nothing else can call Retrieve, Rank or
UpdateItems. The gateway's public port serves TLS; it requires client certificates only when
--tls-client-ca names the CAs to trust (bearer tokens authorize either way: gateway/auth.py).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from common.logs import get_logger

log = get_logger("security")
TLS_FLAGS = "--tls-ca, --tls-cert and --tls-key (env FUSIONREC_TLS_CA, FUSIONREC_TLS_CERT, FUSIONREC_TLS_KEY)"


class SecurityConfigError(SystemExit):
    """TLS is on and its files are missing or unreadable: the process must not start. A
    SystemExit, so the service exits 1 with the message (no traceback), and no `except Exception`
    on the way swallows it."""


@dataclass(frozen=True)
class Security:
    """What one process needs for TLS: the CA bundle it trusts, its own cert and key. `insecure`:
    plaintext everywhere (--insecure-dev only)."""
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None   # gateway: require client certs signed by these CAs
    insecure: bool = False

    @classmethod
    def plaintext(cls) -> "Security":
        return cls(insecure=True)

    @classmethod
    def from_files(cls, ca: str | Path, cert: str | Path, key: str | Path,
                   client_ca: str | Path | None = None) -> "Security":
        """Checked: each file named and readable, else SecurityConfigError naming the flag."""
        given = {"--tls-ca": ca, "--tls-cert": cert, "--tls-key": key}
        missing = [flag for flag, value in given.items() if not str(value or "")]
        if missing:
            raise SecurityConfigError(
                f"TLS is on by default: {', '.join(missing)} not given; pass {TLS_FLAGS}, "
                "or --insecure-dev (FUSIONREC_INSECURE_DEV=1) to run without TLS and tokens (development only)")
        extra = {"--tls-client-ca": client_ca} if client_ca else {}
        for flag, value in {**given, **extra}.items():
            if not Path(value).is_file():
                raise SecurityConfigError(f"{flag}: {value} is not a readable file")
        return cls(Path(ca), Path(cert), Path(key), Path(client_ca) if client_ca else None)

    @classmethod
    def from_config(cls, config: Any) -> "Security":
        if getattr(config, "insecure_dev", False):
            return cls.plaintext()
        return cls.from_files(config.tls_ca, config.tls_cert, config.tls_key,
                              getattr(config, "tls_client_ca", "") or None)

    # -- server side
    def server_credentials(self, require_client_auth: bool) -> grpc.ServerCredentials:
        """require_client_auth: callers must present a cert signed by `ca` (internal services), or,
        with `client_ca` set, by one of those CAs (the gateway's public port)."""
        pair = [(self.key.read_bytes(), self.cert.read_bytes())]   # type: ignore[union-attr]
        if self.client_ca is not None:
            return grpc.ssl_server_credentials(pair, root_certificates=self.client_ca.read_bytes(),
                                               require_client_auth=True)
        if require_client_auth:
            return grpc.ssl_server_credentials(pair, root_certificates=self.ca.read_bytes(),  # type: ignore[union-attr]
                                               require_client_auth=True)
        return grpc.ssl_server_credentials(pair)

    # -- client side
    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca.read_bytes(),    # type: ignore[union-attr]
                                            private_key=self.key.read_bytes(),         # type: ignore[union-attr]
                                            certificate_chain=self.cert.read_bytes())  # type: ignore[union-attr]

    def triton_client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for tritonclient.grpc(.aio).InferenceServerClient: mTLS to Triton."""
        if self.insecure:
            return {}
        return {"ssl": True, "root_certificates": str(self.ca), "private_key": str(self.key),
                "certificate_chain": str(self.cert)}


def add_port(server: Any, address: str, security: Security, require_client_auth: bool) -> int:
    """Bind `address` with TLS (plaintext only when insecure); raises when the port cannot be bound."""
    if security.insecure:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, security.server_credentials(require_client_auth))
    if bound == 0:
        raise RuntimeError(f"cannot bind {address}")
    return bound


@functools.lru_cache(maxsize=None)
def process_security(config: Any) -> Security:
    """This process's Security, read once from its config (cached: the services ask at start and
    again when binding): fails when TLS files are missing, warns once under --insecure-dev, and
    becomes the default of common.client.open_channel (process_default)."""
    global _process_default
    security = Security.from_config(config)
    if security.insecure:
        log.warning("--insecure-dev: TLS, mTLS and token checks are OFF; every port is plaintext and "
                    "unauthenticated (development only)")
    _process_default = security
    return security


# This process's Security once process_security ran; None = not set (a tool or test process):
# open_channel then speaks plaintext, which fails closed against our TLS ports.
_process_default: Security | None = None


def process_default() -> Security | None:
    return _process_default


def read_secret(path: str | Path) -> str:
    """A one-line secret from a file (the Triton model-control header), whitespace stripped."""
    value = Path(path).read_text().strip()
    if not value:
        raise SecurityConfigError(f"{path}: empty secret file")
    return value
