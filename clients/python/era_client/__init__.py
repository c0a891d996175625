"""Python client for ERA Kernel (and any server speaking its API): ``Client`` and
``AsyncClient``. See the package README for a quickstart."""

from ._async import AsyncClient, AsyncFiles, AsyncRun, AsyncSession, AsyncSessions
from ._sync import Client, Files, Run, Session, Sessions
from .errors import (BadRequest, Conflict, ConnectionLost, EraError, Forbidden, NotFound, PayloadTooLarge,
                     RateLimited, RunTimeout, ServerError, ServiceUnavailable, Unauthorized, Unprocessable)
from .models import (Display, Done, Error, Event, InputRequest, RunError, RunResult, RunState, Stderr, Stdout,
                     event_from)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient", "AsyncFiles", "AsyncRun", "AsyncSession", "AsyncSessions",
    "Client", "Files", "Run", "Session", "Sessions",
    "BadRequest", "Conflict", "ConnectionLost", "EraError", "Forbidden", "NotFound", "PayloadTooLarge",
    "RateLimited", "RunTimeout", "ServerError", "ServiceUnavailable", "Unauthorized", "Unprocessable",
    "Display", "Done", "Error", "Event", "InputRequest", "RunError", "RunResult", "RunState", "Stderr", "Stdout",
    "event_from",
]
