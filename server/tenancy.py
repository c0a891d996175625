"""A request's tenant (era_kernel/tenants.py): who its key is, whether it may see a
session, and the key's limits. Called from ``RouteHandler`` (handlers/base.py), so every
route, HTTP or WebSocket, goes through the same three functions.

Another tenant's session is answered exactly as a missing one is (404, the engine's
``session <id> not found``), never a 403 that would confirm it exists.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator

from era_kernel.errors import NotFound, OverLimit, Unauthorized
from era_kernel.listing import record_chunks
from era_kernel.tenants import ADMIN, Tenant, split_key
from era_kernel.validation import is_session_id

from .auth import token_matches

UNAUTHORIZED = "missing or invalid API key; send 'Authorization: Bearer <key>'"


async def authenticate(services: Any, *tokens: str | None, waits: bool = True) -> Tenant:
    """The tenant of the request's key (header and ``?token=`` candidates); 401 when none
    is valid. ``ERA_API_KEY`` needs no store; a tenant key waits for the engine. A route
    that answers before the engine is ready (``waits`` False: /metrics) on a server
    without ERA_API_KEY stays open until then, as it was before tenants."""
    from .handlers.base import wait_ready

    key = services.api_key
    # Every candidate is compared, so timing does not tell which one was present.
    if key is not None and sum(token_matches(t, key) for t in tokens if t is not None):
        return ADMIN
    if key is not None and not any(split_key(t) for t in tokens):
        raise Unauthorized(UNAUTHORIZED)  # neither ours nor a tenant's: no store needed
    if not waits and key is None and services.keys is None and not any(split_key(t) for t in tokens):
        return ADMIN
    await wait_ready(services)
    return await services.keys.authenticate(*tokens)


SESSION_NOT_FOUND = "session {id} not found"  # the engine's words for a missing session


def not_found(session_id: str, template: str = SESSION_NOT_FOUND) -> NotFound:
    return NotFound(template.format(id=session_id[:128]))


async def check_owner(services: Any, tenant: Tenant, session_id: str, template: str = SESSION_NOT_FOUND) -> None:
    """404 for a tenant when the session is not its own, missing or another's alike (the
    admin sees all), before anything else of the request is looked at: were a missing
    session left to the handler, a bad body would answer 400 for it and 404 for another
    tenant's, telling them apart. ``template`` is the route's words for a missing one (the
    gateway's say "kernel"), so the body is the handler's own."""
    if tenant.admin:
        return
    row = await services.engine.store.get_session(session_id) if is_session_id(session_id) else None
    if row is None or row.get("owner") != tenant.owner:
        raise not_found(session_id, template)


def owner_filter(tenant: Tenant) -> str | None:
    """What listings and bulk deletes are narrowed to: None (every session) for the admin."""
    return None if tenant.admin else tenant.owner


_CREATING: dict[str, asyncio.Lock] = {}


@contextlib.asynccontextmanager
async def new_session(services: Any, tenant: Tenant) -> AsyncIterator[None]:
    """Around a create or duplicate: the limits checked, then the session made, one at a
    time per limited tenant, so 200 creates at once cannot all pass the same count."""
    if not {"sessions", "kernels"} & tenant.limits.keys():
        yield
        return
    lock = _CREATING.setdefault(tenant.owner, asyncio.Lock())
    async with lock:
        await check_new_session(services, tenant)
        yield


async def check_new_session(services: Any, tenant: Tenant) -> None:
    """Before a create or duplicate: room under ``sessions`` and ``kernels`` (a new
    session starts a kernel)."""
    limits = tenant.limits
    if "sessions" in limits:
        count = await services.engine.store.count_sessions(owner=tenant.owner)
        if count >= limits["sessions"]:
            raise OverLimit("sessions", limits["sessions"], f"this key's limit of {limits['sessions']} sessions is "
                            "reached (sessions): delete one first", retry_after=60)
    await check_kernel(services, tenant, None)


async def check_kernel(services: Any, tenant: Tenant, session_id: str | None) -> None:
    """Before work that starts a kernel (a create; a run on a session without a live one):
    room under ``kernels``."""
    limit = tenant.limits.get("kernels")
    if limit is None or (session_id is not None and session_id in services.engine.kernels):
        return
    if await live_kernels(services.engine, tenant.owner) >= limit:
        raise OverLimit("kernels", limit, f"this key's limit of {limit} live kernels is reached (kernels): stop "
                        "one (POST /api/vm/{id}/stop) or wait for idle ones to be culled", retry_after=5)


async def live_kernels(engine: Any, owner: str) -> int:
    """How many of the tenant's sessions have a live (or starting) kernel."""
    live, count = engine.kernels, 0
    async for rows in record_chunks(engine.store, owner=owner):
        count += sum(1 for r in rows if r["id"] in live)
    return count


async def check_run(services: Any, tenant: Tenant, session_id: str | None) -> None:
    """Before a run: ``runs_per_minute``, then ``kernels`` when it has to start one."""
    services.run_rate.take(tenant)
    await check_kernel(services, tenant, session_id)


async def check_storage(services: Any, owner: str) -> None:
    """Before a storage write: ``storage_bytes`` of the owner's key (what the owner keeps
    in KV, objects and databases), whether the key or a session's token calls."""
    limit = (await services.keys.limits_of(owner)).get("storage_bytes")
    if limit is None:
        return
    used = await services.engine.storage.usage(owner)
    if used >= limit:
        raise OverLimit("storage_bytes", limit, f"this key's limit of {limit} storage bytes is reached "
                        f"(storage_bytes; {used} used): delete some first", retry_after=60)
