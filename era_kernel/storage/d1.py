"""D1: one SQLite database per name, ``exec``/``query`` of one statement with positional
parameters, answered in ERA's shape (``{success, results, meta}``).

What keeps a caller inside its own database is SQLite's own machinery, not parsing:
- ``set_authorizer`` refuses ATTACH/DETACH (which also covers ``VACUUM [INTO]``),
  ``load_extension`` and ``fts3_tokenizer``, and every pragma outside a read-mostly list
  (so no ``max_page_count`` raise, ``writable_schema``, ``journal_mode``...);
- ``setlimit`` caps attached databases at 0, statement text and value length;
- ``PRAGMA max_page_count`` (set by us before the authorizer is installed) caps the
  file's size: a write past it fails with SQLITE_FULL (413);
- a progress handler cancels a statement past ``ERA_STORAGE_SQL_TIMEOUT`` (422).
Statements run in worker threads, ``ERA_STORAGE_SQL_CONCURRENCY`` at once at most, on
connections kept open between calls; one a statement left state on (a temp object, a
pragma set, an open transaction) is closed instead of reused, so no call inherits another's.
The database name only ever becomes a file name (``names.check_name``).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ..errors import BadRequest, EraError, TooLarge, Unprocessable
from .names import check_name

MAX_SQL_TEXT = 100_000  # characters of one statement
MAX_SQL_VALUE = 16 * 1024**2  # bytes of one string or blob a statement may build
PROGRESS_STEPS = 10_000  # VM instructions between two looks at the clock
MAX_IDLE = 16  # connections kept open between calls, all databases together
SUFFIX = ".sqlite3"

# Pragmas allowed, by what their argument may be: a table or index name (they only read),
# nothing (they only read without one: `page_size = N` would change the file), or a
# value that only concerns this connection or the file's user field.
NAMED_PRAGMAS = frozenset({"table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo",
                           "foreign_key_list", "foreign_key_check", "integrity_check", "quick_check"})
READ_PRAGMAS = frozenset({"page_count", "page_size", "freelist_count", "data_version", "collation_list",
                          "function_list", "pragma_list"})
SETTABLE_PRAGMAS = frozenset({"foreign_keys", "user_version", "defer_foreign_keys", "recursive_triggers",
                              "case_sensitive_like"})
DENIED_FUNCTIONS = frozenset({"load_extension", "fts3_tokenizer"})


class StatementTimeout(Unprocessable):
    """A statement ran past its time and was cancelled."""


# What leaves state on a connection that the next call (reusing it) must not inherit.
STATEFUL_ACTIONS = frozenset({sqlite3.SQLITE_CREATE_TEMP_INDEX, sqlite3.SQLITE_CREATE_TEMP_TABLE,
                              sqlite3.SQLITE_CREATE_TEMP_TRIGGER, sqlite3.SQLITE_CREATE_TEMP_VIEW,
                              sqlite3.SQLITE_TRANSACTION, sqlite3.SQLITE_SAVEPOINT})


def _verdict(action: int, arg1: str | None, arg2: str | None) -> int:
    if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in DENIED_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_PRAGMA:
        name = (arg1 or "").lower()
        if not (name in NAMED_PRAGMAS or name in SETTABLE_PRAGMAS or (name in READ_PRAGMAS and arg2 is None)):
            return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


class _Held:
    """An open connection and whether a statement left state on it (then it is closed
    after the call, never reused)."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self.dirty = False

    def authorize(self, action: int, arg1: str | None, arg2: str | None, _db: str | None, _trigger: str | None) -> int:
        verdict = _verdict(action, arg1, arg2)
        if action in STATEFUL_ACTIONS or (action == sqlite3.SQLITE_PRAGMA and arg2 is not None and
                                          (arg1 or "").lower() in SETTABLE_PRAGMAS):
            self.dirty = True
        return verdict


def check_params(params: Any) -> list[Any]:
    if params is None:
        return []
    if not isinstance(params, list):
        raise BadRequest("params must be a list of positional values", field="params")
    out = []
    for value in params:
        if isinstance(value, bool):
            value = int(value)
        elif value is not None and not isinstance(value, (str, int, float)):
            raise BadRequest("each param must be a string, number, boolean or null", field="params")
        out.append(value)
    return out


def _cell(value: Any) -> Any:
    return list(value) if isinstance(value, bytes) else value  # D1 answers blobs as arrays of bytes


