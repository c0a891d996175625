"""The bases of every handler: ``RouteHandler`` (HTTP and WebSocket: what its route
gives it, and the API key check) and ``BaseHandler`` (HTTP: body limits, JSON in/out,
readiness).

Bodies are streamed (``stream_request_body``) so the size limit is enforced by us, with
a JSON 413, instead of tornado dropping the connection; ``prepare`` runs before the body
is read, so an unauthenticated or oversized request is refused without buffering its
body (see ``BaseHandler`` for why the refusal waits until the body is drained).
"""

from __future__ import annotations

import asyncio
import functools
import json
from datetime import date, datetime
from pathlib import PurePath
from typing import Any

from era_kernel.errors import BadRequest, NotFound, TooLarge
from era_kernel.tenants import ADMIN, Tenant
from tornado.web import HTTPError, RequestHandler, stream_request_body

from .. import forwarding, tenancy
from ..apidoc import Op
from ..auth import bearer_token
from ..errors import Forbidden, JsonErrors, NotReady
from ..services import Services

READY_WAIT_SECONDS = 5.0  # requests arriving while the engine starts wait this long, then 503
MAX_JSON_DEPTH = 64  # deeper documents are refused: the response encoder must never recurse out


def json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def dumps(value: Any) -> str:
    return json.dumps(value, default=json_default)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _check_depth(value: Any) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise BadRequest(f"request body is nested more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, (dict, list)))


def parse_json(raw: bytes | str) -> Any:
    """A JSON value from bytes or text; every failure is a 400 with a sentence (never a 500)."""
    if not raw.strip():
        return None
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise BadRequest("request body is not valid UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except ValueError as exc:  # NaN/Infinity, integers with too many digits
        raise BadRequest(f"request body is not valid JSON: {str(exc)[:120]}") from None
    _check_depth(value)
    return value


async def wait_ready(services: Services) -> None:
    """Hold a request briefly while the engine starts; 503 if it takes longer or is stopping."""
    if services.state == "stopping":
        raise NotReady("the server is shutting down")
    if not services.ready.is_set():
        try:
            await asyncio.wait_for(asyncio.shield(services.ready.wait()), READY_WAIT_SECONDS)
        except asyncio.TimeoutError:
            raise NotReady("the server is starting; retry shortly") from None
    if services.engine is None or services.state != "ready":
        raise NotReady("the engine is not available")


HTTP_METHODS = ("get", "post", "put", "patch", "delete", "head", "options")


def _refuse_first(method):
    """Raise what ``prepare`` refused, once the body has been drained (see BaseHandler)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self._refusal is not None:
            raise self._refusal
        if self._too_large:
            raise TooLarge(f"request body is larger than the limit of {self.services.max_body} bytes")
        if self._forward_to is not None:  # another replica serves the session (server/forwarding.py)
            return forwarding.forward_http(self, self._forward_to)
        return method(self, *args, **kwargs)

    return wrapper


def _wrap_methods(cls: type) -> None:
    for name in HTTP_METHODS:
        method = cls.__dict__.get(name)
        if method is not None and not getattr(method, "__wrapped__", None):
            setattr(cls, name, _refuse_first(method))


def check_declared_size(handler: RequestHandler, limit: int) -> None:
    declared = handler.request.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"request body is {int(declared)} bytes; the limit is {limit}")


class RouteHandler(JsonErrors, RequestHandler):
    """Every handler of the app, HTTP or WebSocket. The route table (``routes.py``) gives it
    ``services`` and ``auth``, whether its route needs the API key; ``check_key`` is the
    one place that requirement is enforced, first thing in every ``prepare``. It also
    finds the request's ``tenant`` (server/tenancy.py); ``check_owner`` then hides other
    tenants' sessions."""

    QUERY_TOKEN = False  # the key may also come as ``?token=`` (WebSocket clients without headers)
    NOT_FOUND = tenancy.SESSION_NOT_FOUND  # how the route words a missing session (another tenant's too)

    def initialize(self, services: Services, auth: bool) -> None:
        self.services = services
        self.auth = auth
        self.tenant: Tenant = ADMIN

    def tokens(self) -> tuple[str | None, str | None]:
        """The key candidates: the Authorization header, and ``?token=`` where allowed."""
        query_token = self.get_query_argument("token", None) if self.QUERY_TOKEN else None
        return bearer_token(self.request.headers.get("Authorization")), query_token

    async def check_key(self) -> None:
        if self.auth:
            waits = getattr(self, "WAITS_FOR_ENGINE", True)
            self.tenant = await tenancy.authenticate(self.services, *self.tokens(), waits=waits)

    async def check_owner(self, session_id: str) -> None:
        """404, as for a missing session, when it is another tenant's."""
        await tenancy.check_owner(self.services, self.tenant, session_id, self.NOT_FOUND)

    @property
    def owner_filter(self) -> str | None:
        return tenancy.owner_filter(self.tenant)


@stream_request_body
class BaseHandler(RouteHandler):
    """Subclasses declare ``API`` (see ``apidoc.Op``).

    A refusal found in ``prepare`` (401, 413, 503) is not answered at once: tornado closes
    the connection when a response finishes before the body was read, and a client still
    sending its body then sees a reset instead of our JSON. So the body is drained (up to
    ``drain_limit``, never buffered) and the refusal raised when the method runs; every
    method of every subclass is wrapped for that. Past ``drain_limit`` we answer and hang up.
    """

    API: dict[str, Op] = {}
    SESSION_ROUTE = False  # first path argument is a session id (logged with the request)
    ADMIN_ONLY = False  # about every tenant (server-wide counts): a tenant's key is refused (403)
    WAITS_FOR_ENGINE = True  # held (then 503) while the engine starts

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _wrap_methods(cls)

    def _not_allowed(self, *args: Any, **kwargs: Any) -> None:
        raise HTTPError(405)

    # Methods a route lacks are wrapped too, so a refusal (401) comes before the 405.
    get = post = put = patch = delete = head = options = _not_allowed

    def initialize(self, services: Services, auth: bool) -> None:
        super().initialize(services, auth)
        self.session_id: str | None = None
        self._chunks: list[bytes] = []
        self._received = 0
        self._too_large = False
        self._refusal: Exception | None = None
        self._forward_to: str | None = None  # the owner's address, when another replica serves the session

    def set_default_headers(self) -> None:
        self.clear_header("Server")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Cache-Control", "no-store")

    # ---- request body ---------------------------------------------------------------
    async def prepare(self) -> None:
        if self.SESSION_ROUTE and self.path_args:
            self.session_id = self.path_args[0][:128]
        self.request.connection.set_max_body_size(self.services.drain_limit)
        try:
            await self.check_key()
            if self.ADMIN_ONLY and not self.tenant.admin:
                raise Forbidden("this route is about every tenant: it needs an admin key")
            await self.admit()
            if self.SESSION_ROUTE and self.path_args and self.WAITS_FOR_ENGINE:
                await self.check_owner(self.path_args[0])
                self._forward_to = await forwarding.target(self)
        except Exception as exc:
            declared = self.request.headers.get("Content-Length", "0")
            if declared.isdigit() and int(declared) > self.services.drain_limit:
                raise  # not worth draining: answer now, tornado then closes the connection
            self._refusal = exc

    async def admit(self) -> None:
        """After the key: the declared size, then readiness. /health narrows this."""
        check_declared_size(self, self.services.max_body)
        if self.WAITS_FOR_ENGINE:
            await wait_ready(self.services)

    def data_received(self, chunk: bytes) -> None:
        if self._finished or self._too_large or self._refusal is not None:
            return  # drained and dropped
        self._received += len(chunk)
        if self._received > self.services.max_body:
            self._too_large = True
            self._chunks.clear()
            return
        self._chunks.append(chunk)

    def body_bytes(self) -> bytes:
        if self._too_large:
            raise TooLarge(f"request body is larger than the limit of {self.services.max_body} bytes")
        return b"".join(self._chunks)

    def json_body(self) -> Any:
        return parse_json(self.body_bytes())

    # ---- responses ------------------------------------------------------------------
    @property
    def engine(self) -> Any:
        return self.services.engine

    def send_json(self, value: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(dumps(value))

    def query(self, name: str) -> str | None:
        """A query argument; invalid UTF-8 is a 400 (tornado raises HTTPError(400))."""
        return self.get_query_argument(name, None)

    def int_query(self, name: str, default: int | None, low: int, high: int) -> int | None:
        raw = self.query(name)
        if raw is None:
            return default
        if not raw.strip().isdigit() or not low <= int(raw) <= high:
            raise BadRequest(f"query parameter '{name}' must be an integer from {low} to {high}", field=name)
        return int(raw)


_wrap_methods(BaseHandler)


class NotFoundHandler(BaseHandler):
    """Every unknown route is a JSON 404 (the route table says where the key comes first)."""

    async def admit(self) -> None:
        pass  # nothing to size or wait for: the answer is a 404 whatever comes

    def get(self, *args: Any) -> None:
        raise NotFound(f"no route matches {self.request.method} {self.request.path[:200]}")

    head = post = put = patch = delete = options = get
