"""The one error path: every failure becomes ``{"error": sentence, "status_code": N}``.

Engine errors (``EraError``) carry their own status and message; tornado's own
``HTTPError``s (unknown route, method not allowed, invalid path encoding) get a sentence
per status; anything else is a 500 with a generic sentence. No traceback ever reaches a
client; unexpected exceptions are logged without request headers or query strings.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from era_kernel.errors import EraError, Unprocessable
from tornado.web import HTTPError

log = logging.getLogger("era.server")


class Forbidden(EraError):
    status = 403


class TooManySockets(EraError):
    """A WebSocket past ERA_MAX_SOCKETS_PER_SESSION or _PER_CLIENT, refused before the upgrade."""

    status = 429

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class NotReady(EraError):
    status = 503

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


_SENTENCES = {
    400: "the request is malformed",
    401: "missing or invalid API key; send 'Authorization: Bearer <key>'",
    403: "forbidden",
    404: "no such route",
    405: "method not allowed",
    413: "request body is too large",
    500: "internal server error",
    503: "the server is not ready; retry shortly",
}


def _from_http_error(exc: HTTPError, method: str, path: str, allowed: list[str]) -> EraError:
    status = exc.status_code
    if status == 404:
        message = f"no route matches {method} {path[:200]}"
    elif status == 405:
        message = f"method {method[:20]} is not allowed on this route; allowed: {', '.join(allowed) or 'none'}"
    elif status == 400 and "unicode" in (exc.log_message or "").lower():
        message = "the request path or query is not valid UTF-8"
    else:
        message = exc.reason or _SENTENCES.get(status, "the request failed")
    err = EraError(message)
    err.status = status  # instance attribute shadows the class default
    return err


def as_era_error(exc: BaseException | None, method: str, path: str, allowed: list[str],
                 status_code: int) -> EraError:
    """Map whatever was raised (or a bare status) to an EraError with a sentence."""
    if isinstance(exc, EraError):
        return exc
    if isinstance(exc, HTTPError):
        return _from_http_error(exc, method, path, allowed)
    if isinstance(exc, RecursionError):
        # Request bodies are depth-checked on parsing; this is a document met later (e.g.
        # session data the code wrote), still caused by input rather than by the server.
        return Unprocessable("a JSON document in this request or its result is nested too deeply")
    err = EraError(_SENTENCES.get(status_code, "the request failed"))
    err.status = status_code if exc is None else 500
    return err


def error_json(err: EraError) -> str:
    body: dict[str, Any] = err.to_json()
    body["status_code"] = err.status  # instance override, see _from_http_error
    return json.dumps(body)


class JsonErrors:
    """Mixin for every RequestHandler (HTTP and WebSocket) of the app."""

    def allowed_methods(self) -> list[str]:
        api = getattr(self, "API", {})
        return sorted(m.upper() for m in api)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        err = as_era_error(exc, self.request.method or "", self.request.path, self.allowed_methods(), status_code)
        self.set_status(err.status)
        for name, value in err.headers.items():
            self.set_header(name, value)
        if err.status == 405:
            self.set_header("Allow", ", ".join(self.allowed_methods()))
        if err.status == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="era"')
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Cache-Control", "no-store")
        self.finish(error_json(err))

    def log_exception(self, typ, value, tb) -> None:
        # Expected errors are part of the API; only the unexpected are logged, and then
        # with method and path only: request headers and the query may carry tokens.
        if isinstance(value, (EraError, HTTPError)):
            return
        log.error("unhandled error in %s %s", self.request.method, self.request.path,
                  exc_info=(typ, value, tb), extra={"event": "error"})
