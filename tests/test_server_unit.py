"""Server pieces that need no kernel: JSON parsing, auth, the route table, OpenAPI, logs,
the early /health responder, error mapping."""

from __future__ import annotations

import json
import logging
import re
import socket
import sys
import time

import pytest
from tornado.web import HTTPError, RequestHandler

from era_kernel.errors import BadRequest, EraError, Unauthorized
from era_server import auth, boot
from era_server.routes import PARAM_PATTERNS, ROUTES, route_pattern
from era_server.errors import Forbidden, as_era_error, error_headers, error_json, http_status
from era_server.handlers.base import MAX_JSON_DEPTH, BaseHandler, parse_json
from era_server.handlers.files import attachment_header, guess_type
from era_server.logs import JsonFormatter, redact

# ---- JSON bodies ----------------------------------------------------------------------------


def test_parse_json_accepts_objects_and_empty_bodies():
    assert parse_json(b'{"a": [1, {"b": null}]}') == {"a": [1, {"b": None}]}
    assert parse_json(b"  ") is None
    assert parse_json('{"x": "\u00e9"}') == {"x": "\u00e9"}


@pytest.mark.parametrize("raw, words", [
    (b'{"a": ', "not valid JSON"),
    (b"\xff\xfe{}", "UTF-8"),
    (b'{"timeout": NaN}', "NaN"),
    (b'{"n": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b"[" * 20000 + b"]" * 20000, "nested"),
    (b'{"a":' * 20000 + b"1" + b"}" * 20000, "nested"),
    (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), "nested"),
])
def test_parse_json_refuses_with_a_sentence(raw, words):
    with pytest.raises(BadRequest) as info:
        parse_json(raw)
    assert words in info.value.message
    assert http_status(info.value) == 400


def test_depth_limit_allows_reasonable_nesting():
    depth = MAX_JSON_DEPTH
    assert parse_json(b"[" * depth + b"]" * depth) is not None


# ---- auth -------------------------------------------------------------------------------------


def test_bearer_parsing_and_constant_time_check():
    key = b"s3cret-key"
    assert auth.bearer_token("Bearer abc") == "abc"
    assert auth.bearer_token("bearer   abc ") == "abc"
    assert auth.bearer_token("Basic abc") is None
    assert auth.bearer_token(None) is None
    auth.require_api_key(key, "Bearer s3cret-key")
    auth.require_api_key(key, None, "s3cret-key")
    auth.require_api_key(None, None)  # no key configured: open
    for header, query in [(None, None), ("Bearer wrong", None), ("Bearer s3cret-ke", None),
                          ("s3cret-key", None), (None, "wrong"), ("Bearer \u00e9", None)]:
        with pytest.raises(Unauthorized):
            auth.require_api_key(key, header, query)


def test_origin_is_an_exact_match():
    allowed = frozenset({"https://trusted.example.com"})
    assert auth.origin_allowed("https://trusted.example.com", "api:1", allowed)
    assert auth.origin_allowed("https://trusted.example.com/", "api:1", allowed)
    for origin in ("https://trusted.example.com.evil.com", "https://evil.com", "http://trusted.example.com",
                   "https://trusted.example.com:444", "https://xtrusted.example.com", "null", ""):
        assert not auth.origin_allowed(origin, "api:1", allowed), origin
    with pytest.raises(Forbidden):
        auth.require_origin("https://trusted.example.com.evil.com", "api:1", allowed)
    auth.require_origin(None, "api:1", allowed)  # non-browser clients send no Origin
    # Without an allow-list, only the server's own host.
    assert auth.origin_allowed("http://127.0.0.1:8787", "127.0.0.1:8787", frozenset())
    assert not auth.origin_allowed("http://evil.com", "127.0.0.1:8787", frozenset())


# ---- route table and OpenAPI ---------------------------------------------------------------


def implemented_methods(handler: type[RequestHandler]) -> set[str]:
    base = BaseHandler if issubclass(handler, BaseHandler) else RequestHandler
    return {m.lower() for m in handler.SUPPORTED_METHODS
            if getattr(handler, m.lower()) is not getattr(base, m.lower())}


