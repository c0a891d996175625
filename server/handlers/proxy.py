"""``/proxy/{id}/{port}/...`` and ``GET /api/sessions/{id}/host``: HTTP and WebSocket
requests relayed to a port inside a session's sandbox (``engine.ports``).

The engine hands back a socket made inside the sandbox's network namespace; this module
speaks HTTP/1.1 over it with tornado's own connection class, streaming both ways: the
request body as it arrives (``stream_request_body``, each chunk written upstream before
the next is read), the response as the app sends it (each chunk flushed). A WebSocket
(any ``Upgrade``) is a tunnel: the handshake goes upstream as it came, then bytes are
copied both ways until either side closes, so the app's own WebSocket server answers it.

Among replicas (README: Replicas), a request for a session another replica serves is
sent to that replica as it came (its key, its path, its Host), over the same streaming
connection class or tunnel, and its answer relayed as is: the owner's own proxy reaches
the sandbox, so the app sees one request, not two.

Who may ask: a session with ``allowPublicAccess`` answers anyone (webhooks, browsers);
otherwise the API key is needed (403 with ERA's hint). Our key never goes upstream.
Proxied pages must not run on the API's origin: the path form sends ``Content-Security-
Policy: sandbox`` without ``allow-same-origin`` (an opaque origin: no access to the API
origin's storage or cookies), and ``ERA_PROXY_HOST`` gives each port an origin of its own.
"""

from __future__ import annotations

import asyncio
import functools
import re
from typing import Any, Callable

from era_kernel.errors import BadRequest, EraError, NotFound, TooLarge, Unauthorized, Unreachable
from era_kernel.tenants import split_key
from era_kernel.ports.service import HOP_BY_HOP, RELAY_BODY_MAX, RelayRequest, check_port
from tornado import httputil
from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters
from tornado.iostream import IOStream, StreamClosedError
from tornado.tcpclient import TCPClient
from tornado.web import stream_request_body

from ..apidoc import Op
from ..auth import bearer_token, token_matches
from .. import forwarding
from ..errors import Forbidden
from ..tenancy import authenticate, not_found
from .base import BaseHandler, RouteHandler, check_declared_size, wait_ready

SANDBOX_CSP = "sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads"
HEADER_LIMIT = 64 * 1024
PROXY_METHODS = ("get", "post", "put", "patch", "delete")  # documented; HEAD and OPTIONS are relayed too
_ANY = Op("Relay the request to 127.0.0.1:{port} inside the session's sandbox (HTTP or WebSocket); ERA's relay "
          "mode runs the stored code when nothing listens", body="bytes", response="bytes",
          errors=(400, 403, 404, 413, 422, 502, 503), tags=("proxy",),
          description="HEAD and OPTIONS are relayed too. Without allowPublicAccess the API key is needed (403 "
                      "otherwise). The path form answers with `Content-Security-Policy: sandbox ...` (no "
                      "allow-same-origin). Bodies past ERA_PROXY_MAX_BODY: 413.")


@functools.lru_cache(maxsize=4)
def proxy_host_pattern(template: str) -> "re.Pattern[str] | None":
    """``ERA_PROXY_HOST`` (``{port}-{id}.sandbox.example``, a port after ``:`` allowed) as
    the regex tornado matches host names with (lower case, no port); None when unset.
    Host names are case-insensitive, so the host form reaches lower-case session ids
    only (auto ids are)."""
    if not template:
        return None
    host = template.rsplit(":", 1)[0] if re.search(r":\d+$", template) else template
    pattern = re.escape(host.lower()).replace(r"\{port\}", r"(?P<port>\d{1,5})").replace(
        r"\{id\}", r"(?P<id>[a-z0-9_-]{1,128})")
    return re.compile(pattern + "$")


def public_url(handler: Any, sid: str, port: int) -> str:
    """Where ``port`` of session ``sid`` is reached: the host form when ERA_PROXY_HOST is
    set, else the path form on this server."""
    template = handler.services.settings["ERA_PROXY_HOST"]
    scheme = handler.request.protocol
    if template:
        return f"{scheme}://{template.replace('{port}', str(port)).replace('{id}', sid)}/"
    return f"{scheme}://{handler.request.host}/proxy/{sid}/{port}/"


