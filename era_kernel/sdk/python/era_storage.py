"""era_storage: ERA's storage SDK for Python (KV, D1, R2), standard library only.

Same calls as ERA's SDK: ``kv.set/get/delete/list``, ``d1.query/exec``,
``r2.put/get/delete/list``. It talks HTTP to ``ERA_STORAGE_URL`` and authenticates with
``ERA_STORAGE_TOKEN`` (a session's token) or else ``ERA_API_KEY``; both are read at
each call, so setting them later works. Failures raise ``StorageError`` (``.status``,
``.body``); a missing key or object reads as None, as in ERA.
"""

from __future__ import annotations

import base64
import json
import os
import time
from typing import Any, Dict, List, Optional
from urllib.error import HTTPError, URLError
from urllib.parse import quote, urlencode
from urllib.request import Request, urlopen

__all__ = ["kv", "d1", "r2", "StorageError", "KVStorage", "D1Storage", "R2Storage"]
TIMEOUT = 60.0
CONNECT_RETRIES = (0.05, 0.1, 0.2, 0.4, 0.8, None)  # seconds between attempts on a refused connection


class StorageError(Exception):
    def __init__(self, message: str, status: int = 0, body: Any = None):
        super().__init__(message)
        self.status = status
        self.body = body


def _url(*parts: str, query: Optional[Dict[str, Any]] = None) -> str:
    base = os.environ.get("ERA_STORAGE_URL", "http://localhost").rstrip("/")
    url = base + "/api/" + "/".join(quote(str(p), safe="") for p in parts)
    if query:
        url += "?" + urlencode({k: v for k, v in query.items() if v is not None})
    return url


def _call(method: str, url: str, body: Any = None, what: str = "storage call") -> Any:
    data = json.dumps(body).encode("utf-8") if body is not None else None
    req = Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    token = os.environ.get("ERA_STORAGE_TOKEN") or os.environ.get("ERA_API_KEY")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        for delay in CONNECT_RETRIES:
            try:
                with urlopen(req, timeout=TIMEOUT) as response:
                    return json.loads(response.read() or b"null")
            except URLError as exc:
                # Right after a kernel starts, the listener in its sandbox may be a moment away.
                if isinstance(exc, HTTPError) or not isinstance(exc.reason, ConnectionRefusedError) or delay is None:
                    raise
                time.sleep(delay)
    except HTTPError as exc:
        raw = exc.read()
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = {"error": raw.decode("utf-8", "replace")[:500]}
        message = doc.get("error", str(exc)) if isinstance(doc, dict) else str(exc)
        raise StorageError(f"{what} failed: {message}", exc.code, doc) from None


class KVStorage:
    """Key-value storage: text values with optional metadata."""

    @staticmethod
    def set(namespace: str, key: str, value: str, metadata: Optional[Dict] = None) -> bool:
        doc = _call("PUT", _url("storage", "kv", namespace, key), {"value": value, "metadata": metadata}, "KV set")
        return bool(doc.get("success"))

    @staticmethod
    def get(namespace: str, key: str) -> Optional[str]:
        try:
            return _call("GET", _url("storage", "kv", namespace, key), what="KV get").get("value")
        except StorageError as exc:
            if exc.status == 404:
                return None
            raise

    @staticmethod
    def delete(namespace: str, key: str) -> bool:
        return bool(_call("DELETE", _url("storage", "kv", namespace, key), what="KV delete").get("success"))

    @staticmethod
    def list(namespace: str, prefix: str = "", limit: int = 100, cursor: Optional[str] = None) -> List[Dict]:
        query = {"prefix": prefix, "limit": limit, "cursor": cursor}
        return _call("GET", _url("storage", "kv", namespace, query=query), what="KV list").get("keys", [])


class D1Storage:
    """SQL databases (SQLite): one statement per call, ``?`` placeholders."""

    @staticmethod
    def query(namespace: str, sql: str, params: Optional[List] = None) -> List[Dict]:
        doc = _call("POST", _url("storage", "d1", namespace, "query"), {"sql": sql, "params": params or []},
                    "D1 query")
        return doc.get("results", [])

    @staticmethod
    def exec(namespace: str, sql: str, params: Optional[List] = None) -> Dict:
        return _call("POST", _url("storage", "d1", namespace, "exec"), {"sql": sql, "params": params or []},
                     "D1 exec")


class R2Storage:
    """Object storage: bytes with optional string metadata."""

    @staticmethod
    def put(namespace: str, key: str, content: bytes, metadata: Optional[Dict[str, str]] = None) -> bool:
        if isinstance(content, str):
            content = content.encode("utf-8")
        body = {"content": base64.b64encode(content).decode("ascii"), "metadata": metadata}
        return bool(_call("PUT", _url("storage", "r2", namespace, key), body, "R2 put").get("success"))

    @staticmethod
    def get(namespace: str, key: str) -> Optional[bytes]:
        try:
            doc = _call("GET", _url("storage", "r2", namespace, key), what="R2 get")
        except StorageError as exc:
            if exc.status == 404:
                return None
            raise
        return base64.b64decode(doc.get("content") or "")

    @staticmethod
    def delete(namespace: str, key: str) -> bool:
        return bool(_call("DELETE", _url("storage", "r2", namespace, key), what="R2 delete").get("success"))

    @staticmethod
    def list(namespace: str, prefix: str = "", limit: int = 100, cursor: Optional[str] = None) -> List[Dict]:
        query = {"prefix": prefix, "limit": limit, "cursor": cursor}
        return _call("GET", _url("storage", "r2", namespace, query=query), what="R2 list").get("objects", [])


kv = KVStorage()
d1 = D1Storage()
r2 = R2Storage()
