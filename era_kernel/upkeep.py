"""The engine's kernel upkeep: starting kernels for the warm pool, admission under the
kernel limit, culling passes and the stats that report on all of it.

``KernelUpkeep`` is part of ``SessionManager`` (its only user), kept in its own file for
size. It works on the manager's state: ``settings``, ``store``, ``files``, ``slots``,
``pool``, ``kernels``, ``culled`` and the ``_starting``, ``_locks``, ``_active_at`` and
``_pool_uids`` maps, through the manager's ``_new_kernel``, ``_startup_cells``, ``_emit``,
``_stop_kernel`` and ``delete``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from typing import Any

from .culling import CullPlan, plan_cull
from .errors import NotFound
from .languages import LANGUAGES
from .listing import record_chunks
from .pool import PoolKey, WarmKernel, reserve_uids

log = logging.getLogger("era.sessions")

POOL_UID_BASE = 400_000_000  # pooled kernels' uids: reserved in blocks (POOL_UID_FILE), never reused
POOL_UID_FILE = "pool-uids"
POOL_UID_BLOCK = 1000


class KernelUpkeep:
    def _take_warm(self, record: dict[str, Any]) -> WarmKernel | None:
        """A pooled kernel for this record, when one of its kind is ready. Sessions with a
        package setup or network access need a kernel launched for them, so never pool."""
        if record.get("setup") or record.get("allowInternetAccess"):
            return None
        return self.pool.take((record["language"], record["provisioner"]))

    async def _spawn_warm(self, key: PoolKey) -> WarmKernel:
        """Start a kernel for the pool (its slot is held): its own directory and uid."""
        language, provisioner = key
        if os.getuid() == 0:
            if not self._pool_uids:
                self._pool_uids = await asyncio.to_thread(reserve_uids, self.settings.data_dir / POOL_UID_FILE,
                                                          POOL_UID_BASE, POOL_UID_BLOCK)
            uid = self._pool_uids.pop()
        else:
            uid = os.getuid()
        ws = self.files.workspace(self.files.pool_path(secrets.token_hex(8)))
        record = {"id": None, "language": language, "provisioner": provisioner, "allowInternetAccess": False}
        kernel = self._new_kernel(record, ws.root, uid, cells=False)
        kernel.launch["labels"] = {"era.pool": f"{language}-{provisioner}"}
        await ws.create(uid=uid)
        try:
            await kernel.start()
            # A kernel's first cell pays for lazy imports and caches; pay it here, not in the
            # claiming user's first request (silent: the user's execution count starts at 1).
            cells = self._startup_cells(record | {"env": {}, "startup": None}, ws.root)
            for cell in cells:
                await kernel.execute(cell, timeout=self.settings["ERA_KERNEL_START_TIMEOUT"], silent=True)
        except BaseException:
            await ws.remove()
            raise
        return WarmKernel(kernel, key, ws.root, uid, cells)

    async def _discard_warm(self, warm: WarmKernel) -> None:
        await warm.kernel.stop(now=True)
        await self.files.workspace(warm.workdir).remove()

    async def _admit(self) -> None:
        """Take a slot for a new kernel: a free one; else a pooled kernel's; else the least
        recently used idle session kernel's (culled, its session stays); else 429. No await
        from the check to the transfer, so concurrent requests cannot overshoot the limit,
        and the kernel given up is gone before the caller starts its own."""
        if self.slots.try_acquire():
            return
        stopping = self.pool.evict()
        if stopping is None:
            idle = [sid for sid, k in self.kernels.items()
                    if k.state == "idle" and sid not in self._starting and not self._lock_held(sid)]
            if not idle:
                self.slots.acquire()  # raises TooManyKernels: 429 with Retry-After
            victim = min(idle, key=lambda sid: self._active_at.get(sid, 0.0))
            kernel = self.kernels.pop(victim)  # its slot is now the caller's
            self.culled["lru"] += 1
            log.info("session %s: kernel shut down to admit a new one (kernel limit %d)", victim, self.slots.limit)
            self._emit(victim, {"type": "status", "state": "culled", "reason": "kernel limit"})
            stopping = kernel.stop(now=True)
        try:
            await stopping
        except BaseException:
            self.slots.release()  # the caller never gets to use it
            raise

    def _lock_held(self, session_id: str) -> bool:
        lock = self._locks.get(session_id)
        return lock is not None and lock.locked()

    async def _cull_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings["ERA_CULL_INTERVAL"])
            try:
                await self.cull()
            except Exception:
                log.exception("culling pass failed")

    async def cull(self) -> dict[str, list[str]]:
        """One culling pass (every ``ERA_CULL_INTERVAL``): delete sessions past their max
        age, shut down kernels idle past ``ERA_KERNEL_IDLE_TIMEOUT`` (era_kernel.culling)."""
        idle_now = {sid for sid, k in self.kernels.items()
                    if k.state == "idle" and sid not in self._starting and not self._lock_held(sid)}
        plan, now = CullPlan(), time.time()
        async for records in record_chunks(self.store):  # planned a chunk at a time; acted on below
            part = plan_cull(records, idle_now, self._active_at, now,
                             idle_timeout=self.settings["ERA_KERNEL_IDLE_TIMEOUT"],
                             default_max_age=self.settings["ERA_SESSION_MAX_AGE"])
            plan.expired += part.expired
            plan.idle += part.idle
        for sid in plan.expired:
            try:
                await self.delete(sid)
            except NotFound:
                continue
            self.culled["max_age"] += 1
            log.info("session %s deleted: older than its max age", sid)
        for sid in plan.idle:
            kernel = self.kernels.get(sid)
            if kernel is None or kernel.state != "idle" or self._lock_held(sid):
                continue  # a run arrived meanwhile
            await self._stop_kernel(sid)
            self.culled["idle"] += 1
            log.info("session %s: idle kernel shut down", sid)
            self._emit(sid, {"type": "status", "state": "culled", "reason": "idle"})
        return {"expired": plan.expired, "idle": plan.idle}

    async def stats(self) -> dict[str, Any]:
        from .resources import kernels_memory_bytes, process_rss_bytes

        now = time.time()
        listed = [(sid, k) for sid, k in self.kernels.items()] + [(None, w.kernel) for w in self.pool.waiting()]
        memory = await kernels_memory_bytes([k.km for _, k in listed])
        kinds = {lang.kernelspec_name(prov): (name, prov) for name, lang in LANGUAGES.items()
                 for prov in ("local", "docker")}
        kernels = []
        for (sid, kernel), mem in zip(listed, memory):
            language, provisioner = kinds.get(kernel.kernel_name, (kernel.kernel_name, ""))
            kernels.append({"session_id": sid, "language": language, "provisioner": provisioner,
                            "state": "pooled" if sid is None else kernel.state,
                            "idle_s": round(now - self._active_at[sid], 3) if sid in self._active_at else None,
                            "memory_bytes": mem if isinstance(mem, int) else None})
        states: dict[str, int] = {}
        for entry in kernels:
            states[entry["state"]] = states.get(entry["state"], 0) + 1
        return {
            "sessions": await self.store.count_sessions(),
            "live_kernels": len(kernels),
            "kernel_states": states,
            "kernel_slots": {"used": self.slots.used, "max": self.slots.limit},
            "pool": self.pool.stats(),
            "culled": dict(self.culled),
            "kernels": kernels,
            "memory": {"server_rss_bytes": await asyncio.to_thread(process_rss_bytes),
                       "kernels_bytes": sum(k["memory_bytes"] or 0 for k in kernels)},
            "uptime_s": round(time.monotonic() - self._started_at, 3),
        }
