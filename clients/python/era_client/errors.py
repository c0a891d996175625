"""One exception class per kind of error the server answers, chosen by HTTP status.

The server's error body is ``{"error": "<sentence>", "status_code": N, "field"?}``; the
sentence becomes the exception's message, so what a program logs is what the server said.
"""

from __future__ import annotations

from typing import Any


class EraError(Exception):
    """Base of every error this package raises."""

    status_code: int | None = None

    def __init__(self, message: str, *, status_code: int | None = None, field: str | None = None,
                 body: Any = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code
        self.field = field
        self.body = body
        self.retry_after = retry_after


class BadRequest(EraError):
    """400: the request is malformed (``field`` names the culprit when the server says)."""
    status_code = 400


class Unauthorized(EraError):
    """401: missing or wrong API key."""
    status_code = 401


class Forbidden(EraError):
    status_code = 403


class NotFound(EraError):
    """404: unknown session, run or file."""
    status_code = 404


class Conflict(EraError):
    """409: an id already taken, or a session not ready for this yet (setup still running)."""
    status_code = 409


class PayloadTooLarge(EraError):
    status_code = 413


class Unprocessable(EraError):
    """422: well-formed but impossible (an unknown language, say)."""
    status_code = 422


class RateLimited(EraError):
    """429: too many runs queued or kernels starting; ``retry_after`` says when to come back."""
    status_code = 429


class ServiceUnavailable(EraError):
    """503: the server is starting or stopping."""
    status_code = 503


class ServerError(EraError):
    """Any other 5xx: a bug or a crash on the server side."""


class ConnectionLost(EraError):
    """The connection failed and could not be resumed (the server is gone, or the stream
    could not be picked up again within the retries)."""


class RunTimeout(EraError):
    """The client stopped waiting for a run; the run was cancelled on the server."""


BY_STATUS: dict[int, type[EraError]] = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict,
    413: PayloadTooLarge, 422: Unprocessable, 429: RateLimited, 503: ServiceUnavailable,
}


def error_for(status: int, body: Any, retry_after: float | None = None) -> EraError:
    """The exception for an error answer (``body`` parsed JSON, or text)."""
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        message, field = body["error"], body.get("field")
    else:
        message, field = (str(body)[:500] if body else f"HTTP {status}"), None
    cls = BY_STATUS.get(status) or (ServerError if status >= 500 else EraError)
    return cls(message, status_code=status, field=field, body=body, retry_after=retry_after)