class HostHandler(BaseHandler):
    SESSION_ROUTE = True
    API = {"get": Op("Where /proxy reaches a port inside the session: {url, session_id, port}",
                     response="HostAnswer", errors=(400, 404), query={"port": "the port, 1-65535 (required)"},
                     tags=("proxy",))}

    async def get(self, sid: str) -> None:
        raw = self.query("port")
        if raw is None:
            raise BadRequest("query parameter 'port' is required (1-65535)", field="port")
        port = check_port(raw)
        await self.engine.ports.record(sid)  # 404 for an unknown session
        self.send_json({"url": public_url(self, sid, port), "session_id": sid, "port": port})


class _Response(httputil.HTTPMessageDelegate):
    """The upstream response, written to our client as it comes."""

    def __init__(self, handler: "ProxyHandler") -> None:
        self.handler = handler

    def headers_received(self, start_line: Any, headers: httputil.HTTPHeaders) -> None:
        self.handler.upstream_headers(start_line, headers)

    def data_received(self, chunk: bytes) -> Any:
        if not self.handler.forwarding:  # (the owner counts its own traffic)
            self.handler.engine.ports.traffic(self.handler.target[0])
        self.handler.write(chunk)
        return self.handler.flush()  # awaited by the connection: a slow client slows the app, nothing piles up

    def finish(self) -> None:
        pass


