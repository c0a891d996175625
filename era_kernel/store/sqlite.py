"""SQLite metadata store: WAL mode, schema versioned by ``PRAGMA user_version``.

All SQLite calls run on one dedicated thread (``SerialThread``: cheaper than an executor,
and paid two or three times per run), so the event loop never blocks on disk and the
connection is only ever used from one thread.
Records are kept as JSON documents beside the few columns we query by; a migration is
one more entry in ``MIGRATIONS``.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from ..serial_thread import SerialThread
from .base import (SESSION_EVENTS_KEPT, KeyExists, LeaseLost, MetadataStore, SessionExists, heartbeat_fields,
                   lease_change, utc_stamp)

T = TypeVar("T")

MIGRATIONS: list[str] = [
    # 1: sessions and runs
    """
    CREATE TABLE sessions (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL,
        doc TEXT NOT NULL
    );
    CREATE TABLE runs (
        n INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        started_at TEXT NOT NULL,
        exit_code INTEGER,
        doc TEXT NOT NULL
    );
    CREATE INDEX runs_by_session ON runs(session_id, n);
    """,
    # 2: run records (queued and running too, by run id) and the per-session event
    # journal; session events and schedules, read by their own features
    """
    CREATE TABLE run_records (
        n INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT NOT NULL,
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        status TEXT NOT NULL,
        doc TEXT NOT NULL,
        UNIQUE (session_id, run_id)
    );
    INSERT INTO run_records (n, run_id, session_id, status, doc)
        SELECT n, COALESCE(json_extract(doc, '$.run_id'), 'run_legacy_' || n), session_id, 'completed', doc
        FROM runs;
    DROP TABLE runs;
    ALTER TABLE run_records RENAME TO runs;
    CREATE INDEX runs_by_session ON runs(session_id, n);
    CREATE INDEX runs_unfinished ON runs(status) WHERE status IN ('queued', 'running');
    CREATE TABLE run_events (
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        run_id TEXT,
        doc TEXT NOT NULL,
        PRIMARY KEY (session_id, seq)
    ) WITHOUT ROWID;
    CREATE TABLE session_events (
        n INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        doc TEXT NOT NULL
    );
    CREATE INDEX session_events_by_session ON session_events(session_id, n);
    CREATE TABLE schedules (
        id TEXT PRIMARY KEY,
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        doc TEXT NOT NULL
    );
    CREATE INDEX schedules_by_session ON schedules(session_id);
    CREATE TABLE schedule_firings (
        schedule_id TEXT NOT NULL REFERENCES schedules(id) ON DELETE CASCADE,
        slot TEXT NOT NULL,
        run_id TEXT,
        PRIMARY KEY (schedule_id, slot)
    );
    """,
    # 3: the replicas sharing this store (MetadataStore.put_replica)
    """
    CREATE TABLE replicas (
        n INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        heartbeat_at REAL NOT NULL,
        doc TEXT NOT NULL
    );
    """,
    # 4: tenants' API keys (MetadataStore.insert_api_key); a name is unique among live keys
    """
    CREATE TABLE api_keys (
        n INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        revoked_at TEXT,
        doc TEXT NOT NULL
    );
    CREATE UNIQUE INDEX api_keys_live_name ON api_keys(name) WHERE revoked_at IS NULL;
    """,
    # 5: sessions' leases (MetadataStore.acquire_lease); no foreign key: a token outlives
    # its session, so one made again under the same id never reuses it
    """
    CREATE TABLE session_leases (
        session_id TEXT PRIMARY KEY,
        replica TEXT,
        token INTEGER NOT NULL,
        expires_at REAL NOT NULL
    ) WITHOUT ROWID;
    """,
]


class SQLiteStore(MetadataStore):
    def __init__(self, url: str):
        path = url.removeprefix("sqlite://")
        self.path = ":memory:" if path in ("", "/:memory:", ":memory:") else path
        self._db: sqlite3.Connection | None = None
        self._thread = SerialThread("era-sqlite")

    def _run(self, func: Callable[..., T], *args: Any) -> "asyncio.Future[T]":
        return self._thread.submit(func, *args)

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._run(self._with_db, fn)

    def _fenced(self, session_id: str, fn: Callable[[sqlite3.Connection], T]) -> "asyncio.Future[T]":
        """A write for the session, under the fencing token it has now (``fence``)."""
        return self._run(self._with_db, fn, session_id, self.fence_of(session_id))

    def _with_db(self, fn: Callable[[sqlite3.Connection], T], session_id: str | None = None,
                 token: int | None = None) -> T:
        assert self._db is not None, "store not opened"
        with self._db:  # one transaction per call
            if token is not None:
                # IMMEDIATE: the write lock first, so no other process changes the lease
                # between this check and the write.
                self._db.execute("BEGIN IMMEDIATE")
                row = self._db.execute("SELECT token FROM session_leases WHERE session_id = ?",
                                       (session_id,)).fetchone()
                if row is None or row[0] != token:
                    raise LeaseLost(f"session {session_id}: fencing token {token} is stale")
            return fn(self._db)

    async def open(self) -> None:
        def connect() -> None:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; WAL survives SIGKILL
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=5000")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise RuntimeError(f"store schema version {version} is newer than this ERA ({len(MIGRATIONS)})")
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                db.executescript("BEGIN;" + script + f"; PRAGMA user_version={number}; COMMIT;")
            db.isolation_level = ""  # back to implicit transactions for `with db:`
            self._db = db

        await self._run(connect)

    async def close(self) -> None:
        """A call like the others: the calls queued before it are applied first (so the
        connection is dropped on the store's thread, not here)."""
        def close() -> None:
            if self._db is not None:
                db, self._db = self._db, None
                db.close()

        await self._run(close)
        self._thread.stop()  # after the jobs before it

    async def schema_version(self) -> int:
        return await self._call(lambda db: db.execute("PRAGMA user_version").fetchone()[0])

    async def insert_session(self, record: dict[str, Any]) -> dict[str, Any]:
        def insert(db: sqlite3.Connection) -> dict[str, Any]:
            try:
                cur = db.execute("INSERT INTO sessions (id, created_at, doc) VALUES (?, ?, ?)",
                                 (record["id"], record["created_at"], "{}"))
            except sqlite3.IntegrityError:
                raise SessionExists(record["id"]) from None
            stored = dict(record, seq=cur.lastrowid)
            db.execute("UPDATE sessions SET doc = ? WHERE seq = ?", (json.dumps(stored), cur.lastrowid))
            return stored

        return await self._call(insert)

    async def get_session(self, session_id: str) -> dict[str, Any] | None:
        row = await self._call(lambda db: db.execute("SELECT doc FROM sessions WHERE id = ?", (session_id,)).fetchone())
        return json.loads(row[0]) if row else None

    async def list_sessions(self, limit: int | None = None, after: int | None = None,
                            owner: str | None = None) -> list[dict[str, Any]]:
        # seq is the INTEGER PRIMARY KEY (the rowid): a range scan, whatever `after` is.
        # LIMIT -1 is SQLite's "no limit"; seq starts at 1.
        rows = await self._call(lambda db: db.execute(
            "SELECT seq, doc FROM sessions WHERE seq > ?1 AND (?2 IS NULL OR json_extract(doc, '$.owner') = ?2) "
            "ORDER BY seq LIMIT ?3", (-1 if after is None else after, owner, -1 if limit is None else limit)).fetchall())
        return [dict(json.loads(doc), seq=seq) for seq, doc in rows]

    async def count_sessions(self, owner: str | None = None) -> int:
        return await self._call(lambda db: db.execute(
            "SELECT COUNT(*) FROM sessions WHERE ?1 IS NULL OR json_extract(doc, '$.owner') = ?1",
            (owner,)).fetchone()[0])

    @staticmethod
    def _update(db: sqlite3.Connection, session_id: str, changes: dict[str, Any]) -> dict[str, Any] | None:
        row = db.execute("SELECT doc FROM sessions WHERE id = ?", (session_id,)).fetchone()
        if row is None:
            return None
        doc = json.loads(row[0])
        doc.update(changes)
        db.execute("UPDATE sessions SET doc = ? WHERE id = ?", (json.dumps(doc), session_id))
        return doc

    async def update_session(self, session_id: str, changes: dict[str, Any]) -> dict[str, Any] | None:
        return await self._fenced(session_id, lambda db: self._update(db, session_id, changes))

    async def delete_session(self, session_id: str) -> bool:
        def delete(db: sqlite3.Connection) -> bool:
            for table in ("runs", "run_events", "session_events", "schedules"):
                db.execute(f"DELETE FROM {table} WHERE session_id = ?", (session_id,))
            return db.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount > 0

        return await self._call(delete)

    def put_run(self, session_id: str, run: dict[str, Any],
                session_changes: dict[str, Any] | None = None) -> "asyncio.Future[None]":
        def put(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO runs (run_id, session_id, status, doc) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT(session_id, run_id) DO UPDATE SET status = excluded.status, doc = excluded.doc",
                       (run["run_id"], session_id, run.get("status", "completed"), json.dumps(run)))
            if session_changes:
                self._update(db, session_id, session_changes)

        return self._fenced(session_id, put)  # queued now: see MetadataStore.put_run

    async def get_run(self, session_id: str, run_id: str) -> dict[str, Any] | None:
        row = await self._call(lambda db: db.execute(
            "SELECT doc FROM runs WHERE run_id = ? AND session_id = ?", (run_id, session_id)).fetchone())
        return json.loads(row[0]) if row else None

    async def unfinished_runs(self) -> list[dict[str, Any]]:
        rows = await self._call(lambda db: db.execute(
            "SELECT session_id, doc FROM runs WHERE status IN ('queued', 'running') ORDER BY n").fetchall())
        return [dict(json.loads(doc), session_id=sid) for sid, doc in rows]

    def append_events(self, session_id: str, events: list[dict[str, Any]]) -> "asyncio.Future[None]":
        def append(db: sqlite3.Connection) -> None:
            # One statement for the whole batch (one encode, one step), not an executemany
            # step per event: this thread competes for the GIL with an event loop busy
            # relaying output, and each step gives it up and waits to get it back.
            db.execute("INSERT INTO run_events (session_id, seq, run_id, doc) "
                       "SELECT ?, json_extract(value, '$.seq'), json_extract(value, '$.run_id'), value "
                       "FROM json_each(?)", (session_id, json.dumps(events)))

        return self._fenced(session_id, append)  # queued now: see MetadataStore.append_events

    async def read_events(self, session_id: str, after: int = 0, limit: int = 1000,
                          run_id: str | None = None) -> list[dict[str, Any]]:
        if run_id is None:
            query, args = ("SELECT doc FROM run_events WHERE session_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                           (session_id, after, limit))
        else:
            query, args = ("SELECT doc FROM run_events WHERE session_id = ? AND seq > ? AND run_id = ? "
                           "ORDER BY seq LIMIT ?", (session_id, after, run_id, limit))
        rows = await self._call(lambda db: db.execute(query, args).fetchall())
        return [json.loads(r[0]) for r in rows]

    async def last_event_seq(self, session_id: str) -> int:
        row = await self._call(lambda db: db.execute(
            "SELECT MAX(seq) FROM run_events WHERE session_id = ?", (session_id,)).fetchone())
        return row[0] or 0

    def add_session_event(self, session_id: str, event: dict[str, Any],
                          session_changes: dict[str, Any] | None = None) -> "asyncio.Future[None]":
        def add(db: sqlite3.Connection) -> None:
            # Refused (foreign key) when the session is gone: nothing is kept for a later one.
            db.execute("INSERT INTO session_events (session_id, doc) VALUES (?, ?)", (session_id, json.dumps(event)))
            # Bounded: rows older than the newest SESSION_EVENTS_KEPT go. The subquery walks
            # the session's index from its newest row, so it costs the bound, not the history.
            db.execute("DELETE FROM session_events WHERE session_id = ?1 AND n <= (SELECT n FROM session_events "
                       "WHERE session_id = ?1 ORDER BY n DESC LIMIT 1 OFFSET ?2)", (session_id, SESSION_EVENTS_KEPT))
            if session_changes:
                self._update(db, session_id, session_changes)

        return self._fenced(session_id, add)  # queued now: see MetadataStore.add_session_event

    async def list_session_events(self, session_id: str, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        rows = await self._call(lambda db: db.execute(
            "SELECT n, doc FROM session_events WHERE session_id = ? AND n > ? ORDER BY n LIMIT ?",
            (session_id, after, limit)).fetchall())
        return [dict(json.loads(doc), id=n) for n, doc in rows]

    async def list_runs(self, session_id: str, limit: int = 100) -> list[dict[str, Any]]:
        rows = await self._call(lambda db: db.execute(
            "SELECT doc FROM (SELECT n, doc FROM runs WHERE session_id = ? AND status NOT IN ('queued', 'running') "
            "ORDER BY n DESC LIMIT ?) ORDER BY n", (session_id, limit)).fetchall())
        return [json.loads(r[0]) for r in rows]

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

        def put(db: sqlite3.Connection) -> bool:
            try:
                # An upsert, not INSERT OR REPLACE: a replaced row would lose its rowid (its
                # place in the listing) and, by the cascade, its firings.
                db.execute("INSERT INTO schedules (id, session_id, doc) VALUES (?, ?, ?) "
                           "ON CONFLICT(id) DO UPDATE SET doc = excluded.doc",
                           (schedule["id"], schedule["session_id"], doc))
            except sqlite3.IntegrityError:  # the session's foreign key: it is gone
                return False
            return True

        return await self._call(put)

    async def update_schedule(self, schedule_id: str, changes: dict[str, Any]) -> dict[str, Any] | None:
        def update(db: sqlite3.Connection) -> dict[str, Any] | None:
            row = db.execute("SELECT doc FROM schedules WHERE id = ?", (schedule_id,)).fetchone()
            if row is None:
                return None
            doc = json.loads(row[0])
            doc.update({k: v for k, v in changes.items() if k not in self._DERIVED})
            db.execute("UPDATE schedules SET doc = ? WHERE id = ?", (json.dumps(doc), schedule_id))
            return self._schedule(db.execute(self._SCHEDULES + " WHERE s.id = ?", (schedule_id,)).fetchone())

        return await self._call(update)

    async def list_schedules(self, session_id: str | None = None) -> list[dict[str, Any]]:
        if session_id is None:
            query, args = self._SCHEDULES + " ORDER BY s.rowid", ()
        else:
            query, args = self._SCHEDULES + " WHERE s.session_id = ? ORDER BY s.rowid", (session_id,)
        # Decoded on the store's thread: the scheduler reads every schedule at each rescan.
        return await self._call(lambda db: [self._schedule(row) for row in db.execute(query, args).fetchall()])

    async def delete_schedule(self, session_id: str, schedule_id: str) -> bool:
        # Its firings go by the foreign key's ON DELETE CASCADE.
        return await self._call(lambda db: db.execute(
            "DELETE FROM schedules WHERE id = ? AND session_id = ?", (schedule_id, session_id)).rowcount > 0)

    async def claim_firing(self, schedule_id: str, slot: str, run_id: str | None) -> bool:
        def claim(db: sqlite3.Connection) -> bool:
            try:
                # One statement, so one write lock: two claims of the same slot meet at the
                # primary key (the second raises); a slot older than one already claimed
                # inserts nothing; a deleted schedule fails its foreign key.
                inserted = db.execute(
                    "INSERT INTO schedule_firings (schedule_id, slot, run_id) SELECT ?, ?, ? WHERE NOT EXISTS "
                    "(SELECT 1 FROM schedule_firings WHERE schedule_id = ? AND slot > ?)",
                    (schedule_id, slot, run_id, schedule_id, slot)).rowcount > 0
            except sqlite3.IntegrityError:
                return False
            if inserted:  # only the latest claim is ever read: the table stays one row per schedule
                db.execute("DELETE FROM schedule_firings WHERE schedule_id = ? AND slot < ?", (schedule_id, slot))
            return inserted

        return await self._call(claim)

    # ---- replicas ------------------------------------------------------------------------------
    # One machine, one clock: the store's clock is this process's.
    async def put_replica(self, replica: dict[str, Any]) -> dict[str, Any]:
        doc = json.dumps(replica)

        def put(db: sqlite3.Connection) -> dict[str, Any]:
            now = time.time()
            db.execute("INSERT INTO replicas (id, heartbeat_at, doc) VALUES (?, ?, ?) "
                       "ON CONFLICT(id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, doc = excluded.doc",
                       (replica["id"], now, doc))
            return dict(json.loads(doc), **heartbeat_fields(now, now))

        return await self._call(put)

    async def list_replicas(self) -> list[dict[str, Any]]:
        rows = await self._call(lambda db: db.execute("SELECT doc, heartbeat_at FROM replicas ORDER BY n").fetchall())
        now = time.time()
        return [dict(json.loads(doc), **heartbeat_fields(at, now)) for doc, at in rows]

    async def delete_replica(self, replica_id: str) -> bool:
        return await self._call(lambda db: db.execute("DELETE FROM replicas WHERE id = ?", (replica_id,)).rowcount > 0)

    # ---- session leases ------------------------------------------------------------------------
    @staticmethod
    def _lease(session_id: str, replica: str | None, token: int, expires_at: float, now: float,
               previous: str | None = None) -> dict[str, Any]:
        return {"session_id": session_id, "replica": replica, "token": token, "expires_in": expires_at - now,
                "previous": previous}

    async def acquire_lease(self, session_id: str, replica_id: str, ttl: float) -> dict[str, Any]:
        def acquire(db: sqlite3.Connection) -> dict[str, Any]:
            db.execute("BEGIN IMMEDIATE")  # the row read and written under one write lock
            now = time.time()
            row = db.execute("SELECT replica, token, expires_at FROM session_leases WHERE session_id = ?",
                             (session_id,)).fetchone()
            taken, token, previous = lease_change(row, replica_id, now)
            if not taken:
                return self._lease(session_id, row[0], row[1], row[2], now)
            db.execute("INSERT INTO session_leases (session_id, replica, token, expires_at) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT(session_id) DO UPDATE SET replica = excluded.replica, token = excluded.token, "
                       "expires_at = excluded.expires_at", (session_id, replica_id, token, now + ttl))
            return self._lease(session_id, replica_id, token, now + ttl, now, previous)

        return await self._call(acquire)

    async def renew_leases(self, replica_id: str, tokens: dict[str, int], ttl: float) -> list[str]:
        def renew(db: sqlite3.Connection) -> list[str]:
            now = time.time()
            held = {sid for (sid,) in db.execute(
                "UPDATE session_leases SET expires_at = ?1 FROM json_each(?2) AS t WHERE session_id = t.key "
                "AND token = t.value AND replica = ?3 RETURNING session_id",
                (now + ttl, json.dumps(tokens), replica_id)).fetchall()}
            return [sid for sid in tokens if sid not in held]

        return await self._call(renew)

    async def end_lease(self, session_id: str, token: int | None = None) -> bool:
        return await self._call(lambda db: db.execute(
            "UPDATE session_leases SET replica = NULL, expires_at = 0, token = token + 1 "
            "WHERE session_id = ?1 AND (?2 IS NULL OR token = ?2)", (session_id, token)).rowcount > 0)

    async def get_leases(self, session_ids: list[str]) -> dict[str, dict[str, Any]]:
        rows = await self._call(lambda db: db.execute(
            "SELECT session_id, replica, token, expires_at FROM session_leases WHERE session_id IN "
            "(SELECT value FROM json_each(?))", (json.dumps(session_ids),)).fetchall())
        now = time.time()
        return {row[0]: self._lease(*row, now) for row in rows}

    # ---- API keys ----------------------------------------------------------------------------
    @staticmethod
    def _key(row: tuple[str, str | None]) -> dict[str, Any]:
        return dict(json.loads(row[0]), revoked_at=row[1])

    async def insert_api_key(self, key: dict[str, Any]) -> dict[str, Any]:
        doc = json.dumps({k: v for k, v in key.items() if k != "revoked_at"})

        def insert(db: sqlite3.Connection) -> dict[str, Any]:
            try:
                db.execute("INSERT INTO api_keys (id, name, doc) VALUES (?, ?, ?)", (key["id"], key["name"], doc))
            except sqlite3.IntegrityError:
                raise KeyExists(key["name"]) from None
            return self._key((doc, None))

        return await self._call(insert)

    async def get_api_key(self, key_id: str) -> dict[str, Any] | None:
        row = await self._call(lambda db: db.execute(
            "SELECT doc, revoked_at FROM api_keys WHERE id = ?", (key_id,)).fetchone())
        return self._key(row) if row else None

    async def list_api_keys(self) -> list[dict[str, Any]]:
        rows = await self._call(lambda db: db.execute("SELECT doc, revoked_at FROM api_keys ORDER BY n").fetchall())
        return [self._key(row) for row in rows]

    async def revoke_api_key(self, name_or_id: str) -> dict[str, Any] | None:
        def revoke(db: sqlite3.Connection) -> dict[str, Any] | None:
            row = db.execute("UPDATE api_keys SET revoked_at = ?1 WHERE revoked_at IS NULL AND (id = ?2 OR name = ?2) "
                             "RETURNING doc, revoked_at", (utc_stamp(), name_or_id)).fetchone()
            return self._key(row) if row else None

        return await self._call(revoke)
