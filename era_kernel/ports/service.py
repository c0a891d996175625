"""``engine.ports``: a session's TCP ports, reached from the server, and ERA's relay mode.

A port is reached where the session's code listens: ``127.0.0.1:PORT`` inside its
sandbox's network namespace (``netns.py``); the session keeps no network of its own. A
session without a live kernel gets one started, as a run would (its servers, if any,
are then gone: they lived in the old kernel's sandbox).

Relay mode (ERA's semantics): when nothing listens on the port and the session has
stored code (``PUT .../code``, ``data.code``), each request runs that code as a run of
the session, with the request in ``ERA_REQUEST_MODE=proxy``, ``ERA_HTTP_METHOD``,
``ERA_HTTP_PATH``, ``ERA_HTTP_QUERY``, ``ERA_HTTP_HEADERS`` (JSON), ``ERA_HTTP_BODY``
and ``ERA_PROXY_URL``. ERA starts a process per request; here the run goes through the
session's kernel like any run without code (``env`` applied around it and undone after),
so it works the same for every language and is serialized with the session's other runs.
What it prints decides the answer: a JSON object with ``status``/``contentType``/
``headers``/``body`` is that response; other JSON is the body as ``application/json``;
anything else is ``text/plain`` with 200, or 500 when the code failed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from ..errors import BadRequest, KernelFailed, TooLarge, Unprocessable, Unreachable
from . import netns

log = logging.getLogger("era.ports")

CONNECT_TIMEOUT = 5.0
ACTIVITY_EVERY = 10.0  # seconds: traffic through a port counts as the session's activity at most this often
RELAY_BODY_MAX = 1024**2  # ERA_HTTP_BODY is an environment variable: its children inherit it
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "proxy-connection"})


def check_port(port: Any) -> int:
    text = str(port)
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise BadRequest("port must be an integer from 1 to 65535", field="port")
    return int(text)


@dataclass
class RelayRequest:
    method: str
    path: str  # from '/' (the part after /proxy/{id}/{port})
    query: str  # raw, without '?'
    headers: dict[str, str]
    body: bytes
    url: str  # where this port is reached from outside (ERA_PROXY_URL)


@dataclass
class RelayResponse:
    status: int
    content_type: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


class PortService:
    """Handed by the engine: ``record(sid)`` (NotFound), ``kernel(sid)`` (the live kernel,
    started when there is none), ``run(sid, body)`` (a run's result) and ``touch(sid)``
    (activity now, for culling)."""

    def __init__(self, *, record: Callable[[str], Awaitable[Any]], kernel: Callable[[str], Awaitable[Any]],
                 run: Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]],
                 touch: Callable[[str], Any]) -> None:
        self._record, self._kernel, self._run, self._touch = record, kernel, run, touch
        self._touched: dict[str, float] = {}
        # kernel -> its network namespace's path; a new kernel is a new sandbox (and key).
        self._namespaces: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def traffic(self, sid: str) -> None:
        """Bytes went through one of the session's ports: a kernel whose app is in use
        (a long WebSocket, a stream) is not idle, so the culler leaves it be."""
        now = time.monotonic()
        if now - self._touched.get(sid, 0.0) >= ACTIVITY_EVERY:
            if len(self._touched) > 10_000:
                self._touched.clear()
            self._touched[sid] = now
            self._touch(sid)

    async def record(self, sid: str) -> Any:
        return await self._record(sid)

    async def namespace(self, sid: str) -> str:
        """The path of the session's sandbox's network namespace (``/proc/<pid>/ns/net``),
        its kernel started when it has none. Unprocessable when the sandbox shares the
        server's own network: its 127.0.0.1 is the server's, which no request may reach."""
        kernel = await self._kernel(sid)
        path = self._namespaces.get(kernel)
        if path is None:
            pid = await _sandbox_pid(kernel)
            path = f"/proc/{pid}/ns/net"
            try:
                shared = await asyncio.to_thread(netns.same_namespace_as_ours, path)
            except OSError:
                raise KernelFailed("the session's kernel process is gone") from None
            if shared:
                raise Unprocessable("this session's sandbox shares the server's network (internet access with host "
                                    "networking, or no sandbox): its 127.0.0.1 is the server's own, so its ports are "
                                    "not proxied")
            self._namespaces[kernel] = path
        return path

    async def connect(self, sid: str, port: int, record: Any = None) -> socket.socket | None:
        """A connected socket to the session's ``127.0.0.1:port``; None when nothing listens
        there but the session has stored code (relay mode: ``relay``). Unreachable (502)
        when nothing listens and there is no stored code. ``record``: the session's, when
        the caller has it already."""
        record = record if record is not None else await self._record(sid)
        port = check_port(port)
        path = await self.namespace(sid)
        try:
            return await netns.connect(path, port, timeout=CONNECT_TIMEOUT)
        except netns.NamespaceError as exc:
            self._namespaces.clear()  # a stale pid: look again next time
            raise KernelFailed(f"cannot reach the session's sandbox: {exc.strerror}") from None
        except (OSError, asyncio.TimeoutError):  # refused, or no answer within the timeout
            if record.stored_code:
                return None
            raise Unreachable(f"nothing listens on port {port} in session {sid}",
                              details={"hint": f"start a server bound to 127.0.0.1:{port} (or 0.0.0.0) in the "
                                               "session, e.g. in a run or a background command; or store code "
                                               f"with PUT /api/sessions/{sid}/code to answer requests as a relay"}
                              ) from None

    async def listen(self, sid: str, port: int = 0, host: str = "127.0.0.1") -> socket.socket:
        """A listening socket at ``host:port`` inside the session's sandbox network (its kernel
        started when it has none): code in the session connects to it there, the server
        accepts from its event loop. It belongs to the sandbox of the kernel live now; a
        new kernel is a new sandbox (listen again then), and the socket keeps the old
        namespace alive until it is closed."""
        await self._record(sid)
        path = await self.namespace(sid)
        try:
            return await netns.listen(path, port, host)
        except netns.NamespaceError as exc:
            self._namespaces.clear()
            raise KernelFailed(f"cannot reach the session's sandbox: {exc.strerror}") from None

    async def relay(self, sid: str, request: RelayRequest) -> RelayResponse:
        """ERA's relay mode: the stored code, run with the request in ``ERA_HTTP_*``."""
        if len(request.body) > RELAY_BODY_MAX:
            raise TooLarge(f"a relayed request body may be at most {RELAY_BODY_MAX} bytes (it is passed in "
                           "ERA_HTTP_BODY); start a server in the session for larger ones")
        env = {"ERA_REQUEST_MODE": "proxy", "ERA_HTTP_METHOD": request.method, "ERA_HTTP_PATH": request.path,
               "ERA_HTTP_QUERY": request.query, "ERA_HTTP_HEADERS": json.dumps(request.headers),
               "ERA_HTTP_BODY": request.body.decode("utf-8", "replace").replace("\0", "\ufffd"),
               "ERA_PROXY_URL": request.url}
        result = await self._run(sid, {"env": env})
        return relay_response(result)


