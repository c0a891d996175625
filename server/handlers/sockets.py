"""The base of both WebSocket routes (``/api/sessions/{id}/ws``, server/ws.py, and the
Jupyter ``/api/kernels/{id}/channels``, server/jupyter.py): what is checked before the
upgrade, the socket's slot under the caps, bounded sending, and closing.

A subclass's ``prepare`` reads::

    sid = await self.handshake()       # key, method, size, Upgrade, Origin; engine ready
    ...look the session up...          # its 404, still a JSON answer
    self.take_slot()                   # last before anything that starts work
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Callable

from era_kernel.errors import BadRequest
from tornado.web import Finish, HTTPError
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from ..auth import require_origin
from ..forwarding import forwarding_socket
from ..services import Services
from .base import RouteHandler, check_declared_size, wait_ready

MAX_UNFLUSHED_BYTES = 16 * 1024**2  # a client this far behind is closed (1008), not buffered for
CLOSE_POLICY = 1008
CLOSE_SESSION_GONE = 4404


def client_key(handler: RouteHandler, services: Services) -> str:
    """Whom a socket counts against for ERA_MAX_SOCKETS_PER_CLIENT: the API key when the
    server has one (the check already passed, so it is that key), else the peer address
    (the TCP peer: headers such as X-Forwarded-For are the client's to forge)."""
    if services.api_key is None and handler.tenant.key_id is None:
        return f"addr:{handler.request.remote_ip}"
    return handler.tenant.owner  # each tenant's sockets count apart


class BoundedSocket(RouteHandler, WebSocketHandler):
    """A WebSocket on one session. Every refusal comes in ``prepare``, before the upgrade,
    as a JSON error; the socket then holds a slot (``Services.sockets``) until it ends,
    and a client that stops reading is closed rather than buffered for."""

    SESSION_ROUTE = True  # the path's first argument is a session id (logged with the request)
    GONE_REASON = "session deleted"  # the close reason when the session is deleted

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        forwarding_socket(cls)  # a session another replica serves: a tunnel to it instead

    def initialize(self, services: Services, auth: bool) -> None:
        super().initialize(services, auth)
        self._handshake: str | None = None
        self.session_id: str | None = None
        self._closed = False  # the client left, or we closed: nothing more is sent
        self._unflushed = 0  # bytes written, not yet flushed to the client
        self._release_slot: Callable[[], None] | None = None

    # ---- before the upgrade ---------------------------------------------------------------
    async def handshake(self) -> str:
        """The checks every WebSocket route makes, then a wait while the engine starts;
        returns the session id of the path. Once per request (forwarding asks first)."""
        if self._handshake is not None:
            return self._handshake
        sid = self.path_args[0]
        self.session_id = sid[:128]
        request, services = self.request, self.services
        await self.check_key()
        if request.method != "GET":
            raise HTTPError(405)
        check_declared_size(self, services.max_body)
        if request.headers.get("Upgrade", "").lower() != "websocket":
            raise BadRequest("this route takes a WebSocket upgrade ('Upgrade: websocket')")
        require_origin(request.headers.get("Origin"), request.headers.get("Host"), services.allowed_origins)
        await wait_ready(services)
        await self.check_owner(sid)
        self._handshake = sid
        return sid

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        tunnel = self.__dict__.get("_tunnel")  # forwarded: the owner's choice
        return tunnel.subprotocol if tunnel is not None else super().select_subprotocol(subprotocols)

    def check_origin(self, origin: str) -> bool:
        return True  # already checked in handshake(), where a refusal can be a JSON 403

    def take_slot(self) -> None:
        """A slot under the socket caps (a JSON 429 when there is none), given back once
        whichever way the socket ends: ``on_close`` after an upgrade (clean close, dropped
        connection, server close), ``on_finish`` when the upgrade never happened (refused
        later in the handshake; ``on_close`` may not come)."""
        if self._closed:  # the client left while prepare awaited: no upgrade, no slot
            raise Finish()
        self._release_slot = self.services.sockets.take(self.session_id or "", client_key(self, self.services))

    def release_slot(self) -> None:
        release, self._release_slot = self._release_slot, None
        if release is not None:
            release()

    def on_finish(self) -> None:
        if self.get_status() != 101:
            self.release_slot()

    # ---- after it ---------------------------------------------------------------------------
    def send_frame(self, data: str | bytes) -> None:
        """Write a frame (bytes: binary) unless the client is over MAX_UNFLUSHED_BYTES
        behind, in which case it is closed (1008) rather than buffered for."""
        if self._closed or self.ws_connection is None:
            return
        if self._unflushed > MAX_UNFLUSHED_BYTES:
            self.close(CLOSE_POLICY, "client is not reading fast enough")
            return
        try:
            future = self.write_message(data, binary=isinstance(data, bytes))
        except WebSocketClosedError:
            self._closed = True
            return
        self._unflushed += len(data)
        future.add_done_callback(partial(self._flushed, len(data)))

    def _flushed(self, size: int, future: asyncio.Future) -> None:
        self._unflushed -= size
        if not future.cancelled():
            future.exception()  # retrieved: a closed socket is not an error here

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """Close from our side (a deleted session, a slow client, shutdown); nothing is
        sent after it. ``on_close`` follows once the connection is gone."""
        self._closed = True
        super().close(code, reason)

    def session_gone(self) -> None:
        """The session was deleted (engine lifecycle, services.py): the socket has nothing left."""
        self.close(CLOSE_SESSION_GONE, self.GONE_REASON)

    def on_close(self) -> None:
        """Subclasses extend it (``super().on_close()`` first) to leave what they joined."""
        self._closed = True
        self.release_slot()
