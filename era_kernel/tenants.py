"""Tenants: API keys with a name and limits, kept hashed in the metadata store.

A key is ``era_k.<id>.<secret>``: ``id`` (12 hex) is public and looks the key up,
``secret`` (32 random bytes) is checked against its SHA-256 (a fast hash is enough for
a high-entropy random secret; no password stretching needed) with
``hmac.compare_digest``. The key itself is shown once, at creation, and never stored.

A key's tenant owns what it creates: a session's record keeps the owner (``key_<id>``, a storage name),
and the storage proxy's namespaces are the owner's. ``ERA_API_KEY`` stays the single
admin key (owner ``DEFAULT_OWNER``); a key made with ``admin`` sees every session too.
A key's record is cached for at most ``CACHE_SECONDS``, so a revoke (from ``era keys
revoke``, another process) takes effect within that.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import BadRequest, Conflict, NotFound, OverLimit, Unauthorized
from .storage import DEFAULT_OWNER
from .store.base import KeyExists, MetadataStore, utc_stamp

PREFIX = "era_k"
CACHE_SECONDS = 1.0  # how stale a key's record may be: a revoke takes effect within this
LIMITS = ("sessions", "kernels", "storage_bytes", "runs_per_minute")
MAX_LIMIT = 10**15
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_KEY_ID = re.compile(r"^[0-9a-f]{12}$")


@dataclass(frozen=True)
class Tenant:
    """Who a request acts for."""

    owner: str  # what its sessions' records and storage namespaces carry
    name: str
    admin: bool = False  # sees and touches every session
    limits: dict[str, int] = field(default_factory=dict)  # only the limits set
    key_id: str | None = None


ADMIN = Tenant(owner=DEFAULT_OWNER, name="admin", admin=True)  # ERA_API_KEY, or a server without keys


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise BadRequest("key name must be 1-64 characters: letters, digits, '_', '.', '-', starting with a letter "
                         "or digit", field="name")
    if _KEY_ID.match(name):
        raise BadRequest("key name must not look like a key id (12 hex digits)", field="name")
    return name


def check_limits(limits: Any) -> dict[str, int]:
    """The limits set (None ones dropped); each a whole number from 0 to ``MAX_LIMIT``."""
    if limits is None:
        return {}
    if not isinstance(limits, dict):
        raise BadRequest("limits must be an object", field="limits")
    out = {}
    for name, value in limits.items():
        if name not in LIMITS:
            raise BadRequest(f"unknown limit '{name}'; known: {', '.join(LIMITS)}", field=name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LIMIT:
            raise BadRequest(f"limit '{name}' must be a whole number from 0 to {MAX_LIMIT}", field=name)
        out[name] = value
    return out


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_key(token: str | None) -> tuple[str, str] | None:
    """``(id, secret)`` of a key of ours, else None."""
    if not token or not token.startswith(PREFIX + "."):
        return None
    parts = token.split(".")
    if len(parts) != 3 or not _KEY_ID.match(parts[1]) or not parts[2]:
        return None
    return parts[1], parts[2]


def tenant_of(record: dict[str, Any]) -> Tenant:
    return Tenant(owner=f"key_{record['id']}", name=record["name"], admin=bool(record.get("admin")),
                  limits=dict(record.get("limits") or {}), key_id=record["id"])


def public(record: dict[str, Any]) -> dict[str, Any]:
    """A key's record as ``era keys list`` shows it: never the hash."""
    return {k: v for k, v in record.items() if k != "hash"}


class Keys:
    """The store's keys, as the server and ``era keys`` use them."""

    def __init__(self, store: MetadataStore, admin_key: bytes | None = None):
        self.store = store
        self.admin_key = admin_key
        self._cache: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._any: tuple[float, bool] = (0.0, False)

    async def create(self, name: Any, limits: Any = None, admin: bool = False) -> tuple[dict[str, Any], str]:
        """A new key: its record (as listed) and the key itself, which is never shown again."""
        record = {"id": secrets.token_hex(6), "name": check_name(name), "created_at": utc_stamp(),
                  "admin": bool(admin), "limits": check_limits(limits)}
        secret = secrets.token_urlsafe(32)
        try:
            stored = await self.store.insert_api_key({**record, "hash": hash_secret(secret)})
        except KeyExists:
            raise Conflict(f"a key named '{name}' exists; revoke it first", field="name") from None
        return public(stored), f"{PREFIX}.{record['id']}.{secret}"

    async def list(self) -> list[dict[str, Any]]:
        return [public(r) for r in await self.store.list_api_keys()]

    async def revoke(self, name_or_id: str) -> dict[str, Any]:
        record = await self.store.revoke_api_key(name_or_id)
        if record is None:
            raise NotFound(f"no key named or with id '{name_or_id}' that is not revoked already")
        self._cache.pop(record["id"], None)
        return public(record)

    async def _record(self, key_id: str) -> dict[str, Any] | None:
        now = time.monotonic()
        hit = self._cache.get(key_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        record = await self.store.get_api_key(key_id)
        if len(self._cache) > 10_000:  # forged ids must not grow it without bound
            self._cache.clear()
        self._cache[key_id] = (now + CACHE_SECONDS, record)
        return record

    async def limits_of(self, owner: str) -> dict[str, int]:
        """The limits of the key that owns ``owner`` (what a session's storage token acts
        for); none for the admin's."""
        if not owner.startswith("key_"):
            return {}
        record = await self._record(owner[4:])
        return dict((record or {}).get("limits") or {})

    async def keys_exist(self) -> bool:
        """Whether any key was ever made (then a server without ERA_API_KEY still wants one)."""
        now = time.monotonic()
        if self._any[0] > now or self._any[1]:  # once there is one, there always is
            return self._any[1]
        found = bool(await self.store.list_api_keys())
        self._any = (now + CACHE_SECONDS, found)
        return found

    async def authenticate(self, *tokens: str | None) -> Tenant:
        """The tenant of the first of ``tokens`` that is a valid key; Unauthorized when
        none is (every candidate is checked, so timing does not say which was sent)."""
        found: Tenant | None = None
        for token in tokens:
            if token is None:
                continue
            if self.admin_key is not None and hmac.compare_digest(token.encode("utf-8", "replace"), self.admin_key):
                found = found or ADMIN
                continue
            parts = split_key(token)
            if parts is None:
                continue
            record = await self._record(parts[0])
            if record is None or record.get("revoked_at"):
                continue
            if hmac.compare_digest(hash_secret(parts[1]).encode(), str(record.get("hash", "")).encode()):
                found = found or tenant_of(record)
        if found is not None:
            return found
        if self.admin_key is None and not await self.keys_exist():
            return ADMIN  # an open server (no key configured), as before tenants
        raise Unauthorized("missing or invalid API key; send 'Authorization: Bearer <key>'")


class RunRate:
    """Runs per minute per owner: a sliding window of the last minute's starts."""

    def __init__(self) -> None:
        self._starts: dict[str, collections.deque[float]] = {}

    def take(self, tenant: Tenant) -> None:
        limit = tenant.limits.get("runs_per_minute")
        if limit is None:
            return
        now = time.monotonic()
        window = self._starts.setdefault(tenant.owner, collections.deque())
        while window and window[0] <= now - 60:
            window.popleft()
        if len(window) >= limit:
            wait = 60 - (now - window[0]) if window else 60
            raise OverLimit("runs_per_minute", limit, f"this key's limit of {limit} runs per minute is reached "
                            "(runs_per_minute)", retry_after=max(1.0, wait))
        window.append(now)
