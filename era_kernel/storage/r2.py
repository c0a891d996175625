"""R2: objects in buckets, kept on the workspace store (``ERA_WORKSPACE_URL``: a local
directory, or S3 when the server uses S3), answered in ERA's shape.

Bytes live at ``<store root>/.storage/r2/<owner>/<bucket>/<sha256 of key>``: a key is
any text (as in R2) yet never becomes a path, so it cannot climb or collide with a
directory ("a" and "a/b" are both fine). ``.`` cannot start a session id, so no
session's snapshot shares the prefix. The index (key, size, metadata, times) is a row
in the storage database: listings are ordered, paged by cursor, and need no store
listing. A put writes the object first (atomic, see ``ObjectStore``) and then the row;
a delete removes the row first: a crash in between leaves at worst an unreferenced
object, never a row without its bytes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
from datetime import datetime, timezone
from typing import Any, Callable

from ..errors import BadRequest, NotFound, TooLarge
from .kv import encode_cursor, list_page
from .metadb import MetaDB, now, rows
from .names import check_key, check_name, check_prefix

PREFIX = (".storage", "r2")


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class R2:
    def __init__(self, db: MetaDB, objects: Callable[[], Any], max_object: int):
        self.db = db
        self._objects = objects  # () -> ObjectStore; built lazily by the workspace store
        self.max_object = max_object

    def _key(self, owner: str, bucket: str, key: str) -> str:
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        return self._objects().key(*PREFIX, check_name(owner, "owner"), bucket, digest)

    def decode(self, content: Any) -> bytes:
        if not isinstance(content, str):
            raise BadRequest("content must be a base64 string", field="content")
        if len(content) > (self.max_object + 2) // 3 * 4 + 4:
            raise TooLarge(f"the object is larger than {self.max_object} bytes (ERA_STORAGE_MAX_OBJECT)",
                           field="content")
        try:
            return base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("content is not valid base64", field="content") from None

    async def put(self, owner: str, bucket: str, key: str, data: bytes, metadata: Any = None,
                  http_metadata: Any = None) -> dict[str, Any]:
        check_name(bucket, "bucket")
        check_key(key)
        for name, value in (("metadata", metadata), ("httpMetadata", http_metadata)):
            if value is not None and not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
                raise BadRequest(f"{name} must be an object of strings", field=name)
        if len(data) > self.max_object:
            raise TooLarge(f"the object is {len(data)} bytes; the limit is {self.max_object} (ERA_STORAGE_MAX_OBJECT)",
                           field="content")
        path = self._key(owner, bucket, key)
        store = self._objects()
        await asyncio.to_thread(store.put, path, data)
        t = now()
        meta, http = (json.dumps(v) if v else None for v in (metadata, http_metadata))
        await self.db.call(lambda c: c.execute(
            "INSERT INTO objects (owner, bucket, key, size, metadata, http_metadata, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (owner, bucket, key) DO UPDATE SET size = excluded.size, "
            "metadata = excluded.metadata, http_metadata = excluded.http_metadata, updated_at = excluded.updated_at",
            (owner, bucket, key, len(data), meta, http, t, t)))
        return {"success": True, "size": len(data)}

    async def _row(self, owner: str, bucket: str, key: str) -> dict[str, Any]:
        check_name(bucket, "bucket")
        check_key(key)
        found = await self.db.call(lambda c: rows(
            c, "SELECT * FROM objects WHERE owner = ? AND bucket = ? AND key = ?", (owner, bucket, key)))
        if not found:
            raise NotFound("Object not found")
        return found[0]

    async def get(self, owner: str, bucket: str, key: str) -> dict[str, Any]:
        row = await self._row(owner, bucket, key)
        store = self._objects()
        try:
            data = await asyncio.to_thread(store.get, self._key(owner, bucket, key))
        except FileNotFoundError:
            raise NotFound("Object not found") from None
        return {"content": base64.b64encode(data).decode("ascii"), "size": len(data),
                "httpMetadata": json.loads(row["http_metadata"]) if row["http_metadata"] else {},
                "customMetadata": json.loads(row["metadata"]) if row["metadata"] else {},
                "uploaded": iso(row["updated_at"])}

    async def delete(self, owner: str, bucket: str, key: str) -> dict[str, Any]:
        check_name(bucket, "bucket")
        check_key(key)
        await self.db.call(lambda c: c.execute(
            "DELETE FROM objects WHERE owner = ? AND bucket = ? AND key = ?", (owner, bucket, key)))
        store = self._objects()
        await asyncio.to_thread(store.remove_many, [self._key(owner, bucket, key)])
        return {"success": True}

    async def list(self, owner: str, bucket: str, prefix: str | None = None, limit: int = 100,
                   cursor: str | None = None) -> dict[str, Any]:
        check_name(bucket, "bucket")
        prefix = check_prefix(prefix)
        page, more = await list_page(self.db, "objects", "key, size, updated_at", "bucket", owner, bucket, prefix,
                                     limit, cursor)
        doc: dict[str, Any] = {"objects": [{"key": r["key"], "size": r["size"], "uploaded": iso(r["updated_at"])}
                                           for r in page],
                               "truncated": more}
        if more:
            doc["cursor"] = encode_cursor(page[-1]["key"])
        return doc
