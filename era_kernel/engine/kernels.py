"""The kernel table: every live or starting kernel of a session, the slot each one holds
under ``ERA_MAX_KERNELS``, its activity, and admission when the limit is reached.

One owner for kernel lifecycles. A kernel enters the table with its ``Lease`` (one slot)
and leaves it through ``stop``, which stops the kernel and gives the slot back, exactly
once, whatever the path: a delete, a restart, a death noticed by a run, culling, or
eviction to admit another kernel. Pooled and one-shot kernels hold leases too (the pool
and the runner give them back), so the count of slots in use is the count of kernels.

Admission (``admit``) never overshoots: the check and the take happen with no await in
between, so 200 concurrent creates cannot pass a limit of N (docs/security.md case 1). Past the
limit it takes a pooled kernel's slot first, then the least recently used session
kernel that is idle or dead (its session stays; the next run starts a kernel), and with
every kernel busy it raises ``Busy`` (retry later).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Awaitable, Callable, Iterator

from ..errors import Busy, KernelFailed
from ..kernel import KernelState, SessionKernel
from .events import EngineEvents, KernelCulled

log = logging.getLogger("era.kernels")


class Lease:
    """One kernel slot. ``release`` gives it back once; later calls do nothing."""

    __slots__ = ("_slots", "released")

    def __init__(self, slots: "KernelSlots") -> None:
        self._slots = slots
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._slots.used -= 1


class KernelSlots:
    """``limit`` slots; live plus starting kernels never hold more."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def try_acquire(self) -> Lease | None:
        if self.used >= self.limit:
            return None
        self.used += 1
        return Lease(self)

    def acquire(self) -> Lease:
        lease = self.try_acquire()
        if lease is None:
            raise Busy(f"kernel limit reached ({self.limit} live kernels); retry later", retry_after=2)
        return lease


# Gives up one pooled kernel for its slot: (the lease, the kernel's stop), or None.
PoolEviction = Callable[[], "tuple[Lease, Awaitable[None]] | None"]


class _Entry:
    __slots__ = ("kernel", "lease", "starting", "settled", "active_at")

    def __init__(self, kernel: SessionKernel | None, lease: Lease) -> None:
        self.kernel = kernel
        self.lease = lease
        self.starting: asyncio.Task | None = None  # a background start (create, restart)
        self.settled = asyncio.Event()  # its start is over, well or not
        self.active_at = time.time()


