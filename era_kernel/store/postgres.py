"""PostgreSQL metadata store: psycopg 3 (async) on a psycopg_pool connection pool.

For several servers on one database (``ERA_STORE_URL=postgresql://...``). Records are
JSON documents kept as text beside the few columns we query by, as in SQLite: text keeps
every JSON value exactly (jsonb would refuse a NUL in a string and reorder keys). The
schema is versioned in ``era_schema_migrations``: one row per applied entry of
``MIGRATIONS``, applied under an advisory lock so replicas starting together migrate once.

Ordering (MetadataStore: calls apply in the order they are made) without one connection:
every call is a task chained to the calls before it. A write waits for every earlier
call; a read waits only for the last earlier write, so the reads between two writes run
side by side on pooled connections. A cancelled caller does not stop a call already made.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable, TypeVar

from .base import (SESSION_EVENTS_KEPT, KeyExists, LeaseLost, MetadataStore, SessionExists, heartbeat_fields,
                   lease_change, utc_stamp)

T = TypeVar("T")

# Connections per store object: one write at a time, reads beside it.
POOL_MAX = 8
MIGRATION_LOCK = 0x45524131  # pg_advisory_xact_lock key: "ERA1"

MIGRATIONS: list[str] = [
    # 1: the schema of SQLite's migration 2, in one step
    """
    CREATE TABLE sessions (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL,
        doc TEXT NOT NULL
    );
    CREATE TABLE runs (
        n BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        run_id TEXT NOT NULL,
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        status TEXT NOT NULL,
        doc TEXT NOT NULL,
        UNIQUE (session_id, run_id)
    );
    CREATE INDEX runs_by_session ON runs(session_id, n);
    CREATE INDEX runs_unfinished ON runs(status) WHERE status IN ('queued', 'running');
    CREATE TABLE run_events (
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        seq BIGINT NOT NULL,
        run_id TEXT,
        doc TEXT NOT NULL,
        PRIMARY KEY (session_id, seq)
    );
    CREATE TABLE session_events (
        n BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        doc TEXT NOT NULL
    );
    CREATE INDEX session_events_by_session ON session_events(session_id, n);
    CREATE TABLE schedules (
        n BIGINT GENERATED ALWAYS AS IDENTITY,
        id TEXT PRIMARY KEY,
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        doc TEXT NOT NULL
    );
    CREATE INDEX schedules_by_session ON schedules(session_id, n);
    CREATE TABLE schedule_firings (
        schedule_id TEXT NOT NULL REFERENCES schedules(id) ON DELETE CASCADE,
        slot TEXT NOT NULL,
        run_id TEXT,
        PRIMARY KEY (schedule_id, slot)
    );
    """,
    # 2: the replicas sharing this store (MetadataStore.put_replica)
    """
    CREATE TABLE replicas (
        n BIGINT GENERATED ALWAYS AS IDENTITY,
        id TEXT PRIMARY KEY,
        heartbeat_at DOUBLE PRECISION NOT NULL,
        doc TEXT NOT NULL
    );
    """,
    # 3: tenants' API keys (MetadataStore.insert_api_key); a name is unique among live keys
    """
    CREATE TABLE api_keys (
        n BIGINT GENERATED ALWAYS AS IDENTITY,
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        revoked_at TEXT,
        doc TEXT NOT NULL
    );
    CREATE UNIQUE INDEX api_keys_live_name ON api_keys(name) WHERE revoked_at IS NULL;
    """,
    # 4: sessions' leases (MetadataStore.acquire_lease); no foreign key: a token outlives
    # its session, so one made again under the same id never reuses it
    """
    CREATE TABLE session_leases (
        session_id TEXT PRIMARY KEY,
        replica TEXT,
        token BIGINT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
    );
    """,
]

# Applies %(changes)s (a JSON object) to the document of session %(sid)s: its top-level
# fields replaced or added, the rest kept (json, not jsonb: values keep their exact text,
# NUL escapes included). Returns the new (seq, doc), or no row when the session is gone. An
# UPDATE that meets another server's change to the row re-reads it before merging.
_MERGE = """
UPDATE sessions SET doc = (
    SELECT COALESCE(json_object_agg(key, value ORDER BY pos), '{}'::json)::text FROM (
        SELECT DISTINCT ON (key) key, value, pos FROM (
            SELECT key, value, pos, 1 AS pri FROM json_each(sessions.doc::json) WITH ORDINALITY AS d(key, value, pos)
            UNION ALL
            SELECT key, value, pos + 1000000000, 0 FROM json_each(%(changes)s::json) WITH ORDINALITY AS c(key, value, pos)
        ) entries ORDER BY key, pri
    ) merged)
