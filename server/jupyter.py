"""Jupyter kernel gateway routes: JupyterLab / jupyter_server (``--gateway-url``) use ERA.

``/api/kernelspecs`` lists our kernelspecs (Docker ones only when an engine and the
image are there); ``/api/kernels`` creates, lists, gets, interrupts, restarts and deletes
kernels; ``/api/kernels/{id}/channels`` is the Jupyter messaging WebSocket (the "legacy"
JSON format jupyter_server's GatewayClient speaks: one message per frame with a
``channel`` field; messages with buffers as binary frames).

A gateway kernel is an ERA session underneath (``metadata.jupyter_kernel: true``, the
session id is the kernel id): it gets the sandbox, the kernel limit (429), the warm pool,
the workspace, culling and stats, and ``/api/sessions/{id}/run`` works on it alongside.
The channels socket is a raw relay: the client's messages go to the kernel as they are
(re-signed by our kernel client), every IOPub message comes back to every socket, and
shell/stdin/control replies go to the socket that sent the request. While no socket is
connected, what the last one would have received is kept for the next one with the same
``session_id`` (server/gateway_replay.py), as jupyter_server does for its own kernels.

A kernel that went away under a client (culled idle, evicted, died, stopped) is replaced
by the client's next message; its model says why (``last_exit``), and the cell that next
runs shows it in its stderr, so a client learns why its variables are gone. A message
that cannot get a kernel (the kernel limit) is answered with an error reply saying so,
not left waiting.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import struct
import time
import uuid
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Any

from era_kernel.errors import BadRequest, EraError, NotFound
from era_kernel.languages import GVISOR_KERNELSPECS, KERNEL_KINDS
from tornado.web import Finish

from .apidoc import Op
from .tenancy import new_session
from .gateway_replay import ReplayBuffer, replay_for
from .handlers.base import BaseHandler, dumps, json_default, parse_json
from .handlers.sockets import BoundedSocket
from .services import Services

log = logging.getLogger("era.server.jupyter")

KERNEL_ENV_RE = re.compile(r"KERNEL_[A-Za-z0-9_]{1,120}", re.ASCII)  # what GatewayClient sends (plus allowed_envs)
SPEC_CACHE_SECONDS = 30.0
CLIENT_CHANNELS = ("shell", "control", "stdin")
MAX_TRACKED_REQUESTS = 4096  # msg ids per socket whose replies it is waiting for
# A replay is sent no faster than the client reads: past this many unflushed bytes it waits
# (polling, a few ms) rather than tripping the slow-client close of send_frame at 16 MiB.
REPLAY_WINDOW = 1024**2
REPLAY_POLL_SECONDS = 0.005
REPLAY_BATCH = 256  # frames sent between yields to the loop: 10,000 small ones must not hold it
TAGS = ("kernels",)


# ---- kernelspecs ---------------------------------------------------------------------------
def _docker_languages() -> set[str]:
    """Languages whose Docker image is built and current (a few Docker API calls; in a thread)."""
    try:
        from era_kernel.images.build import current_image, docker_client

        client = docker_client(timeout=5)
        client.ping()
    except Exception:
        return set()
    ready = set()
    for language in {lang for lang, prov in KERNEL_KINDS.values() if prov == "docker"}:
        try:
            if current_image(language, client=client):
                ready.add(language)
        except Exception:
            pass
    return ready


_docker_cache: dict[str, Any] = {"at": -1e9, "languages": set(), "task": None}


async def docker_languages() -> set[str]:
    """``_docker_languages`` cached for SPEC_CACHE_SECONDS; one check at a time, off the loop."""
    if time.monotonic() - _docker_cache["at"] < SPEC_CACHE_SECONDS:
        return _docker_cache["languages"]
    task = _docker_cache["task"]
    if task is None or task.done():
        task = _docker_cache["task"] = asyncio.ensure_future(asyncio.to_thread(_docker_languages))
    languages = await asyncio.shield(task)
    _docker_cache.update(at=time.monotonic(), languages=languages)
    return languages


async def usable_specs(engine: Any) -> dict[str, dict[str, Any]]:
    """name -> ``{name, spec, resources}`` for the kernelspecs this server can start."""
    docker = await docker_languages()
    shipped = await engine.kernelspecs()
    specs = {}
    kinds = {**KERNEL_KINDS, **{name: (language, "docker") for name, language in GVISOR_KERNELSPECS.items()}}
    for name, (language, provisioner) in sorted(kinds.items()):
        if name not in shipped or (provisioner == "docker" and language not in docker):
            continue
        specs[name] = {"name": name, "spec": shipped[name], "resources": {}}
    return specs


def default_spec(settings: Any, specs: dict[str, Any]) -> str | None:
    preferred = "era-python" if settings["ERA_PROVISIONER"] == "docker" else "era-python-local"
    if preferred in specs:
        return preferred
    return "era-python-local" if "era-python-local" in specs else next(iter(specs), None)


# ---- kernel models ---------------------------------------------------------------------------
def _jupyter_time(epoch: float | None, fallback: str | None) -> str:
    """``%Y-%m-%dT%H:%M:%S.%fZ``: GatewayClient parses exactly that (microseconds required)."""
    if epoch is None and fallback:
        try:
            epoch = datetime.fromisoformat(fallback.replace("Z", "+00:00")).timestamp()
        except ValueError:
            epoch = None
    moment = datetime.fromtimestamp(epoch if epoch is not None else time.time(), timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def is_gateway_kernel(doc: dict[str, Any]) -> bool:
    return isinstance(doc.get("metadata"), dict) and doc["metadata"].get("jupyter_kernel") is True


KERNEL_NOT_FOUND = "kernel {id} not found"


async def kernel_doc(engine: Any, kernel_id: str) -> dict[str, Any]:
    """The session behind a gateway kernel; 404 for unknown ids and for ordinary sessions."""
    try:
        doc = await engine.get(kernel_id)
    except NotFound:
        doc = None
    if doc is None or not is_gateway_kernel(doc):
        raise NotFound(KERNEL_NOT_FOUND.format(id=kernel_id[:128]))
    return doc


def kernel_model(services: Services, doc: dict[str, Any]) -> dict[str, Any]:
    sid = doc["id"]
    state = (doc.get("kernel") or {}).get("state", "none")
    kinds = {v: k for k, v in KERNEL_KINDS.items()}
    name = kinds.get((doc["language"], doc.get("provisioner")), doc["metadata"].get("kernelspec", ""))
    model = {
        "id": sid,
        "name": doc["metadata"].get("kernelspec", name) if doc.get("isolation") == "gvisor" else name,
        "last_activity": _jupyter_time(services.engine.jupyter_activity(sid), doc.get("last_run_at")
                                       or doc.get("created_at")),
        "execution_state": {"none": "idle"}.get(state, state),
        "connections": len(services.channels.get(sid, ())),
    }
    last_exit = (doc.get("kernel") or {}).get("last_exit")
    if last_exit is not None:  # ERA's own key, only when there is something to say: Jupyter's model has five
        model["last_exit"] = last_exit  # why the last kernel went away; the next message starts a new one
    return model


def kernel_env(env: Any) -> dict[str, str]:
    """Only the KERNEL_* variables GatewayClient documents reach the kernel; others are dropped."""
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise BadRequest("field 'env' must be an object of strings", field="env")
    return {k: v for k, v in env.items() if isinstance(k, str) and KERNEL_ENV_RE.fullmatch(k) and isinstance(v, str)}


class KernelSpecsHandler(BaseHandler):
    API = {"get": Op("Jupyter: the kernelspecs this server can start", response="KernelSpecList", errors=(),
                     tags=TAGS, description="Docker kernelspecs only when a Docker engine and the image are there.")}

    async def get(self) -> None:
        specs = await usable_specs(self.engine)
        self.send_json({"default": default_spec(self.services.settings, specs), "kernelspecs": specs})


class KernelSpecHandler(BaseHandler):
    API = {"get": Op("Jupyter: one kernelspec", response="KernelSpecEntry", errors=(404,), tags=TAGS)}

    async def get(self, name: str) -> None:
        specs = await usable_specs(self.engine)
        if name not in specs:
            raise NotFound(f"kernelspec {name[:128]} not found (available: {', '.join(specs)})")
        self.send_json(specs[name])


class KernelsHandler(BaseHandler):
    API = {
        "get": Op("Jupyter: the running gateway kernels", response="KernelList", errors=(), tags=TAGS),
        "post": Op("Jupyter: start a kernel (an ERA session underneath)", body="StartKernel",
                   response="KernelModel", status=201, errors=(400, 404, 429, 503), tags=TAGS,
                   description="`name` is a kernelspec of `/api/kernelspecs` (default: the listing's "
                               "default); of `env`, only `KERNEL_*` variables reach the kernel. "
                               "Answers once the kernel is up; the kernel id is the session id."),
    }

    async def get(self) -> None:
        # Every page: Jupyter's list has no paging, and a kernel model is small.
        models, cursor = [], None
        while True:
            page = await self.engine.list(cursor=cursor, owner=self.owner_filter)
            models += [kernel_model(self.services, d) for d in page if is_gateway_kernel(d)]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        self.send_json(models)

    async def post(self) -> None:
        body = self.json_body() or {}
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        if body.get("name") is not None and not isinstance(body["name"], str):
            raise BadRequest("field 'name' must be a kernelspec name (a string)", field="name")
        specs = await usable_specs(self.engine)
        name = body.get("name") or default_spec(self.services.settings, specs)
        if name not in specs:
            raise NotFound(f"kernelspec {str(name)[:128]} not found (available: {', '.join(specs)})")
        if name in GVISOR_KERNELSPECS:
            language, provisioner, isolation = GVISOR_KERNELSPECS[name], "docker", {"isolation": "gvisor"}
        else:
            (language, provisioner), isolation = KERNEL_KINDS[name], {}
        # jupyter_server routes only UUID-shaped kernel ids (\w+-\w+-\w+-\w+-\w+); a UUID is a valid session id.
        async with new_session(self.services, self.tenant):
            doc = await self.engine.create({"id": str(uuid.uuid4()), "language": language, "provisioner": provisioner,
                                            **isolation, "metadata": {"jupyter_kernel": True, "kernelspec": name},
                                            "env": kernel_env(body.get("env"))}, owner=self.tenant.owner)
        self.session_id = sid = doc["id"]
        try:
            await self.engine.jupyter_kernel(sid)  # a kernel that cannot start is this request's error
        except BaseException:
            try:
                await self.engine.delete(sid)
            except Exception:
                pass
            raise
        self.set_header("Location", f"/api/kernels/{sid}")
        self.send_json(kernel_model(self.services, await self.engine.get(sid)), 201)


class KernelHandler(BaseHandler):
    SESSION_ROUTE = True
    NOT_FOUND = KERNEL_NOT_FOUND
    API = {
        "get": Op("Jupyter: one kernel", response="KernelModel", errors=(404,), tags=TAGS),
        "delete": Op("Jupyter: shut a kernel down (its session is deleted)", status=204, errors=(404,), tags=TAGS),
    }

    async def get(self, kid: str) -> None:
        self.send_json(kernel_model(self.services, await kernel_doc(self.engine, kid)))

    async def delete(self, kid: str) -> None:
        await kernel_doc(self.engine, kid)
        await self.engine.delete(kid)  # its channels close on the engine's SessionDeleted (services.py)
        self.set_status(204)
        self.finish()


class KernelInterruptHandler(BaseHandler):
    SESSION_ROUTE = True
    NOT_FOUND = KERNEL_NOT_FOUND
    API = {"post": Op("Jupyter: interrupt a kernel", status=204, errors=(404,), tags=TAGS)}

    async def post(self, kid: str) -> None:
        await kernel_doc(self.engine, kid)
        await self.engine.interrupt(kid)
        self.set_status(204)
        self.finish()


class KernelRestartHandler(BaseHandler):
    SESSION_ROUTE = True
    NOT_FOUND = KERNEL_NOT_FOUND
    API = {"post": Op("Jupyter: restart a kernel (answers once it is up again)", response="KernelModel",
                      errors=(404, 429, 503), tags=TAGS)}

    async def post(self, kid: str) -> None:
        await kernel_doc(self.engine, kid)
        await self.engine.restart(kid)
        await self.engine.jupyter_kernel(kid)
        self.send_json(kernel_model(self.services, await self.engine.get(kid)))


# ---- the channels WebSocket ----------------------------------------------------------------
def serialize_binary_message(msg: dict[str, Any]) -> bytes:
    """Jupyter's legacy binary frame: offsets, then the JSON message, then the buffers."""
    buffers = [bytes(b) for b in msg.get("buffers") or []]
    head = {k: v for k, v in msg.items() if k != "buffers"}
    parts = [json.dumps(head, default=json_default).encode("utf-8"), *buffers]
    offsets = [4 * (len(parts) + 1)]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + len(part))
    return struct.pack("!" + "I" * (len(parts) + 1), len(parts), *offsets) + b"".join(parts)