class KernelTable:
    def __init__(self, limit: int, events: EngineEvents) -> None:
        self.slots = KernelSlots(limit)
        self.events = events
        self._entries: dict[str, _Entry] = {}
        self._run_locks: dict[str, asyncio.Lock] = {}
        self._active_at: dict[str, float] = {}  # outlives the entry: culling reads it after a stop
        self.evict_pooled: PoolEviction = lambda: None  # set by the engine once the pool exists
        self.lru_culls = 0

    # ---- reading -----------------------------------------------------------------------
    def kernel(self, session_id: str) -> SessionKernel | None:
        """The session's kernel, live or starting (None when it has none)."""
        entry = self._entries.get(session_id)
        return entry.kernel if entry is not None else None

    def state(self, session_id: str) -> KernelState:
        entry = self._entries.get(session_id)
        if entry is None or entry.kernel is None:
            return KernelState.STARTING if entry is not None else KernelState.NONE
        if entry.starting is not None:
            return KernelState.STARTING
        return entry.kernel.state

    def starting(self, session_id: str) -> asyncio.Task | None:
        entry = self._entries.get(session_id)
        return entry.starting if entry is not None else None

    def live(self) -> "Mapping[str, SessionKernel]":
        """Session id -> kernel, for every session with one (a read-only view)."""
        return _LiveView(self._entries)

    def run_lock(self, session_id: str) -> asyncio.Lock:
        """The session's FIFO lock: runs (and a raw Jupyter client's kernel start) hold it."""
        return self._run_locks.setdefault(session_id, asyncio.Lock())

    def in_use(self, session_id: str) -> bool:
        lock = self._run_locks.get(session_id)
        return lock is not None and lock.locked()

    def touch(self, session_id: str) -> None:
        self._active_at[session_id] = time.time()

    def active_at(self, session_id: str) -> float | None:
        return self._active_at.get(session_id)

    def idle(self) -> set[str]:
        """Sessions whose kernel is up and idle: not running, queued or starting."""
        return {sid for sid, entry in self._entries.items()
                if entry.starting is None and entry.kernel is not None and entry.kernel.state == KernelState.IDLE
                and not self.in_use(sid)}

    def dead(self) -> set[str]:
        """Sessions whose kernel died (or was cut off) and waits to be replaced."""
        return {sid for sid, entry in self._entries.items()
                if entry.starting is None and entry.kernel is not None and entry.kernel.state == KernelState.DEAD
                and not self.in_use(sid)}

    # ---- slots -------------------------------------------------------------------------
    async def admit(self) -> Lease:
        """A slot for a new kernel: a free one; else a pooled kernel's; else the least
        recently used dead or idle session kernel's (culled, its session stays); else
        ``Busy``. The kernel given up is gone before this returns."""
        lease = self.slots.try_acquire()
        if lease is not None:
            return lease
        evicted = self.evict_pooled()
        if evicted is not None:
            lease, stopping = evicted
        else:
            candidates = self.dead() or self.idle()
            if not candidates:
                self.slots.acquire()  # raises Busy: retry later
            victim = min(candidates, key=lambda sid: self._active_at.get(sid, 0.0))
            entry = self._entries.pop(victim)
            lease = entry.lease  # the victim's slot is the caller's now
            self.lru_culls += 1
            log.info("session %s: kernel shut down to admit a new one (kernel limit %d)", victim, self.slots.limit)
            active = self._active_at.get(victim)
            self.events.publish(KernelCulled(victim, "kernel limit", {
                "max_kernels": self.slots.limit, "kernel_state": str(entry.kernel.state),
                "idle_s": round(time.time() - active, 1) if active is not None else None}))
            stopping = entry.kernel.stop(now=True)
        try:
            await stopping
        except BaseException:
            lease.release()  # the caller never gets to use it
            raise
        return lease

    # ---- entering and leaving ------------------------------------------------------------
    def reserve(self, session_id: str, lease: Lease) -> bool:
        """The session is getting a kernel with this slot (its start begins). False when
        it already has one (a restart and a cold run raced): the caller uses that one and
        gives its slot back."""
        if session_id in self._entries:
            return False
        self._entries[session_id] = _Entry(None, lease)
        self.touch(session_id)
        return True

    def mark_starting(self, session_id: str, task: asyncio.Task) -> None:
        """The background task starting it (a delete or a restart cancels it)."""
        self._entries[session_id].starting = task

    def attach(self, session_id: str, kernel: SessionKernel, lease: Lease) -> None:
        """The kernel object exists (it may still be starting)."""
        entry = self._entries.get(session_id)
        if entry is None or entry.lease is not lease:  # stopped (deleted, restarted) while it prepared
            raise KernelFailed(f"the kernel of session {session_id} was stopped while it started")
        entry.kernel = kernel

    def started(self, session_id: str, lease: Lease) -> None:
        """Its start finished: the kernel is ready for runs."""
        entry = self._entries.get(session_id)
        if entry is not None and entry.lease is lease:
            entry.starting = None
            entry.settled.set()
            self.touch(session_id)

    async def start_failed(self, session_id: str, lease: Lease) -> None:
        """Its start failed: the entry goes (and its slot), unless a stop took it first."""
        entry = self._entries.get(session_id)
        if entry is not None and entry.lease is lease:
            entry.settled.set()
            await self.stop(session_id, lease=lease)

    async def stop(self, session_id: str, *, lease: Lease | None = None, kernel: SessionKernel | None = None) -> bool:
        """Stop the session's kernel (cancelling a background start) and give its slot
        back; True when there was one. ``lease`` / ``kernel``: only if the entry still
        holds that slot or that kernel (a failed start or a run whose kernel died cleans up
        after itself, never after a restart that replaced it meanwhile)."""
        entry = self._entries.get(session_id)
        if entry is not None and entry.starting is None and not entry.settled.is_set():
            # A run's own (inline) start is under way: stopping its kernel half-launched
            # races jupyter_client's launch; let it finish (or fail) first.
            await entry.settled.wait()
            entry = self._entries.get(session_id)
        if entry is None or (lease is not None and entry.lease is not lease) or \
                (kernel is not None and entry.kernel is not kernel):
            return False
        del self._entries[session_id]
        entry.settled.set()
        try:
            starting = entry.starting
            if starting is not None and starting is not asyncio.current_task() and not starting.done():
                # Once only: a start already cancelled (by shutdown) is stopping its kernel,
                # and a second cancel would cut that short, leaving its directory and cgroup.
                if not starting.cancelling():
                    starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
            if entry.kernel is not None:
                await entry.kernel.stop(now=True)
        finally:
            entry.lease.release()
        return True

    def forget(self, session_id: str) -> None:
        """The session is gone: drop what the table kept about it (its kernel is stopped)."""
        self._run_locks.pop(session_id, None)
        self._active_at.pop(session_id, None)

    def sessions(self) -> list[str]:
        return list(self._entries)


class _LiveView(Mapping):
    def __init__(self, entries: dict[str, _Entry]) -> None:
        self._entries = entries

    def __getitem__(self, session_id: str) -> SessionKernel:
        kernel = self._entries[session_id].kernel
        if kernel is None:
            raise KeyError(session_id)
        return kernel

    def __iter__(self) -> Iterator[str]:
        return (sid for sid, entry in list(self._entries.items()) if entry.kernel is not None)

    def __len__(self) -> int:
        return sum(1 for entry in self._entries.values() if entry.kernel is not None)
