"""Engine errors: what went wrong, in the engine's terms, never in HTTP's.

Each class names a kind of failure a caller can act on; the server alone decides the
status it answers with (``server/errors.py`` maps class -> status), and the CLI prints
the message. ``message`` is a sentence for the client, ``field`` the request field at
fault when known, ``retry_after`` (seconds) when waiting is the remedy, ``details`` any
further fields the answer carries (ERA's ``hint``, the taken ``id``). Lookups that
miss also derive from the built-in ``LookupError`` family, bad values from ``ValueError``.
"""

from __future__ import annotations


class EraError(Exception):
    """Anything else that failed: the caller cannot fix it by changing the request."""

    retry_after: float | None = None  # seconds worth waiting before asking again

    def __init__(self, message: str, *, field: str | None = None, retry_after: float | None = None,
                 details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.details = dict(details or {})
        if retry_after is not None:
            self.retry_after = retry_after


class Invalid(EraError, ValueError):
    """The request is malformed or a value in it is not acceptable."""


BadRequest = Invalid  # the name most of the code base raises


class Unauthorized(EraError):
    """The caller did not prove who it is (no or a wrong API key)."""


class NotFound(EraError, KeyError):
    """What the request names (a session, a file, a kernelspec) does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class Conflict(EraError):
    """The request contradicts the current state of what it names (a taken id, no input()
    waiting); asking again only helps once that state changed."""


class SetupPending(Conflict):
    """A run waited for its session's package setup for as long as its timeout allowed.
    The session's state, not a failure: the run can go once ``setup_status`` moves on."""

    retry_after = 5.0


class TooLarge(EraError):
    """A body, field or file is over its size limit."""


class Unprocessable(EraError):
    """Well-formed input the engine still cannot process (a document nested too deeply)."""


class Busy(EraError):
    """No room now, retry later: every kernel slot is taken (with every kernel busy), or a
    session's run queue is full."""

    retry_after = 1.0


TooManyKernels = Busy


class OverLimit(Busy):
    """A tenant is at one of its key's limits (sessions, kernels, storage_bytes,
    runs_per_minute); the message and the answer's ``details.limit`` name it, ``details.max``
    is its value. Retry once it has room again."""

    def __init__(self, limit: str, maximum: int, message: str, retry_after: float = 1.0):
        super().__init__(message, retry_after=retry_after, details={"details": {"limit": limit, "max": maximum}})


class Unavailable(EraError):
    """The kernel could not be started, or died in a way the run cannot report."""


KernelFailed = Unavailable


class Moved(Unavailable):
    """Another live replica serves the session, and this call cannot be forwarded there
    (an engine call made in this process; engine/ownership.py)."""


class Unreachable(EraError):
    """What the request was to be relayed to does not answer (nothing listens on a
    session's port): a gateway's failure, not the caller's nor the server's."""
