"""Engine errors. Each carries the HTTP status the server answers with, so the server has
one error path: ``{"error": message, "status_code": status}`` (plus ``field`` when known).
Lookups that miss raise subclasses of the built-in ``LookupError`` family where natural.
"""

from __future__ import annotations


class EraError(Exception):
    status = 500

    def __init__(self, message: str, *, field: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.headers = headers or {}

    def to_json(self) -> dict:
        body = {"error": self.message, "status_code": self.status}
        if self.field:
            body["field"] = self.field
        return body


class BadRequest(EraError, ValueError):
    status = 400


class Unauthorized(EraError):
    status = 401


class NotFound(EraError, KeyError):
    status = 404

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class Conflict(EraError):
    status = 409


class TooLarge(EraError):
    status = 413


class Unprocessable(EraError):
    status = 422


class Busy(EraError):
    """Every kernel slot (or a session's run queue) is taken: retry later."""

    status = 429

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message, headers={"Retry-After": str(retry_after)})


TooManyKernels = Busy


class KernelFailed(EraError):
    """The kernel could not be started or died in a way the run cannot report."""

    status = 503