WHERE id = %(sid)s RETURNING seq, doc"""


class PostgresStore(MetadataStore):
    def __init__(self, url: str):
        self.url = url
        self._pool: Any = None
        self._last_write: asyncio.Future | None = None
        self._reads: list[asyncio.Future] = []  # reads made since the last write

    # ---- the order ---------------------------------------------------------------------------
    def _submit(self, write: bool, fn: Callable[[Any], Awaitable[T]], tx: bool = False,
                fence: str | None = None) -> "asyncio.Future[T]":
        """Run ``fn(connection)`` in call order (see the module doc): in autocommit when it
        is one statement, in a transaction (``tx``) when it is more. ``fence``: a write for
        that session, under the fencing token it has now (``MetadataStore.fence``)."""
        waits = [self._last_write] if self._last_write is not None else []
        if write:
            waits += self._reads
        token = self.fence_of(fence) if fence is not None else None
        if token is not None:
            fn = self._checked(fence, token, fn)
            tx = True
        task = asyncio.ensure_future(self._apply(waits, fn, tx))
        if write:
            self._last_write, self._reads = task, []
        else:
            self._reads = [r for r in self._reads if not r.done()]
            self._reads.append(task)
        # Shielded: a cancelled caller does not cancel the call it made (nor those after).
        return asyncio.shield(task)

    def _checked(self, session_id: str, token: int, fn: Callable[[Any], Awaitable[T]]) -> Callable[[Any], Awaitable[T]]:
        async def checked(conn: Any) -> T:
            # FOR SHARE: a change of hands (an UPDATE of this row) waits for this write to
            # commit, and this check sees any change of hands committed before it.
            row = await self._one(conn, "SELECT token FROM session_leases WHERE session_id = %s FOR SHARE",
                                  (session_id,))
            if row is None or row[0] != token:
                raise LeaseLost(f"session {session_id}: fencing token {token} is stale")
            return await fn(conn)

        return checked

    async def _apply(self, waits: list[asyncio.Future], fn: Callable[[Any], Awaitable[T]], tx: bool) -> T:
        if waits:
            await asyncio.wait(waits)  # their outcomes are their callers'
        if self._pool is None:
            raise RuntimeError("store not opened")
        async with self._pool.connection() as conn:
            if not tx:  # one statement, in autocommit: no BEGIN and COMMIT round trips
                return await fn(conn)
            async with conn.transaction():
                return await fn(conn)

    async def _unordered(self, fn: Callable[[Any], Awaitable[T]], tx: bool = False) -> T:
        """Out of the call order, at once on a pooled connection: for the lease calls, which
        no other call's outcome depends on, and which must not wait behind a queue of
        journal writes (a renewal that waits past the lease's expiry loses it)."""
        return await asyncio.shield(asyncio.ensure_future(self._apply([], fn, tx)))

    async def _read(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        return await self._submit(False, fn)

    async def _write(self, fn: Callable[[Any], Awaitable[T]], tx: bool = False) -> T:
        return await self._submit(True, fn, tx)

    @staticmethod
    async def _one(conn: Any, query: str, args: tuple = ()) -> Any:
        cur = await conn.execute(query, args)
        return await cur.fetchone()

    @staticmethod
    async def _all(conn: Any, query: str, args: tuple = ()) -> list[Any]:
        cur = await conn.execute(query, args)
        return await cur.fetchall()

    # ---- open and close ----------------------------------------------------------------------
    async def open(self) -> None:
        try:
            from psycopg_pool import AsyncConnectionPool
        except ImportError as exc:  # an optional dependency: say which
            raise RuntimeError("ERA_STORE_URL is postgresql://... but psycopg is not installed: "
                               "pip install 'era-kernel[postgres]'") from exc
        pool = AsyncConnectionPool(self.url, min_size=1, max_size=POOL_MAX, open=False,
                                   kwargs={"autocommit": True}, name="era-store")
        await pool.open(wait=True, timeout=30)
        try:
            async with pool.connection() as conn:
                await self._migrate(conn)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    @staticmethod
    async def _migrate(conn: Any) -> None:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            await conn.execute("CREATE TABLE IF NOT EXISTS era_schema_migrations "
                               "(version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            row = await PostgresStore._one(conn, "SELECT COALESCE(MAX(version), 0) FROM era_schema_migrations")
            version = row[0]
            if version > len(MIGRATIONS):
                raise RuntimeError(f"store schema version {version} is newer than this ERA ({len(MIGRATIONS)})")
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                await conn.execute(script)  # no parameters: several statements in one go
                await conn.execute("INSERT INTO era_schema_migrations (version) VALUES (%s)", (number,))

    async def close(self) -> None:
        """A write like the others: the calls made before it are applied first."""
        async def nothing(conn: Any) -> None:
            return None

        if self._pool is None:
            return
        await self._write(nothing)
        pool, self._pool = self._pool, None
        await pool.close()

    async def schema_version(self) -> int:
        row = await self._read(lambda conn: self._one(conn, "SELECT MAX(version) FROM era_schema_migrations"))
        return row[0]

    # ---- sessions ----------------------------------------------------------------------------
    async def insert_session(self, record: dict[str, Any]) -> dict[str, Any]:
        # The document is kept without its seq (the column is the one truth; reads add it).
        doc = json.dumps({k: v for k, v in record.items() if k != "seq"})

        async def insert(conn: Any) -> dict[str, Any]:
            # ON CONFLICT rather than an exception: nothing to roll back. The refused
            # insert still takes a seq from the identity, which only leaves a gap.
            row = await self._one(conn, "INSERT INTO sessions (id, created_at, doc) VALUES (%s, %s, %s) "
                                  "ON CONFLICT (id) DO NOTHING RETURNING seq", (record["id"], record["created_at"], doc))
            if row is None:
                raise SessionExists(record["id"])
            return dict(json.loads(doc), seq=row[0])

        return await self._write(insert)

    async def get_session(self, session_id: str) -> dict[str, Any] | None:
        row = await self._read(lambda c: self._one(c, "SELECT seq, doc FROM sessions WHERE id = %s", (session_id,)))
        return dict(json.loads(row[1]), seq=row[0]) if row else None

    async def list_sessions(self, limit: int | None = None, after: int | None = None,
                            owner: str | None = None) -> list[dict[str, Any]]:
        # LIMIT NULL is no limit; the primary key on seq makes it a range scan.
        rows = await self._read(lambda c: self._all(
            c, "SELECT seq, doc FROM sessions WHERE seq > %(after)s AND (%(owner)s::text IS NULL OR "
               "doc::json->>'owner' = %(owner)s) ORDER BY seq LIMIT %(limit)s",
            {"after": -1 if after is None else after, "owner": owner, "limit": limit}))
        return [dict(json.loads(doc), seq=seq) for seq, doc in rows]

    async def count_sessions(self, owner: str | None = None) -> int:
        return (await self._read(lambda c: self._one(
            c, "SELECT COUNT(*) FROM sessions WHERE %(owner)s::text IS NULL OR doc::json->>'owner' = %(owner)s",
            {"owner": owner})))[0]

    async def _changed(self, conn: Any, session_id: str, changes: dict[str, Any] | None, before: str = "",
                       params: dict[str, Any] | None = None, fallback: Callable[[Any], Awaitable[Any]] | None = None,
                       ) -> dict[str, Any] | None:
        """Apply ``changes`` to the session's document in ONE statement (``before``: data-
        modifying CTEs to run with it, e.g. the run record), and return the new record.

        One statement, in autocommit, is one round trip instead of five (BEGIN, SELECT ...
        FOR UPDATE, UPDATE, COMMIT): the engine writes a session change with most runs.
        The merge runs in the database (``_MERGE``); a value PostgreSQL's json type refuses
        (NaN from Python's encoder) makes it fail as a whole, and then ``fallback`` (the
        CTEs' work again) and the merge happen in Python, in a transaction."""
        from psycopg.errors import DataError

        params = dict(params or {}, sid=session_id,
                      changes=json.dumps({k: v for k, v in (changes or {}).items() if k != "seq"}))
        try:
            row = await self._one(conn, before + _MERGE, params)
        except DataError:
            async with conn.transaction():
                if fallback is not None:
                    await fallback(conn)
                return await self._update(conn, session_id, changes or {})
        return dict(json.loads(row[1]), seq=row[0]) if row else None

    @staticmethod
    async def _update(conn: Any, session_id: str, changes: dict[str, Any]) -> dict[str, Any] | None:
        # FOR UPDATE: another server writing the same session waits, so no change is lost.
        row = await PostgresStore._one(conn, "SELECT seq, doc FROM sessions WHERE id = %s FOR UPDATE", (session_id,))
        if row is None:
            return None
        seq, doc = row[0], json.loads(row[1])
        doc.update(changes)
        doc.pop("seq", None)
        await conn.execute("UPDATE sessions SET doc = %s WHERE seq = %s", (json.dumps(doc), seq))
        return dict(doc, seq=seq)

    async def update_session(self, session_id: str, changes: dict[str, Any]) -> dict[str, Any] | None:
        changes = json.loads(json.dumps(changes))  # the caller's to change once this returns
        return await self._submit(True, lambda c: self._changed(c, session_id, changes), fence=session_id)

    async def delete_session(self, session_id: str) -> bool:
        # Runs, journal, events, schedules and firings go by ON DELETE CASCADE.
        async def delete(conn: Any) -> bool:
            cur = await conn.execute("DELETE FROM sessions WHERE id = %s", (session_id,))
            return cur.rowcount > 0

        return await self._write(delete)

    # ---- runs --------------------------------------------------------------------------------
    def put_run(self, session_id: str, run: dict[str, Any],
                session_changes: dict[str, Any] | None = None) -> "asyncio.Future[None]":
        # Dropped, not refused, when the session is gone (INSERT ... SELECT finds no row): a
        # run recorded in the background after a delete has nowhere to go.
        insert = ("INSERT INTO runs (run_id, session_id, status, doc) SELECT %(run_id)s, %(sid)s, %(status)s, "
                  "%(doc)s WHERE EXISTS (SELECT 1 FROM sessions WHERE id = %(sid)s) ON CONFLICT (session_id, run_id) "
                  "DO UPDATE SET status = excluded.status, doc = excluded.doc")

        async def put(conn: Any) -> None:
            params = {"run_id": run["run_id"], "sid": session_id, "status": run.get("status", "completed"),
                      "doc": json.dumps(run)}
            if not session_changes:
                await conn.execute(insert, params)
            else:
                await self._changed(conn, session_id, session_changes, f"WITH run AS ({insert}) ", params,
                                    lambda c: c.execute(insert, params))

        return self._submit(True, put, fence=session_id)  # queued now: see MetadataStore.put_run

    async def get_run(self, session_id: str, run_id: str) -> dict[str, Any] | None:
        row = await self._read(lambda c: self._one(
            c, "SELECT doc FROM runs WHERE run_id = %s AND session_id = %s", (run_id, session_id)))
        return json.loads(row[0]) if row else None

    async def list_runs(self, session_id: str, limit: int = 100) -> list[dict[str, Any]]:
        rows = await self._read(lambda c: self._all(
            c, "SELECT doc FROM (SELECT n, doc FROM runs WHERE session_id = %s AND status NOT IN ('queued', 'running') "
               "ORDER BY n DESC LIMIT %s) newest ORDER BY n", (session_id, limit)))
        return [json.loads(r[0]) for r in rows]

    async def unfinished_runs(self) -> list[dict[str, Any]]:
        rows = await self._read(lambda c: self._all(
            c, "SELECT session_id, doc FROM runs WHERE status IN ('queued', 'running') ORDER BY n"))
        return [dict(json.loads(doc), session_id=sid) for sid, doc in rows]

    # ---- the journal -------------------------------------------------------------------------
    def append_events(self, session_id: str, events: list[dict[str, Any]]) -> "asyncio.Future[None]":
        async def append(conn: Any) -> None:
            # One statement for the whole batch: three arrays, unnested side by side.
            await conn.execute(
                "INSERT INTO run_events (session_id, seq, run_id, doc) "
                "SELECT %s, * FROM unnest(%s::bigint[], %s::text[], %s::text[])",
                (session_id, [e["seq"] for e in events], [e.get("run_id") for e in events],
                 [json.dumps(e) for e in events]))

        return self._submit(True, append, fence=session_id)  # queued now: see MetadataStore.append_events

    async def read_events(self, session_id: str, after: int = 0, limit: int = 1000,
                          run_id: str | None = None) -> list[dict[str, Any]]:
        if run_id is None:
            query, args = ("SELECT doc FROM run_events WHERE session_id = %s AND seq > %s ORDER BY seq LIMIT %s",
                           (session_id, after, limit))
        else:
            query, args = ("SELECT doc FROM run_events WHERE session_id = %s AND seq > %s AND run_id = %s "
                           "ORDER BY seq LIMIT %s", (session_id, after, run_id, limit))
        rows = await self._read(lambda c: self._all(c, query, args))
        return [json.loads(r[0]) for r in rows]

    async def last_event_seq(self, session_id: str) -> int:
        row = await self._read(lambda c: self._one(
            c, "SELECT MAX(seq) FROM run_events WHERE session_id = %s", (session_id,)))
        return row[0] or 0

    # ---- session events ----------------------------------------------------------------------
    def add_session_event(self, session_id: str, event: dict[str, Any],
                          session_changes: dict[str, Any] | None = None) -> "asyncio.Future[None]":
        doc = json.dumps(event)

        # One statement: the insert (dropped when the session is gone: nothing is kept for a
        # later one of its id) and the bound. The delete does not see the row being
        # inserted, so it keeps one fewer of the older rows; its subquery walks the
        # session's index from the newest row, costing the bound, not the history.
        added = ("WITH added AS (INSERT INTO session_events (session_id, doc) SELECT %(sid)s, %(doc)s "
                 "WHERE EXISTS (SELECT 1 FROM sessions WHERE id = %(sid)s) RETURNING n), trimmed AS ("
                 "DELETE FROM session_events WHERE session_id = %(sid)s AND EXISTS (SELECT 1 FROM added) AND n <= "
                 "(SELECT n FROM session_events WHERE session_id = %(sid)s ORDER BY n DESC LIMIT 1 OFFSET %(k)s)) ")
        params = {"sid": session_id, "doc": doc, "k": SESSION_EVENTS_KEPT - 1}

        async def add(conn: Any) -> None:
            if not session_changes:
                await conn.execute(added + "SELECT 1", params)
            else:
                await self._changed(conn, session_id, session_changes, added, params,
                                    lambda c: c.execute(added + "SELECT 1", params))

        return self._submit(True, add, fence=session_id)  # queued now: see MetadataStore.add_session_event

    async def list_session_events(self, session_id: str, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        rows = await self._read(lambda c: self._all(
            c, "SELECT n, doc FROM session_events WHERE session_id = %s AND n > %s ORDER BY n LIMIT %s",
            (session_id, after, limit)))
        return [dict(json.loads(doc), id=n) for n, doc in rows]

    # ---- schedules ---------------------------------------------------------------------------
    # The latest claimed firing of each schedule is its last_slot and last_run_id.
    _SCHEDULES = ("SELECT s.doc, f.slot, f.run_id FROM schedules s LEFT JOIN schedule_firings f ON "
                  "f.schedule_id = s.id AND f.slot = (SELECT MAX(slot) FROM schedule_firings WHERE schedule_id = s.id)")
    _DERIVED = ("last_slot", "last_run_id")  # read from schedule_firings, never kept in the document

    @staticmethod
    def _schedule(row: tuple[str, str | None, str | None]) -> dict[str, Any]:
        doc, slot, run_id = row
        return dict(json.loads(doc), last_slot=slot, last_run_id=run_id)

    async def put_schedule(self, schedule: dict[str, Any]) -> bool:
        doc = json.dumps({k: v for k, v in schedule.items() if k not in self._DERIVED})

        async def put(conn: Any) -> bool:
            # The session row is locked (FOR KEY SHARE) so a delete racing this one waits;
            # an upsert keeps the row (its place in the listing, its firings).
            cur = await conn.execute(
                "INSERT INTO schedules (id, session_id, doc) SELECT %s, %s, %s FROM sessions WHERE id = %s "
                "FOR KEY SHARE ON CONFLICT (id) DO UPDATE SET doc = excluded.doc",
                (schedule["id"], schedule["session_id"], doc, schedule["session_id"]))
            return cur.rowcount > 0

        return await self._write(put)

    async def update_schedule(self, schedule_id: str, changes: dict[str, Any]) -> dict[str, Any] | None:
        changes = {k: v for k, v in json.loads(json.dumps(changes)).items() if k not in self._DERIVED}

        async def update(conn: Any) -> dict[str, Any] | None:
            row = await self._one(conn, "SELECT doc FROM schedules WHERE id = %s FOR UPDATE", (schedule_id,))
            if row is None:
                return None
            doc = json.loads(row[0])
            doc.update(changes)
            await conn.execute("UPDATE schedules SET doc = %s WHERE id = %s", (json.dumps(doc), schedule_id))
            return self._schedule(await self._one(conn, self._SCHEDULES + " WHERE s.id = %s", (schedule_id,)))

        return await self._write(update, tx=True)

    async def list_schedules(self, session_id: str | None = None) -> list[dict[str, Any]]:
        if session_id is None:
            query, args = self._SCHEDULES + " ORDER BY s.n", ()
        else:
            query, args = self._SCHEDULES + " WHERE s.session_id = %s ORDER BY s.n", (session_id,)
        rows = await self._read(lambda c: self._all(c, query, args))
        return [self._schedule(row) for row in rows]

    async def delete_schedule(self, session_id: str, schedule_id: str) -> bool:
        async def delete(conn: Any) -> bool:
            cur = await conn.execute("DELETE FROM schedules WHERE id = %s AND session_id = %s",
                                     (schedule_id, session_id))
            return cur.rowcount > 0

        return await self._write(delete)

    async def claim_firing(self, schedule_id: str, slot: str, run_id: str | None) -> bool:
        async def claim(conn: Any) -> bool:
            # The schedule's row lock orders every claim of it, whichever server makes it:
            # after it, the check for a later slot sees every claim committed before, and
            # two claims of one slot meet at the primary key (the second inserts nothing).
            if await self._one(conn, "SELECT 1 FROM schedules WHERE id = %s FOR UPDATE", (schedule_id,)) is None:
                return False
            cur = await conn.execute(
                "INSERT INTO schedule_firings (schedule_id, slot, run_id) SELECT %(id)s, %(slot)s, %(run)s "
                "WHERE NOT EXISTS (SELECT 1 FROM schedule_firings WHERE schedule_id = %(id)s AND slot > %(slot)s) "
                "ON CONFLICT DO NOTHING", {"id": schedule_id, "slot": slot, "run": run_id})
            inserted = cur.rowcount > 0
            if inserted:  # only the latest claim is ever read: one row per schedule
                await conn.execute("DELETE FROM schedule_firings WHERE schedule_id = %s AND slot < %s",
                                   (schedule_id, slot))
            return inserted

        return await self._write(claim, tx=True)

    # ---- replicas ----------------------------------------------------------------------------
    # Heartbeats are stamped and aged by the database server's clock, the one all share.
    _NOW = "extract(epoch from clock_timestamp())::double precision"

    async def put_replica(self, replica: dict[str, Any]) -> dict[str, Any]:
        doc = json.dumps(replica)

        async def put(conn: Any) -> dict[str, Any]:
            row = await self._one(conn, f"INSERT INTO replicas (id, heartbeat_at, doc) VALUES (%s, {self._NOW}, %s) "
                                  "ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, "
                                  "doc = excluded.doc RETURNING heartbeat_at", (replica["id"], doc))
            return dict(json.loads(doc), **heartbeat_fields(row[0], row[0]))

        return await self._write(put)

    async def list_replicas(self) -> list[dict[str, Any]]:
        rows = await self._read(lambda c: self._all(
            c, f"SELECT doc, heartbeat_at, {self._NOW} FROM replicas ORDER BY n"))
        return [dict(json.loads(doc), **heartbeat_fields(at, now)) for doc, at, now in rows]

    async def delete_replica(self, replica_id: str) -> bool:
        async def delete(conn: Any) -> bool:
            cur = await conn.execute("DELETE FROM replicas WHERE id = %s", (replica_id,))
            return cur.rowcount > 0

        return await self._write(delete)

    # ---- session leases (expiry by the database server's clock, as heartbeats) ---------------
    async def acquire_lease(self, session_id: str, replica_id: str, ttl: float) -> dict[str, Any]:
        async def acquire(conn: Any) -> dict[str, Any]:
            # A first lease of the id: inserted, or met by another server's insert (then read).
            await conn.execute("INSERT INTO session_leases VALUES (%s, NULL, 0, 0) ON CONFLICT DO NOTHING",
                               (session_id,))
            replica, token, expires_at, now = await self._one(
                conn, f"SELECT replica, token, expires_at, {self._NOW} FROM session_leases WHERE session_id = %s "
                "FOR UPDATE", (session_id,))
            taken, token, previous = lease_change((replica, token, expires_at) if token else None, replica_id, now)
            if not taken:
                return {"session_id": session_id, "replica": replica, "token": token, "expires_in": expires_at - now,
                        "previous": None}
            await conn.execute("UPDATE session_leases SET replica = %s, token = %s, expires_at = %s "
                               "WHERE session_id = %s", (replica_id, token, now + ttl, session_id))
            return {"session_id": session_id, "replica": replica_id, "token": token, "expires_in": ttl,
                    "previous": previous}

        return await self._unordered(acquire, tx=True)

    async def renew_leases(self, replica_id: str, tokens: dict[str, int], ttl: float) -> list[str]:
        async def renew(conn: Any) -> list[str]:
            rows = await self._all(
                conn, f"UPDATE session_leases l SET expires_at = {self._NOW} + %s FROM unnest(%s::text[], "
                "%s::bigint[]) AS t(sid, token) WHERE l.session_id = t.sid AND l.token = t.token AND l.replica = %s "
                "RETURNING l.session_id", (ttl, list(tokens), list(tokens.values()), replica_id))
            held = {row[0] for row in rows}
            return [sid for sid in tokens if sid not in held]

        return await self._unordered(renew)

    async def end_lease(self, session_id: str, token: int | None = None) -> bool:
        async def end(conn: Any) -> bool:
            cur = await conn.execute("UPDATE session_leases SET replica = NULL, expires_at = 0, token = token + 1 "
                                     "WHERE session_id = %(sid)s AND (%(token)s::bigint IS NULL OR token = %(token)s)",
                                     {"sid": session_id, "token": token})
            return cur.rowcount > 0

        return await self._write(end)

    async def get_leases(self, session_ids: list[str]) -> dict[str, dict[str, Any]]:
        rows = await self._read(lambda c: self._all(
            c, f"SELECT session_id, replica, token, expires_at - {self._NOW} FROM session_leases "
               "WHERE session_id = ANY(%s) AND token > 0", (list(session_ids),)))
        return {sid: {"session_id": sid, "replica": replica, "token": token, "expires_in": left, "previous": None}
                for sid, replica, token, left in rows}

    # ---- API keys ----------------------------------------------------------------------------
    @staticmethod
    def _key(row: Any) -> dict[str, Any]:
        return dict(json.loads(row[0]), revoked_at=row[1])

    async def insert_api_key(self, key: dict[str, Any]) -> dict[str, Any]:
        doc = json.dumps({k: v for k, v in key.items() if k != "revoked_at"})

        async def insert(conn: Any) -> dict[str, Any]:
            # ON CONFLICT DO NOTHING covers both constraints (id, live name): nothing to roll back.
            row = await self._one(conn, "INSERT INTO api_keys (id, name, doc) VALUES (%s, %s, %s) "
                                  "ON CONFLICT DO NOTHING RETURNING doc, revoked_at", (key["id"], key["name"], doc))
            if row is None:
                raise KeyExists(key["name"])
            return self._key(row)

        return await self._write(insert)

    async def get_api_key(self, key_id: str) -> dict[str, Any] | None:
        row = await self._read(lambda c: self._one(c, "SELECT doc, revoked_at FROM api_keys WHERE id = %s", (key_id,)))
        return self._key(row) if row else None

    async def list_api_keys(self) -> list[dict[str, Any]]:
        rows = await self._read(lambda c: self._all(c, "SELECT doc, revoked_at FROM api_keys ORDER BY n"))
        return [self._key(row) for row in rows]

    async def revoke_api_key(self, name_or_id: str) -> dict[str, Any] | None:
        async def revoke(conn: Any) -> dict[str, Any] | None:
            row = await self._one(conn, "UPDATE api_keys SET revoked_at = %(at)s WHERE revoked_at IS NULL AND "
                                  "(id = %(k)s OR name = %(k)s) RETURNING doc, revoked_at",
                                  {"at": utc_stamp(), "k": name_or_id})
            return self._key(row) if row else None

        return await self._write(revoke)
