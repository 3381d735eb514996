"""Structured logs: one JSON object per line on stderr. Never log user ids or request payloads.

Inside a served call every line also carries `request_id` and `trace_id` (bound by
common.tracing's server interceptor through a context variable: tasks the call starts inherit
them, other calls never see them).
"""
from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

_RESERVED = set(vars(logging.makeLogRecord({})))
# (request_id, trace_id) of the call being served in this context, or None.
_REQUEST: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("fusionrec_request", default=None)


def bind_request(request_id: str, trace_id: str) -> contextvars.Token:
    return _REQUEST.set((request_id, trace_id))


def unbind_request(token: contextvars.Token) -> None:
    try:
        _REQUEST.reset(token)
    except ValueError:   # reset from another context (an async generator closed elsewhere)
        _REQUEST.set(None)


def current_request_id() -> str:
    """The request id of the call being served here; '' outside a call."""
    request = _REQUEST.get()
    return request[0] if request else ""


def current_request() -> tuple[str, str] | None:
    """(request_id, trace_id) of the call being served here; None outside a call."""
    return _REQUEST.get()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) +
                 f".{int(record.msecs):03d}Z", "level": record.levelname.lower(),
                 "logger": record.name, "msg": record.getMessage()}
        request = _REQUEST.get()
        if request is not None:
            entry["request_id"], entry["trace_id"] = request
        entry.update({k: v for k, v in vars(record).items() if k not in _RESERVED and k != "message"})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def get_logger(name: str) -> logging.Logger:
    root = logging.getLogger("fusionrec")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return root.getChild(name)