@stream_request_body
class ProxyHandler(RouteHandler):
    """``ANY /proxy/{id}/{port}/{proxy_path}``."""

    API = {m: _ANY for m in PROXY_METHODS}
    HOST_FORM = False

    def initialize(self, services: Any, auth: bool) -> None:
        super().initialize(services, auth)
        self.upstream: HTTP1Connection | None = None
        self.relay_body: list[bytes] | None = None  # relay mode: the body, buffered (small)
        self.relay_size = 0
        self.refusal: Exception | None = None
        self.target: tuple[str, int, str] = ("", 0, "/")
        self.prefix = ""
        self.forwarding = False  # the request goes to the replica serving the session, as it came

    @property
    def engine(self) -> Any:
        return self.services.engine

    async def check_key(self) -> None:
        pass  # the session decides (allowPublicAccess): see _authorize

    def set_default_headers(self) -> None:
        self.clear_header("Server")

    # ---- before the body ----------------------------------------------------------------
    def _parse_target(self) -> tuple[str, int, str]:
        sid, port = self.path_args[0], self.path_args[1]
        # The app gets the path as the client sent it, still percent-encoded (tornado's
        # path arguments are decoded: an encoded '?' or space would change the request).
        parts = self.request.path.split("/", 4)  # '', 'proxy', id, port, rest
        self.prefix = "/".join(parts[:4])
        return sid, check_port(port), "/" + (parts[4] if len(parts) > 4 else "")

    async def _tenant(self) -> Any:
        """The tenant of the request's key, or None without a valid one."""
        try:
            return await authenticate(self.services, bearer_token(self.request.headers.get("Authorization")))
        except Unauthorized:
            return None

    def _ours(self, value: str) -> bool:
        """An Authorization header carrying one of our keys (never passed to the app)."""
        token = bearer_token(value)
        key = self.services.api_key
        return token is not None and ((key is not None and token_matches(token, key)) or split_key(token) is not None)

    def _refuse(self, sid: str) -> Forbidden:
        return Forbidden("this session does not allow public access to its ports",
                         details={"hint": "send 'Authorization: Bearer <key>', or set allowPublicAccess: true "
                                          f"(PATCH /api/sessions/{sid})"})

    async def _authorized_record(self, sid: str) -> Any:
        """The session's record, if this request may reach its ports. Without the key an
        unknown session is refused as a private one is, so ids cannot be probed."""
        tenant = await self._tenant()
        try:
            record = await self.engine.ports.record(sid)
        except NotFound:
            if tenant is None:
                raise self._refuse(sid) from None
            raise
        if record.allow_public:
            return record
        if tenant is None:
            raise self._refuse(sid)
        if not tenant.admin and record.owner != tenant.owner:
            raise not_found(sid)  # another tenant's private session: as a missing one
        return record

    async def prepare(self) -> None:
        limit = int(self.services.settings["ERA_PROXY_MAX_BODY"])
        self.request.connection.set_max_body_size(limit)  # past it, mid-stream, tornado hangs up
        try:
            check_declared_size(self, limit)
            await wait_ready(self.services)
            sid, port, path = self.target = self._parse_target()
            record = await self._authorized_record(sid)
            owner = await forwarding.target(self, sid)
            if owner is not None:
                await self._forward(owner)
                return
            sock = await self.engine.ports.connect(sid, port, record)
            if self.request.headers.get("Upgrade"):
                if sock is None:
                    raise BadRequest("nothing listens on this port, and a relay (the stored code) answers plain "
                                     "HTTP only, not an Upgrade")
                self._tunnel(IOStream(sock), *self._upstream_head())
                return
            if sock is None:
                self.relay_body = []
                return
            await self._open_upstream(IOStream(sock), *self._upstream_head())
        except Exception as exc:
            if isinstance(exc, StreamClosedError):
                exc = Unreachable("the session's port closed the connection before the request was sent")
            if not isinstance(exc, EraError) or isinstance(exc, TooLarge) or self.request.headers.get("Upgrade"):
                raise exc  # (a body over the limit is not worth draining: answered now, then tornado hangs up)
            self.refusal = exc  # answered once the body is drained (see BaseHandler's docstring)

    def _upstream_head(self) -> tuple[str, httputil.HTTPHeaders]:
        sid, port, path = self.target
        uri = path + (f"?{self.request.query}" if self.request.query else "")
        headers = httputil.HTTPHeaders()
        upgrade = bool(self.request.headers.get("Upgrade"))
        for name, value in self.request.headers.get_all():
            lower = name.lower()
            if lower in HOP_BY_HOP and not (upgrade and lower in ("upgrade", "connection")):
                continue
            if lower == "authorization" and self._ours(value):
                continue  # our key is ours: never the app's
            if lower == "expect":
                continue  # our server already said 100 Continue to the client; the body simply follows
            if lower.startswith("x-forwarded-"):
                continue  # ours below, not what a client claims
            headers.add(name, value)
        headers["X-Forwarded-Proto"] = self.request.protocol
        headers["X-Forwarded-Host"] = self.request.host
        headers["X-Forwarded-For"] = self.request.remote_ip or ""
        if not self.HOST_FORM:
            headers["X-Forwarded-Prefix"] = self.prefix
        return uri, headers

    async def _forward(self, address: str) -> None:
        """To the replica serving the session: the request as the client sent it (our key
        included: that replica checks it again), marked so that it is not forwarded on."""
        url = httputil.urlparse(address)
        try:
            stream = await TCPClient().connect(url.hostname, url.port or 80, timeout=forwarding.CONNECT_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError, StreamClosedError) as exc:
            raise Unreachable(f"the replica serving this session ({address}) does not answer ({exc}); retry "
                              "once its lease has expired") from None
        self.forwarding = True
        upgrade = bool(self.request.headers.get("Upgrade"))
        headers = httputil.HTTPHeaders()
        for name, value in self.request.headers.get_all():
            lower = name.lower()
            if lower in HOP_BY_HOP and not (upgrade and lower in ("upgrade", "connection")):
                continue
            if lower == "expect":
                continue
            headers.add(name, value)
        headers[forwarding.FORWARDED_BY] = self.engine.replica.id
        if upgrade:
            self._tunnel(stream, self.request.uri, headers)
        else:
            await self._open_upstream(stream, self.request.uri, headers)

    async def _open_upstream(self, stream: IOStream, uri: str, headers: httputil.HTTPHeaders) -> None:
        self.upstream = HTTP1Connection(stream, True, HTTP1ConnectionParameters(
            no_keep_alive=True, max_header_size=HEADER_LIMIT, decompress=False,
            max_body_size=2**62))  # what the app answers is the app's: streamed, never held
        await self.upstream.write_headers(httputil.RequestStartLine(self.request.method, uri, "HTTP/1.1"), headers)

    def data_received(self, chunk: bytes) -> Any:
        if self.refusal is not None or self._finished:
            return None
        if self.upstream is not None:
            return self.upstream.write(chunk)  # awaited by tornado: the app's pace is the client's
        if self.relay_body is not None:
            self.relay_size += len(chunk)
            if self.relay_size <= RELAY_BODY_MAX:
                self.relay_body.append(chunk)
        return None

    # ---- the answer ---------------------------------------------------------------------
    async def _answer(self, *args: Any) -> None:
        if self.refusal is not None:
            raise self.refusal
        if self.relay_body is not None:
            await self._relay()
            return
        assert self.upstream is not None
        try:
            self.upstream.finish()
            await self.upstream.read_response(_Response(self))
        except StreamClosedError:
            if not self._headers_written:
                raise Unreachable("the session's port closed the connection before answering") from None
        except httputil.HTTPInputError as exc:  # the app's answer is not HTTP we can relay
            if not self._headers_written:
                raise Unreachable(f"the session's port did not answer with valid HTTP: {str(exc)[:200]}") from None
            self.request.connection.close()  # halfway through: the client must see it cut, not complete
        finally:
            self.upstream.close()
        if not self._finished:
            self.finish()

    get = post = put = patch = delete = head = options = _answer

    def upstream_headers(self, start_line: Any, headers: httputil.HTTPHeaders) -> None:
        self.set_status(start_line.code, start_line.reason or None)
        self.clear_header("Content-Type")
        seen: set[str] = set()
        for name, value in headers.get_all():
            if name.lower() in HOP_BY_HOP:
                continue
            # The first value replaces ours (tornado's Date); more of one name (Set-Cookie) add up.
            (self.add_header if name.lower() in seen else self.set_header)(name, value)
            seen.add(name.lower())
        if not self.HOST_FORM and not self.forwarding:  # beside the app's own policy, if any: browsers enforce both
            self.add_header("Content-Security-Policy", SANDBOX_CSP)  # (a forwarded answer has the owner's)

    async def _relay(self) -> None:
        if self.relay_size > RELAY_BODY_MAX:
            raise TooLarge(f"a relayed request body may be at most {RELAY_BODY_MAX} bytes (it is passed in "
                           "ERA_HTTP_BODY); start a server in the session for larger ones")
        sid, port, path = self.target
        headers = {name: value for name, value in self.request.headers.get_all()
                   if not (name.lower() == "authorization" and self._ours(value))}
        answer = await self.engine.ports.relay(sid, RelayRequest(
            method=self.request.method or "GET", path=path, query=self.request.query, headers=headers,
            body=b"".join(self.relay_body or []), url=public_url(self, sid, port)))
        self.set_status(answer.status)
        for name, value in answer.headers.items():
            try:
                self.set_header(name, value)
            except ValueError:
                continue  # a header the code made up that HTTP cannot carry
        self.set_header("Content-Type", answer.content_type)
        if not self.HOST_FORM:
            self.add_header("Content-Security-Policy", SANDBOX_CSP)
        self.finish(answer.body)

    def on_connection_close(self) -> None:
        if self.upstream is not None:
            self.upstream.close()  # the client left: so does the app's connection

    # ---- WebSocket (any Upgrade) --------------------------------------------------------
    def _tunnel(self, upstream: IOStream, uri: str, headers: httputil.HTTPHeaders) -> None:
        lines = [f"{self.request.method} {uri} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.get_all()]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        client = self.detach()
        client.set_nodelay(True)
        sid = self.target[0]
        traffic = (lambda: None) if self.forwarding else (lambda: self.engine.ports.traffic(sid))
        self.services.spawn(_splice(client, upstream, head, traffic))


async def _splice(client: IOStream, upstream: IOStream, head: bytes, traffic: Callable[[], None]) -> None:
    async def copy(src: IOStream, dst: IOStream) -> None:
        try:
            while True:
                chunk = await src.read_bytes(256 * 1024, partial=True)
                traffic()
                await dst.write(chunk)
        except StreamClosedError:
            pass
        finally:
            dst.close()

    try:
        await upstream.write(head)
    except StreamClosedError:
        client.close()
        return
    await asyncio.gather(copy(client, upstream), copy(upstream, client))


class ProxyRootHandler(ProxyHandler):
    """``ANY /proxy/{id}/{port}``: the app's ``/``."""


class ProxyHostHandler(ProxyHandler):
    """The host form (``ERA_PROXY_HOST``): every path of ``{port}-{id}.<domain>``."""

    HOST_FORM = True

    def _parse_target(self) -> tuple[str, int, str]:
        pattern = proxy_host_pattern(self.services.settings["ERA_PROXY_HOST"])
        match = pattern.match(self.request.host_name) if pattern is not None else None
        if match is None:
            raise NotFound("no session port has this host name")
        return match["id"], check_port(match["port"]), self.request.path
