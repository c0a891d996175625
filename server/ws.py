"""WebSocket ``/api/sessions/{id}/ws``: runs, interrupts and ``input()`` over one socket.

Client -> server: ``{"type": "run", "code", "timeout"?, "env"?, "id"?}``,
``{"type": "interrupt"}``, ``{"type": "input_reply", "value": str}``.
Server -> client: the engine's events (``stdout``, ``stderr``, ``display``, ``error``,
``done``, ``input_request``, ``status``) with ``id`` = the run id; ``result`` (the full
run result, to the socket that asked for the run); and protocol errors in the API's
error shape ``{"type": "error", "id", "error", "status_code", "field"?}``.

One ``SessionHub`` per session holds the engine subscription and fans every event of
every run (REST and SSE runs too) out to all sockets of the session. A run belongs to the
server, not to the socket that asked for it: disconnecting does not stop it. ``input()``
asks every connected socket; the first ``input_reply`` answers it.
"""

from __future__ import annotations

import asyncio
import logging
import re
from functools import partial
from typing import Any, Callable

from era_kernel.errors import BadRequest, Busy, Conflict, EraError, TooLarge
from tornado.web import Finish, HTTPError
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from .apidoc import Op
from .auth import require_origin
from .errors import error_body
from .handlers.base import RouteHandler, dumps, parse_json, wait_ready
from .logs import log_run
from .services import Services

log = logging.getLogger("era.server.ws")

RUN_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}", re.ASCII)
MAX_UNFLUSHED_BYTES = 16 * 1024**2  # a client this far behind is closed (1008), not buffered for
MAX_RUNS_IN_FLIGHT = 100  # queued + running WebSocket runs per session
CLOSE_POLICY = 1008
CLOSE_SESSION_GONE = 4404


def check_upgrade(handler: RouteHandler, services: Services) -> None:
    """What every WebSocket route checks before the upgrade (in ``prepare``, where each
    refusal can still be a JSON error): the API key (as its route says), the method, the
    body size, the upgrade itself and the Origin."""
    request = handler.request
    handler.check_key()
    if request.method != "GET":
        raise HTTPError(405)
    declared = request.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > services.max_body:
        raise TooLarge(f"request body is {int(declared)} bytes; the limit is {services.max_body}")
    if request.headers.get("Upgrade", "").lower() != "websocket":
        raise BadRequest("this route takes a WebSocket upgrade ('Upgrade: websocket')")
    require_origin(request.headers.get("Origin"), request.headers.get("Host"), services.allowed_origins)


def client_key(handler: Any, services: Services) -> str:
    """Whom a socket counts against for ERA_MAX_SOCKETS_PER_CLIENT: the API key when the
    server has one (the check already passed, so it is that key), else the peer address
    (the TCP peer: headers such as X-Forwarded-For are the client's to forge)."""
    return "api-key" if services.api_key is not None else f"addr:{handler.request.remote_ip}"


class SocketSlot:
    """Both WebSocket routes: a slot under the socket caps (``Services.sockets``), taken
    in ``prepare`` and given back once, whichever way the socket ends: ``on_close`` after
    an upgrade (clean close, dropped connection, server close), ``on_finish`` when the
    upgrade never happened (refused later in the handshake; ``on_close`` may not come)."""

    services: Services
    _closed: bool
    _release_slot: Callable[[], None] | None = None

    def take_slot(self, session_id: str) -> None:
        if self._closed:  # the client left while prepare awaited: no upgrade, no slot
            raise Finish()
        self._release_slot = self.services.sockets.take(session_id, client_key(self, self.services))

    def release_slot(self) -> None:
        release, self._release_slot = self._release_slot, None
        if release is not None:
            release()

    def on_finish(self) -> None:
        if self.get_status() != 101:  # type: ignore[attr-defined]
            self.release_slot()