def test_every_route_declares_exactly_the_methods_it_implements():
    seen = set()
    for template, handler in ((r.template, r.handler) for r in ROUTES):
        assert template not in seen
        seen.add(template)
        assert handler.API, template
        implemented = implemented_methods(handler)
        if template.endswith("/ws"):
            implemented = {"get"}
        if template.startswith("/proxy/"):  # HEAD and OPTIONS are relayed as they come (said in the op's text)
            implemented -= {"head", "options"}
        assert set(handler.API) == implemented, (template, set(handler.API), implemented)
        assert all(p in PARAM_PATTERNS for p in re.findall(r"\{(\w+)\}", template))
        assert "{" not in route_pattern(template)


def test_openapi_document_covers_the_route_table_and_is_valid():
    from era_server.openapi import build_openapi

    doc = build_openapi(ROUTES)
    assert set(doc["paths"]) == {r.template for r in ROUTES}
    for route in ROUTES:
        assert set(doc["paths"][route.template]) == set(route.handler.API)
    create = doc["paths"]["/api/sessions"]["post"]
    schema_name = create["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert "language" in doc["components"]["schemas"][schema_name]["properties"]
    assert "201" in create["responses"] and "409" in create["responses"]
    assert doc["paths"]["/health"]["get"]["security"] == []
    json.dumps(doc)
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(doc)


# ---- error mapping ---------------------------------------------------------------------------


def test_errors_map_to_one_shape_without_internals():
    err = as_era_error(HTTPError(404), "GET", "/nope", [], 404)
    assert json.loads(error_json(err)) == {"error": "no route matches GET /nope", "status_code": 404}
    err = as_era_error(HTTPError(405), "PUT", "/api/sessions", ["GET", "POST"], 405)
    assert http_status(err) == 405 and "GET, POST" in err.message
    err = as_era_error(HTTPError(400, "Invalid unicode in %s: %r", "url", b"\xff"), "GET", "/x", [], 400)
    assert http_status(err) == 400 and "UTF-8" in err.message
    err = as_era_error(RecursionError("deep"), "POST", "/x", [], 500)
    assert http_status(err) == 422
    err = as_era_error(KeyError("/etc/secret path"), "POST", "/x", [], 500)
    assert http_status(err) == 500 and "secret" not in error_json(err)
    assert json.loads(error_json(BadRequest("bad", field="code"))) == {
        "error": "bad", "status_code": 400, "field": "code"}
    assert isinstance(as_era_error(Unauthorized("no"), "GET", "/", [], 500), EraError)


def test_engine_errors_carry_no_status_and_the_server_maps_each_kind():
    from era_kernel import errors
    from era_server.errors import NotReady, TooManySockets

    expected = {errors.Invalid: 400, errors.BadRequest: 400, errors.Unauthorized: 401, Forbidden: 403,
                errors.NotFound: 404, errors.Conflict: 409, errors.SetupPending: 409, errors.TooLarge: 413,
                errors.Unprocessable: 422, errors.Busy: 429, errors.TooManyKernels: 429, TooManySockets: 429,
                errors.Unavailable: 503, errors.KernelFailed: 503, NotReady: 503, errors.EraError: 500}
    for cls, status in expected.items():
        err = cls("x")
        assert not hasattr(err, "status") and not hasattr(err, "headers"), cls
        assert http_status(err) == status, cls

    class Unmapped(errors.Conflict):  # a new kind answers as its nearest mapped base
        pass

    assert http_status(Unmapped("x")) == 409 and http_status(ValueError("x")) == 500
    # retry_after is data; the server makes the header (whole seconds, at least 1).
    assert error_headers(errors.Busy("full", retry_after=2)) == {"Retry-After": "2"}
    assert error_headers(errors.SetupPending("setup still running"))["Retry-After"]
    assert error_headers(errors.Busy("full", retry_after=0.2)) == {"Retry-After": "1"}
    assert error_headers(errors.KernelFailed("dead")) == {} == error_headers(errors.Conflict("taken"))


# ---- socket caps -----------------------------------------------------------------------------


def test_socket_slots_count_per_session_and_client_and_give_back_once():
    from era_server.errors import TooManySockets
    from era_server.services import SocketSlots

    slots = SocketSlots(per_session=2, per_client=3)
    a1, a2 = slots.take("s1", "addr:a"), slots.take("s1", "addr:a")
    with pytest.raises(TooManySockets) as err:
        slots.take("s1", "addr:b")  # the session is full, whoever asks
    assert http_status(err.value) == 429 and error_headers(err.value)["Retry-After"] and \
        "ERA_MAX_SOCKETS_PER_SESSION" in err.value.message
    a3 = slots.take("s2", "addr:a")
    with pytest.raises(TooManySockets, match="ERA_MAX_SOCKETS_PER_CLIENT"):
        slots.take("s3", "addr:a")
    a1()
    a1()  # a second release (on_close after on_finish, say) gives nothing back twice
    assert slots.sessions == {"s1": 1, "s2": 1} and slots.clients == {"addr:a": 2}
    for release in (a2, a3, slots.take("s3", "addr:a")):
        release()
    assert not slots.sessions and not slots.clients  # no entry left per session or address seen
    from era_kernel.config import Settings

    for name in ("ERA_MAX_SOCKETS_PER_SESSION", "ERA_MAX_SOCKETS_PER_CLIENT", "ERA_LIST_MAX"):
        with pytest.raises(ValueError, match="at least 1"):  # a cap of 0 would refuse everything
            Settings.from_env({name: "0"})


# ---- downloads -------------------------------------------------------------------------------


def test_attachment_header_is_safe_for_any_name():
    assert attachment_header("a/b/report.html") == "attachment; filename=\"report.html\"; filename*=UTF-8''report.html"
    header = attachment_header('x/e"vil;\r\nSet-Cookie: a=b.txt')
    assert "\r" not in header and "\n" not in header and header.count('"') == 2
    assert "filename*=UTF-8''%C3%A9t%C3%A9.txt" in attachment_header("\u00e9t\u00e9.txt")
    assert guess_type("a.png") == "image/png"
    assert guess_type("a.tar.gz") == "application/octet-stream"
    assert guess_type("noext") == "application/octet-stream"


# ---- logs ------------------------------------------------------------------------------------


def test_log_lines_are_json_and_never_carry_tokens():
    redact.secrets = ["the-api-key-123"]
    try:
        formatter = JsonFormatter()
        record = logging.LogRecord("era.server", logging.ERROR, __file__, 1,
                                   "headers: Authorization: Bearer abc.def url /x?token=zzz&a=1 key the-api-key-123",
                                   (), None)
        record.session_id = "s1"
        try:
            raise ValueError("Cookie: token=qqq; Referer: http://h/?access_token=ppp")
        except ValueError:
            record.exc_info = sys.exc_info()
        line = formatter.format(record)
        entry = json.loads(line)
        assert entry["session_id"] == "s1" and entry["level"] == "ERROR"
        for secret in ("abc.def", "zzz", "the-api-key-123", "qqq", "ppp"):
            assert secret not in line, secret
        assert "a=1" in line
    finally:
        redact.secrets = []


# ---- boot ------------------------------------------------------------------------------------


def test_parse_args():
    assert boot.parse_args(["--host", "0.0.0.0", "--port=9"]) == {"ERA_HOST": "0.0.0.0", "ERA_PORT": 9}
    assert boot.parse_args([]) == {}
    for bad in (["--port", "x"], ["--port"], ["--what"], ["--port", "70000"]):
        with pytest.raises(boot.UsageError):
            boot.parse_args(bad)


def _http(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(raw)
        chunks = []
        while True:
            data = conn.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


def test_early_responder_answers_health_and_hands_off_the_rest_unread():
    listener = boot.bind("127.0.0.1", 0)
    port = listener.getsockname()[1]
    responder = boot.EarlyResponder(listener)
    responder.start()
    try:
        answer = _http(port, b"GET /health?probe=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 OK")
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {"status": "ok", "ready": False, "state": "starting"}
        other = socket.create_connection(("127.0.0.1", port), timeout=5)
        request = b"POST /api/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
        other.sendall(request)
        deadline = time.monotonic() + 5
        while not responder.handoff and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        handoff = responder.stop()
    assert responder.answered == 1
    assert len(handoff) == 1
    conn, _ = handoff[0]
    conn.setblocking(True)
    assert conn.recv(4096) == request  # tornado gets every byte
    conn.close()
    other.close()
    listener.close()


def test_main_refuses_bad_arguments_without_starting(capsys):
    import era_server

    assert era_server.main(["--port", "not-a-port"]) == 2
    assert "--port must be an integer" in capsys.readouterr().err
