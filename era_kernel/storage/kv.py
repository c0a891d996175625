"""KV: namespace/key -> a text value and optional JSON metadata, with ERA's answers.

ERA's proxy keeps ``namespace:key`` in Cloudflare KV; we keep rows in the storage
database (``metadb``), keyed by owner, namespace and key, every one a bound parameter.
Listing follows KV's shape: ``{keys: [{name, metadata}], list_complete, cursor}``, keys
in order, ``prefix`` and an opaque ``cursor`` to go on from.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from ..errors import BadRequest, NotFound, TooLarge
from .metadb import MetaDB, now, rows
from .names import check_key, check_name, check_prefix

MAX_LIST = 1000


def encode_cursor(last_key: str) -> str:
    return base64.urlsafe_b64encode(last_key.encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> str | None:
    if not cursor:
        return None
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("invalid cursor: pass back the one a listing returned", field="cursor") from None


async def list_page(db: MetaDB, table: str, columns: str, scope_column: str, owner: str, scope: str,
                    prefix: str, limit: int, cursor: str | None) -> tuple[list[dict[str, Any]], bool]:
    """One listing page of ``table`` (KV's or R2's): rows of ``owner``'s ``scope`` whose
    key starts with ``prefix`` and sorts after the ``cursor``, in key order; and whether
    more follow. ``table``, ``columns`` and ``scope_column`` are ours, never a caller's."""
    after = decode_cursor(cursor)
    limit = max(1, min(int(limit), MAX_LIST))
    sql = (f"SELECT {columns} FROM {table} WHERE owner = ? AND {scope_column} = ? AND key >= ? "
           "AND substr(key, 1, length(?)) = ?")
    params: list[Any] = [owner, scope, prefix, prefix, prefix]
    if after is not None:
        sql += " AND key > ?"
        params.append(after)
    sql += " ORDER BY key LIMIT ?"
    params.append(limit + 1)
    found = await db.call(lambda c: rows(c, sql, tuple(params)))
    return found[:limit], len(found) > limit


class KV:
    def __init__(self, db: MetaDB, max_value: int):
        self.db = db
        self.max_value = max_value

    async def put(self, owner: str, namespace: str, key: str, value: Any, metadata: Any = None) -> dict[str, Any]:
        check_name(namespace, "namespace")
        check_key(key)
        if not isinstance(value, str):
            raise BadRequest("value must be a string (store JSON as text)", field="value")
        if metadata is not None and not isinstance(metadata, dict):
            raise BadRequest("metadata must be an object or null", field="metadata")
        meta_text = json.dumps(metadata) if metadata is not None else None
        size = len(value.encode("utf-8", "surrogatepass")) + len(meta_text or "")
        if size > self.max_value:
            raise TooLarge(f"value and metadata are {size} bytes; the limit is {self.max_value} "
                           "(ERA_STORAGE_MAX_VALUE)", field="value")
        t = now()

        def put(conn) -> None:
            conn.execute(
                "INSERT INTO kv (owner, namespace, key, value, metadata, size, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (owner, namespace, key) DO UPDATE SET "
                "value = excluded.value, metadata = excluded.metadata, size = excluded.size, "
                "updated_at = excluded.updated_at",
                (owner, namespace, key, value, meta_text, size, t, t))

        await self.db.call(put)
        return {"success": True}

    async def get(self, owner: str, namespace: str, key: str) -> dict[str, Any]:
        check_name(namespace, "namespace")
        check_key(key)
        found = await self.db.call(lambda c: rows(
            c, "SELECT value, metadata FROM kv WHERE owner = ? AND namespace = ? AND key = ?", (owner, namespace, key)))
        if not found:
            raise NotFound("Key not found")
        row = found[0]
        return {"value": row["value"], "metadata": json.loads(row["metadata"]) if row["metadata"] else None}

    async def delete(self, owner: str, namespace: str, key: str) -> dict[str, Any]:
        check_name(namespace, "namespace")
        check_key(key)
        await self.db.call(lambda c: c.execute(
            "DELETE FROM kv WHERE owner = ? AND namespace = ? AND key = ?", (owner, namespace, key)))
        return {"success": True}  # as in ERA (and KV): deleting a missing key succeeds

    async def list(self, owner: str, namespace: str, prefix: str | None = None, limit: int = 100,
                   cursor: str | None = None) -> dict[str, Any]:
        check_name(namespace, "namespace")
        prefix = check_prefix(prefix)
        page, more = await list_page(self.db, "kv", "key, metadata", "namespace", owner, namespace, prefix, limit,
                                     cursor)
        doc: dict[str, Any] = {
            "keys": [{"name": r["key"], "metadata": json.loads(r["metadata"]) if r["metadata"] else None}
                     for r in page],
            "list_complete": not more,
        }
        if more:
            doc["cursor"] = encode_cursor(page[-1]["key"])
        return doc