def send_bounded(handler: Any, data: str | bytes) -> None:
    """Write a frame unless the client is over MAX_UNFLUSHED_BYTES behind, in which case it
    is closed (1008) rather than buffered for. ``handler`` keeps ``_unflushed`` (bytes
    written, not yet flushed) and ``_closed``; both WebSocket routes send through this."""
    if handler._closed or handler.ws_connection is None:
        return
    if handler._unflushed > MAX_UNFLUSHED_BYTES:
        handler._closed = True
        handler.close(CLOSE_POLICY, "client is not reading fast enough")
        return
    try:
        future = handler.write_message(data, binary=isinstance(data, bytes))
    except WebSocketClosedError:
        handler._closed = True
        return
    handler._unflushed += len(data)
    future.add_done_callback(partial(_flushed, handler, len(data)))


def _flushed(handler: Any, size: int, future: asyncio.Future) -> None:
    handler._unflushed -= size
    if not future.cancelled():
        future.exception()  # retrieved: a closed socket is not an error here


class SessionHub:
    def __init__(self, services: Services, session_id: str) -> None:
        self.services = services
        self.session_id = session_id
        self.sockets: set[SessionSocket] = set()
        self.runs_in_flight: set[str] = set()
        self.pending_input: tuple[str, asyncio.Future] | None = None
        self._unsubscribe = services.engine.subscribe(session_id, self.on_event)

    @classmethod
    def for_session(cls, services: Services, session_id: str) -> "SessionHub":
        hub = services.hubs.get(session_id)
        if hub is None:
            hub = services.hubs[session_id] = cls(services, session_id)
        return hub

    def on_event(self, event: dict[str, Any]) -> None:
        """Engine subscriber (sync): one encoding, written to every socket."""
        message = dict(event)
        message["id"] = message.pop("run_id", None)
        text = dumps(message)
        for socket in list(self.sockets):
            socket.send_text(text)

    async def ask_input(self, run_id: str, prompt: str, password: bool) -> str:
        # The engine has already sent the input_request event to every socket.
        future = asyncio.get_running_loop().create_future()
        self.pending_input = (run_id, future)
        try:
            return await future
        finally:
            if self.pending_input is not None and self.pending_input[1] is future:
                self.pending_input = None

    def reply_input(self, value: str) -> bool:
        if self.pending_input is None or self.pending_input[1].done():
            return False
        self.pending_input[1].set_result(value)
        return True

    def cancel_input(self, run_id: str) -> None:
        if self.pending_input is not None and self.pending_input[0] == run_id:
            self.pending_input[1].cancel()
            self.pending_input = None

    def discard(self, socket: "SessionSocket | None" = None, run_id: str | None = None) -> None:
        self.sockets.discard(socket)
        self.runs_in_flight.discard(run_id)
        if not self.sockets and not self.runs_in_flight:
            self._unsubscribe()
            if self.services.hubs.get(self.session_id) is self:
                del self.services.hubs[self.session_id]

    def close_sockets(self, code: int, reason: str) -> None:
        for socket in list(self.sockets):
            socket.close(code, reason)


