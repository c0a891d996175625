"""The metadata store interface: sessions, their run history and their schedules.

Small on purpose, so another database can follow SQLite. The store knows nothing of
kernels or files; it keeps documents. Backends are chosen by URL scheme
(``sqlite:///path``, ``sqlite://:memory:``, ``postgresql://...``) through the ``era_kernel.stores`` entry-point
group, built-ins registered the same way as third parties.
"""

from __future__ import annotations

import abc
from typing import Any, Awaitable


# How many events of a session's event log a store keeps (the newest; add_session_event).
SESSION_EVENTS_KEPT = 1000


class SessionExists(Exception):
    """``insert_session`` found the id taken."""


class KeyExists(Exception):
    """``insert_api_key`` found the id taken, or the name held by a key not revoked."""


class LeaseLost(Exception):
    """A write for a session under a fencing token its lease no longer has: another
    replica took the session over (``MetadataStore.fence``). Nothing was written."""


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
    async def list_sessions(self, limit: int | None = None, after: int | None = None,
                            owner: str | None = None) -> list[dict[str, Any]]:
        """Records in ``seq`` order (oldest first) whose ``seq`` is greater than ``after``,
        at most ``limit`` of them (None: no bound). Each record carries its ``seq``. With
        ``owner``, only the records whose ``owner`` field equals it (a tenant's sessions;
        records without the field match no owner).

        The engine pages with it: one page per ``SessionManager.list`` (``GET
        /api/sessions``; ``after`` comes from the client's cursor), and chunk by chunk in
        its passes over every session (start, bulk delete, culling). A backend answers
        from an index on ``seq``, never by reading the rows before ``after``."""

    async def count_sessions(self, owner: str | None = None) -> int:
        """How many sessions there are (stats, /health, /metrics ask on every call), or
        how many ``owner`` has (a tenant's session limit, checked at each create).
        Derived from ``list_sessions``; a backend overrides it when it can count cheaply."""
        return len(await self.list_sessions(owner=owner))

    @abc.abstractmethod
    async def update_session(self, session_id: str, changes: dict[str, Any]) -> dict[str, Any] | None:
        """Apply ``changes`` (top-level fields) and return the new record, or None."""

    @abc.abstractmethod
    async def delete_session(self, session_id: str) -> bool:
        """Delete the record and its runs; True when it existed."""

    @abc.abstractmethod
    def put_run(self, session_id: str, run: dict[str, Any],
                session_changes: dict[str, Any] | None = None) -> Awaitable[None]:
        """Insert or replace the session's run record ``run["run_id"]`` (a run id is
        unique within its session, not across sessions): its ``status`` (completed when
        absent) and the whole document as given; in the same transaction, apply
        ``session_changes`` to the session
        (last_run_at, data). A record keeps its place (submission order) when replaced.

        Called by the engine when a run is submitted (``queued``), starts (``running``)
        and ends (``completed``, ``failed``, ``cancelled`` or ``interrupted``, with its
        result). Not a coroutine: the write is queued before this returns, and (as for
        every call) applied in order, so any call made after it sees the run; the engine
        answers a run without waiting for its record to land. The caller must not change
        ``run`` or ``session_changes`` afterwards: a backend may encode them when the
        write is applied (SQLite does, off the event loop)."""

    def add_run(self, session_id: str, run: dict[str, Any],
                session_changes: dict[str, Any] | None = None) -> Awaitable[None]:
        """A finished run into the history: ``put_run`` of a record whose ``status`` is
        completed unless it says otherwise."""
        return self.put_run(session_id, run, session_changes)

    @abc.abstractmethod
    async def get_run(self, session_id: str, run_id: str) -> dict[str, Any] | None:
        """One run record of the session, whatever its status, or None."""

    @abc.abstractmethod
    async def list_runs(self, session_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """The history: the most recent ``limit`` finished runs (not queued or running),
        oldest first."""

    @abc.abstractmethod
    async def unfinished_runs(self) -> list[dict[str, Any]]:
        """Every queued or running run of every session, in submission order, each with
        its ``session_id``. Called once by a starting server: a running one was cut off
        by the previous process, a queued one still has to run."""

    @abc.abstractmethod
    def append_events(self, session_id: str, events: list[dict[str, Any]]) -> Awaitable[None]:
        """Append events to the session's journal, in one transaction; each carries its
        ``seq`` (per session, strictly increasing, given by the engine) and ``run_id``.
        Not a coroutine (queued, applied in order, like ``put_run``); the engine writes a
        batch at a time (group commit), never one transaction per event."""

    @abc.abstractmethod
    async def read_events(self, session_id: str, after: int = 0, limit: int = 1000,
                          run_id: str | None = None) -> list[dict[str, Any]]:
        """Journal events with ``seq`` greater than ``after``, oldest first, at most
        ``limit``; only one run's when ``run_id`` is given."""

    @abc.abstractmethod
    async def last_event_seq(self, session_id: str) -> int:
        """The session's highest journal ``seq`` (0 when it has none): where the engine's
        counter resumes after a restart."""

    # ---- schedules (era_kernel/engine/schedules.py) ------------------------------------------
    # A schedule is a document ``{id, session_id, cron, timezone, code, created_at, ...}``;
    # deleting its session deletes it (``delete_session``). Its firings are claimed here,
    # so that two servers on one database fire each slot once: the store's constraint
    # decides, never a lock in one process's memory.

    @abc.abstractmethod
    async def put_schedule(self, schedule: dict[str, Any]) -> bool:
        """Insert the schedule ``schedule["id"]`` of session ``schedule["session_id"]``, or
        replace its document (it keeps its place in the listing). False, and nothing
        stored, when the session does not exist. Called by the engine when a client
        creates a schedule."""

    @abc.abstractmethod
    async def update_schedule(self, schedule_id: str, changes: dict[str, Any]) -> dict[str, Any] | None:
        """Apply ``changes`` (top-level fields) to the schedule's document, in one
        transaction, and return it as ``list_schedules`` would; None (and nothing created)
        when it is gone. Called by the scheduler to note a firing it skipped, which may
        race with a delete: an update never brings a deleted schedule back."""

    @abc.abstractmethod
    async def list_schedules(self, session_id: str | None = None) -> list[dict[str, Any]]:
        """The session's schedules (every session's when None), oldest first, each with
        ``last_slot`` and ``last_run_id`` of its latest claimed firing (None before the
        first). Called by the engine to answer the schedules routes, and by the scheduler
        when it starts and whenever the schedules may have changed."""

    @abc.abstractmethod
    async def delete_schedule(self, session_id: str, schedule_id: str) -> bool:
        """Delete the session's schedule and its firings; True when it existed (a schedule
        of another session is not touched). Called when a client deletes it."""

    @abc.abstractmethod
    async def claim_firing(self, schedule_id: str, slot: str, run_id: str | None) -> bool:
        """Claim the schedule's firing at ``slot`` (a UTC time, ``2026-01-01T00:05:00.000Z``:
        such strings sort as the times do) for the run ``run_id``. True for exactly one
        caller per (schedule, slot), whichever store object or process it calls from, and
        never when the schedule is gone or a later slot was already claimed (a scheduler
        that fell behind never fires the past). A backend decides with a unique
        constraint, in one atomic statement. Called by the scheduler before it submits
        the firing's run; the latest claim is the schedule's ``last_slot``, and a backend
        may drop the older ones."""


    @abc.abstractmethod
    def add_session_event(self, session_id: str, event: dict[str, Any],
                          session_changes: dict[str, Any] | None = None) -> Awaitable[None]:
        """Append ``event`` to the session's event log and, in the same transaction, apply
        ``session_changes`` to the session (its kernel's ``last_exit``).

        Called by the engine's session log (engine/session_log.py) for each lifecycle
        event: a kernel started, culled, evicted, died, restarted or stopped, a package
        setup done or failed. It is called from a lifecycle watcher, which cannot await,
        so it is not a coroutine: queued before it returns and applied in order, like
        ``put_run``, and the caller must not change ``event`` afterwards. The log is
        bounded: only the newest ``SESSION_EVENTS_KEPT`` events of a session are kept,
        older ones are deleted in the same transaction. An event for a session that does
        not exist (deleted meanwhile) may be refused or dropped, never kept."""

    @abc.abstractmethod
    async def list_session_events(self, session_id: str, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """The session's events with ``id`` greater than ``after``, oldest first, at most
        ``limit``: each the document as given, plus its ``id`` (given by the store: it
        grows with every event and is never reused, so a client pages with the last one
        it saw). Called for ``GET /api/sessions/{id}/events``."""

    # ---- replicas ---------------------------------------------------------------------------
    # Servers sharing one store register themselves: a document ``{id, address, capacity,
    # ...}`` (the address other replicas reach it at), refreshed by a heartbeat. The store
    # stamps each put with its own clock, so replicas whose clocks differ still agree on
    # which heartbeats are old.

    @abc.abstractmethod
    async def put_replica(self, replica: dict[str, Any]) -> dict[str, Any]:
        """Register the replica ``replica["id"]`` or refresh it (its document replaced,
        its place in the listing kept), stamping its heartbeat now; returns it as
        ``list_replicas`` would. Called by a server when it starts and at each heartbeat."""

    @abc.abstractmethod
    async def list_replicas(self) -> list[dict[str, Any]]:
        """Every registered replica, first registered first: its document plus
        ``heartbeat_at`` and ``heartbeat_age`` (``heartbeat_fields``). Whether an old
        heartbeat means a dead replica is the caller's to decide."""

    @abc.abstractmethod
    async def delete_replica(self, replica_id: str) -> bool:
        """Remove the replica's registration; True when it existed. Called by a server
        that stops cleanly."""


    # ---- session leases (era_kernel/engine/ownership.py) ------------------------------------------
    # A session's live kernel belongs to one replica at a time: a lease row per session id
    # ``{session_id, replica, token, expires_in}``. ``token`` (the fencing token) grows by
    # one each time the lease changes hands and never goes back, also across a session
    # deleted and made again under its id. Expiry is by the store's clock, like heartbeats.

    @abc.abstractmethod
    async def acquire_lease(self, session_id: str, replica_id: str, ttl: float) -> dict[str, Any]:
        """Take or renew the session's lease for ``ttl`` seconds, atomically: free (never
        held, released, or expired) or held by ``replica_id`` already, it becomes
        ``replica_id``'s; held by another replica whose lease has not expired, it is left
        alone. Returns the lease as it now is: ``{session_id, replica, token, expires_in,
        previous}``; it is the caller's when ``replica`` is ``replica_id``. The token is
        kept while the same replica holds it (also renewing an expired lease nobody
        took), and is the last one plus one when it changes hands; ``previous`` is the
        replica that held it before a change of hands (None otherwise, or when it was free)."""

    @abc.abstractmethod
    async def renew_leases(self, replica_id: str, tokens: dict[str, int], ttl: float) -> list[str]:
        """Extend, by ``ttl`` seconds from now, each lease of ``tokens`` (session id ->
        token) that ``replica_id`` still holds under that token, in one statement; returns
        the session ids it no longer holds (taken over, or ended). Called by each replica's
        lease heartbeat."""

    @abc.abstractmethod
    async def end_lease(self, session_id: str, token: int | None = None) -> bool:
        """Free the session's lease and raise its token by one, so that writes fenced by
        the old token are refused; with ``token``, only when the lease still has it.
        True when a lease was ended. Called by an owner that stops cleanly (its token),
        and by any replica deleting a session (none)."""

    @abc.abstractmethod
    async def get_leases(self, session_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The leases of these sessions that exist (free or held, expired or not), by id,
        each as ``acquire_lease`` returns it (``previous`` None); ``expires_in`` is
        negative once expired."""

    def fence(self, session_id: str, token: int | None) -> None:
        """Make this store object's writes for the session (``update_session``,
        ``put_run``, ``append_events``, ``add_session_event``) conditional on the session's
        lease still having ``token``, checked in the write's own transaction, which holds
        the lease row against a change of hands until it commits: a write after the lease
        changed hands raises (or its future fails with) ``LeaseLost`` and changes nothing.
        ``None``: unfenced again (the default: a single server takes no leases)."""
        fences = self.__dict__.setdefault("_fences", {})
        if token is None:
            fences.pop(session_id, None)
        else:
            fences[session_id] = token

    def fence_of(self, session_id: str) -> int | None:
        return self.__dict__.get("_fences", {}).get(session_id)

    # ---- API keys (era_kernel/tenants.py) --------------------------------------------------------
    # A key is a document ``{id, name, hash, created_at, admin, limits}``: ``id`` the public
    # prefix of the key a client sends, ``hash`` the digest of its secret part (the key
    # itself is never stored). Revoked keys stay listed, with ``revoked_at``.

    @abc.abstractmethod
    async def insert_api_key(self, key: dict[str, Any]) -> dict[str, Any]:
        """Store a new key; returns it as ``get_api_key`` would (``revoked_at`` None).
        Raises ``KeyExists`` when its id is taken or a key not revoked has its name (a
        revoked key's name may be used again). Called by ``era keys create``."""

    @abc.abstractmethod
    async def get_api_key(self, key_id: str) -> dict[str, Any] | None:
        """The key with this id, revoked or not, or None. Called to authenticate a
        request (at most once a second per key: tenants.py caches for that long)."""

    @abc.abstractmethod
    async def list_api_keys(self) -> list[dict[str, Any]]:
        """Every key, revoked ones included, oldest first."""

    @abc.abstractmethod
    async def revoke_api_key(self, name_or_id: str) -> dict[str, Any] | None:
        """Revoke the key not yet revoked whose id or name this is, stamping
        ``revoked_at`` (UTC, ISO); returns it, or None when there is no such key (an
        already revoked one included). Called by ``era keys revoke``."""


def lease_change(row: tuple[str | None, int, float] | None, replica_id: str, now: float
                 ) -> tuple[bool, int, str | None]:
    """``acquire_lease``'s rule on the lease row ``(replica, token, expires_at)`` (None:
    no row): whether ``replica_id`` gets it, its token then, and the previous holder when
    it changes hands. One rule for every backend, applied under the row's lock."""
    if row is None:
        return True, 1, None
    replica, token, expires_at = row
    if replica == replica_id:
        return True, token, None
    if replica is None or expires_at <= now:
        return True, token + 1, replica
    return False, token, None


def utc_stamp() -> str:
    """Now, as the engine writes times: ``2026-01-01T00:00:00.000Z``."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def heartbeat_fields(heartbeat_at: float, now: float) -> dict[str, Any]:
    """A replica's heartbeat as ``list_replicas`` gives it: the time of its last
    ``put_replica`` (UTC, ISO, like every time the engine writes) and its age in seconds,
    both by the store's clock (the one clock every replica shares)."""
    from datetime import datetime, timezone

    stamp = datetime.fromtimestamp(heartbeat_at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return {"heartbeat_at": stamp, "heartbeat_age": max(0.0, now - heartbeat_at)}


def url_without_password(url: str) -> str:
    """The store URL fit for a log or a report: a password in it (``postgresql://u:pw@h``)
    replaced by ``***``."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


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
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresStore

        return PostgresStore(url)
    raise ValueError(f"no metadata store for URL scheme {scheme!r}")