def deserialize_binary_message(data: bytes) -> Any:
    try:
        count = struct.unpack("!I", data[:4])[0]
        offsets = list(struct.unpack("!" + "I" * count, data[4:4 * (count + 1)]))
    except struct.error:
        raise BadRequest("malformed binary message") from None
    if not offsets or any(b < a for a, b in zip(offsets, offsets[1:])) or offsets[-1] > len(data):
        raise BadRequest("malformed binary message")
    parts = [data[a:b] for a, b in zip(offsets, offsets[1:] + [len(data)])]
    msg = parse_json(parts[0])
    if isinstance(msg, dict):
        msg["buffers"] = parts[1:]
    return msg


def encode(channel: str, msg: dict[str, Any]) -> str | bytes:
    out = {"header": msg.get("header", {}), "msg_id": msg.get("msg_id"), "msg_type": msg.get("msg_type"),
           "parent_header": msg.get("parent_header", {}), "metadata": msg.get("metadata", {}),
           "content": msg.get("content", {}), "buffers": msg.get("buffers") or [], "channel": channel}
    if out["buffers"]:
        return serialize_binary_message(out)
    return dumps(out)


def outgoing(channel: str, msg: dict[str, Any], requests: OrderedDict[str, None]) -> str | bytes | None:
    """The frame a socket (or the replay buffer standing in for one) gets for a kernel
    message: every IOPub one, and replies to its own requests; None for the others."""
    if channel != "iopub" and msg.get("parent_header", {}).get("msg_id") not in requests:
        return None  # a reply to another socket's request, or to one of ERA's own runs
    try:
        return encode(channel, msg)
    except Exception:
        log.exception("encoding a %s message failed", msg.get("msg_type"))
        return None