class SessionSocket(SocketSlot, RouteHandler, WebSocketHandler):
    SESSION_ROUTE = True
    QUERY_TOKEN = True  # browsers cannot set headers on a WebSocket
    API = {"get": Op("WebSocket: runs with streamed events, interrupt, input()", response="websocket",
                     errors=(400, 401, 403, 404, 429),
                     query={"token": "the API key, for clients that cannot send headers"},
                     description=__doc__ or "")}

    def initialize(self, services: Services, auth: bool) -> None:
        super().initialize(services, auth)
        self.session_id: str | None = None
        self.hub: SessionHub | None = None
        self.kernel_state = "none"
        self._unflushed = 0
        self._closed = False

    # ---- handshake: every refusal is a JSON error before the upgrade ----------------------
    async def prepare(self) -> None:
        sid = self.path_args[0]
        self.session_id = sid[:128]
        services = self.services
        check_upgrade(self, services)
        await wait_ready(services)
        doc = await services.engine.get(sid)
        self.kernel_state = (doc.get("kernel") or {}).get("state", "none")
        self.take_slot(sid)  # last: nothing after it can fail before the upgrade

    def check_origin(self, origin: str) -> bool:
        return True  # already checked in prepare, where a refusal can be a JSON 403

    def open(self, sid: str) -> None:
        self.set_nodelay(True)  # without it, back-to-back small frames wait ~40 ms (Nagle)
        self.hub = SessionHub.for_session(self.services, sid)
        self.hub.sockets.add(self)
        self.send_json({"type": "status", "id": None, "state": self.kernel_state, "session_id": sid})

    def on_close(self) -> None:
        self._closed = True
        self.release_slot()
        if self.hub is not None:
            self.hub.discard(socket=self)

    # ---- outbound -----------------------------------------------------------------------
    def send_json(self, message: dict[str, Any]) -> None:
        self.send_text(dumps(message))

    def send_text(self, text: str) -> None:
        send_bounded(self, text)

    def send_protocol_error(self, err: EraError, run_id: str | None) -> None:
        message = {"type": "error", "id": run_id, **error_body(err)}
        self.send_json(message)

    # ---- inbound ------------------------------------------------------------------------
    def on_message(self, message: str | bytes) -> None:
        try:
            if isinstance(message, bytes):
                raise BadRequest("binary messages are not accepted; send JSON text")
            msg = parse_json(message)
            if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
                raise BadRequest("a message must be a JSON object with a string 'type'", field="type")
            kind = msg["type"]
            if kind == "run":
                self._start_run(msg)
            elif kind == "interrupt":
                self.services.spawn(self._interrupt())
            elif kind == "input_reply":
                value = msg.get("value", "")
                if not isinstance(value, str):
                    raise BadRequest("field 'value' must be a string", field="value")
                if self.hub is None or not self.hub.reply_input(value):
                    raise Conflict("no input() is waiting for a reply")
            else:
                raise BadRequest(f"unknown message type {kind[:40]!r}; expected run, interrupt or input_reply",
                                 field="type")
        except EraError as err:
            self.send_protocol_error(err, msg_id(message))

    def _start_run(self, msg: dict[str, Any]) -> None:
        hub = self.hub
        assert hub is not None and self.session_id is not None
        run_id = msg.get("id")
        if run_id is None:
            from era_kernel.engine.results import new_run_id  # loaded with the engine

            run_id = new_run_id()
        elif not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id):
            raise BadRequest("field 'id' must be 1-128 characters of A-Z, a-z, 0-9, '_', '.', ':' or '-'",
                             field="id")
        if run_id in hub.runs_in_flight:
            raise Conflict(f"run {run_id} is already queued or running", field="id")
        if len(hub.runs_in_flight) >= MAX_RUNS_IN_FLIGHT:
            raise Busy(f"{MAX_RUNS_IN_FLIGHT} runs are already queued or running on this session; retry when one "
                       "finishes")
        body = {key: msg[key] for key in ("code", "timeout", "env") if key in msg}
        hub.runs_in_flight.add(run_id)
        self.services.spawn(self._run(hub, self.session_id, run_id, body))

    async def _run(self, hub: SessionHub, sid: str, run_id: str, body: dict[str, Any]) -> None:
        try:
            result = await self.services.engine.run(sid, body, on_input=partial(hub.ask_input, run_id),
                                                    run_id=run_id)
        except EraError as err:
            self.send_protocol_error(err, run_id)
        except Exception:
            log.exception("WebSocket run failed", extra={"event": "error", "session_id": sid})
            self.send_protocol_error(EraError("internal server error"), run_id)
        else:
            log_run(sid, result, "ws")
            self.send_json({"type": "result", "id": run_id, "result": result})
        finally:
            hub.cancel_input(run_id)
            hub.discard(run_id=run_id)

    async def _interrupt(self) -> None:
        try:
            await self.services.engine.interrupt(self.session_id)
        except EraError as err:
            self.send_protocol_error(err, None)


def msg_id(message: Any) -> str | None:
    """The run id a bad message named, when it can be read, to tag the error with."""
    if isinstance(message, str) and '"id"' in message:
        try:
            value = parse_json(message).get("id")
            return value if isinstance(value, str) and RUN_ID_RE.fullmatch(value) else None
        except (EraError, AttributeError):
            return None
    return None
