"""The metadata store interface: sessions and their run history.

Small on purpose, so another database can follow SQLite. The store knows nothing of
kernels or files; it keeps documents. Backends are chosen by URL scheme
(``sqlite:///path``, ``sqlite://:memory:``) through the ``era_kernel.stores`` entry-point
group, built-ins registered the same way as third parties.
"""

from __future__ import annotations

import abc
from typing import Any, Awaitable


class SessionExists(Exception):
    """``insert_session`` found the id taken."""


class MetadataStore(abc.ABC):
    """Async store of session records and run records (plain dicts of JSON values).

    A store applies its calls in the order they are made (one connection, one queue):
    a read made after a write, even one not yet awaited, sees it."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Called once by the engine at start: connect, create or migrate the schema."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Called once by the engine at shutdown."""

    @abc.abstractmethod
    async def insert_session(self, record: dict[str, Any]) -> dict[str, Any]:
        """Insert a new session; raises ``SessionExists``. Returns the record with ``seq``
        (a unique, never reused integer, larger than every one before it; the engine
        derives the sandbox uid from it, and pages the session list by it)."""

    @abc.abstractmethod
    async def get_session(self, session_id: str) -> dict[str, Any] | None:
        """The record, or None."""

    @abc.abstractmethod
    async def list_sessions(self, limit: int | None = None, after: int | None = None) -> list[dict[str, Any]]:
        """Records in ``seq`` order (oldest first) whose ``seq`` is greater than ``after``,
        at most ``limit`` of them (None: no bound). Each record carries its ``seq``.

        The engine pages with it: one page per ``SessionManager.list`` (``GET
        /api/sessions``; ``after`` comes from the client's cursor), and chunk by chunk in
        its passes over every session (start, bulk delete, culling). A backend answers
        from an index on ``seq``, never by reading the rows before ``after``."""

    async def count_sessions(self) -> int:
        """How many sessions there are (stats, /health, /metrics ask on every call).
        Derived from ``list_sessions``; a backend overrides it when it can count cheaply."""
        return len(await self.list_sessions())

    @abc.abstractmethod
    async def update_session(self, session_id: str, changes: dict[str, Any]) -> dict[str, Any] | None:
        """Apply ``changes`` (top-level fields) and return the new record, or None."""

    @abc.abstractmethod
    async def delete_session(self, session_id: str) -> bool:
        """Delete the record and its runs; True when it existed."""

    @abc.abstractmethod
    def add_run(self, session_id: str, run: dict[str, Any],
                session_changes: dict[str, Any] | None = None) -> Awaitable[None]:
        """Append a run record (code, outputs, exit code, timings) to the history and, in
        the same transaction, apply ``session_changes`` to the session (last_run_at, data).

        Not a coroutine: the write is queued before this returns, and (as for every call)
        applied in order, so any call made after it sees the run. The engine answers a run
        without waiting for its record to land and awaits the result in the background.
        The caller must not change ``run`` or ``session_changes`` afterwards: a backend may
        encode them when the write is applied (SQLite does, off the event loop)."""

    @abc.abstractmethod
    async def list_runs(self, session_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """The most recent ``limit`` runs, oldest first."""


def store_for_url(url: str) -> MetadataStore:
    """Build the backend registered for the URL's scheme."""
    from importlib.metadata import entry_points

    scheme = url.split(":", 1)[0]
    for ep in entry_points(group="era_kernel.stores"):
        if ep.name == scheme:
            return ep.load()(url)
    if scheme == "sqlite":  # also works from a source tree that was not pip-installed
        from .sqlite import SQLiteStore

        return SQLiteStore(url)
    raise ValueError(f"no metadata store for URL scheme {scheme!r}")
