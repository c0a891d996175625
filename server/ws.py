"""WebSocket ``/api/sessions/{id}/ws``: runs, interrupts and ``input()`` over one socket.

Client -> server: ``{"type": "run", "code", "timeout"?, "env"?, "id"?}``, ``{"type":
"command", "cmd", ...}`` (a command beside the kernel: ``POST .../commands``'s body; its
output comes to this socket only, then ``command_result``),
``{"type": "interrupt"}``, ``{"type": "input_reply", "value": str}``, and
``{"type": "subscribe", "run_id", "after"?}``: the run's journal events with ``seq`` after
``after`` (default 0) are replayed, then its live ones follow, none twice (a client that
lost its socket reconnects with ``?run_id=&after=`` on the URL, which replays before any
live event, so in order; a subscribe message sent later doubles nothing, but the run's
events that reached the socket live before it come before the replayed ones).
Server -> client: the engine's events (``stdout``, ``stderr``, ``display``, ``error``,
``done``, ``input_request``, ``status``) with ``seq`` (their place in the session's
journal), ``run_id`` (the run's record: ``GET .../runs/{run_id}``) and ``id``: the
client's own id for a run a socket started with one, while it runs, else the run id;
``result`` (the full run result, to the socket that asked for the run); and protocol
errors in the API's error shape ``{"type": "error", "id", "error", "status_code", "field"?}``.
The first message is the kernel's ``status`` with the session's ``last_exit`` (why its
last kernel went away, or null), and a kernel culled or dying later is a ``status`` with
``state`` culled or dead and its ``reason``; ``GET .../events`` has the whole story.
A client's ``id`` is a correlation id, not the run's record id: it may be used again
once its run has ended.

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
from .handlers.sockets import MAX_UNFLUSHED_BYTES, BoundedSocket
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
        self.runs_in_flight: set[str] = set()  # client ids of WebSocket runs queued or running
        self.client_ids: dict[str, str] = {}  # run id -> the id its client gave it, while it runs
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
        message = as_message(event, self.client_ids)
        text = dumps(message)
        run_id = message["run_id"]
        for socket in list(self.sockets):
            socket.deliver(run_id, message, text)

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


def as_message(event: dict[str, Any], client_ids: dict[str, str]) -> dict[str, Any]:
    """An engine event as the socket frames it: ``id`` is the client's id for the run
    (the run id when it gave none), ``run_id`` the run's record id."""
    message = dict(event)
    run_id = message.setdefault("run_id", None)
    message["id"] = client_ids.get(run_id, run_id) if run_id is not None else None
    return message


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
        self.last_exit: dict[str, Any] | None = None
        self.replaying: dict[str, list[dict[str, Any]]] = {}  # run id -> live events held during its replay
        # run id -> the first seq this socket got live: a replay stops short of it, so a
        # subscribe sent after some of the run came live doubles nothing.
        self.first_live: dict[str, int] = {}
        self.subscription: tuple[str, int] | None = None

    async def prepare(self) -> None:
        sid = await self.handshake()
        self.subscription = self._query_subscription()
        if self.subscription is not None:
            await self.services.engine.get_run(sid, self.subscription[0])  # an unknown run: 404, no upgrade
        doc = await self.services.engine.get(sid)
        self.kernel_state = (doc.get("kernel") or {}).get("state", "none")
        self.last_exit = (doc.get("kernel") or {}).get("last_exit")
        self.take_slot()  # last: nothing after it can fail before the upgrade

    def open(self, sid: str) -> None:
        self.set_nodelay(True)  # without it, back-to-back small frames wait ~40 ms (Nagle)
        self.hub = SessionHub.for_session(self.services, sid)
        if self.subscription is not None:  # replay first: none of the run's live events come before it
            self._subscribe({"run_id": self.subscription[0], "after": self.subscription[1]})
        self.hub.sockets.add(self)
        self.send_json({"type": "status", "id": None, "state": self.kernel_state, "session_id": sid,
                        "last_exit": self.last_exit})

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
            elif kind == "subscribe":
                self._subscribe(msg)
            elif kind == "command":
                self._start_command(msg)
            elif kind == "interrupt":
                self.services.spawn(self._interrupt())
            elif kind == "input_reply":
                value = msg.get("value", "")
                if not isinstance(value, str):
                    raise BadRequest("field 'value' must be a string", field="value")
                if self.hub is None or not self.hub.reply_input(value):
                    raise Conflict("no input() is waiting for a reply")
            else:
                raise BadRequest(f"unknown message type {kind[:40]!r}; expected run, command, subscribe, interrupt or "
                                 "input_reply", field="type")
        except EraError as err:
            self.send_protocol_error(err, msg_id(message))

    def _start_run(self, msg: dict[str, Any]) -> None:
        hub = self.hub
        assert hub is not None and self.session_id is not None
        from era_kernel.engine.results import new_run_id  # loaded with the engine

        run_id = new_run_id()
        client_id = msg.get("id", run_id)
        if not isinstance(client_id, str) or not RUN_ID_RE.fullmatch(client_id):
            raise BadRequest("field 'id' must be 1-128 characters of A-Z, a-z, 0-9, '_', '.', ':' or '-'",
                             field="id")
        if client_id in hub.runs_in_flight:
            raise Conflict(f"run {client_id} is already queued or running", field="id")
        if len(hub.runs_in_flight) >= MAX_RUNS_IN_FLIGHT:
            raise Busy(f"{MAX_RUNS_IN_FLIGHT} runs are already queued or running on this session; retry when one "
                       "finishes")
        body = {key: msg[key] for key in ("code", "timeout", "env") if key in msg}
        if "background" in msg:
            raise BadRequest("a WebSocket run streams on its socket; send 'background' runs to POST .../run",
                             field="background")
        self.services.run_rate.take(self.tenant)  # runs_per_minute: a 429 error frame for this id
        hub.runs_in_flight.add(client_id)
        hub.client_ids[run_id] = client_id
        self.services.spawn(self._run(hub, self.session_id, run_id, client_id, body))

    async def _run(self, hub: SessionHub, sid: str, run_id: str, client_id: str, body: dict[str, Any]) -> None:
        try:
            result = await self.services.engine.run(sid, body, on_input=partial(hub.ask_input, run_id),
                                                    run_id=run_id, fresh_id=True, source="ws")
        except EraError as err:
            self.send_protocol_error(err, client_id)
        except Exception:
            log.exception("WebSocket run failed", extra={"event": "error", "session_id": sid})
            self.send_protocol_error(EraError("internal server error"), client_id)
        else:
            log_run(sid, result, "ws")
            self.send_json({"type": "result", "id": client_id, "run_id": run_id, "result": result})
        finally:
            hub.cancel_input(run_id)
            hub.client_ids.pop(run_id, None)
            hub.discard(run_id=client_id)

    def _start_command(self, msg: dict[str, Any]) -> None:
        """``{"type": "command", "id"?, cmd, args?, shell?, cwd?, env?, timeout?, stdin?}``: a
        foreground command (engine ``commands.run``) whose ``stdout``/``stderr`` come to this
        socket only, tagged with ``id`` and ``command: true``, then ``command_result``."""
        client_id = msg.get("id")
        if client_id is not None and (not isinstance(client_id, str) or not RUN_ID_RE.fullmatch(client_id)):
            raise BadRequest("field 'id' must be 1-128 characters of A-Z, a-z, 0-9, '_', '.', ':' or '-'", field="id")
        if msg.get("background"):
            raise BadRequest("start background processes with POST .../commands; follow them with "
                             ".../processes/{pid}/stream", field="background")
        body = {key: value for key, value in msg.items() if key not in ("type", "id")}
        self.services.spawn(self._command(client_id, body))

    async def _command(self, client_id: str | None, body: dict[str, Any]) -> None:
        def forward(event: dict[str, Any]) -> None:
            self.send_json({**event, "id": client_id, "command": True})

        try:
            result = await self.services.engine.commands.run(self.session_id, body, on_output=forward)
        except EraError as err:
            self.send_protocol_error(err, client_id)
        except Exception:
            log.exception("WebSocket command failed", extra={"event": "error", "session_id": self.session_id})
            self.send_protocol_error(EraError("internal server error"), client_id)
        else:
            self.send_json({"type": "command_result", "id": client_id, "result": result})

    def deliver(self, run_id: str | None, message: dict[str, Any], text: str) -> None:
        """A live event (from the hub): held while its run is being replayed here."""
        replaying = self.replaying.get(run_id) if run_id is not None else None
        if replaying is not None:
            replaying.append(message)  # sent after the replay, unless it was in it
            return
        seq = message.get("seq")
        if run_id is not None and seq is not None:
            self.first_live.setdefault(run_id, seq)
        self.send_text(text)

    def _query_subscription(self) -> tuple[str, int] | None:
        """``?run_id=&after=`` on the URL: the in-order way to reconnect to a run."""
        run_id = self.get_query_argument("run_id", None)
        if run_id is None:
            return None
        after = self.get_query_argument("after", "0")
        if not after.isdigit():
            raise BadRequest("query parameter 'after' must be a non-negative integer (the last seq seen)",
                             field="after")
        return run_id, int(after)

    def _subscribe(self, msg: dict[str, Any]) -> None:
        run_id, after = msg.get("run_id"), msg.get("after", 0)
        if not isinstance(run_id, str) or not run_id:
            raise BadRequest("field 'run_id' must name a run of this session", field="run_id")
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise BadRequest("field 'after' must be a non-negative integer (the last seq seen)", field="after")
        if run_id in self.replaying:
            raise Conflict(f"a replay of run {run_id[:128]} is already in progress on this socket", field="run_id")
        self.replaying[run_id] = []  # from now on live events of the run wait for the replay
        self.services.spawn(self._replay(run_id, after))

    async def _replay(self, run_id: str, after: int) -> None:
        """The journal from ``after``, then what came live meanwhile, each event once."""
        engine = self.services.engine
        sent_live = self.first_live.get(run_id)  # from it on, this socket has had them live
        replayed = after  # the last seq this replay sent: held live events after it go out
        try:
            await engine.get_run(self.session_id, run_id)
            while sent_live is None or after + 1 < sent_live:
                events = await engine.run_events(self.session_id, run_id, after, limit=1000)
                for event in events:
                    if sent_live is None or event["seq"] < sent_live:
                        self.send_json(as_message(event, self.hub.client_ids if self.hub else {}))
                        replayed = event["seq"]
                if events:
                    after = events[-1]["seq"]
                if len(events) < 1000:
                    break
                while self._unflushed > MAX_UNFLUSHED_BYTES // 2 and not self._closed:
                    await asyncio.sleep(0.01)  # a long replay goes at the client's pace
        except EraError as err:
            self.send_protocol_error(err, run_id)
        finally:
            # Not ``after``: the journal read may reach past events held here (journaled and
            # delivered while it ran) that it did not send, being at or past ``sent_live``.
            for message in self.replaying.pop(run_id, []):
                if message.get("seq") is None or message["seq"] > replayed:
                    self.send_json(message)

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
