"""Warm kernels: started ahead of demand per (language, provisioner), each used once.

A pooled kernel is launched with no session: a fresh working directory of its own, a
uid of its own, no network, and no startup cells. The engine takes one when a new
session or a one-shot ``/api/execute`` needs a kernel of that kind, runs that user's
startup cells in it (``SessionKernel.claim``), and the directory becomes the session's
workspace. A kernel is never returned to the pool, so no kernel is ever handed to a
second user. Every taken kernel is replaced in the background.

How many it keeps (``target``) follows demand: at least ``ERA_POOL_SIZE``; after a burst
of takes, as many as the largest burst seen lately (takes within ``BURST_SPAN``
seconds), and under a steady stream, the take rate times the time a kernel takes to
start; at most ``ERA_POOL_MAX``, half the kernel limit, and what the memory left allows
(``available_memory``). With no take for ``ERA_POOL_IDLE`` seconds it shrinks back to
``ERA_POOL_SIZE``. Refills start several kernels at once, but at most ``ERA_POOL_STARTS``
at a time across pools (by default one per core, two while a caller waits and every
pool's kernels are forked, and more while the CPU has idle time): on a machine bound by
CPU, kernels started a few at a time are ready one after another, while many started
together are all ready only at the end.

A new session that finds no kernel ready waits for one the pool is starting (``claim``)
rather than starting its own beside it: the pool counts it as demand, and the session
gets the next kernel to finish, in order of arrival. It starts its own only when the
pool cannot start one for it (no free slot, or this kind keeps failing to start).

Pooled kernels count against the kernel limit like any other live kernel: each holds a
``Lease`` on a slot (``KernelSlots``), a refill only starts when a slot is free, and
admission may take a pooled kernel's slot (``evict``) before it culls anybody's session
kernel. A claimed kernel's lease goes with it to its session.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from ..kernel import SessionKernel
from .kernels import KernelSlots, Lease

log = logging.getLogger("era.pool")

PoolKey = tuple[str, str]  # (language, provisioner); the provisioner picks the image
RETRY_MAX = 60.0  # seconds between attempts while a pool cannot start kernels
BURST_SPAN = 2.0  # takes this close together are one burst, which the pool then keeps ready for
RATE_WINDOW = 10.0  # seconds over which the steady take rate is measured
MEMORY_RESERVE = 512 * 1024**2  # memory the pool never grows into


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
    def __init__(self, keys: list[PoolKey], size: int, slots: KernelSlots, spawn: Spawner, discard: Discarder, *,
                 max_size: int | None = None, starts: int | None = None, starts_per_core: int = 1, idle: float = 120.0,
                 kernel_bytes: int = 96 * 1024**2, memory: Callable[[], int | None] | None = None):
        self.keys = keys if size > 0 else []
        self.size = max(0, size)
        self.max_size = max(self.size, max_size if max_size is not None else self.size)
        # Kernel starts under way at once, all pools together: ``starts`` when given; else
        # ``starts_per_core`` per core (default_starts), more while the CPU has idle time (a
        # start that mostly waits leaves the CPU to more of them).
        self.starts = max(1, starts or default_starts(starts_per_core))
        # With nobody waiting (a refill behind sessions already served), one per core: the
        # sessions that just took kernels run their first cells meanwhile, and a burst on a
        # grown pool was answered later with more refills beside it.
        self.refill_starts = self.starts if starts else min(self.starts, default_starts(1))
        self._cpu = CpuIdle() if not starts else None
        self._more = 0  # starts allowed beyond ``starts`` while the CPU is idle enough
        self.idle = idle  # seconds without a take after which a grown pool shrinks back to ``size``
        self.kernel_bytes = kernel_bytes  # what one more warm kernel is taken to cost, against the memory left
        self._memory = memory or available_memory
        self.slots = slots
        self._spawn = spawn
        self._discard = discard
        self._ready: dict[PoolKey, deque[WarmKernel]] = {key: deque() for key in self.keys}
        self._starting: dict[PoolKey, int] = {key: 0 for key in self.keys}
        self._waiters: dict[PoolKey, deque[asyncio.Future]] = {key: deque() for key in self.keys}
        self._takes: dict[PoolKey, deque[float]] = {key: deque(maxlen=4096) for key in self.keys}
        self._retry_at: dict[PoolKey, float] = {key: 0.0 for key in self.keys}  # failing: no start before this
        self._delay: dict[PoolKey, float] = {key: 1.0 for key in self.keys}
        self._start_s: dict[PoolKey, float] = {key: 1.0 for key in self.keys}  # recent kernel start time (average)
        self._wake: dict[PoolKey, asyncio.Event] = {key: asyncio.Event() for key in self.keys}
        self._loops: list[asyncio.Task] = []
        self._spawns: dict[asyncio.Task, Lease] = {}
        self._spawn_keys: dict[asyncio.Task, PoolKey] = {}
        self._evicted: set[asyncio.Task] = set()  # spawns whose slot admission took
        self.claimed = 0
        self.misses = 0  # requests for a pooled kind that found the pool empty and got no kernel from it
        self.waited = 0  # requests that waited for a kernel the pool was starting
        self._closing = False
        self._stopping: set[asyncio.Task] = set()  # kernels the pool no longer needs, being stopped

    # ---- lifecycle (the engine calls these at its start and shutdown) -------------------
    def start(self) -> None:
        """Begin filling every pool in the background; returns at once."""
        self._loops = [asyncio.create_task(self._fill(key), name=f"era-pool-{key[0]}-{key[1]}")
                       for key in self.keys]

    async def shutdown(self) -> None:
        """Stop refilling and stop every kernel still waiting in the pool."""
        self._closing = True  # from here the starts are this method's to settle, not _spawned's
        for waiters in self._waiters.values():
            while waiters:
                self._answer(waiters.popleft(), None)
        spawns = list(self._spawns.items())
        for task in [*self._loops, *(task for task, _ in spawns)]:
            if not task.cancelling():  # an evicted start is already stopping its kernel: let it finish
                task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        started = await asyncio.gather(*(task for task, _ in spawns), return_exceptions=True)
        self._loops, self._spawns, self._spawn_keys = [], {}, {}
        # A kernel that finished starting just as we cancelled is stopped like the rest;
        # a start that did not finish gives its slot back (unless admission took it).
        waiting = [warm for queue in self._ready.values() for warm in queue]
        waiting += [warm for warm in started if isinstance(warm, WarmKernel)]
        for (task, lease), result in zip(spawns, started):
            if not isinstance(result, WarmKernel) and task not in self._evicted:
                lease.release()
        for queue in self._ready.values():
            queue.clear()
        await asyncio.gather(*(self._drop(warm) for warm in waiting), *self._stopping, return_exceptions=True)

    # ---- the engine's side --------------------------------------------------------------
    def take(self, key: PoolKey) -> WarmKernel | None:
        """A ready kernel of this kind, now the caller's (its lease with it), or None.
        Synchronous, so two callers can never get the same kernel."""
        if key not in self._ready:
            return None
        self._note_take(key)
        warm = self._pop_ready(key)
        if warm is None:
            self.misses += 1
        return warm

    async def claim(self, key: PoolKey, timeout: float) -> WarmKernel | None:
        """A ready kernel of this kind; else the next one the pool finishes starting, when
        it is starting one for this caller or can (waiting at most ``timeout`` seconds);
        else None, and the caller starts its own. Waiters are served in arrival order."""
        if key not in self._ready:
            return None
        self._note_take(key)
        warm = self._pop_ready(key)
        if warm is not None:
            return warm
        if not self._can_serve(key, len(self._waiters[key]) + 1):
            self.misses += 1
            return None
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[key].append(waiter)
        self._wake[key].set()  # start one for it
        try:
            await asyncio.wait({waiter}, timeout=timeout)
        except BaseException:
            self._withdraw(key, waiter)
            raise
        if not waiter.done():
            self._withdraw(key, waiter)
        warm = waiter.result() if waiter.done() and not waiter.cancelled() else None
        if warm is None:
            self.misses += 1
        else:
            self.waited += 1
        return warm

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
            key = self._spawn_keys[task]
            if self._starting[key] <= len(self._waiters[key]):
                continue  # each start of this kind is a waiting session's kernel already
            if not task.done() and task not in self._evicted:
                self._starting[key] -= 1  # no longer one a waiter can count on
                self._evicted.add(task)
                task.cancel()  # kernel.start() stops what it had started
                return lease, self._reap_evicted(task)
        return None

    async def _reap_evicted(self, task: asyncio.Task) -> None:
        await asyncio.wait({task})
        if not task.cancelled() and task.exception() is None:  # it finished just before the cancel
            await self._discard(task.result())

    def target(self, key: PoolKey) -> int:
        """How many kernels of this kind to keep ready or starting now (see the module doc)."""
        now = time.monotonic()
        takes = self._takes[key]
        while takes and takes[0] < now - self.idle:
            takes.popleft()
        peak, first = 0, 0
        for last, at in enumerate(takes):  # the most takes within BURST_SPAN seconds
            while at - takes[first] > BURST_SPAN:
                first += 1
            peak = max(peak, last - first + 1)
        recent = sum(1 for at in takes if at >= now - RATE_WINDOW)
        steady = math.ceil(recent / RATE_WINDOW * self._start_s[key] * 2)  # twice: refills trail the takes
        wanted = max(self.size, min(max(peak, steady), self.max_size, self.slots.limit // 2))
        if wanted > self.size:  # growing: only into memory that is free
            free = self._memory()
            if free is not None:
                room = len(self._ready[key]) + self._starting[key] + max(0, (free - MEMORY_RESERVE) // self.kernel_bytes)
                wanted = max(self.size, min(wanted, room))
        return wanted

    def stats(self) -> dict:
        return {
            "size": self.size,
            "pools": {f"{lang}:{prov}": {"ready": len(self._ready[(lang, prov)]),
                                        "starting": self._starting[(lang, prov)],
                                        "waiting": len(self._waiters[(lang, prov)]),
                                        "target": self.target((lang, prov))}
                      for lang, prov in self.keys},
            "claimed": self.claimed,
            "misses": self.misses,
            "waited": self.waited,
        }

    def waiting(self) -> list[WarmKernel]:
        return [warm for queue in self._ready.values() for warm in queue]

    # ---- handing out ----------------------------------------------------------------------
    def _note_take(self, key: PoolKey) -> None:
        self._takes[key].append(time.monotonic())
        self._wake[key].set()  # refill, and perhaps grow

    def _pop_ready(self, key: PoolKey) -> WarmKernel | None:
        queue = self._ready[key]
        while queue:
            warm = queue.popleft()
            if warm.kernel.state == "idle":
                self.claimed += 1
                return warm
            asyncio.create_task(self._drop(warm))  # died while waiting
        return None

    def _can_serve(self, key: PoolKey, waiters: int) -> bool:
        """Whether ``waiters`` callers of this kind will get a kernel from the pool: ones
        already starting, or slots free for more; never while its kernels fail to start."""
        if time.monotonic() < self._retry_at[key]:
            return False
        return self._starting[key] + self.slots.limit - self.slots.used >= waiters

    def _answer(self, waiter: asyncio.Future, warm: WarmKernel | None) -> bool:
        if waiter.done():
            return False
        waiter.set_result(warm)
        return True

    def _withdraw(self, key: PoolKey, waiter: asyncio.Future) -> None:
        """A waiter gave up (timed out, or its request was cancelled)."""
        if not waiter.done():
            waiter.cancel()
        elif not waiter.cancelled() and waiter.result() is not None:  # a kernel came just as it left
            self._ready[key].appendleft(waiter.result())
            self.claimed -= 1
        try:
            self._waiters[key].remove(waiter)
        except ValueError:
            pass

    def _deliver(self, key: PoolKey, warm: WarmKernel) -> None:
        """A kernel finished starting: the longest waiting caller's, else ready."""
        waiters = self._waiters[key]
        while waiters:
            if self._answer(waiters.popleft(), warm):
                self.claimed += 1
                return
        self._ready[key].append(warm)

    # ---- refilling ----------------------------------------------------------------------
    async def _fill(self, key: PoolKey) -> None:
        """Keep ``target`` kernels of this kind ready or starting (plus one per waiting
        caller), as slots and ``starts`` allow; back off while kernels of this kind fail
        to start (no Docker engine, no image); shrink back when idle."""
        while True:
            self._wake[key].clear()
            self._top_up(key)
            self._shrink(key)
            busy = bool(self._waiters[key]) and self._cpu is not None  # look at the CPU often meanwhile
            try:  # woken by a take or a finished start; the timeout retries when slots were all in use
                await asyncio.wait_for(self._wake[key].wait(), timeout=0.2 if busy else 1.0)
            except TimeoutError:
                pass

    def _top_up(self, key: PoolKey) -> None:
        waiters = self._waiters[key]
        failing = time.monotonic() < self._retry_at[key]
        self._adjust_starts()
        while not failing and (len(self._ready[key]) + self._starting[key]
                               < self.target(key) + len(waiters)) and len(self._spawns) < self._start_limit():
            lease = self.slots.try_acquire()
            if lease is None:
                break
            self._starting[key] += 1
            task = asyncio.create_task(self._spawn(key, lease), name=f"era-pool-start-{key[0]}-{key[1]}")
            self._spawns[task] = lease
            self._spawn_keys[task] = key
            began = time.monotonic()
            task.add_done_callback(lambda t, began=began: self._spawned(key, t, began))
        # Callers the pool cannot serve (no slot for them, or failing) start their own now.
        while waiters and (failing or not self._can_serve(key, len(waiters))):
            self._answer(waiters.pop(), None)

    def _start_limit(self) -> int:
        """Starts allowed under way now: ``starts`` while a caller waits for a kernel,
        ``refill_starts`` otherwise, plus what the idle CPU allows (``_adjust_starts``)."""
        waiting = any(self._waiters.values())
        return (self.starts if waiting else self.refill_starts) + self._more

    def _adjust_starts(self) -> None:
        """With ``starts`` automatic: while starts are under way at the limit, allow one
        more when the CPU was mostly idle since the last look, one fewer when it was busy."""
        if self._cpu is None:
            return
        idle = self._cpu.sample()
        if idle is None:
            return
        if len(self._spawns) >= self._start_limit() and idle > 0.3:  # mostly idle: up fast
            self._more = min(2 * self._more + 1 if idle > 0.5 else self._more + 1, 4 * self.starts)
        elif idle < 0.1 or not self._spawns:
            self._more = max(self._more - 1, 0)

    def _spawned(self, key: PoolKey, task: asyncio.Task, began: float) -> None:
        if self._closing:
            return
        lease = self._spawns.pop(task, None)
        self._spawn_keys.pop(task, None)
        self._wake[key].set()
        if task in self._evicted:  # admission took its slot while it started (evict; counted there)
            self._evicted.discard(task)
            return
        self._starting[key] -= 1
        error = None if task.cancelled() else task.exception()
        if task.cancelled() or error is not None:
            lease.release()
            delay = self._delay[key]
            log.warning("pool %s:%s: a kernel failed to start (retry in %.0fs): %s",
                        key[0], key[1], delay, error or "cancelled")
            self._retry_at[key] = time.monotonic() + delay
            self._delay[key] = min(delay * 2, RETRY_MAX)
            return
        self._delay[key] = 1.0
        self._start_s[key] = 0.7 * self._start_s[key] + 0.3 * (time.monotonic() - began)
        self._deliver(key, task.result())

    def _shrink(self, key: PoolKey) -> None:
        """Stop ready kernels beyond the target (the newest first), once demand fell; in
        the background, so refills and waiters are not held up by the stops."""
        excess = []
        queue = self._ready[key]
        while len(queue) + self._starting[key] > self.target(key) and queue and not self._waiters[key]:
            excess.append(queue.pop())
        if excess:
            log.info("pool %s:%s: %d idle kernels stopped (demand fell)", key[0], key[1], len(excess))
        for warm in excess:
            task = asyncio.create_task(self._drop(warm))
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    async def _drop(self, warm: WarmKernel) -> None:
        try:
            await self._discard(warm)
        finally:
            warm.lease.release()


