"""Keeping the engine tidy while it runs: culling passes, and the stats that report on
kernels, slots, the pool and culls.

A culling pass (every ``ERA_CULL_INTERVAL``) deletes sessions past their max age, shuts
down kernels idle past ``ERA_KERNEL_IDLE_TIMEOUT`` (the session stays; its next run
starts a kernel), and stops kernels that died between runs, whose slot would otherwise
stay taken until the session's next run. Ages are read from the store's ``created_at``
and ``last_run_at``, so a restart resets no clock; running, queued and starting kernels
are never culled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Awaitable, Callable, Iterable

from ..config import Settings
from ..errors import NotFound
from ..languages import kernel_kind
from ..listing import record_chunks
from ..store.base import MetadataStore
from .events import EngineEvents, KernelCulled
from .kernels import KernelTable
from .pool import KernelPool

log = logging.getLogger("era.upkeep")


def epoch(timestamp: str) -> float:
    """Seconds since the epoch of a store timestamp (``2026-01-01T00:00:00.000Z``)."""
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


@dataclass
class CullPlan:
    expired: list[str] = field(default_factory=list)  # sessions to delete: past their max age
    idle: list[str] = field(default_factory=list)  # kernels to shut down: idle past the timeout


def plan_cull(records: Iterable[dict[str, Any]], idle_kernels: set[str], active_at: Callable[[str], float | None],
              now: float, *, idle_timeout: float, default_max_age: float) -> CullPlan:
    """Pure decisions over store rows. ``idle_kernels``: sessions whose kernel is live and
    idle. A session's own ``max_age`` wins over ``default_max_age``; 0 means never."""
    plan = CullPlan()
    for record in records:
        sid = record["id"]
        max_age = record.get("max_age") or default_max_age
        if max_age and now - epoch(record["created_at"]) > max_age:
            plan.expired.append(sid)
        elif idle_timeout and sid in idle_kernels:
            last = max(epoch(record.get("last_run_at") or record["created_at"]), active_at(sid) or 0.0)
            if now - last > idle_timeout:
                plan.idle.append(sid)
    return plan


async def _how_it_died(kernel: Any) -> dict[str, Any]:
    """What a dead kernel still says of its end (the session log keeps it)."""
    if kernel is None:
        return {}
    return {"exit_status": await kernel.exit_status(), "cut": kernel.cut}


class Upkeep:
    def __init__(self, settings: Settings, store: MetadataStore, table: KernelTable, pool: KernelPool,
                 events: EngineEvents, delete: Callable[[str, str], Awaitable[None]]) -> None:
        self.settings = settings
        self.store = store
        self.table = table
        self.pool = pool
        self.events = events
        self._delete = delete  # (session id, reason): the engine's own delete
        self.culled = {"idle": 0, "max_age": 0, "dead": 0}
        self._loop: asyncio.Task | None = None
        self._started_at = time.monotonic()

    def start(self) -> None:
        """Called by the engine's start (not by one-shot CLI engines): culling from now on."""
        self._started_at = time.monotonic()
        self._loop = asyncio.create_task(self._cull_loop(), name="era-culler")

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
            self._loop = None

    async def _cull_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings["ERA_CULL_INTERVAL"])
            try:
                await self.cull()
            except Exception:
                log.exception("culling pass failed")

    async def cull(self) -> dict[str, list[str]]:
        """One culling pass; returns what it ended."""
        idle_now = self.table.idle()
        plan, now = CullPlan(), time.time()
        async for records in record_chunks(self.store):  # planned a chunk at a time; acted on below
            part = plan_cull(records, idle_now, self.table.active_at, now,
                             idle_timeout=self.settings["ERA_KERNEL_IDLE_TIMEOUT"],
                             default_max_age=self.settings["ERA_SESSION_MAX_AGE"])
            plan.expired += part.expired
            plan.idle += part.idle
        for sid in plan.expired:
            try:
                await self._delete(sid, "max_age")
            except NotFound:
                continue
            self.culled["max_age"] += 1
            log.info("session %s deleted: older than its max age", sid)
        for sid in plan.idle:
            if sid not in self.table.idle():
                continue  # a run arrived meanwhile
            active = self.table.active_at(sid)
            await self.table.stop(sid)
            self.culled["idle"] += 1
            log.info("session %s: idle kernel shut down", sid)
            idle_s = round(time.time() - active, 1) if active is not None else None
            self.events.publish(KernelCulled(sid, "idle", {"idle_s": idle_s,
                                                           "idle_timeout_s": self.settings["ERA_KERNEL_IDLE_TIMEOUT"]}))
        dead = sorted(self.table.dead())
        for sid in dead:  # a cut connection or a death between runs: give the slot back now
            details = await _how_it_died(self.table.kernel(sid))  # before the stop forgets it
            await self.table.stop(sid)
            self.culled["dead"] += 1
            self.events.publish(KernelCulled(sid, "dead", details))
        return {"expired": plan.expired, "idle": plan.idle, "dead": dead}

    async def stats(self, owner: str | None = None) -> dict[str, Any]:
        """This server's counts; with ``owner`` (a tenant's key), the sessions and kernels
        are only that tenant's: another tenant's session ids never show (their sessions
        are a 404 to it everywhere else), nor do pooled kernels."""
        from ..resources import kernels_memory_bytes, process_rss_bytes

        now = time.time()
        listed = [(sid, k) for sid, k in self.table.live().items()] + [(None, w.kernel) for w in self.pool.waiting()]
        if owner is not None:
            own = {r["id"] for r in await self.store.list_sessions(owner=owner)}
            listed = [(sid, k) for sid, k in listed if sid in own]
        memory = await kernels_memory_bytes([k.km for _, k in listed])
        kernels = []
        for (sid, kernel), mem in zip(listed, memory):
            language, provisioner = kernel_kind(kernel.kernel_name)
            active_at = self.table.active_at(sid) if sid is not None else None
            kernels.append({"session_id": sid, "language": language, "provisioner": provisioner,
                            "state": "pooled" if sid is None else str(self.table.state(sid)),
                            "idle_s": round(now - active_at, 3) if active_at is not None else None,
                            "memory_bytes": mem if isinstance(mem, int) else None})
        states: dict[str, int] = {}
        for entry in kernels:
            states[entry["state"]] = states.get(entry["state"], 0) + 1
        return {
            "sessions": await self.store.count_sessions(owner=owner),
            "live_kernels": len(kernels),
            "kernel_states": states,
            "kernel_slots": {"used": self.table.slots.used, "max": self.table.slots.limit},
            "pool": self.pool.stats(),
            "culled": {**self.culled, "lru": self.table.lru_culls},
            "kernels": kernels,
            "memory": {"server_rss_bytes": await asyncio.to_thread(process_rss_bytes),
                       "kernels_bytes": sum(k["memory_bytes"] or 0 for k in kernels)},
            "uptime_s": round(time.monotonic() - self._started_at, 3),
        }
