"""ERA's resource registry (``/api/resources/list``, the storage part of
``/api/resources/stats``): every KV entry, object and D1 table an owner has.

ERA keeps a registry object that each write updates; ours is computed from what is
stored (the KV and object rows, the D1 databases' tables), so it cannot drift from it.
Shapes are ERA's: a resource is ``{type, namespace, key, created_at, updated_at, size,
metadata}`` (for D1, ``namespace`` is the database and ``key`` the table); a listing is
``{resources, total, offset, limit, has_more}``, newest first; stats are ``{total,
by_type: {kv, d1, r2, do}, by_namespace, total_size}``.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import BadRequest
from .d1 import D1
from .kv import MAX_LIST
from .metadb import MetaDB, rows
from .names import check_name, check_prefix
from .r2 import iso

TYPES = ("kv", "d1", "r2", "do")

# KV entries and objects as one relation (both tables are ours; values are parameters).
UNION = ("SELECT 'kv' AS type, namespace, key, size, metadata, created_at, updated_at FROM kv WHERE owner = ? "
         "UNION ALL SELECT 'r2', bucket, key, size, metadata, created_at, updated_at FROM objects WHERE owner = ?")


def _resource(row: dict[str, Any]) -> dict[str, Any]:
    meta = row.get("metadata")
    return {"type": row["type"], "namespace": row["namespace"], "key": row["key"], "size": row["size"],
            "metadata": json.loads(meta) if isinstance(meta, str) and meta else None,
            "created_at": iso(row["created_at"]), "updated_at": iso(row["updated_at"]), "_t": row["updated_at"]}


class Registry:
    def __init__(self, db: MetaDB, d1: D1):
        self.db = db
        self.d1 = d1

    async def _d1(self, owner: str) -> list[dict[str, Any]]:
        return [{"type": "d1", "namespace": t["database"], "key": t["table"], "size": t["size"],
                 "metadata": None, "created_at": t["created_at"], "updated_at": t["updated_at"]}
                for t in await self.d1.tables(owner)]

    async def list(self, owner: str, *, type: str | None = None, namespace: str | None = None,
                   key_prefix: str | None = None, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        if type is not None and type not in TYPES:
            raise BadRequest(f"type must be one of {', '.join(TYPES)}", field="type")
        if namespace is not None:
            check_name(namespace, "namespace")
        prefix = check_prefix(key_prefix, "key_prefix")
        limit = max(1, min(int(limit), MAX_LIST))
        where, params = "type IN ('kv', 'r2')", [owner, owner]
        if type is not None:
            where += " AND type = ?"
            params.append(type)
        if namespace is not None:
            where += " AND namespace = ?"
            params.append(namespace)
        if prefix:
            where += " AND substr(key, 1, length(?)) = ?"
            params += [prefix, prefix]
        sql = f"SELECT * FROM ({UNION}) WHERE {where}"

        def query(conn) -> tuple[int, list[dict[str, Any]]]:
            total = conn.execute(f"SELECT count(*) FROM ({sql})", tuple(params)).fetchone()[0]
            top = rows(conn, sql + " ORDER BY updated_at DESC, type, namespace, key LIMIT ?",
                       (*params, offset + limit))
            return total, top

        total, top = await self.db.call(query)
        tables = []
        if type in (None, "d1"):
            tables = [t for t in await self._d1(owner)
                      if (namespace is None or t["namespace"] == namespace) and t["key"].startswith(prefix)]
        merged = sorted([*top, *tables], key=lambda r: -r["updated_at"])
        page = [_resource(r) for r in merged[offset:offset + limit]]
        for r in page:
            del r["_t"]
        total += len(tables)
        return {"resources": page, "total": total, "offset": offset, "limit": limit,
                "has_more": offset + limit < total}

    async def stats(self, owner: str) -> dict[str, Any]:
        def query(conn) -> list[dict[str, Any]]:
            return rows(conn, f"SELECT type, namespace, count(*) AS n, coalesce(sum(size), 0) AS bytes "
                              f"FROM ({UNION}) GROUP BY type, namespace", (owner, owner))

        groups = await self.db.call(query)
        for t in await self._d1(owner):
            groups.append({"type": "d1", "namespace": t["namespace"], "n": 1, "bytes": 0})
        by_type = {name: 0 for name in TYPES}
        by_namespace: dict[str, int] = {}
        for g in groups:
            by_type[g["type"]] += g["n"]
            by_namespace[g["namespace"]] = by_namespace.get(g["namespace"], 0) + g["n"]
        # ERA counts sizes of KV values and objects only (D1 tables carry none).
        return {"total": sum(by_type.values()), "by_type": by_type, "by_namespace": by_namespace,
                "total_size": sum(g["bytes"] for g in groups)}
