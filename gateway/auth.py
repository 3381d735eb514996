"""Bearer-token auth, scopes and per-token rate limits on the public API (issue 13).

A caller sends `authorization: Bearer <token>` metadata. The gateway holds only sha256 hashes of
the tokens (a file written by `fusionrec tokens` or `issue_tokens`), each with a name (not secret:
it is what logs and metrics show), its scopes and an optional rate limit. Tokens are 32 random
bytes (urlsafe base64), so an unsalted sha256 cannot be reversed by guessing.

Decisions, in order (the first that fails answers):
  health and server reflection   open (Kubernetes probes, grpcurl)
  no/malformed/unknown token     UNAUTHENTICATED
  method not in METHOD_SCOPES    PERMISSION_DENIED (fail closed: a new RPC is denied until mapped)
  token lacks the method's scope PERMISSION_DENIED naming the scope
  token over its rate            RESOURCE_EXHAUSTED (token bucket per token, per gateway process)
A denied call never reaches the servicer, and its payload is not even decoded. The gateway
re-reads the tokens file within a second of a change: rotation and revocation need no restart.

Tokens file (JSON, mode 0600):
  {"format": "fusionrec-tokens/1",
   "tokens": [{"name": "web", "sha256": "<64 hex>", "scopes": ["recommend"],
               "rate_per_s": 100, "burst": 200}]}      # rate_per_s/burst optional; 0 = no limit
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence

import grpc

from common.config import GatewayConfig
from common.logs import get_logger
from common.metrics import AUTH_DECISIONS

log = get_logger("gateway.auth")

FORMAT = "fusionrec-tokens/1"
SCOPES = ("recommend", "events", "items", "admin")
ALL = "all"   # issue_tokens' key for the token that carries every scope
_SERVICE = "/fusionrec.v1.Recommender/"
# The one map from public method to the scope it needs. `admin` implies nothing else.
METHOD_SCOPES: Mapping[str, str] = {
    _SERVICE + "Recommend": "recommend",
    _SERVICE + "ReportEvents": "events",
    _SERVICE + "ReportEventBatch": "events",
    _SERVICE + "UpsertItems": "items",
    _SERVICE + "DeleteItems": "items",
    _SERVICE + "DeleteUserData": "admin",
}
# Open without a token: probes (kubelet's gRPC probe sends no metadata) and schema discovery.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HASH = re.compile(r"[0-9a-f]{64}")
_BEARER = re.compile(r"Bearer ([A-Za-z0-9_~+/.=-]{1,512})", re.IGNORECASE)
_FIELDS = {"name", "sha256", "scopes", "rate_per_s", "burst"}
_REQUIRED = ("name", "sha256", "scopes")


class TokenFileError(ValueError):
    """The tokens file is missing or malformed; the message names the file, entry and field."""


@dataclass(frozen=True)
class TokenEntry:
    name: str                      # shown in logs and metric labels; never the token
    sha256: str                    # hex digest of the token's UTF-8 bytes
    scopes: frozenset[str]
    rate_per_s: float | None = None   # None: the gateway's --token-rate-per-s; 0: no limit
    burst: float | None = None        # None: --token-burst (0 there: one second of the rate)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "sha256": self.sha256, "scopes": sorted(self.scopes)}
        if self.rate_per_s is not None:
            out["rate_per_s"] = self.rate_per_s
        if self.burst is not None:
            out["burst"] = self.burst
        return out


def new_token() -> str:
    """A fresh secret: 32 random bytes, urlsafe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `token` (what grpc.access_token_call_credentials sends over TLS)."""
    return (("authorization", f"Bearer {token}"),)


# -- the tokens file

def _entry(path: Path, i: int, raw: Any) -> TokenEntry:
    where = f"tokens file {path}: tokens[{i}]"
    if not isinstance(raw, dict):
        raise TokenFileError(f"{where}: must be an object with {', '.join(_REQUIRED)}")
    for field in _REQUIRED:
        if field not in raw:
            raise TokenFileError(f"{where}: missing field {field!r}")
    unknown = set(raw) - _FIELDS
    if unknown:
        raise TokenFileError(f"{where}: unknown field(s) {sorted(unknown)} (known: {sorted(_FIELDS)})")
    name, digest, scopes = raw["name"], raw["sha256"], raw["scopes"]
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise TokenFileError(f"{where}.name: must be 1-64 of A-Z a-z 0-9 _ . - (starting with a letter or digit)")
    where = f"tokens file {path}: tokens[{i}] ({name})"
    if not isinstance(digest, str) or not _HASH.fullmatch(digest):
        raise TokenFileError(f"{where}.sha256: must be 64 lowercase hex digits (the token's sha256, never the token)")
    if (not isinstance(scopes, list) or not scopes or not all(isinstance(s, str) for s in scopes)
            or not set(scopes) <= set(SCOPES)):
        raise TokenFileError(f"{where}.scopes: must be a non-empty list of {', '.join(SCOPES)}, got {scopes!r}")
    limits = {}
    for field in ("rate_per_s", "burst"):
        value = raw.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise TokenFileError(f"{where}.{field}: must be a finite number >= 0, got {value!r}")
        limits[field] = None if value is None else float(value)
    return TokenEntry(name, digest, frozenset(scopes), **limits)


def load_tokens(path: Path) -> list[TokenEntry]:
    """Read and check a tokens file; TokenFileError names what is wrong."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenFileError(f"tokens file {path}: not found (create one with `fusionrec tokens --file {path}`)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenFileError(f"tokens file {path}: cannot be read ({type(e).__name__})") from None
    except json.JSONDecodeError as e:
        raise TokenFileError(f"tokens file {path}: not JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("tokens"), list):
        raise TokenFileError(f"tokens file {path}: must be an object with \"format\": \"{FORMAT}\" and a "
                             "\"tokens\" list")
    entries = [_entry(path, i, raw) for i, raw in enumerate(doc["tokens"])]
    for field in ("name", "sha256"):
        values = [getattr(e, field) for e in entries]
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            shown = twice if field == "name" else [f"{d[:8]}..." for d in twice]
            raise TokenFileError(f"tokens file {path}: {field} must be unique, repeated: {shown}")
    return entries


def write_tokens(path: Path, entries: Sequence[TokenEntry]) -> None:
    """Write the file atomically (temp file + rename), readable by its owner only (0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"format": FORMAT, "tokens": [e.to_json() for e in entries]}, indent=1) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)   # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(body)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_token(path: Path, name: str, scopes: Iterable[str], rate_per_s: float | None = None,
              burst: float | None = None) -> str:
    """Append a new token to the file (created if missing); returns the token (shown once, never stored)."""
    path = Path(path)
    entries = load_tokens(path) if path.exists() else []
    token = new_token()
    raw = TokenEntry(name, hash_token(token), frozenset(scopes), rate_per_s, burst).to_json()
    entry = _entry(path, len(entries), raw)   # the same checks as at load
    if any(e.name == name for e in entries):
        raise TokenFileError(f"tokens file {path}: a token named {name!r} exists already")
    write_tokens(path, [*entries, entry])
    return token


def issue_tokens(path: Path, rate_per_s: float | None = None) -> dict[str, str]:
    """A fresh tokens file (replacing any) with one token per scope and one with all of them:
    -> {scope: token} for recommend, events, items, admin and "all" (what make run and the tests use)."""
    tokens = {scope: new_token() for scope in (*SCOPES, ALL)}
    entries = [TokenEntry(scope, hash_token(token), frozenset(SCOPES if scope == ALL else (scope,)), rate_per_s)
               for scope, token in tokens.items()]
    write_tokens(Path(path), entries)
    return tokens


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What tells a changed file: (inode, mtime ns, size) of what the path points to; None: gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


# -- rate limits

class TokenBucket:
    """`rate` tokens per second up to `burst`; one call takes one. Starts full."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate, self.burst, self.clock = rate, max(1.0, burst), clock
        self.level, self.stamp = self.burst, clock()

    def take(self) -> bool:
        now = self.clock()
        self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.level >= 1.0:
            self.level -= 1.0
            return True
        return False


# -- the interceptor

@dataclass(frozen=True)
class Decision:
    code: grpc.StatusCode | None    # None: allowed
    details: str                    # what the caller is told (never the token)
    outcome: str                    # metric label: open, ok, unauthenticated, permission_denied, rate_limited
    entry: TokenEntry | None = None

def _method_label(method: str) -> str:
    """A bounded label: the short name of a mapped method, else "other" (callers choose method strings)."""
    return method[len(_SERVICE):] if method in METHOD_SCOPES else "other"


class _Throttle:
    """At most one log line per key per `interval_s` (a flood of bad calls must not flood the logs)."""

    def __init__(self, clock: Callable[[], float], interval_s: float = 1.0) -> None:
        self.clock, self.interval_s = clock, interval_s
        self.last: dict[tuple[str, ...], float] = {}
        self.suppressed: dict[tuple[str, ...], int] = {}

    def allow(self, key: tuple[str, ...]) -> int | None:
        """None: stay quiet; else the number of lines suppressed since the last one."""
        now = self.clock()
        if now - self.last.get(key, -math.inf) < self.interval_s:
            self.suppressed[key] = self.suppressed.get(key, 0) + 1
            return None
        if len(self.last) > 10_000:   # keys are bounded (methods x outcomes x names); belt and braces
            self.last.clear()
        self.last[key] = now
        return self.suppressed.pop(key, 0)


def _deny_handler(handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as the real one that aborts at once. No deserializer:
    the payload of a refused call is never decoded."""
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    async def streamed(request: Any, context: grpc.aio.ServicerContext):  # unary_stream / stream_stream
        await context.abort(code, details)
        yield  # pragma: no cover  (makes this an async generator)

    if handler is not None and handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streamed)
    if handler is not None and handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    if handler is not None and handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streamed)
    return grpc.unary_unary_rpc_method_handler(unary)


class TokenAuth(grpc.aio.ServerInterceptor):
    """The gateway's per-service interceptor (runs inside the standard chain of common.server).

    Built from a file (from_file), it follows that file: at most once per RELOAD_INTERVAL_S a call
    stats it, and a changed file (inode, mtime or size: an atomic rename, a Kubernetes secret's
    symlink swap, an edit) is read again, so tokens are added and revoked without a restart. A new
    file that does not load keeps the last good set (logged once per change): a bad edit must not
    lock every caller out. Rate buckets survive a reload for tokens whose limits did not change."""
    RELOAD_INTERVAL_S = 1.0

    def __init__(self, entries: Sequence[TokenEntry], default_rate_per_s: float = 0.0,
                 default_burst: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.default_rate_per_s, self.default_burst = default_rate_per_s, default_burst
        self.entries: list[TokenEntry] = []
        self.buckets: dict[str, TokenBucket] = {}
        self._set_entries(entries)
        self._throttle = _Throttle(clock)
        self.path: Path | None = None   # set by from_file: the file this set follows
        self._stamp: tuple[int, int, int] | None = None
        self._checked = clock()

    @classmethod
    def from_file(cls, path: Path, default_rate_per_s: float = 0.0, default_burst: float = 0.0,
                  clock: Callable[[], float] = time.monotonic) -> "TokenAuth":
        path = Path(path)
        stamp = _file_stamp(path)   # before the read: a change made while reading is seen at the next check
        auth = cls(load_tokens(path), default_rate_per_s, default_burst, clock)
        auth.path, auth._stamp = path, stamp
        return auth

    def _set_entries(self, entries: Sequence[TokenEntry]) -> None:
        buckets: dict[str, TokenBucket] = {}
        for e in entries:
            rate = self.default_rate_per_s if e.rate_per_s is None else e.rate_per_s
            burst = (self.default_burst if e.burst is None else e.burst) or rate   # 0: one second's worth
            if rate > 0:
                fresh, old = TokenBucket(rate, burst, self.clock), self.buckets.get(e.name)
                same = old is not None and (old.rate, old.burst) == (fresh.rate, fresh.burst)
                buckets[e.name] = old if same else fresh   # unchanged limits keep their level
        self.entries, self.buckets = list(entries), buckets

    def reload_if_changed(self) -> bool:
        """Re-read the tokens file when it changed (checked at most once per RELOAD_INTERVAL_S);
        True when a new set was taken."""
        now = self.clock()
        if self.path is None or now - self._checked < self.RELOAD_INTERVAL_S:
            return False
        self._checked = now
        stamp = _file_stamp(self.path)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            entries = load_tokens(self.path)
        except TokenFileError as e:
            log.error("tokens file changed but does not load; keeping the previous tokens",
                      extra={"error": str(e), "tokens": len(self.entries)})
            return False
        self._set_entries(entries)
        log.info("tokens reloaded", extra={"tokens": len(self.entries), "rate_limited_tokens": len(self.buckets)})
        return True

    def authenticate(self, metadata: Iterable[Any]) -> TokenEntry | None:
        """The entry whose hash matches the call's bearer token, else None."""
        values = [value for key, value in metadata if key == "authorization"]
        if len(values) != 1 or not isinstance(values[0], str):
            return None
        match = _BEARER.fullmatch(values[0])
        if match is None:
            return None
        digest = hash_token(match.group(1))
        found = None
        for entry in self.entries:   # every entry compared in constant time, no early exit
            if hmac.compare_digest(entry.sha256, digest):
                found = entry
        return found

    def decide(self, method: str, metadata: Iterable[Any]) -> Decision:
        if method.startswith(OPEN_SERVICES):
            return Decision(None, "", "open")
        self.reload_if_changed()
        entry = self.authenticate(metadata)
        if entry is None:
            return Decision(grpc.StatusCode.UNAUTHENTICATED,
                            "missing or invalid credentials: send metadata 'authorization: Bearer <token>'",
                            "unauthenticated")
        scope = METHOD_SCOPES.get(method)
        if scope is None:
            return Decision(grpc.StatusCode.PERMISSION_DENIED, "method not allowed for any token scope",
                            "permission_denied", entry)
        if scope not in entry.scopes:
            return Decision(grpc.StatusCode.PERMISSION_DENIED,
                            f"this token lacks scope '{scope}', needed by {_method_label(method)}",
                            "permission_denied", entry)
        bucket = self.buckets.get(entry.name)
        if bucket is not None and not bucket.take():
            return Decision(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"rate limit of this token exceeded ({bucket.rate:g}/s); retry later",
                            "rate_limited", entry)
        return Decision(None, "", "ok", entry)

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        d = self.decide(method, handler_call_details.invocation_metadata or ())
        if d.outcome == "open":   # probes every few seconds: not counted
            return await continuation(handler_call_details)
        name = d.entry.name if d.entry is not None else ""
        label = _method_label(method)
        AUTH_DECISIONS.labels(label, d.outcome, name).inc()
        if d.code is None:
            return await continuation(handler_call_details)
        suppressed = self._throttle.allow((label, d.outcome, name))
        if suppressed is not None:
            log.info("call refused", extra={"method": label, "outcome": d.outcome, "token_name": name or None,
                                            "suppressed_since_last": suppressed})
        return _deny_handler(await continuation(handler_call_details), d.code, d.details)


def auth_interceptors(config: GatewayConfig) -> list[grpc.aio.ServerInterceptor]:
    """[TokenAuth] from --tokens; [] with --insecure-dev. Raises TokenFileError (naming --tokens)
    when tokens are required and the file is missing or malformed, so the gateway fails at start."""
    if config.insecure_dev:
        log.warning("token auth is OFF (--insecure-dev): any caller may read, write and erase")
        return []
    if not str(config.tokens) or config.tokens == Path(""):
        raise TokenFileError("--tokens is required (a file of hashed bearer tokens: create one with "
                             "`fusionrec tokens --file PATH --name NAME --scopes recommend`), or pass "
                             "--insecure-dev to run without auth (development only)")
    try:
        auth = TokenAuth.from_file(config.tokens, config.token_rate_per_s, config.token_burst)
    except TokenFileError as e:
        raise TokenFileError(f"--tokens: {e}") from None
    log.info("token auth on", extra={"tokens": len(auth.entries), "rate_limited_tokens": len(auth.buckets)})
    return [auth]
