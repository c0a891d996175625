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
from typing import Any

from era_kernel.errors import BadRequest, Busy, Conflict, EraError

from .apidoc import Op
from .errors import error_body
from .handlers.base import dumps, parse_json
from .handlers.sockets import BoundedSocket
from .logs import log_run
from .services import Services

log = logging.getLogger("era.server.ws")

RUN_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}", re.ASCII)
MAX_RUNS_IN_FLIGHT = 100  # queued + running WebSocket runs per session


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


class SessionSocket(BoundedSocket):
    QUERY_TOKEN = True  # browsers cannot set headers on a WebSocket
    API = {"get": Op("WebSocket: runs with streamed events, interrupt, input()", response="websocket",
                     errors=(400, 401, 403, 404, 429),
                     query={"token": "the API key, for clients that cannot send headers"},
                     description=__doc__ or "")}

    def initialize(self, services: Services, auth: bool) -> None:
        super().initialize(services, auth)
        self.hub: SessionHub | None = None
        self.kernel_state = "none"

    async def prepare(self) -> None:
        sid = await self.handshake()
        doc = await self.services.engine.get(sid)
        self.kernel_state = (doc.get("kernel") or {}).get("state", "none")
        self.take_slot()  # last: nothing after it can fail before the upgrade

    def open(self, sid: str) -> None:
        self.set_nodelay(True)  # without it, back-to-back small frames wait ~40 ms (Nagle)
        self.hub = SessionHub.for_session(self.services, sid)
        self.hub.sockets.add(self)
        self.send_json({"type": "status", "id": None, "state": self.kernel_state, "session_id": sid})

    def on_close(self) -> None:
        super().on_close()
        if self.hub is not None:
            self.hub.discard(socket=self)

    # ---- outbound -----------------------------------------------------------------------
    def send_json(self, message: dict[str, Any]) -> None:
        self.send_frame(dumps(message))

    def send_text(self, text: str) -> None:
        self.send_frame(text)

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
