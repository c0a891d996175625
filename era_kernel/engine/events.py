"""What the engine tells its listeners: each run's events, per session, and the sessions'
and kernels' lifecycle, engine-wide.

Two streams, both synchronous callbacks on the event loop (a callback must not block):
- ``subscribe(session_id, cb)``: the session's run events as dicts, exactly what an SSE
  or WebSocket client receives (``{"type": "stdout", ...}``, docs/engine-api.md);
- ``watch(cb)``: typed lifecycle events below, whoever caused them (a request, the
  culler, admission under the kernel limit, a kernel dying). The server closes a deleted
  session's sockets and moves a gateway channel to a replaced kernel from here, so no
  request handler has to remember to.

Kernel lifecycle events are also sent to the session's subscribers in their dict form
(a ``status`` event), which is what ERA clients already read. Each event may carry
``details`` (exit status, seconds idle, ...): the session log (session_log.py) keeps
them as the session's events, so a client can ask later why its kernel went away.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Union

if TYPE_CHECKING:
    from .journal import RunJournal

log = logging.getLogger("era.events")

RunEvent = dict[str, Any]


@dataclass(frozen=True)
class SessionDeleted:
    """The session and its files are gone (``reason``: ``request`` or ``max_age``)."""

    session_id: str
    reason: str = "request"


@dataclass(frozen=True)
class KernelCulled:
    """The session's kernel was shut down; the session stays and its next run starts a
    kernel (``reason``: ``idle``, ``kernel limit`` (evicted, least recently used, to
    admit another) or ``dead`` (it had died between runs))."""

    session_id: str
    reason: str
    details: dict[str, Any] = field(default_factory=dict, compare=False)  # idle_s, idle_timeout_s, max_kernels


@dataclass(frozen=True)
class KernelReplaced:
    """The session has a new live kernel (first start, restart, or after a death or a
    cull): whoever holds the old one should follow."""

    session_id: str
    details: dict[str, Any] = field(default_factory=dict, compare=False)  # language, provisioner, pooled, start_ms


@dataclass(frozen=True)
class KernelDied:
    """The session's kernel stopped on its own: ``reason`` says how (out of memory, exit
    status, a cut connection, an interrupt that did not take)."""

    session_id: str
    reason: str
    details: dict[str, Any] = field(default_factory=dict, compare=False)  # exit_status, out_of_memory, cut, timeout_s


@dataclass(frozen=True)
class KernelStopped:
    """The engine stopped the session's kernel for a reason of its own: ``restart`` (asked
    for), ``settings changed`` (a patch of env or network access) or ``server shutdown``.
    Subscribers are not sent a status for it (a restart already says ``restarting``)."""

    session_id: str
    reason: str
    details: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class SetupFinished:
    """The session's package setup ended: ``status`` is ``completed`` or ``failed``
    (``details``: error, duration_ms, source, env). Subscribers saw its log already."""

    session_id: str
    status: str
    details: dict[str, Any] = field(default_factory=dict, compare=False)


LifecycleEvent = Union[SessionDeleted, KernelCulled, KernelReplaced, KernelDied, KernelStopped, SetupFinished]
KERNEL_GONE = (KernelCulled, KernelDied, KernelStopped)  # the session's kernel went away (session_log.py)


def as_status(event: LifecycleEvent) -> RunEvent | None:
    """The dict a session's subscribers receive for it (None: they are sent nothing)."""
    if isinstance(event, (KernelReplaced, KernelStopped, SetupFinished)):
        return None  # subscribers see the kernel's own status events, and the setup's log
    if isinstance(event, SessionDeleted):
        return {"type": "status", "state": "deleted", "reason": event.reason}
    if isinstance(event, KernelCulled):
        return {"type": "status", "state": "culled", "reason": event.reason}
    if isinstance(event, KernelDied):
        return {"type": "status", "state": "dead", "reason": event.reason}
    raise TypeError(f"not a lifecycle event: {event!r}")


class EngineEvents:
    def __init__(self, journal: "RunJournal | None" = None) -> None:
        self.journal = journal  # every emitted event is numbered and kept (journal.py)
        self._subscribers: dict[str, set[Callable[[RunEvent], None]]] = {}
        self._watchers: list[Callable[[LifecycleEvent], None]] = []

    # ---- run events, per session ----------------------------------------------------------
    def subscribe(self, session_id: str, callback: Callable[[RunEvent], None]) -> Callable[[], None]:
        """``callback(event)`` for every event of the session's runs, whoever asked for the
        run. Returns the function that unsubscribes."""
        subs = self._subscribers.setdefault(session_id, set())
        subs.add(callback)

        def unsubscribe() -> None:
            subs.discard(callback)
            if not subs and self._subscribers.get(session_id) is subs:
                del self._subscribers[session_id]

        return unsubscribe

    def emit(self, session_id: str, event: RunEvent, on_event: Callable[[RunEvent], None] | None = None) -> None:
        """Number the event in the session's journal, then send it to the run's own caller
        (``on_event``) and to every subscriber."""
        if self.journal is not None:
            event = self.journal.record(session_id, event)
        if on_event is not None:
            on_event(event)
        subs = self._subscribers.get(session_id)
        if subs:
            for callback in list(subs):
                try:
                    callback(event)
                except Exception:
                    log.exception("event subscriber failed")

    def flush(self, session_id: str) -> None:
        """The session's journal events so far go to the store before what is written next."""
        if self.journal is not None:
            self.journal.flush(session_id)

    # ---- lifecycle, engine-wide ------------------------------------------------------------
    def watch(self, callback: Callable[[LifecycleEvent], None]) -> Callable[[], None]:
        """``callback(event)`` for every lifecycle event of every session."""
        self._watchers.append(callback)
        return lambda: self._watchers.remove(callback) if callback in self._watchers else None

    def publish(self, event: LifecycleEvent) -> None:
        """Tell the watchers, then the session's subscribers (as a status event)."""
        for callback in list(self._watchers):
            try:
                callback(event)
            except Exception:
                log.exception("lifecycle watcher failed")
        status = as_status(event)
        if status is not None:
            self.emit(event.session_id, status)
