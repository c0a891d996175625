"""Requests for a session another replica serves go to that replica, streamed both ways.

Among replicas sharing a store, each session is served by the replica holding its lease
(era_kernel/engine/ownership.py). A request for it that reaches another replica (the
balancer sends any request anywhere) is forwarded here to the owner's address from the
replica registry: HTTP with the body as received and the answer relayed as it comes
(so SSE streams stay live), WebSockets (runs, terminals, Jupyter channels) as a tunnel
of frames in both directions. The forwarded request carries ``FORWARDED_BY``: a replica
receiving one for a session it does not serve answers 503 instead of forwarding again,
so a request never loops between replicas that disagree for a moment.

Handlers do not call this module: ``BaseHandler.prepare`` and ``BoundedSocket.prepare``
(through ``forwarding_socket``) ask ``target`` first, and the request is forwarded
before the route's own code runs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, Callable

from era_kernel.errors import Moved
from tornado import httputil
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError, websocket_connect

from .errors import NotReady

log = logging.getLogger("era.forwarding")

FORWARDED_BY = "X-Era-Forwarded-By"  # the replica id that forwarded the request
CONNECT_TIMEOUT_S = 5.0
# Forwarded requests in flight at once, per replica: tornado's default (10) would queue a
# run behind ten long ones (SSE streams, slow runs) and fail it after CONNECT_TIMEOUT_S.
MAX_FORWARDED = 10_000
_client: AsyncHTTPClient | None = None
# Hop-by-hop headers (RFC 9110 7.6.1) and those tornado sets for the relayed answer itself.
HOP_HEADERS = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Connection", "TE", "Trailer", "Transfer-Encoding", "Upgrade", "Host",
    "Content-Length", "Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Accept", "Sec-WebSocket-Protocol"))


async def target(handler: Any, session_id: str | None = None) -> str | None:
    """The owner's address when another replica serves the request's session (the route's
    first path argument, or ``session_id``), else None (served here: held, or taken over
    just now)."""
    engine = handler.services.engine
    if engine is None or not engine.ownership.enabled:
        return None
    address = await engine.ownership.locate(session_id or handler.path_args[0][:128])
    if address is None:
        return None
    came_from = handler.request.headers.get(FORWARDED_BY)
    if came_from:
        raise NotReady(f"this request was forwarded here by replica {came_from}, but replica "
                       f"{engine.replica.id} does not serve the session either (its lease is moving); retry")
    return address


def _outgoing_headers(handler: Any) -> dict[str, str]:
    headers = {k: v for k, v in handler.request.headers.get_all() if k.lower() not in HOP_HEADERS}
    headers[FORWARDED_BY] = handler.services.engine.replica.id
    return headers


# ---- HTTP --------------------------------------------------------------------------------
class ClientGone(Exception):
    """The client of a forwarded request left: the relay from the owner stops."""


def http_client() -> AsyncHTTPClient:
    global _client
    if _client is None:
        _client = AsyncHTTPClient(force_instance=True, max_clients=MAX_FORWARDED, max_body_size=2**62,
                                  max_buffer_size=64 * 1024**2)
    return _client


async def forward_http(handler: Any, address: str) -> None:
    """Send the request to ``address`` and relay the answer as it arrives."""
    request = handler.request
    started = {"done": False}

    def on_header(line: str) -> None:
        line = line.rstrip("\r\n")
        if line.startswith("HTTP/"):
            start = httputil.parse_response_start_line(line)
            if start.code == 100:
                return
            handler.clear()
            for name in ("Content-Type", "Server", "Cache-Control", "X-Content-Type-Options"):
                handler.clear_header(name)
            handler.set_status(start.code, start.reason)
        elif line and ":" in line:
            name, value = line.split(":", 1)
            if name.strip().lower() not in HOP_HEADERS and name.strip().lower() != "date":
                handler.add_header(name.strip(), value.strip())
        elif not line:
            started["done"] = True

    def on_chunk(chunk: bytes) -> None:
        stream = getattr(handler.request.connection, "stream", None)
        if handler._finished or stream is None or stream.closed():
            raise ClientGone()  # the owner's answer is dropped with its connection
        handler.write(chunk)
        handler.flush()  # as it comes: an SSE event must not wait for the next one

    body = handler.body_bytes() if request.method in ("POST", "PUT", "PATCH", "DELETE") else None
    outgoing = HTTPRequest(address.rstrip("/") + request.uri, method=request.method, headers=_outgoing_headers(handler),
                           body=body, allow_nonstandard_methods=True, follow_redirects=False,
                           connect_timeout=CONNECT_TIMEOUT_S, request_timeout=0, decompress_response=False,
                           header_callback=on_header, streaming_callback=on_chunk)
    try:
        response = await http_client().fetch(outgoing, raise_error=False)
    except ClientGone:
        return
    except (OSError, HTTPClientError) as exc:
        response = None
        error: BaseException | None = exc
    else:
        error = response.error if response.code == 599 else None
    if isinstance(error, ClientGone):
        return
    if error is not None or response is None:
        if not started["done"]:
            # The owner does not answer (died a moment ago): its lease expires soon.
            raise NotReady(f"the replica serving this session ({address}) does not answer ({error}); retry "
                           "after its lease expires (ERA_LEASE_TTL)")
        log.warning("forwarded answer from %s cut: %s", address, error)
    if not handler._finished:
        handler.finish()


# ---- WebSocket ---------------------------------------------------------------------------
class SocketTunnel:
    """A client's WebSocket on this replica, joined frame for frame to one on the owner."""

    def __init__(self, handler: Any, address: str):
        self.handler = handler
        self.address = address
        self.upstream: WebSocketClientConnection | None = None
        self._pump: asyncio.Task | None = None

    async def connect(self) -> None:
        request = self.handler.request
        url = "ws" + self.address.rstrip("/").removeprefix("http") + request.uri
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        try:
            self.upstream = await websocket_connect(
                HTTPRequest(url, headers=_outgoing_headers(self.handler), connect_timeout=CONNECT_TIMEOUT_S,
                            request_timeout=CONNECT_TIMEOUT_S * 2), subprotocols=protocols or None,
                max_message_size=self.handler.services.max_body)
        except HTTPClientError as exc:  # the owner refused the upgrade: its JSON answer is the client's
            response = exc.response
            self.handler.set_status(exc.code)
            if response is not None and response.body:
                self.handler.set_header("Content-Type", response.headers.get("Content-Type", "application/json"))
                self.handler.finish(response.body)
            else:
                self.handler.finish()
            raise
        except OSError as exc:
            raise NotReady(f"the replica serving this session ({self.address}) does not answer ({exc}); retry") \
                from None

    @property
    def subprotocol(self) -> str | None:
        return self.upstream.selected_subprotocol if self.upstream is not None else None

    def open(self, *args: Any) -> None:
        self.handler.set_nodelay(True)
        self._pump = asyncio.ensure_future(self._downstream())

    async def _downstream(self) -> None:
        upstream = self.upstream
        assert upstream is not None
        while True:
            message = await upstream.read_message()
            if message is None:
                break
            self.handler.send_frame(message)
        code, reason = upstream.close_code, upstream.close_reason
        self.handler.close(code if code and code != 1005 else 1000, reason)

    def on_message(self, message: str | bytes) -> Any:
        if self.upstream is None:
            return None
        try:
            return self.upstream.write_message(message, binary=isinstance(message, bytes))
        except WebSocketClosedError:
            return None

    def on_close(self) -> None:
        if self.upstream is not None:
            code = self.handler.close_code
            self.upstream.close(code if code and code not in (1005, 1006) else 1000, self.handler.close_reason)
        if self._pump is not None:
            self._pump.cancel()


