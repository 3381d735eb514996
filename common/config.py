"""Service configuration: one frozen dataclass per service, read once from flags and environment.

Every field can be given as a flag (--metrics-port) or an environment variable
(FUSIONREC_METRICS_PORT); flags win. Invalid values fail at start, not on the first request.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from core.fresh import MAX_FRESH_SLOTS
from core.limits import DEFAULT_CANDIDATES

T = TypeVar("T")


def _flag(default: Any, help: str, choices: tuple[Any, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class ServerConfig:
    host: str = _flag("127.0.0.1", "address to bind")
    port: int = _flag(0, "gRPC port (required, > 0)")
    metrics_port: int = _flag(0, "Prometheus /metrics HTTP port (0 = no metrics server)")
    artifacts: Path = _flag(Path("artifacts"), "artifact root (with LATEST) or a version folder")
    grace_s: float = _flag(5.0, "seconds in-flight calls get to finish on SIGTERM")
    item_log: str = _flag("sqlite:run/state.db", "item log shared by every replica of every service: "
                                                 "sqlite:<path> (one machine) or redis://host:port/db")
    # Security (issue 13): TLS on every port, mTLS between services; --insecure-dev is the only way
    # to run without TLS and tokens, and it logs a warning at start.
    insecure_dev: bool = _flag(False, "run without TLS and tokens (development only; logs a warning)")
    tls_ca: str = _flag("", "PEM bundle of the service CA: the peers this process trusts (required unless --insecure-dev)")
    tls_cert: str = _flag("", "PEM certificate of this process, signed by the service CA (required unless --insecure-dev)")
    tls_key: str = _flag("", "PEM private key of --tls-cert (required unless --insecure-dev)")
    # Overload (issue 13): an adaptive concurrency limit per method (common/admission.py); calls over
    # it wait at most queue_ms, then get RESOURCE_EXHAUSTED.
    no_admission: bool = _flag(False, "no adaptive concurrency limit: every call is admitted")
    min_concurrency: int = _flag(2, "floor of the adaptive concurrency limit (calls in flight per method)")
    max_concurrency: int = _flag(64, "ceiling of the adaptive concurrency limit (calls in flight per method)")
    queue_ms: float = _flag(2.0, "longest wait for a slot under the limit before RESOURCE_EXHAUSTED")
    otlp_endpoint: str = _flag("", "OTLP/gRPC collector that receives trace spans, e.g. http://otel-collector:4317 "
                                   "(empty = no export; trace context and request ids still propagate)")


@dataclass(frozen=True)
class RetrievalConfig(ServerConfig):
    candidates: int = _flag(DEFAULT_CANDIDATES, "default number of candidates per request")
    faiss_threads: int = _flag(1, "FAISS OpenMP threads (1 is fastest for one query per call)")
    faiss_gpu: str = _flag("auto", "search flat/IVF indexes on the GPU: auto (if faiss sees one), "
                                   "on (required, else fail at start), off", choices=("auto", "on", "off"))
    # The sequential channel's query vector comes from Triton's seq_encoder (retrieval/seq_encoder.py),
    # over mTLS with this process's --tls-* files; any failure skips the channel, never the call.
    triton_url: str = _flag("", "Triton gRPC address serving seq_encoder (empty = none: the sequential channel is skipped)")
    triton_timeout_ms: float = _flag(20.0, "upper bound on one seq_encoder call")
    triton_deadline_share: float = _flag(0.4, "most of the call's remaining deadline one seq_encoder call may use")


@dataclass(frozen=True)
class RankingConfig(ServerConfig):
    triton_url: str = _flag("127.0.0.1:8001", "Triton gRPC address")
    triton_timeout_ms: float = _flag(60.0, "upper bound on one Triton call")
    reranker_threads: int = _flag(1, "LightGBM threads, set once at load")
    diversity_weight: float = _flag(-1.0, "re-ranker penalty on max similarity to the slate so far; "
                                          "negative (default) = the weight the build chose on validation, "
                                          "read from each artifact version's manifest")
    fresh_slots: int = _flag(-1, "slate positions kept for items without training interactions, at the end "
                                 "of the slate (core/fresh.py); negative (default) = the count the build "
                                 "chose, read from each artifact version's manifest",
                             choices=tuple(range(-1, MAX_FRESH_SLOTS + 1)))
    triton_admin_secret_file: str = _flag("", "file holding the header secret Triton's model-control API "
                                              "requires (--grpc-restricted-protocol); empty = send none")


@dataclass(frozen=True)
class GatewayConfig(ServerConfig):
    retrieval_addr: str = _flag("127.0.0.1:50051", "retrieval service address")
    ranking_addr: str = _flag("127.0.0.1:50052", "ranking service address")
    default_deadline_ms: float = _flag(250.0, "budget when the caller sets no deadline")
    retrieval_share: float = _flag(0.4, "share of the remaining budget given to retrieval until both hops' "
                                        "latency is measured (then: all but ranking's latency tail)")
    reserve_ms: float = _flag(3.0, "budget kept back for the gateway's own work and fallbacks")
    candidates: int = _flag(DEFAULT_CANDIDATES, "candidates asked of retrieval")
    triton_url: str = _flag("127.0.0.1:8001", "Triton gRPC address (text_encoder for UpsertItems)")
    state: str = _flag("sqlite:run/state.db", "user state store: sqlite:<path> or redis://host:port/db")
    event_log: Path = _flag(Path("run/events"), "folder of the durable event log")
    history_cap: int = _flag(100, "recent history kept per user")
    tokens: Path = _flag(Path(""), "file of hashed bearer tokens with scopes (required unless --insecure-dev)")
    tls_client_ca: str = _flag("", "PEM bundle: when given, the public port requires a client certificate "
                                   "signed by one of these CAs (tokens still authorize)")
    token_rate_per_s: float = _flag(1000.0, "calls/s allowed per token at this gateway process when the "
                                            "tokens file sets no rate_per_s for it (0 = no limit)")
    token_burst: float = _flag(0.0, "token bucket size per token when the file sets no burst (0 = one second of its rate)")
    write_deadline_ms: float = _flag(30_000.0, "budget of UpsertItems, DeleteItems and DeleteUserData when the "
                                               "caller sets no deadline (Recommend's default never applies to writes)")


@dataclass(frozen=True)
class ColocatedConfig(GatewayConfig):
    """The gateway with retrieval and ranking in its process (tools/colocated.py): the gateway's
    flags (--retrieval-addr/--ranking-addr unused), plus what the ranking service needs of its own."""
    triton_admin_secret_file: str = _flag("", "file holding the header secret Triton's model-control API "
                                              "requires (the colocated ranking loads the models); empty = send none")


def parse_config(cls: type[T], argv: list[str] | None = None, description: str = "") -> T:
    """Build cls from flags, then FUSIONREC_* environment variables, then defaults."""
    parser = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(cls):
        env = os.environ.get(f"FUSIONREC_{f.name.upper()}")
        kind = f.type if not isinstance(f.type, str) else {"int": int, "float": float, "str": str,
                                                            "Path": Path, "bool": bool}[f.type]
        if kind is bool:   # a switch: --insecure-dev, or FUSIONREC_INSECURE_DEV=1/true/yes
            on = env.strip().lower() in ("1", "true", "yes", "on") if env is not None else f.default
            parser.add_argument(f"--{f.name.replace('_', '-')}", action="store_true", default=on,
                                help=f"{f.metadata.get('help', '')} (env FUSIONREC_{f.name.upper()}=1)")
            continue
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind,
                            default=kind(env) if env is not None else f.default,
                            help=f"{f.metadata.get('help', '')} (env FUSIONREC_{f.name.upper()}, default: %(default)s)")
    args = vars(parser.parse_args(argv))
    for f in dataclasses.fields(cls):   # argparse checks choices on flags only, not on env defaults
        choices = f.metadata.get("choices")
        if choices and args[f.name] not in choices:
            parser.error(f"--{f.name.replace('_', '-')} must be one of {', '.join(map(str, choices))}, "
                         f"got {args[f.name]!r}")
    config = cls(**args)
    if not 0 < config.port < 65536:  # type: ignore[attr-defined]
        parser.error(f"--port must be in 1..65535, got {config.port}")  # type: ignore[attr-defined]
    return config
