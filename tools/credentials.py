"""What an API caller needs to reach a running stack: `run/credentials.json`, written by
`fusionrec run` (tools/stack.py Stack.write_credentials):

    {"gateway": "HOST:PORT", "ca": path, "cert": path, "key": path, "tokens": {scope: token}}

`ca` verifies the gateway's server cert; `cert`/`key` are the API caller's client cert (client CA);
`tokens` holds one bearer token per scope (recommend, events, items, admin) and "all".

    from tools.credentials import Credentials
    channel = Credentials.load("run/credentials.json").channel(scope="recommend")
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.client import open_channel
from common.security import Security

DEFAULT_PATH = Path("run/credentials.json")


class CredentialsError(ConnectionError):
    """No usable credentials: the caller cannot connect (the CLI tools print it and exit 2)."""


@dataclass(frozen=True)
class Credentials:
    gateway: str
    ca: Path
    cert: Path
    key: Path
    tokens: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path = DEFAULT_PATH) -> "Credentials":
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except OSError as e:
            raise CredentialsError(f"{path}: cannot read ({e.strerror}); `fusionrec run` writes it") from None
        except ValueError:
            raise CredentialsError(f"{path}: not JSON") from None
        missing = [k for k in ("gateway", "ca", "cert", "key", "tokens") if k not in doc]
        if missing:
            raise CredentialsError(f"{path}: missing {', '.join(missing)}")
        base = path.parent   # relative file paths are relative to the credentials file
        files = {k: (Path(doc[k]) if Path(doc[k]).is_absolute() else base / doc[k]) for k in ("ca", "cert", "key")}
        return cls(doc["gateway"], tokens=dict(doc["tokens"]), **files)

    def token(self, scope: str) -> str:
        if scope not in self.tokens:
            raise CredentialsError(f"no token for scope {scope!r} (have: {', '.join(sorted(self.tokens))})")
        return self.tokens[scope]

    @property
    def security(self) -> Security:
        return Security.from_files(self.ca, self.cert, self.key)

    def channel(self, scope: str = "recommend", aio: bool = False, target: str | None = None,
                options: tuple[tuple[str, Any], ...] = ()) -> Any:
        """A TLS channel to the gateway (or `target`) with the client cert, sending the `scope` token."""
        return open_channel(target or self.gateway, options=options, aio=aio, security=self.security,
                            token=self.token(scope))


def client_channel(target: str | None, credentials: str | Path | None, insecure_dev: bool,
                   scope: str = "recommend", aio: bool = False) -> Any:
    """The channel a command-line tool opens to a gateway: plaintext with --insecure-dev, else TLS
    and a token from --credentials (default run/credentials.json; its gateway unless --target)."""
    if insecure_dev:
        if not target:
            raise CredentialsError("--target is required with --insecure-dev")
        return open_channel(target, aio=aio, security=Security.plaintext())
    return Credentials.load(credentials or DEFAULT_PATH).channel(scope=scope, aio=aio, target=target)