FORKED_POOL_SIZE = 12  # ERA_POOL_SIZE=auto where the pools' kernels are forked
NEW_INTERPRETER_POOL_SIZE = 4  # ERA_POOL_SIZE=auto otherwise (bubblewrap, Docker)
POOL_SIZE = 2  # the least ERA_POOL_SIZE=auto keeps, whatever the memory


def auto_pool_size(forked: bool, kernel_limit: int, kernel_bytes: int = 96 * 1024**2,
                   memory: Callable[[], int | None] | None = None) -> int:
    """``ERA_POOL_SIZE=auto``: the kernels a pool keeps ready while idle; the engine calls
    it once at start.

    Where every pooled kernel is forked (``KernelLauncher.pools_fork``), 12: such a kernel
    costs about 12 MiB (PSS; 17 on Python 3.11) and 0.1 CPU-seconds to start, and a burst
    of new sessions is bound by CPU, so the kernels started before it are what answer it
    soon. Measured on 2 cores, 30 sessions at once on a fresh server: 2 kept ready
    1.15-1.37 s p50, 2.1-2.4 s max; 6 0.87-1.09 s; 8 0.85-1.03 s; 12 0.71-0.73 s,
    1.76-1.86 s max. Otherwise (new interpreters: bubblewrap, Docker, about 0.75
    CPU-seconds and 35-50 MiB each) 4: 10 Docker sessions at once waited 1.58-1.67 s p50
    with 2 kept ready, 0.77-0.93 s with 4. No more than half the kernel limit (sessions
    would evict pooled kernels to get a slot), nor than fits in the memory left beyond
    ``MEMORY_RESERVE`` at ``kernel_bytes`` each, as the pool's growth (``target``); at
    least ``POOL_SIZE``."""
    size = min(FORKED_POOL_SIZE if forked else NEW_INTERPRETER_POOL_SIZE, kernel_limit // 2)
    free = (memory or available_memory)()
    if free is not None:
        size = min(size, max(0, free - MEMORY_RESERVE) // kernel_bytes)
    return max(POOL_SIZE, size)


def default_starts(per_core: int = 1) -> int:
    """Kernel starts the pool runs at once: ``per_core`` per core, at least two.

    One per core where a start is a new interpreter importing ipykernel (bubblewrap, a
    container: about 0.75 CPU-seconds, nearly all of the start); two where every pooled
    kernel is forked (``KernelLauncher.pools_fork``), whose start is about half CPU (0.11
    CPU-seconds, server included, in 0.17 s; the rest waits on threads, sockets and the
    sandbox): one per core left the CPU a third idle in a burst, and the ramp above it
    (``_adjust_starts``) never came while anything else ran on the machine. Measured on
    2 cores, 30 forked sessions at once on a shared machine: 2 starts 1.9-2.4 s p50,
    3.4-4.6 s max; 4 starts 1.6-1.8 s, 3.2-3.4 s; 6 and 10 worse again (all ready
    late); 10 Docker sessions: 2 starts 1.8-2.3 s p50, 4 starts 4.7-5.7 s."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(2, per_core * max(1, cores))


class CpuIdle:
    """The machine's idle CPU fraction between two looks (``/proc/stat``), at most one
    look per ``every`` seconds; None between them or where unknown."""

    def __init__(self, every: float = 0.15) -> None:
        self.every = every
        self._last: tuple[float, int, int] | None = None

    def sample(self) -> float | None:
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < self.every:
            return None
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        total, idle = sum(fields[:8]), fields[3] + (fields[4] if len(fields) > 4 else 0)
        last, self._last = self._last, (now, total, idle)
        if last is None or total <= last[1]:
            return None
        return (idle - last[2]) / (total - last[1])


def available_memory() -> int | None:
    """Bytes this process's kernels can still use: the machine's MemAvailable, or less
    when our cgroup (v2) has a lower limit left. None when unknown."""
    free: int | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError):
        pass
    try:
        group = Path("/proc/self/cgroup").read_text().strip().splitlines()[0].split(":", 2)[2]
        base = Path("/sys/fs/cgroup") / group.lstrip("/")
        limit = (base / "memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int((base / "memory.current").read_text())
            free = left if free is None else min(free, left)
    except (OSError, ValueError, IndexError):
        pass
    return free


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
