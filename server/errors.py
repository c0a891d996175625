"""The one error path: every failure becomes ``{"error": sentence, "status_code": N}``.

The engine raises domain errors (``era_kernel.errors``) that know nothing of HTTP;
``STATUS`` below is the one place that says which status each kind answers with
(``http_status`` walks the class's MRO, so a subclass answers as its nearest mapped
base), and ``error_headers`` the one place that turns ``retry_after`` into a header.
Tornado's own ``HTTPError``s (unknown route, method not allowed, invalid path encoding)
become a ``ProtocolError`` with a sentence per status; anything else is a 500 with a
generic sentence. No traceback ever reaches a client; unexpected exceptions are logged
without request headers or query strings.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from era_kernel.errors import (Busy, Conflict, EraError, Invalid, NotFound, SetupPending, TooLarge, Unauthorized,
                               Unavailable, Unprocessable, Unreachable)
from tornado.web import HTTPError

log = logging.getLogger("era.server")


class Forbidden(EraError):
    """The request is understood and authenticated but not allowed (a WebSocket Origin)."""


class TooManySockets(Busy):
    """A WebSocket past ERA_MAX_SOCKETS_PER_SESSION or _PER_CLIENT, refused before the upgrade."""


class NotReady(Unavailable):
    """The engine is starting or stopping: retry shortly."""

    retry_after = 1.0


class ProtocolError(EraError):
    """A refusal at the HTTP level (tornado's ``HTTPError``, a bare status): it carries the
    status itself, since it never was a domain error."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


STATUS: dict[type[BaseException], int] = {
    Invalid: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    # The session is in a state the run cannot go in yet (package setup still running past
    # the run's timeout): nothing is wrong with the server, and the same request succeeds
    # once setup_status moves on, so not a 503 (which tells clients and balancers the
    # server is unwell); Retry-After says when it is worth asking again.
    SetupPending: 409,
    Conflict: 409,
    TooLarge: 413,
    Unprocessable: 422,
    # Busy covers the kernel limit and a session's full run queue: both clear as runs
    # finish, and both are too many requests for what the server (or that one session)
    # can work through; RFC 6585 leaves how 429 counts requests to the server, per
    # resource included, and its Retry-After is the remedy. Not a 503: the server is well.
    Busy: 429,
    Unavailable: 503,
    Unreachable: 502,  # /proxy: nothing listens on the session's port
    EraError: 500,
}


def http_status(err: BaseException) -> int:
    """The status an error answers with: its nearest mapped class; 500 for the unknown."""
    if isinstance(err, ProtocolError):
        return err.status
    for cls in type(err).__mro__:
        status = STATUS.get(cls)
        if status is not None:
            return status
    return 500


def error_headers(err: BaseException) -> dict[str, str]:
    """Response headers an error brings: ``Retry-After`` (whole seconds) when it has one."""
    retry_after = getattr(err, "retry_after", None)
    if isinstance(err, EraError) and retry_after is not None:
        return {"Retry-After": str(max(1, math.ceil(retry_after)))}
    return {}


def error_body(err: EraError) -> dict[str, Any]:
    """The one JSON error shape (WebSocket protocol errors add ``type`` and ``id`` to it)."""
    body: dict[str, Any] = {**getattr(err, "details", {}), "error": err.message, "status_code": http_status(err)}
    if err.field:
        body["field"] = err.field
    return body


def error_json(err: EraError) -> str:
    return json.dumps(error_body(err))


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
    return ProtocolError(message, status)


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
    return ProtocolError(_SENTENCES.get(status_code, "the request failed"), status_code if exc is None else 500)


class JsonErrors:
    """Mixin for every RequestHandler (HTTP and WebSocket) of the app."""

    def allowed_methods(self) -> list[str]:
        api = getattr(self, "API", {})
        return sorted(m.upper() for m in api)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        err = as_era_error(exc, self.request.method or "", self.request.path, self.allowed_methods(), status_code)
        status = http_status(err)
        self.set_status(status)
        for name, value in error_headers(err).items():
            self.set_header(name, value)
        if status == 405:
            self.set_header("Allow", ", ".join(self.allowed_methods()))
        if status == 401:
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
