"""What handlers are given through ``initialize(services=...)``: settings, the engine once
it is ready, the WebSocket hubs, and the limits derived from the settings.

Sockets follow the engine's lifecycle events (``engine.watch``), not the requests that
cause them: a session deleted by a request, a bulk delete or the culler closes its
sockets the same way, and a Jupyter channel moves to the session's new kernel whoever
replaced, culled or killed the old one."""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections import Counter
from typing import Any, Callable

from .errors import TooManySockets, http_status

log = logging.getLogger("era.server")

# Bodies declared larger than the limit are still drained (up to this multiple of it) so
# that the client reads our 413 instead of a reset connection; past it we hang up.
DRAIN_FACTOR = 4


class Services:
    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.engine: Any = None
        self.state = "starting"  # starting | ready | failed | stopping
        self.ready = asyncio.Event()
        self.started = time.monotonic()
        self.max_body = int(settings["ERA_MAX_BODY"])
        self.drain_limit = self.max_body * DRAIN_FACTOR
        key = settings["ERA_API_KEY"] or ""
        self.api_key: bytes | None = key.encode() if key else None
        self.allowed_origins = frozenset(
            o.strip().rstrip("/") for o in (settings["ERA_ALLOWED_ORIGINS"] or "").split(",") if o.strip())
        self.hubs: dict[str, Any] = {}  # session id -> ws.SessionHub
        self.channels: dict[str, set] = {}  # session id -> jupyter.KernelChannels sockets
        self.sockets = SocketSlots(int(settings["ERA_MAX_SOCKETS_PER_SESSION"]),
                                   int(settings["ERA_MAX_SOCKETS_PER_CLIENT"]))
        self.tasks: set[asyncio.Task] = set()  # runs that outlive their request or socket
        self._unwatch: Callable[[], None] = lambda: None
        self.openapi: dict | None = None  # built on first request
        self.storage_listeners: Any = None  # storage_listeners.StorageListeners, with ERA_STORAGE_PORT
        self._unwatch_storage: Callable[[], None] = lambda: None
        self.version = "unknown"
        self.address: str | None = None  # where this server listens, for the replica registry (app._serve)
        self.keys: Any = None  # era_kernel.tenants.Keys, on the engine's store, once it is ready
        self.run_rate: Any = None  # era_kernel.tenants.RunRate: runs per minute per tenant

    def spawn(self, coro) -> asyncio.Task:
        """A background task that outlives the request or socket that started it."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        task.add_done_callback(_retrieve)
        return task

    def on_lifecycle(self, event: Any) -> None:
        """``engine.watch`` callback (sync, on the event loop): a deleted session's sockets
        close (4404); on any change of its kernel a gateway channel re-attaches to the
        session's current one (none, after a cull or a death, until the next start), and
        keeps why the old one went, to tell its client."""
        from era_kernel.engine.events import SessionDeleted, SetupFinished

        sid = event.session_id
        hub = self.hubs.get(sid)
        channels = list(self.channels.get(sid, ()))
        if isinstance(event, SessionDeleted):
            for socket in [*(hub.sockets if hub is not None else ()), *channels]:
                socket.session_gone()
        elif not isinstance(event, SetupFinished):  # KernelReplaced, KernelCulled, KernelDied, KernelStopped
            for channel in channels:
                channel.follow_kernel(event)

    async def start_engine(self) -> None:
        """Import the engine off the event loop (so /health keeps answering), then start it."""
        t0 = time.monotonic()
        sessions, self.version = await asyncio.to_thread(_import_engine)
        engine = sessions.SessionManager(self.settings)
        engine.replica.address = engine.replica.address or self.address
        await engine.start()
        self._unwatch = engine.watch(self.on_lifecycle)
        from era_kernel.tenants import Keys, RunRate

        self.keys, self.run_rate = Keys(engine.store, self.api_key), RunRate()
        if self.settings["ERA_STORAGE_PORT"]:
            from .storage_listeners import StorageListeners

            self.storage_listeners = StorageListeners(self, self.settings["ERA_STORAGE_PORT"])
            self._unwatch_storage = engine.watch(self.storage_listeners.on_lifecycle)
        self.engine = engine
        if self.state == "starting":
            self.state = "ready"
        self.ready.set()
        log.info("engine ready", extra={"event": "ready", "duration_ms": round((time.monotonic() - t0) * 1000, 1)})

    async def shutdown_engine(self) -> None:
        if self.engine is not None:
            self._unwatch()  # the sockets were closed already (app._shutdown)
            if self.storage_listeners is not None:
                self._unwatch_storage()
                self.storage_listeners.close_all()
            await self.engine.shutdown()


class SocketSlots:
    """Open WebSockets per session and per client, both WebSocket routes counted together.

    Each socket holds a send buffer of up to sockets.MAX_UNFLUSHED_BYTES and a file
    descriptor, so the caps bound what one session or one client can make the server
    hold. A socket takes its slot in ``prepare`` (a refusal is then a JSON 429 before
    the upgrade) and gives it back through the function ``take`` returns, however the
    socket ends; calling it again does nothing."""

    def __init__(self, per_session: int, per_client: int) -> None:
        self.per_session = per_session
        self.per_client = per_client
        self.sessions: Counter[str] = Counter()
        self.clients: Counter[str] = Counter()

    def take(self, session_id: str, client: str) -> Callable[[], None]:
        if self.sessions[session_id] >= self.per_session:
            raise TooManySockets(f"session {session_id} already has {self.per_session} WebSocket connections, the "
                                 "most allowed (ERA_MAX_SOCKETS_PER_SESSION); close one and retry")
        if self.clients[client] >= self.per_client:
            raise TooManySockets(f"this client already has {self.per_client} WebSocket connections, the most "
                                 "allowed (ERA_MAX_SOCKETS_PER_CLIENT); close one and retry")
        self.sessions[session_id] += 1
        self.clients[client] += 1
        held = [(self.sessions, session_id), (self.clients, client)]

        def release() -> None:
            while held:
                counts, key = held.pop()
                counts[key] -= 1
                if counts[key] <= 0:
                    del counts[key]  # no entry left behind per session or address ever seen

        return release


def _retrieve(task: asyncio.Task) -> None:
    """Whoever awaited the task reported its error; this only keeps asyncio from warning."""
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        if http_status(exc) >= 500:
            log.warning("background run failed: %s", type(exc).__name__, extra={"event": "error"})


def _import_engine():
    # models too: the first request that needs them should not pay for the import.
    import mimetypes
    from importlib.metadata import PackageNotFoundError, version

    mimetypes.init()  # reads the system's MIME tables once, here rather than on a download
    importlib.import_module("era_kernel.models")
    try:
        dist_version = version("era-kernel")
    except PackageNotFoundError:
        dist_version = "unknown"
    return importlib.import_module("era_kernel.sessions"), dist_version
