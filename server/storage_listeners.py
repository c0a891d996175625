"""Where code in a sandbox without network reaches the storage proxy: a listener the
server opens inside each session's network namespace (``engine.ports.listen``), at
``127.0.0.1:ERA_STORAGE_PORT``, serving the storage routes only.

The connection itself says who calls: only that session's sandbox can reach its
listener, so requests act for the session's owner without a key or a token (ERA's own
SDK, which sends neither, works unchanged; its default ``http://localhost`` is port 80,
ours too). A new kernel is a new sandbox, so the listener follows the session's kernel
lifecycle (``on_lifecycle``, from ``engine.watch``): opened on ``KernelReplaced``, closed
when the kernel stops, dies, is culled or the session is deleted. A sandbox that shares
the server's network (internet with host networking) gets none: it reaches the server
at ``ERA_STORAGE_URL`` when that is set.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.web import Application

from .logs import log_request
from .routes import ROUTES, UNKNOWN, route_pattern

log = logging.getLogger("era.server")


def storage_routes() -> list[Any]:
    from .handlers.storage import StorageHandler

    return [route for route in ROUTES if issubclass(route.handler, StorageHandler)]


class StorageListeners:
    def __init__(self, services: Any, port: int) -> None:
        self.services = services
        self.port = port
        self.servers: dict[str, HTTPServer] = {}  # session id -> the server on its listener
        self._opening: dict[str, asyncio.Task] = {}

    def app(self, session_id: str) -> Application:
        args = {"services": self.services, "auth": False, "session_id": session_id}
        routes = [(route_pattern(r.template), r.handler, args) for r in storage_routes()]
        return Application(routes, default_handler_class=UNKNOWN.handler,
                           default_handler_args={"services": self.services, "auth": False},
                           log_function=log_request, compress_response=False, serve_traceback=False)

    def on_lifecycle(self, event: Any) -> None:
        """``engine.watch`` callback (sync, on the event loop)."""
        from era_kernel.engine.events import KernelReplaced, SetupFinished

        if isinstance(event, SetupFinished):
            return
        sid = event.session_id
        self.close(sid)
        if isinstance(event, KernelReplaced):
            task = asyncio.ensure_future(self._open(sid))
            self._opening[sid] = task
            task.add_done_callback(lambda t, sid=sid: self._opening.pop(sid, None) if self._opening.get(sid) is t
                                   else None)

    async def _open(self, sid: str) -> None:
        engine = self.services.engine
        try:
            if await engine.jupyter_kernel(sid, start=False) is None:
                return  # gone again already: never start a kernel for this
            sock = await engine.ports.listen(sid, self.port)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # shared network (Unprocessable), a kernel gone meanwhile: no listener
            log.info("session %s: no storage listener in its sandbox: %s", sid, exc,
                     extra={"event": "storage_listener", "session_id": sid})
            return
        server = HTTPServer(self.app(sid), max_body_size=self.services.drain_limit, idle_connection_timeout=60)
        server.add_sockets([sock])
        self.servers[sid] = server

    def close(self, sid: str) -> None:
        task = self._opening.pop(sid, None)
        if task is not None:
            task.cancel()
        server = self.servers.pop(sid, None)
        if server is not None:
            server.stop()  # closes the listening socket; answers under way finish

    def close_all(self) -> None:
        for sid in list({*self.servers, *self._opening}):
            self.close(sid)