class D1:
    def __init__(self, root: Path, *, max_bytes: int, timeout: float, max_rows: int, concurrency: int,
                 durable: bool = True):
        self.root = root
        self.durable = durable  # synchronous=FULL (survives power loss) or NORMAL (survives crashes)
        self._idle: OrderedDict[Path, list[_Held]] = OrderedDict()  # open connections between calls
        self._idle_lock = threading.Lock()
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.max_rows = max_rows
        self._slots = asyncio.Semaphore(concurrency)

    def path(self, owner: str, database: str) -> Path:
        return self.root / check_name(owner, "owner") / (check_name(database, "database") + SUFFIX)

    async def execute(self, owner: str, database: str, sql: Any, params: Any, *, rows: bool) -> dict[str, Any]:
        path = self.path(owner, database)
        if not isinstance(sql, str) or not sql.strip():
            raise BadRequest("sql must be a non-empty string", field="sql")
        if len(sql) > MAX_SQL_TEXT:
            raise TooLarge(f"sql is longer than {MAX_SQL_TEXT} characters", field="sql")
        values = check_params(params)
        async with self._slots:
            return await asyncio.to_thread(self._run, path, sql, values, rows)

    def _open(self, path: Path) -> _Held:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=self.timeout)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'NORMAL'}")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count={max(1, self.max_bytes // page_size)}")  # an int we computed
        conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, MAX_SQL_TEXT * 4)
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_SQL_VALUE)
        held = _Held(conn)
        conn.set_authorizer(held.authorize)  # from here on, the caller's SQL
        return held

    # Connections are kept open between calls: opening one and closing it (a WAL
    # checkpoint and its fsyncs) would cost several times the statement itself.
    def _take(self, path: Path) -> _Held:
        with self._idle_lock:
            idle = self._idle.get(path)
            if idle:
                return idle.pop()
        return self._open(path)

    def _give(self, path: Path, held: _Held) -> None:
        conn = held.conn
        if held.dirty or conn.in_transaction:  # temp objects, a pragma set, an open transaction
            conn.close()  # rolls back whatever it left open
            return
        closing = []
        with self._idle_lock:
            self._idle.setdefault(path, []).append(held)
            self._idle.move_to_end(path)
            while sum(len(v) for v in self._idle.values()) > MAX_IDLE:
                oldest = next(iter(self._idle))
                closing.append(self._idle[oldest].pop(0))
                if not self._idle[oldest]:
                    del self._idle[oldest]
        for extra in closing:
            extra.conn.close()

    def close(self) -> None:
        with self._idle_lock:
            idle, self._idle = self._idle, OrderedDict()
        for held in (h for conns in idle.values() for h in conns):
            held.conn.close()

    def _run(self, path: Path, sql: str, params: list[Any], want_rows: bool) -> dict[str, Any]:
        started = time.monotonic()
        deadline = started + self.timeout
        held = self._take(path)
        conn = held.conn
        before = conn.total_changes
        conn.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, PROGRESS_STEPS)
        try:
            try:
                cur = conn.execute(sql, params)
                results = None
                if want_rows and cur.description is not None:
                    names = [d[0] for d in cur.description]
                    fetched = cur.fetchmany(self.max_rows + 1)
                    if len(fetched) > self.max_rows:
                        raise TooLarge(f"the query returns more than {self.max_rows} rows "
                                       "(ERA_STORAGE_SQL_MAX_ROWS); add a LIMIT", field="sql")
                    results = [dict(zip(names, map(_cell, row))) for row in fetched]
                else:
                    cur.fetchall()  # run it to the end (an exec of a SELECT still executes)
                cur.close()
                changes = conn.total_changes - before
                last_row_id = cur.lastrowid if changes else None
            except sqlite3.Error as exc:
                raise self._error(exc, time.monotonic() > deadline) from None
            finally:
                conn.set_progress_handler(None, 0)
            pages, page_size = (conn.execute("PRAGMA page_count").fetchone()[0],
                                conn.execute("PRAGMA page_size").fetchone()[0])
        finally:
            self._give(path, held)
        meta = {"duration": round((time.monotonic() - started) * 1000, 3), "changes": changes,
                "last_row_id": last_row_id, "changed_db": changes > 0,
                "rows_read": len(results) if results is not None else 0, "rows_written": changes,
                "size_after": pages * page_size}
        doc: dict[str, Any] = {"success": True, "meta": meta}
        if want_rows:
            doc["results"] = results or []
        return doc

    def _error(self, exc: sqlite3.Error, late: bool) -> EraError:
        message = str(exc)
        if isinstance(exc, sqlite3.OperationalError) and message == "interrupted" and late:
            return StatementTimeout(f"the statement ran past {self.timeout:g} s (ERA_STORAGE_SQL_TIMEOUT) and was "
                                    "cancelled", field="sql")
        if "database or disk is full" in message:
            return TooLarge(f"the database would grow past {self.max_bytes} bytes (ERA_STORAGE_SQL_MAX_BYTES)",
                            field="sql")
        if "not authorized" in message or "authorization denied" in message:
            return BadRequest(f"not allowed: {message} (no ATTACH/DETACH, VACUUM, extensions or pragmas that "
                              "change the database's settings)", field="sql")
        if isinstance(exc, sqlite3.ProgrammingError) and "one statement" in message:
            return BadRequest("one statement per call", field="sql")
        return BadRequest(f"D1 query failed: {message}", field="sql", details={"details": message})

    # ---- listing (resources, stats) ---------------------------------------------------------
    async def tables(self, owner: str) -> list[dict[str, Any]]:
        """Every table of every database of ``owner``: ``{database, table, size}``."""
        return await asyncio.to_thread(self._tables, owner)

    def _tables(self, owner: str) -> list[dict[str, Any]]:
        directory = self.root / check_name(owner, "owner")
        out = []
        for path in sorted(directory.glob("*" + SUFFIX)) if directory.is_dir() else []:
            stat = path.stat()
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                names = [r[0] for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
            except sqlite3.Error:
                names = []
            finally:
                conn.close()
            for name in names:
                out.append({"database": path.name[:-len(SUFFIX)], "table": name, "size": stat.st_size,
                            "created_at": stat.st_ctime, "updated_at": stat.st_mtime})
        return out
