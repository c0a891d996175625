"""Warm kernels: started ahead of demand per (language, provisioner), each used once.

A pooled kernel is launched with no session: a fresh working directory of its own, a
uid of its own, no network, and no startup cells. The engine takes one when a new
session or a one-shot ``/api/execute`` needs a kernel of that kind, runs that user's
startup cells in it (``SessionKernel.claim``), and the directory becomes the session's
workspace. A kernel is never returned to the pool, so no kernel is ever handed to a
second user. Every taken kernel is replaced in the background.

Pooled kernels count against the kernel limit like any other live kernel: each holds a
``Lease`` on a slot (``KernelSlots``), a refill only starts when a slot is free, and
admission may take a pooled kernel's slot (``evict``) before it culls anybody's session
kernel. A claimed kernel's lease goes with it to its session.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from ..kernel import SessionKernel
from .kernels import KernelSlots, Lease

log = logging.getLogger("era.pool")

PoolKey = tuple[str, str]  # (language, provisioner); the provisioner picks the image
RETRY_MAX = 60.0  # seconds between attempts while a pool cannot start kernels


@dataclass
class WarmKernel:
    kernel: SessionKernel
    key: PoolKey
    workdir: Path  # mounted in the kernel's sandbox; becomes the claiming session's workspace
    uid: int
    cells: list[str]  # the startup cells it already ran: a claim with the same ones skips them
    lease: Lease  # its slot; goes with the kernel to whoever claims it


# Starts a kernel for a pool key, holding the given slot; the pool owns the result.
Spawner = Callable[[PoolKey, Lease], Awaitable[WarmKernel]]
# Stops a kernel that was never claimed and removes its directory (not its slot).
Discarder = Callable[[WarmKernel], Awaitable[None]]


def parse_pool_keys(spec: str, default_provisioner: str) -> list[PoolKey]:
    """``"python,python:docker"`` -> ``[("python", "local"), ("python", "docker")]``."""
    keys: list[PoolKey] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        language, _, provisioner = item.partition(":")
        key = (language.strip(), provisioner.strip() or default_provisioner)
        if key[1] not in ("local", "docker"):
            raise ValueError(f"ERA_POOL_KERNELS: unknown provisioner {key[1]!r} in {item!r}")
        if key not in keys:
            keys.append(key)
    return keys


class KernelPool:
    def __init__(self, keys: list[PoolKey], size: int, slots: KernelSlots, spawn: Spawner, discard: Discarder):
        self.keys = keys if size > 0 else []
        self.size = max(0, size)
        self.slots = slots
        self._spawn = spawn
        self._discard = discard
        self._ready: dict[PoolKey, deque[WarmKernel]] = {key: deque() for key in self.keys}
        self._starting: dict[PoolKey, int] = {key: 0 for key in self.keys}
        self._wake: dict[PoolKey, asyncio.Event] = {key: asyncio.Event() for key in self.keys}
        self._loops: list[asyncio.Task] = []
        self._spawns: dict[asyncio.Task, Lease] = {}
        self._evicted: set[asyncio.Task] = set()  # spawns whose slot admission took
        self.claimed = 0
        self.misses = 0  # requests for a pooled kind that found the pool empty

    # ---- lifecycle (the engine calls these at its start and shutdown) -------------------
    def start(self) -> None:
        """Begin filling every pool in the background; returns at once."""
        self._loops = [asyncio.create_task(self._fill(key), name=f"era-pool-{key[0]}-{key[1]}")
                       for key in self.keys]

    async def shutdown(self) -> None:
        """Stop refilling and stop every kernel still waiting in the pool."""
        spawns = list(self._spawns.items())
        for task in [*self._loops, *(task for task, _ in spawns)]:
            if not task.cancelling():  # an evicted start is already stopping its kernel: let it finish
                task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        started = await asyncio.gather(*(task for task, _ in spawns), return_exceptions=True)
        self._loops, self._spawns = [], {}
        # A kernel that finished starting just as we cancelled is stopped like the rest;
        # a start that did not finish gives its slot back (unless admission took it).
        waiting = [warm for queue in self._ready.values() for warm in queue]
        waiting += [warm for warm in started if isinstance(warm, WarmKernel)]
        for (task, lease), result in zip(spawns, started):
            if not isinstance(result, WarmKernel) and task not in self._evicted:
                lease.release()
        for queue in self._ready.values():
            queue.clear()
        await asyncio.gather(*(self._drop(warm) for warm in waiting), return_exceptions=True)

    # ---- the engine's side --------------------------------------------------------------
    def take(self, key: PoolKey) -> WarmKernel | None:
        """A ready kernel of this kind, now the caller's (its lease with it), or None.
        Synchronous, so two callers can never get the same kernel."""
        queue = self._ready.get(key)
        if queue is None:
            return None
        while queue:
            warm = queue.popleft()
            self._wake[key].set()  # refill
            if warm.kernel.state == "idle":
                self.claimed += 1
                return warm
            asyncio.create_task(self._drop(warm))  # died while waiting
        self.misses += 1
        return None

    def evict(self) -> tuple[Lease, Awaitable[None]] | None:
        """Give up one pooled kernel, ready or still starting, so the caller can have its
        slot (admission under the kernel limit prefers this to culling a session's
        kernel); None when the pool holds none. Returns the kernel's lease, the caller's
        at once, and an awaitable after which the kernel is gone."""
        for queue in self._ready.values():
            if queue:
                warm = queue.pop()  # the newest: the oldest stays, first to be claimed
                return warm.lease, self._discard(warm)
        for task, lease in self._spawns.items():
            if not task.done() and task not in self._evicted:
                self._evicted.add(task)
                task.cancel()  # kernel.start() stops what it had started
                return lease, self._reap_evicted(task)
        return None

    async def _reap_evicted(self, task: asyncio.Task) -> None:
        await asyncio.wait({task})
        if not task.cancelled() and task.exception() is None:  # it finished just before the cancel
            await self._discard(task.result())

    def stats(self) -> dict:
        return {
            "size": self.size,
            "pools": {f"{lang}:{prov}": {"ready": len(self._ready[(lang, prov)]),
                                        "starting": self._starting[(lang, prov)], "target": self.size}
                      for lang, prov in self.keys},
            "claimed": self.claimed,
            "misses": self.misses,
        }

    def waiting(self) -> list[WarmKernel]:
        return [warm for queue in self._ready.values() for warm in queue]

    # ---- refilling ----------------------------------------------------------------------
    async def _fill(self, key: PoolKey) -> None:
        """Keep ``size`` kernels of this kind ready or starting, as slots allow; back off
        while kernels of this kind fail to start (no Docker engine, no image)."""
        delay = 1.0
        while True:
            self._wake[key].clear()
            failed = False
            while len(self._ready[key]) + self._starting[key] < self.size:
                lease = self.slots.try_acquire()
                if lease is None:
                    break
                self._starting[key] += 1
                task = asyncio.create_task(self._spawn(key, lease))
                self._spawns[task] = lease
                try:
                    await asyncio.wait({task})  # raises if this loop is cancelled, not if the spawn is
                finally:
                    self._spawns.pop(task, None)
                    self._starting[key] -= 1
                if task in self._evicted:  # admission took its slot while it started (evict)
                    self._evicted.discard(task)
                    continue
                error = None if task.cancelled() else task.exception()
                if task.cancelled() or error is not None:
                    lease.release()
                    log.warning("pool %s:%s: a kernel failed to start (retry in %.0fs): %s",
                                key[0], key[1], delay, error or "cancelled")
                    failed = True
                    break
                self._ready[key].append(task.result())
                delay = 1.0
            if failed:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            try:  # woken by a take; the timeout retries when slots were all in use
                await asyncio.wait_for(self._wake[key].wait(), timeout=2.0)
            except TimeoutError:
                pass

    async def _drop(self, warm: WarmKernel) -> None:
        try:
            await self._discard(warm)
        finally:
            warm.lease.release()


def reserve_uids(counter: Path, base: int, block: int) -> list[int]:
    """The next ``block`` never-used uids from ``base`` up (blocking; run it in a thread).
    The counter file survives restarts, so a uid a claimed kernel gave its session is
    never handed out again."""
    start = int(counter.read_text()) if counter.exists() else 0
    tmp = counter.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(str(start + block))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, counter)
    return list(range(base + start + block - 1, base + start - 1, -1))
