"""The storage proxy's own SQLite database: KV entries and the index of objects.

One file, ``$ERA_DATA_DIR/storage/storage.db``, apart from the metadata store (a storage
caller can never reach sessions' records through it). Every name and value is a bound
parameter; table names are ours. One thread owns the connection (``SerialThread``), so
calls are applied in order and never block the event loop.

Every row carries ``owner``: who the caller acts for (the API key today; a tenant later).
Nothing here crosses owners: every query has ``owner = ?``.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from ..serial_thread import SerialThread

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    owner TEXT NOT NULL, namespace TEXT NOT NULL, key TEXT NOT NULL,
    value TEXT NOT NULL, metadata TEXT, size INTEGER NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (owner, namespace, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS objects (
    owner TEXT NOT NULL, bucket TEXT NOT NULL, key TEXT NOT NULL,
    size INTEGER NOT NULL, metadata TEXT, http_metadata TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (owner, bucket, key)
) WITHOUT ROWID;
"""


class MetaDB:
    def __init__(self, path: Path, durable: bool = True):
        self.path = path
        self.durable = durable  # fsync each commit (ERA_WORKSPACE_FSYNC), else only WAL checkpoints
        self._conn: sqlite3.Connection | None = None
        self._thread = SerialThread("era-storage-db")

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'NORMAL'}")
            conn.executescript(SCHEMA)
            self._conn = conn
        return self._conn

    async def call(self, func: Callable[[sqlite3.Connection], T]) -> T:
        return await self._thread.submit(lambda: func(self._connection()))

    async def close(self) -> None:
        def close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        await self._thread.submit(close)
        self._thread.stop()


def now() -> float:
    return time.time()


def rows(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
    cur = conn.execute(sql, params)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]