def forwarding_socket(cls: type) -> None:
    """Wrap a WebSocket handler class (``BoundedSocket.__init_subclass__``): its
    ``prepare`` first asks ``target``, and for a session served elsewhere opens a
    ``SocketTunnel`` instead of running the route's own code; its ``open``,
    ``on_message``, ``on_close`` and ``select_subprotocol`` then go to the tunnel."""
    prepare = cls.__dict__.get("prepare")
    if prepare is not None and not getattr(prepare, "_forwards", False):
        @functools.wraps(prepare)
        async def prepare_or_forward(self: Any) -> None:
            await self.handshake()
            address = await target(self)
            if address is None:
                return await prepare(self)
            tunnel = SocketTunnel(self, address)
            try:
                await tunnel.connect()
            except HTTPClientError:
                return  # answered already, as the owner did
            self._tunnel = tunnel
            self.take_slot()

        prepare_or_forward._forwards = True  # type: ignore[attr-defined]
        cls.prepare = prepare_or_forward
    for name in ("open", "on_message", "on_close"):
        method = cls.__dict__.get(name)
        if method is not None and not getattr(method, "_forwards", False):
            setattr(cls, name, _to_tunnel(name, method))


def _to_tunnel(name: str, method: Callable) -> Callable:
    @functools.wraps(method)
    def wrapper(self: Any, *args: Any) -> Any:
        tunnel = self.__dict__.get("_tunnel")
        if tunnel is None:
            return method(self, *args)
        if name == "on_close":
            self._closed = True
            self.release_slot()
        return getattr(tunnel, name)(*args)

    wrapper._forwards = True  # type: ignore[attr-defined]
    return wrapper


__all__ = ["FORWARDED_BY", "Moved", "SocketTunnel", "forward_http", "forwarding_socket", "target"]
