"""Structured logs: one JSON object per line on stderr.

One line per request (method, path without the query, status, duration, session id) and
one per run. Secrets never reach the log: the access line is built from chosen fields
only (no headers, query, cookies or Referer), exceptions are logged with method and
path only, and as a last guard every line is passed through ``redact`` (bearer tokens,
``token=``-style parameters and the configured API key itself).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

log = logging.getLogger("era.server")
access_log = logging.getLogger("era.server.access")

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_PATTERNS = [
    (re.compile(r"(?i)(bearer\s+)[^\s\"',;]+"), r"\1[redacted]"),
    (re.compile(r"(?i)((?:token|api[_-]?key|access_token|password|secret)=)[^&\s\"',;]+"), r"\1[redacted]"),
    # A tenant's key wherever it appears: its public id kept (which key), its secret never.
    (re.compile(r"(era_k\.[0-9a-f]{12}\.)[A-Za-z0-9_-]+"), r"\1[redacted]"),
]


class Redactor:
    def __init__(self) -> None:
        self.secrets: list[str] = []

    def __call__(self, text: str) -> str:
        for pattern, repl in _PATTERNS:
            text = pattern.sub(repl, text)
        for secret in self.secrets:
            text = text.replace(secret, "[redacted]")
        return text


redact = Redactor()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # Redacted field by field, before encoding: a pattern must never cut a JSON escape.
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=lambda v: redact(str(v)))


def setup_logging(level: str, api_key: str | None) -> None:
    if api_key and len(api_key) >= 4:
        redact.secrets = [api_key]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO))
    # tornado.access would log the full URI, query (and so ?token=) included: ours replaces it.
    logging.getLogger("tornado.access").disabled = True


def log_request(handler: Any) -> None:
    """tornado's ``log_function``: the one access line per request."""
    request = handler.request
    status = handler.get_status()
    fields: dict[str, Any] = {
        "event": "request",
        "method": request.method,
        "path": request.path[:512],
        "status": status,
        "duration_ms": round(request.request_time() * 1000, 2),
    }
    session_id = getattr(handler, "session_id", None)
    if session_id:
        fields["session_id"] = session_id
    level = logging.WARNING if status >= 500 else logging.INFO
    access_log.log(level, "%s %s %s", request.method, fields["path"], status, extra=fields)


def log_run(session_id: str | None, result: dict[str, Any], via: str) -> None:
    log.info("run finished", extra={
        "event": "run", "via": via, "session_id": session_id, "run_id": result.get("run_id"),
        "exit_code": result.get("exit_code"), "duration_ms": result.get("duration_ms"),
        "timed_out": result.get("timed_out"), "truncated": result.get("truncated"),
    })
