"""Every route of the route table, walked with bad input: each answer has the one error
shape, the right status, no traceback, and nothing is ever a 500."""

from __future__ import annotations

import http.client
import json
import socket

import pytest

from era_server.routes import ROUTES
from tests.support.api_errors import assert_error_shape, sample_path
from tests.support.era_server import MAIN_ENV, shared_server

MAX_BODY = int(MAIN_ENV["ERA_MAX_BODY"])
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
ROUTE_METHODS = [(r.template, m.upper(), op) for r in ROUTES for m, op in r.handler.API.items()]
HANDLERS = {r.template: r.handler for r in ROUTES}
SESSION_ID = "err-walk"

BAD_IDS = ["absent-session", "bad%00id", "%E2%80%AEevil", "a" * 4096, "%FF%FE", "a%2Fb", "..", "%0d%0aX:%20y"]
MALFORMED = [b'{"code": ', b"[" * 20000 + b"]" * 20000, b'{"a":' * 20000 + b"1" + b"}" * 20000, b"\xff\xfe",
             b"[1, 2]", b'"text"', b'{"x": NaN}', b'{"deep": ' + b"[" * 100 + b"]" * 100 + b"}"]
BAD_FIELDS = {
    "CreateSession": [{"id": "bad id!"}, {"language": "--privileged"}, {"env": {"A": "x\u0000"}},
                      {"default_timeout": 0}, {"metadata": []}, {"limits": {"memory_mib": 1}},
                      {"allowPublicAccess": "yes"}, {"typecheck": 1}],
    "CreateVm": [{"network_mode": "bridge"}, {"memory_mib": 1}, {"memory_mib": "512"}, {"cpu_count": 0},
                 {"language": "cobol"}, {"persist": "yes"}],
    "CommandRequest": [{"command": 5}, {}, {"command": " "}, {"command": "ls", "timeout": 0},
                       {"command": "ls", "envs": {"1BAD": "x"}}],
    "SessionCommand": [{}, {"cmd": 5}, {"cmd": []}, {"cmd": ["a\u0000"]}, {"cmd": "ls", "shell": "yes"},
                       {"cmd": ["ls"], "timeout": 0}, {"cmd": ["ls"], "env": {"1BAD": "x"}}, {"cmd": ["ls"], "args": [5]},
                       {"cmd": ["ls"], "cwd": "../up"}, {"cmd": ["ls"], "stdin": 5}],
    "ProcessInput": [{"data": 5}, {"data": "x", "eof": "yes"}],
    "ProcessSignal": [{}, {"signal": 9}, {"signal": "SIGSYS"}, {"signal": "kill -9"}],
    "PatchSession": [{"default_timeout": 0}, {"default_timeout": "1"}, {"data": "x"}],
    "RunRequest": [{"code": 5}, {"code": "1", "timeout": -1}, {"code": "1", "env": {"1BAD": "x"}}],
    "ExecuteRequest": [{"code": 5}, {"code": "1", "language": "cobol"}, {"code": "1", "files": []}],
    "DuplicateRequest": [{"id": "x" * 200}, {"id": "a/b"}],
    "BulkDelete": [{"ids": "x"}, {"prefix": 5}],
    "code": [{"code": 5}, {"nocode": "x"}],
    "StartKernel": [{"name": 5}, {"env": "x"}, {"env": []}],
    "KvPut": [{}, {"value": 5}, {"value": "x", "metadata": []}],
    "D1Body": [{}, {"sql": 5}, {"sql": " "}, {"sql": "SELECT ?", "params": "x"}, {"sql": "SELECT ?", "params": [{}]}],
    "R2Put": [{}, {"content": 5}, {"content": "not base64!"}, {"content": "", "metadata": {"a": 1}}],
    "ScheduleRequest": [{}, {"cron": 5}, {"cron": "61 * * * *"}, {"cron": "* * * * *", "timezone": "Mars/Base"},
                        {"cron": "* * * * *", "code": "1", "timezone": 3}, {"cron": "* * * * *"}],
}


@pytest.fixture(scope="module")
def server():
    srv = shared_server()
    status, _ = srv.request("GET", f"/api/sessions/{SESSION_ID}")
    if status == 404:
        srv.json("POST", "/api/sessions", {"id": SESSION_ID}, expect=201)
    return srv


def ids(params):
    return [f"{m} {t}" for t, m, *_ in params]