def era_message(msg_type: str, parent: dict[str, Any], content: dict[str, Any]) -> dict[str, Any]:
    """A message from ERA itself, not from the kernel, in answer to the request ``parent``."""
    header = {"msg_id": uuid.uuid4().hex, "msg_type": msg_type, "username": "era", "session": "era-gateway",
              "date": datetime.now(timezone.utc).isoformat(), "version": "5.3"}
    return {"header": header, "msg_id": header["msg_id"], "msg_type": msg_type, "parent_header": parent,
            "metadata": {}, "content": content}


def worth_telling(exit_event: dict[str, Any] | None) -> dict[str, Any] | None:
    """The kernel's end, when its client did not ask for it (a restart it requested it knows of)."""
    if not exit_event or (exit_event.get("type"), exit_event.get("reason")) == ("kernel_restarted", "request"):
        return None
    return exit_event


def check_client_message(msg: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(msg, dict):
        raise BadRequest("a message must be a JSON object")
    channel = msg.get("channel")
    if channel not in CLIENT_CHANNELS:
        raise BadRequest("field 'channel' must be shell, control or stdin", field="channel")
    header = msg.get("header")
    if not isinstance(header, dict) or not isinstance(header.get("msg_id"), str) \
            or not isinstance(header.get("msg_type"), str):
        raise BadRequest("field 'header' must be an object with string msg_id and msg_type", field="header")
    for key in ("parent_header", "metadata", "content"):
        if msg.get(key) is not None and not isinstance(msg[key], dict):
            raise BadRequest(f"field '{key}' must be an object", field=key)
    return channel, msg


class KernelChannels(BoundedSocket):
    NOT_FOUND = KERNEL_NOT_FOUND
    GONE_REASON = "kernel deleted"
    API = {"get": Op("Jupyter: the kernel's messaging channels (WebSocket, Jupyter's JSON format)",
                     response="jupyter-websocket", errors=(400, 401, 403, 404, 429, 503), tags=TAGS,
                     description=__doc__ or "")}

    def initialize(self, services: Services, auth: bool) -> None:
        super().initialize(services, auth)
        self.kernel: Any = None
        self._remove_listener = lambda: None
        self._requests: OrderedDict[str, None] = OrderedDict()
        self._backlog: ReplayBuffer | None = None  # while replaying: what is still to send, live ones behind
        self._gone = False  # the session was deleted: nothing to keep for a reconnect
        # Why the kernel this client used went away (a session event): told in the output
        # of its next execute_request, which runs on a new kernel.
        self._lost: dict[str, Any] | None = None

    @property
    def client_session(self) -> str | None:
        """The Jupyter client's session id (``?session_id=``): the key of the replay buffer."""
        return self.get_query_argument("session_id", None) or None

    async def prepare(self) -> None:
        sid = await self.handshake()  # the gateway client sends its key in the header: no ?token=
        engine = self.services.engine
        doc = await kernel_doc(engine, sid)
        self.take_slot()  # before the kernel start: a refused socket starts nothing
        if await engine.jupyter_kernel(sid, start=False) is None:  # a client coming back after its kernel went
            self._lost = worth_telling((doc.get("kernel") or {}).get("last_exit"))
        self.kernel = await engine.jupyter_kernel(sid)  # started now if it was culled
        if self._closed:  # gone during the start (its slot is back): no upgrade
            raise Finish()

    def open(self, sid: str) -> None:
        self.set_nodelay(True)
        self.services.channels.setdefault(sid, set()).add(self)
        # Claiming the buffer stops its listener and this socket's starts in the same step
        # on the loop: no kernel message can fall between them or reach both.
        parked = replay_for(self.services, outgoing).claim(sid, self.client_session)
        if parked is not None:
            self._requests = parked.requests  # replies still due to the previous socket come here
            self._backlog = parked.buffer
            self.services.spawn(self._replay())
        self._listen(self.kernel)

    def on_close(self) -> None:
        super().on_close()
        self._remove_listener()
        sockets = self.services.channels.get(self.session_id or "")
        if sockets is not None:
            sockets.discard(self)
            if not sockets:
                self.services.channels.pop(self.session_id, None)
                if not self._gone and self.services.state == "ready":  # not for a deleted kernel or a shutdown
                    replay_for(self.services, outgoing).park(self.session_id, self.client_session, self.kernel,
                                                             self._requests, self._backlog)

    def session_gone(self) -> None:
        self._gone = True
        super().session_gone()

    async def _replay(self) -> None:
        """Send the buffered messages, oldest first; live ones queue behind them in the same
        buffer (``_on_kernel_message``) until it is empty, so none is doubled or reordered.
        If the socket closes meanwhile, what is left is parked again (``on_close``)."""
        backlog = self._backlog
        assert backlog is not None
        sent = 0
        while not self._closed:
            notice = backlog.take_notice()
            if notice is not None:
                self.send_frame(encode("iopub", notice))
            if not len(backlog):
                self._backlog = None
                return
            if self._unflushed > REPLAY_WINDOW:
                await asyncio.sleep(REPLAY_POLL_SECONDS)
                continue
            self.send_frame(backlog.popleft()[2])
            sent += 1
            if sent % REPLAY_BATCH == 0:
                await asyncio.sleep(0)

    # ---- kernel -> client ---------------------------------------------------------------
    def _listen(self, kernel: Any) -> None:
        self._remove_listener()
        self.kernel = kernel
        self._remove_listener = kernel.add_listener(self._on_kernel_message) if kernel else (lambda: None)

    def follow_kernel(self, event: Any = None) -> None:
        """The session's kernel was replaced (restart, a cold start), culled, stopped or died
        (engine lifecycle, services.py): listen to whatever is its kernel now, and keep why
        the old one went for the client."""
        from era_kernel.engine.events import KERNEL_GONE
        from era_kernel.engine.session_log import session_event

        if isinstance(event, KERNEL_GONE):
            self._lost = worth_telling(session_event(event))
        self.services.spawn(self._follow_kernel())

    async def _follow_kernel(self) -> None:
        try:
            kernel = await self.services.engine.jupyter_kernel(self.session_id, start=False)
        except EraError:
            return
        if kernel is not self.kernel and not self._closed:
            self._listen(kernel)

    def _on_kernel_message(self, channel: str, msg: dict[str, Any]) -> None:
        frame = outgoing(channel, msg, self._requests)
        if frame is not None:
            self._send(channel, frame, msg)

    def _send(self, channel: str, frame: str | bytes, msg: dict[str, Any]) -> None:
        if self._backlog is not None:  # a replay is under way: behind it
            self._backlog.append(channel, frame, msg)
        else:
            self.send_frame(frame)

    # ---- client -> kernel ---------------------------------------------------------------
    async def on_message(self, message: str | bytes) -> None:
        try:
            msg = deserialize_binary_message(message) if isinstance(message, bytes) else parse_json(message)
            channel, msg = check_client_message(msg)
        except EraError as err:
            log.warning("dropped a malformed Jupyter message: %s", err.message,
                        extra={"event": "error", "session_id": self.session_id})
            return
        engine = self.services.engine
        kernel = self.kernel
        if kernel is None or kernel.kc is None or kernel.state == "dead":
            try:
                kernel = await engine.jupyter_kernel(self.session_id)
            except NotFound:
                self.session_gone()
                return
            except EraError as err:
                log.warning("kernel unavailable: %s", err.message,
                            extra={"event": "error", "session_id": self.session_id})
                self._refuse(channel, msg, err)
                return
            if kernel is not self.kernel:
                self._listen(kernel)
        if self._lost is not None and msg["header"]["msg_type"] == "execute_request":
            lost, self._lost = self._lost, None
            self._tell(msg, f"[ERA] {lost.get('message') or lost.get('reason')} ({lost.get('at')}). This cell runs "
                            "on a new kernel: variables and imports from before are gone.\n")
        self._requests[msg["header"]["msg_id"]] = None
        while len(self._requests) > MAX_TRACKED_REQUESTS:
            self._requests.popitem(last=False)
        if channel == "shell" and msg["header"]["msg_type"] == "execute_request":
            try:
                self.services.run_rate.take(self.tenant)  # a cell is a run: runs_per_minute
            except EraError as err:
                self._refuse(channel, msg, err, why="this cell is refused")
                return
            try:  # a cell becomes a run record (engine/gateway_runs.py); the relay goes on whatever happens
                await engine.gateway_execute(self.session_id, kernel, msg)
            except Exception:
                log.exception("recording a gateway cell failed", extra={"session_id": self.session_id})
        try:
            kernel.send_raw(channel, msg)
        except EraError as err:
            log.warning("could not relay a message: %s", err.message,
                        extra={"event": "error", "session_id": self.session_id})
            return
        engine.jupyter_activity(self.session_id, touch=True)

    # ---- ERA's own answers ----------------------------------------------------------------
    def _tell(self, request: dict[str, Any], text: str) -> None:
        """A stderr stream parented to the client's request: a notebook shows it in that cell."""
        note = era_message("stream", request["header"], {"name": "stderr", "text": text})
        self._send("iopub", encode("iopub", note), note)

    def _refuse(self, channel: str, request: dict[str, Any], err: EraError,
                why: str = "no kernel to run this on") -> None:
        """No kernel for the request (the kernel limit, a start that failed): answer it as a
        kernel would answer a failed one (stderr, an error reply, idle), so the client's
        cell ends with the reason instead of waiting for a reply that never comes."""
        text = f"[ERA] {why}: {err.message}\n"
        if self._lost is not None:
            text += f"[ERA] the previous kernel went away: {self._lost.get('message') or self._lost.get('reason')}\n"
        self._tell(request, text)
        header = request["header"]
        if header["msg_type"].endswith("_request"):
            content = {"status": "error", "ename": type(err).__name__, "evalue": err.message, "traceback": []}
            if header["msg_type"] == "execute_request":
                content["execution_count"] = None
            reply = era_message(header["msg_type"].removesuffix("_request") + "_reply", header, content)
            self._send(channel, encode(channel, reply), reply)
        idle = era_message("status", header, {"execution_state": "idle"})
        self._send("iopub", encode("iopub", idle), idle)