def relay_response(result: dict[str, Any]) -> RelayResponse:
    """A run's result as the relayed request's answer (see the module's docstring)."""
    stdout = result.get("stdout") or ""
    if result.get("exit_code") not in (0, None):
        error = result.get("error") or {}
        detail = "\n".join(x for x in (stdout, result.get("stderr") or "",
                                       f"{error.get('ename', '')}: {error.get('evalue', '')}" if error else "") if x)
        return RelayResponse(500, "text/plain; charset=utf-8", (detail or "the stored code failed").encode())
    try:
        doc = json.loads(stdout)
    except ValueError:
        return RelayResponse(200, "text/plain; charset=utf-8", stdout.encode())
    if isinstance(doc, dict) and {"status", "contentType", "headers", "body"} & doc.keys():
        status = doc.get("status", 200)
        if not isinstance(status, int) or not 100 <= status <= 599:
            status = 500
        body = doc.get("body", "")
        content_type = doc.get("contentType")
        if not isinstance(body, (str, bytes)):
            body, content_type = json.dumps(body), content_type or "application/json"
        headers = doc.get("headers") if isinstance(doc.get("headers"), dict) else {}
        headers = {str(k): str(v) for k, v in headers.items()
                   if str(k).lower() not in HOP_BY_HOP and str(k).lower() != "content-length"}
        raw = body.encode() if isinstance(body, str) else body
        return RelayResponse(status, str(content_type or "text/plain; charset=utf-8"), raw, headers)
    return RelayResponse(200, "application/json", stdout.encode())


async def _sandbox_pid(kernel: Any) -> int:
    """A process of the kernel's sandbox, whose network namespace is the session's."""
    provisioner = kernel.km.provisioner if getattr(kernel, "km", None) is not None else None
    name = type(provisioner).__name__
    if name == "EraLocalProvisioner":
        pid = await asyncio.to_thread(provisioner._kernel_pid)
    elif name == "EraDockerProvisioner":
        if provisioner.container_id is None:
            pid = None
        else:
            def inspect() -> int | None:
                state = provisioner.client.api.inspect_container(provisioner.container_id)["State"]
                pid = state.get("Pid") or None
                # State.Pid is a pid in dockerd's pid namespace: only when that is ours (dockerd
                # on this host, the server not in a pid namespace of its own) is /proc/<pid>
                # the container's process and not some other one's. Its cgroup names it.
                try:
                    with open(f"/proc/{pid}/cgroup") as fh:
                        ours = provisioner.container_id in fh.read()
                except OSError:
                    ours = False
                if pid is not None and not ours:
                    raise KernelFailed("the kernel container's process is not visible to the server (dockerd on "
                                       "another host or in another pid namespace): its ports cannot be reached")
                return pid

            try:
                pid = await asyncio.to_thread(inspect)
            except KernelFailed:
                raise
            except Exception as exc:  # docker.errors.APIError: the container went
                raise KernelFailed(f"cannot find the session's kernel container: {exc}") from None
    else:
        raise KernelFailed(f"ports need an ERA provisioner; this kernel runs on {name}")
    if pid is None:
        raise KernelFailed("the session's kernel process is gone")
    return int(pid)