SESSION_ROUTES = [r for r in ROUTE_METHODS if "{id}" in r[0]]
BODY_ROUTES = [r for r in ROUTE_METHODS if r[2].body not in (None, "bytes")]
# /proxy streams bodies to the session's app under a limit of its own (ERA_PROXY_MAX_BODY,
# tests/test_server_proxy.py), not ERA_MAX_BODY.
LIMITED_ROUTES = [r for r in ROUTE_METHODS if r[0] != "/health" and not r[0].endswith("/ws")
                  and not r[0].startswith("/proxy/")]


@pytest.mark.parametrize("template, method, op", SESSION_ROUTES, ids=ids(SESSION_ROUTES))
def test_unknown_and_malformed_session_ids(server, template, method, op):
    for bad in BAD_IDS:
        body = b"x" if op.body == "bytes" else None
        status, data = server.request(method, sample_path(template, bad), body)
        # The WebSocket route answers a plain GET with 400 before looking the session up.
        assert_error_shape(status, data, (400, 404))


@pytest.mark.parametrize("template, method, op", BODY_ROUTES, ids=ids(BODY_ROUTES))
def test_malformed_and_invalid_bodies(server, template, method, op):
    path = sample_path(template, SESSION_ID)
    for raw in MALFORMED:
        status, data = server.request(method, path, raw, {"Content-Type": "application/json"})
        assert_error_shape(status, data, 400)
    for body in BAD_FIELDS[op.body]:
        status, data = server.request(method, path, body)
        doc = assert_error_shape(status, data, (400, 422))
        assert doc.get("field"), doc


@pytest.mark.parametrize("template, method, op", LIMITED_ROUTES, ids=ids(LIMITED_ROUTES))
def test_bodies_over_the_limit_are_413(server, template, method, op):
    status, data = server.request(method, sample_path(template, SESSION_ID), b"x" * (MAX_BODY + 1))
    assert_error_shape(status, data, 413)


@pytest.mark.parametrize("template", list(HANDLERS))
def test_methods_a_route_does_not_have_are_405(server, template):
    handler = HANDLERS[template]
    for method in [m for m in METHODS if m.lower() not in handler.API] + ["FOO"]:
        status, headers, data = server.request_full(method, sample_path(template, SESSION_ID))
        assert_error_shape(status, data, 405)
        if method != "FOO":
            assert set(headers["Allow"].split(", ")) == {m.upper() for m in handler.API}


@pytest.mark.parametrize("method, path", [("GET", "/console/nope.js"), ("GET", "/nope"), ("GET", "/api/nope"),
                                          ("POST", "/api/sessions/x/unknown"), ("GET", "/api/sessions/x/files/"),
                                          ("DELETE", "/api/sessions/x/y/z"), ("GET", "/health/x")])
def test_unknown_routes_are_json_404(server, method, path):
    status, data = server.request(method, path)
    assert_error_shape(status, data, 404)


def test_invalid_utf8_in_query_is_400(server):
    status, data = server.request("GET", f"/api/sessions/{SESSION_ID}/runs?limit=%FF")
    assert_error_shape(status, data, 400)


def test_chunked_body_over_the_limit_is_413(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    chunks = (b"x" * 65536 for _ in range(MAX_BODY // 65536 + 2))
    conn.request("POST", f"/api/sessions/{SESSION_ID}/run", body=chunks, encode_chunked=True,
                 headers={"Transfer-Encoding": "chunked"})
    response = conn.getresponse()
    assert_error_shape(response.status, response.read(), 413)
    conn.close()


def test_large_upload_gets_a_readable_413(server):
    # Twice the limit: drained, so the client reads the answer instead of a reset.
    status, data = server.request("PUT", f"/api/sessions/{SESSION_ID}/files/big.bin", b"x" * (2 * MAX_BODY))
    assert_error_shape(status, data, 413)


def test_huge_declared_body_is_refused_without_reading_it(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        conn.sendall(f"PUT /api/sessions/{SESSION_ID}/files/x HTTP/1.1\r\nHost: x\r\n"
                     f"Content-Length: {100 * MAX_BODY}\r\n\r\n".encode())
        answer = conn.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert_error_shape(413, body[: int(dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
                                       [b"Content-Length"])], 413)


def test_nothing_was_ever_a_500(server):
    # 502 is /proxy's answer when nothing listens on the session's port: the app's, not ours.
    bad = [e for e in server.logs() if e.get("event") == "request" and e["status"] >= 500 and e["status"] != 503
           and not (e["status"] == 502 and e["path"].startswith("/proxy/"))]
    assert not bad, bad
    assert not [e for e in server.logs() if e.get("level") == "ERROR"], "errors were logged"
    assert all("Traceback" not in line for line in server.lines if '"event": "request"' in line)
    json.dumps(server.logs())
