"""The session log: each lifecycle event of a session, kept as one of its session events,
so a client can ask later why its kernel went away (``GET /api/sessions/{id}/events``)
and the session document says how the last one ended (``kernel.last_exit``).

The engine registers ``SessionLog.record`` with ``EngineEvents.watch``, so every path
that starts or ends a kernel (a request, the culler, admission under the kernel limit, a
run whose kernel died or timed out, a shutdown, a package setup) is logged the same way
without each remembering to. A session event is a JSON document::

    {"type": "kernel_culled", "reason": "idle", "at": "2026-01-01T00:00:00.000Z",
     "message": "the kernel was shut down after 1802 s without a run (...)", "idle_s": 1802.4, ...}

``type``: ``kernel_started``, ``kernel_culled`` (idle), ``kernel_evicted`` (the least
recently used, to admit another under ``ERA_MAX_KERNELS``), ``kernel_died`` (out of
memory, an exit status, a cut connection), ``kernel_restarted`` (a run's timeout whose
interrupt did not take, or a restart asked for), ``kernel_stopped`` (settings changed,
server shutdown), ``setup_completed``, ``setup_failed``. The kernel-ending ones also
become the session's ``last_exit``, written with the event in one store call, so it
survives a restart without a query over the log.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..store.base import MetadataStore
from .events import (KernelCulled, KernelDied, KernelReplaced, KernelStopped, LifecycleEvent, SetupFinished)
from .results import utc_now

log = logging.getLogger("era.session_log")

# The types that say the kernel went away: each becomes the session's kernel.last_exit.
EXIT_TYPES = frozenset({"kernel_culled", "kernel_evicted", "kernel_died", "kernel_restarted", "kernel_stopped"})
MAX_REASON = 1000  # characters of a setup error kept in the event (setup_result has it whole)


def _seconds(value: Any) -> str:
    return f"{value:g} s" if isinstance(value, (int, float)) else "?"


def session_event(event: LifecycleEvent) -> dict[str, Any] | None:
    """The session event for a lifecycle event (None: not one kept, a session deletion
    takes its log with it). Pure: the server uses it too, to tell a Jupyter client."""
    details = {k: v for k, v in getattr(event, "details", {}).items() if v is not None}
    if isinstance(event, KernelReplaced):
        how = "claimed from the warm pool" if details.get("pooled") else "started"
        took = f" in {details['start_ms']:g} ms" if "start_ms" in details else ""
        kind = f"{details.get('language', '?')} kernel ({details.get('provisioner', '?')})"
        return _entry("kernel_started", "warm pool" if details.get("pooled") else "start",
                      f"a {kind} was {how}{took}", details)
    if isinstance(event, KernelCulled):
        return _culled(event, details)
    if isinstance(event, KernelDied):
        if "timeout_s" in details:
            return _entry("kernel_restarted", "timeout",
                          f"a run exceeded its {_seconds(details['timeout_s'])} timeout and the interrupt did not "
                          "stop it within ERA_INTERRUPT_GRACE, so the kernel was stopped; the next run starts a new "
                          "kernel", details)
        return _entry("kernel_died", event.reason, _died(details, "during a run"), details)
    if isinstance(event, KernelStopped):
        if event.reason == "taken over":
            return _entry("kernel_restarted", "taken over",
                          f"replica {details.get('replica', '?')} took the session over from replica "
                          f"{details.get('from_replica') or '?'}, whose lease had expired: the kernel's in-memory "
                          "state is lost; files, data and history are kept, and the next run starts a new kernel",
                          details)
        if event.reason == "restart":
            return _entry("kernel_restarted", "request", "the kernel was restarted on request", details)
        what = {"settings changed": "the session's env or network access changed (it applies from the next kernel "
                                    "start)",
                "server shutdown": "the server shut down"}.get(event.reason, event.reason)
        return _entry("kernel_stopped", event.reason,
                      f"the kernel was stopped: {what}; the next run starts a new kernel", details)
    if isinstance(event, SetupFinished):
        error = str(details.get("error") or "")[:MAX_REASON]
        if event.status == "failed":
            return _entry("setup_failed", error or "failed", f"package setup failed: {error}", details)
        return _entry("setup_completed", "completed",
                      f"package setup completed ({details.get('source', '?')})", details)
    return None


def _culled(event: KernelCulled, details: dict[str, Any]) -> dict[str, Any]:
    after = "; the session, its files and data stay, and its next run starts a new kernel"
    if event.reason == "idle":
        return _entry("kernel_culled", "idle",
                      f"the kernel was shut down after {_seconds(details.get('idle_s'))} without a run "
                      f"(ERA_KERNEL_IDLE_TIMEOUT is {_seconds(details.get('idle_timeout_s'))}){after}", details)
    if event.reason == "kernel limit":
        return _entry("kernel_evicted", "kernel limit",
                      f"the kernel was shut down as the least recently used {details.get('kernel_state', 'idle')} "
                      f"one, to make room for another (ERA_MAX_KERNELS is {details.get('max_kernels', '?')})"
                      f"{after}", details)
    reason = ("message too large" if details.get("cut") else
              f"exit status {details['exit_status']}" if "exit_status" in details else "died")
    return _entry("kernel_died", reason, _died(details, "between runs"), details)


def _died(details: dict[str, Any], when: str) -> str:
    after = "; the next run starts a new kernel"
    if details.get("out_of_memory"):
        return (f"the kernel ran out of memory {when} (its session's limit: ERA_KERNEL_MEMORY, or ERA_DOCKER_MEMORY "
                f"in Docker) and was killed{after}")
    if details.get("cut"):
        return f"the kernel's connection was cut {when}: {details['cut']}{after}"
    if "exit_status" in details:
        return f"the kernel died {when} with exit status {details['exit_status']}{after}"
    return f"the kernel died {when}{after}"


def _entry(kind: str, reason: str, message: str, details: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "reason": reason, "at": utc_now(), "message": message, **details}


class SessionLog:
    def __init__(self, store: MetadataStore) -> None:
        self.store = store
        self._writes: set[asyncio.Future] = set()

    def record(self, event: LifecycleEvent) -> None:
        """The engine's lifecycle watcher (sync, on the loop): the event is queued for the
        store (``add_session_event``), with ``last_exit`` when it ended the kernel."""
        entry = session_event(event)
        if entry is None:
            return
        changes = {"last_exit": entry} if entry["type"] in EXIT_TYPES else None
        written = asyncio.ensure_future(self.store.add_session_event(event.session_id, entry, changes))
        self._writes.add(written)
        written.add_done_callback(self._written)

    def note(self, session_id: str, entry: dict[str, Any]) -> None:
        """A session event that is no lifecycle event (an egress denial: ``egress/gate.py``)."""
        written = asyncio.ensure_future(self.store.add_session_event(session_id, {**entry, "at": utc_now()}))
        self._writes.add(written)
        written.add_done_callback(self._written)

    def _written(self, future: asyncio.Future) -> None:
        self._writes.discard(future)
        if not future.cancelled() and future.exception() is not None:
            # Most likely its session was deleted meanwhile (the culler raced a delete):
            # then there is nobody left to ask.
            log.info("a session event was not kept: %s", future.exception())

    async def read(self, session_id: str, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        return await self.store.list_session_events(session_id, after, limit)

    async def settle(self) -> None:
        """Every event recorded so far is in the store (shutdown, tests)."""
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)
