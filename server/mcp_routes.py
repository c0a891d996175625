"""MCP on the API's port: ``/mcp`` (MCP's streamable HTTP, served by the official SDK)
and ``/mcp/v1`` (ERA's own JSON-RPC endpoint), both behind the API key like every route.

``/mcp``: the SDK's transport is an ASGI app and this server is Tornado. Rather than a
second listener (another port to secure) or a re-implementation of the transport, a
Tornado handler speaks ASGI to the SDK's ``StreamableHTTPSessionManager``: it builds the
scope from the request, hands over the body tornado already read (and limited), and
writes each ``http.response.body`` chunk as it comes, flushed, so SSE answers stream.
Auth, body limits, errors and logging stay the route table's (``BaseHandler``); the SDK
keeps the protocol (headers, versions, SSE framing). It runs stateless: each POST is
answered on its own, so nothing is held per client between requests and the server keeps
no MCP session to expire; our state lives in ERA sessions, which the tools name by id.

Both endpoints call the tools of ``era_kernel.mcp``, which use the public HTTP API: here,
looped back to this very server on the address the request came in on, with the caller's
own ``Authorization``. One tool layer for stdio, ``/mcp`` and ``/mcp/v1``, identical
behaviour local or remote, and every call goes through the same validation and auth as
any client's; the cost is one loopback HTTP hop per API call (about a millisecond), small
beside a run.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import OrderedDict
from typing import Any

from tornado.iostream import StreamClosedError

from .apidoc import Op
from .handlers.base import BaseHandler, parse_json
from .services import Services

MAX_CLIENTS = 8  # API clients kept per server, one per distinct Authorization (normally one or two)


class McpBridge:
    """Per server: the SDK's session manager (started on first use, for the server's
    life) and the API clients the tools use, reused across requests."""

    def __init__(self) -> None:
        self.manager: Any = None
        self._started: asyncio.Future | None = None
        self._clients: OrderedDict[tuple[str, str], Any] = OrderedDict()

    def tools(self, base_url: str, authorization: str) -> Any:
        import era_client
        from era_kernel.mcp.handlers import EraTools

        key = (base_url, authorization)
        tools = self._clients.get(key)
        if tools is None:
            token = authorization.partition(" ")[2].strip() if authorization else ""
            tools = self._clients[key] = EraTools(era_client.AsyncClient(base_url, token, max_retries=2))
            while len(self._clients) > MAX_CLIENTS:
                _, old = self._clients.popitem(last=False)
                asyncio.ensure_future(old.client.close())
        self._clients.move_to_end(key)
        return tools

    async def ready(self, services: Services) -> Any:
        if self._started is None:
            self._started = asyncio.get_running_loop().create_future()
            services.spawn(self._run())
        await asyncio.shield(self._started)
        return self.manager

    async def _run(self) -> None:
        assert self._started is not None
        try:
            from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

            from era_kernel.mcp.server import build_server

            server = build_server(lambda ctx: ctx.request.scope["era.tools"])
            self.manager = StreamableHTTPSessionManager(server, stateless=True)
            async with self.manager.run():
                self._started.set_result(None)
                await asyncio.Event().wait()  # until the loop ends with the server
        except BaseException as exc:
            if not self._started.done():  # requests waiting for it fail instead of hanging
                self._started.set_exception(exc if isinstance(exc, Exception) else RuntimeError("MCP stopped"))
                self._started = None  # the next request tries again
            raise


_BRIDGES: "weakref.WeakKeyDictionary[Services, McpBridge]" = weakref.WeakKeyDictionary()


def bridge_for(services: Services) -> McpBridge:
    bridge = _BRIDGES.get(services)
    if bridge is None:
        bridge = _BRIDGES[services] = McpBridge()
    return bridge


class McpBase(BaseHandler):
    def loopback_url(self) -> str:
        """This server, as reached by this request: the local address it came in on."""
        sockname = self.request.connection.stream.socket.getsockname()
        host = sockname[0]
        return f"http://[{host}]:{sockname[1]}" if ":" in host else f"http://{host}:{sockname[1]}"

    def tools(self) -> Any:
        return bridge_for(self.services).tools(self.loopback_url(), self.request.headers.get("Authorization", ""))


class McpV1Handler(McpBase):
    API = {"post": Op("ERA's MCP endpoint: one JSON-RPC 2.0 message (or batch) per request",
                      errors=(413, 503),
                      description="Methods: `initialize` (serverInfo.name `era-agent-mcp`), `tools/list`, "
                                  "`tools/call`, `resources/list`, `resources/read`, `ping`. Answered as JSON with "
                                  "HTTP 200, JSON-RPC errors included; notifications get 202 and no body. The same "
                                  "tools as `/mcp` and `era mcp`.")}

    async def post(self) -> None:
        from era_kernel.errors import BadRequest
        from era_kernel.mcp import jsonrpc

        try:
            message = parse_json(self.body_bytes())
        except BadRequest as exc:
            self.send_json(jsonrpc.error(None, jsonrpc.PARSE_ERROR, f"Parse error: {exc.message}"))
            return
        reply = await jsonrpc.answer(self.tools(), message)
        if reply is None:
            self.set_status(202)
            self.finish()
            return
        self.send_json(reply)


class McpHandler(McpBase):
    API = {method: Op(f"MCP streamable HTTP ({method.upper()})", errors=(400, 406, 413, 503),
                      description="The Model Context Protocol's streamable HTTP transport, served by the official "
                                  "MCP SDK in stateless mode: POST JSON-RPC with `Accept: application/json, "
                                  "text/event-stream`. ERA's tools (`era_python`, `era_run_in_session`, ...) and "
                                  "session resources. Same API key as every route.")
           for method in ("get", "post", "delete")}

    _gone: asyncio.Event | None = None

    async def get(self) -> None:
        await self._asgi()

    async def post(self) -> None:
        await self._asgi()

    async def delete(self) -> None:
        await self._asgi()

    async def _asgi(self) -> None:
        manager = await bridge_for(self.services).ready(self.services)
        self._gone = asyncio.Event()
        request = self.request
        sockname = request.connection.stream.socket.getsockname()
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": request.method, "scheme": "http", "path": request.path, "raw_path": request.path.encode(),
            "query_string": request.query.encode("latin-1"), "root_path": "",
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.get_all()],
            "server": (sockname[0], sockname[1]), "client": (request.remote_ip, 0), "state": {},
            "era.tools": self.tools(),  # what the tool handlers answer this caller with (server.build_server)
        }
        body = self.body_bytes()
        sent_body = False

        async def receive() -> dict[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            assert self._gone is not None
            await self._gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if self._finished:
                return
            if message["type"] == "http.response.start":
                self.set_status(message["status"])
                self.clear_header("Content-Type")
                for name, value in message.get("headers", []):
                    name_s = name.decode("latin-1")
                    if name_s.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.add_header(name_s, value.decode("latin-1"))
                stream = getattr(request.connection, "stream", None)
                if stream is not None:
                    stream.set_nodelay(True)  # SSE frames go out now, not after Nagle's delay
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                try:
                    if chunk:
                        self.write(chunk)
                        await self.flush()
                    if not message.get("more_body", False):
                        self.finish()
                except StreamClosedError:
                    self._gone.set()

        await manager.handle_request(scope, receive, send)
        if not self._finished:
            self.finish()

    def on_connection_close(self) -> None:
        if self._gone is not None:
            self._gone.set()

