"""ERA's storage proxy, engine side: KV (``kv``), SQL databases (``d1``), objects
(``r2``), the resource registry (``registry``) and session tokens (``tokens``).

Every call names the owner it acts for: the tenant of the API key (``era_kernel/tenants.py``;
``DEFAULT_OWNER`` for ``ERA_API_KEY``); a session's calls act for the owner of the key
that created it (its record's ``owner``). The server (``server/handlers/storage.py``) turns a
request's credential into an owner; nothing below trusts a name from the request for it.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from ..config import Settings
from .d1 import D1
from .kv import KV
from .metadb import MetaDB
from .r2 import R2
from .registry import Registry
from .tokens import SessionTokens

DEFAULT_OWNER = "default"


class Storage:
    def __init__(self, settings: Settings, objects: Callable[[], Any],
                 session_row: Callable[[str], Awaitable[dict[str, Any] | None]]):
        self._session_row = session_row  # the metadata store's record of a session, or None
        root = settings.data_dir / "storage"
        self.db = MetaDB(root / "storage.db", durable=settings["ERA_WORKSPACE_FSYNC"])
        self.kv = KV(self.db, settings["ERA_STORAGE_MAX_VALUE"])
        self.d1 = D1(root / "d1", max_bytes=settings["ERA_STORAGE_SQL_MAX_BYTES"],
                     timeout=settings["ERA_STORAGE_SQL_TIMEOUT"], max_rows=settings["ERA_STORAGE_SQL_MAX_ROWS"],
                     concurrency=settings["ERA_STORAGE_SQL_CONCURRENCY"], durable=settings["ERA_WORKSPACE_FSYNC"])
        self.r2 = R2(self.db, objects, settings["ERA_STORAGE_MAX_OBJECT"])
        self.registry = Registry(self.db, self.d1)
        self.tokens = SessionTokens(settings.data_dir)
        port = settings["ERA_STORAGE_PORT"]
        # Where a session's era_storage sends: the setting, else the server's listener in its sandbox.
        self.url = settings["ERA_STORAGE_URL"] or (f"http://127.0.0.1:{port}" if port else "")

    async def start(self) -> None:
        await asyncio.to_thread(self.tokens._key)  # the secret file, off the event loop

    async def close(self) -> None:
        await self.db.close()
        await asyncio.to_thread(self.d1.close)

    def session_env(self, session_id: str) -> dict[str, str]:
        """What ``era_storage`` in the session reads: its token, and where to send it."""
        env = {"ERA_STORAGE_TOKEN": self.tokens.token(session_id)}
        if self.url:
            env["ERA_STORAGE_URL"] = self.url
        return env

    def owner_of_session(self, record: Any) -> str:
        """Whose storage a session's calls reach: its creator's (sessions made before
        tenants are the admin's)."""
        return (record or {}).get("owner") or DEFAULT_OWNER

    async def usage(self, owner: str) -> int:
        """Bytes ``owner`` keeps: KV values, objects and SQL databases (a tenant's
        ``storage_bytes`` limit is checked against it before each write)."""
        rows = await self.db.call(lambda c: c.execute(
            "SELECT (SELECT COALESCE(SUM(size), 0) FROM kv WHERE owner = ?1) + "
            "(SELECT COALESCE(SUM(size), 0) FROM objects WHERE owner = ?1)", (owner,)).fetchone())
        return int(rows[0]) + await asyncio.to_thread(self._d1_bytes, owner)

    def _d1_bytes(self, owner: str) -> int:
        directory = self.d1.root / owner
        return sum(p.stat().st_size for p in directory.iterdir() if p.is_file()) if directory.is_dir() else 0

    async def owner_for_session(self, session_id: str) -> str | None:
        """The owner a session acts for; None when it is gone."""
        row = await self._session_row(session_id)
        return self.owner_of_session(row) if row is not None else None

    async def owner_for_token(self, token: str) -> str | None:
        """The owner a session token acts for; None when it is forged or its session is gone."""
        session_id = self.tokens.session_of(token)
        return await self.owner_for_session(session_id) if session_id else None
