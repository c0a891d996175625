"""With ERA_API_KEY set: every route of the route table (so a new route cannot skip this)
answers 401 without the key; WebSocket Origin is an exact match; tokens never reach the
logs (docs/security.md cases 23-24)."""

from __future__ import annotations

import json

import pytest
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from era_server.routes import ROUTES
from tests.support.api_errors import assert_error_shape, sample_path
from tests.support.era_server import ServerProcess

KEY = "era-test-key-5f1c2b9a"
TRUSTED = "https://trusted.example.com"
ROUTE_METHODS = [(r.template, m.upper()) for r in ROUTES for m in r.handler.API]
HANDLERS = {r.template: r.handler for r in ROUTES}
OPEN = {r.template for r in ROUTES if not r.auth}
# A session's ports: without the key, a session that does not allow public access answers
# ERA's 403 with a hint (tests/test_server_proxy.py covers allowPublicAccess itself).
PROXIED = {r.template for r in ROUTES if r.template.startswith("/proxy/")}
HARMLESS = {("/api/sessions", "DELETE"): {"ids": ["absent-session"]}, ("/api/sessions", "POST"): {"id": "bad id!"}}
# The last: a forged storage session token (the storage routes take a session's token too).
WRONG = ["", "Bearer", "Bearer wrong", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", f"Basic {KEY}", KEY,
         "Bearer era_st.auth-s.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"]


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(env={"ERA_API_KEY": KEY, "ERA_ALLOWED_ORIGINS": f"{TRUSTED}, https://other.example"})
    srv.start()
    srv.json("POST", "/api/sessions", {"id": "auth-s"}, {"Authorization": f"Bearer {KEY}"}, expect=201)
    yield srv
    srv.cleanup()


def test_only_health_is_open():
    assert OPEN == {"/health"}


@pytest.mark.parametrize("template, method", ROUTE_METHODS, ids=[f"{m} {t}" for t, m in ROUTE_METHODS])
def test_every_route_needs_the_key(server, template, method):
    path = sample_path(template, "auth-s")
    if template in OPEN:
        assert server.request(method, path)[0] == 200
        return
    refused = 403 if template in PROXIED else 401
    for header in WRONG:
        status, headers, body = server.request_full(method, path, b"{}", {"Authorization": header} if header else {})
        assert_error_shape(status, body, refused)
        if refused == 401:
            assert headers["WWW-Authenticate"].startswith("Bearer")
    if not HANDLERS[template].QUERY_TOKEN:  # only WebSockets may carry the key in the query
        status, body = server.request(method, f"{path}?token={KEY}")
        assert_error_shape(status, body, refused)
    # With the key the request gets past auth (whatever it then answers; nothing is created or lost).
    status, _ = server.request(method, sample_path(template, "absent-session"), HARMLESS.get((template, method)),
                               {"Authorization": f"Bearer {KEY}"})
    assert status != 401


@pytest.mark.parametrize("template", [t for t in HANDLERS if t not in OPEN])
def test_methods_a_route_lacks_are_401_before_405(server, template):
    handler = HANDLERS[template]  # (the proxy routes take every method)
    for method in [m for m in ("GET", "POST", "PUT", "PATCH", "DELETE") if m.lower() not in handler.API]:
        assert_error_shape(*server.request(method, sample_path(template, "auth-s")), 401)


def test_unknown_api_routes_do_not_reveal_themselves_without_the_key(server):
    assert_error_shape(*server.request("GET", "/api/no-such-route"), 401)
    assert_error_shape(*server.request("GET", "/api/no-such-route", None, {"Authorization": f"Bearer {KEY}"}), 404)
    assert_error_shape(*server.request("GET", "/elsewhere"), 404)


def ws_request(server, query="", headers=None):
    return HTTPRequest(f"{server.ws_base}/api/sessions/auth-s/ws{query}", headers=headers or {})


async def test_websocket_auth_by_header_or_query_token(server):
    for request in (ws_request(server), ws_request(server, "?token=wrong"),
                    ws_request(server, headers={"Authorization": "Bearer wrong"})):
        with pytest.raises(HTTPClientError) as info:
            await websocket_connect(request)
        assert info.value.code == 401
        assert json.loads(info.value.response.body)["status_code"] == 401
    for request in (ws_request(server, f"?token={KEY}"),
                    ws_request(server, headers={"Authorization": f"Bearer {KEY}"})):
        conn = await websocket_connect(request)
        assert json.loads(await conn.read_message())["type"] == "status"
        conn.close()


@pytest.mark.parametrize("origin, allowed", [
    (TRUSTED, True), ("https://other.example", True), (TRUSTED + "/", True),
    ("https://trusted.example.com.evil.com", False), ("https://evil.com", False), ("http://trusted.example.com", False),
    ("https://trusted.example.com:8443", False), ("null", False),
])
async def test_websocket_origin_is_an_exact_match(server, origin, allowed):
    request = ws_request(server, f"?token={KEY}", {"Origin": origin})
    if allowed:
        (await websocket_connect(request)).close()
    else:
        with pytest.raises(HTTPClientError) as info:
            await websocket_connect(request)
        assert info.value.code == 403


def test_no_token_reaches_the_logs(server):
    secrets = {"header": "hdr-secret-111", "query": "qry-secret-222", "cookie": "ck-secret-333",
               "referer": "ref-secret-444"}
    server.request("GET", f"/api/sessions?token={secrets['query']}&access_token={secrets['query']}",
                   None, {"Authorization": f"Bearer {secrets['header']}", "Cookie": f"token={secrets['cookie']}",
                          "Referer": f"http://x/?token={secrets['referer']}"})
    server.request("GET", f"/api/sessions/auth-s?token={KEY}", None,
                   {"Authorization": f"Bearer {KEY}", "Cookie": f"session={KEY}", "Referer": f"http://x/?k={KEY}"})
    server.request("POST", "/api/sessions/auth-s/run", {"code": "print(1)", "env": {"SECRET_ENV": "env-secret-555"}},
                   {"Authorization": f"Bearer {KEY}"})
    logged = "\n".join(server.lines)
    assert '"event": "request"' in logged
    for secret in [KEY, "env-secret-555", *secrets.values()]:
        assert secret not in logged, secret
    access = [e for e in server.logs() if e.get("event") == "request"]
    assert all("?" not in e["path"] for e in access)
