"""A session's ports from outside, on both provisioners, against one real server: an
``http.server`` and a tornado app (streaming, uploads, WebSocket echo) started in a run
answer through ``/proxy`` and the ``ERA_PROXY_HOST`` form while the session itself still
cannot connect anywhere; one session's proxy does not reach another's port;
``allowPublicAccess`` off (the key, or ERA's 403) and on; ERA's relay mode; 502 with a
hint when nothing listens."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time

import pytest
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from tests.support.api_errors import assert_error_shape
from tests.support.era_server import ServerProcess

from .conftest import require_docker

KEY = "proxy-test-key-93c1"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROXY_HOST = "{port}-{id}.ports.test"
HTTP_PORT, APP_PORT, NOBODY_PORT = 8001, 8002, 8999
PROVISIONERS = ["local", "docker"]
PROXY_MAX_BODY = 32 * 1024**2

# Started in a run: a plain http.server on HTTP_PORT (serving the workspace) and a tornado
# app on APP_PORT, each in a thread of the kernel; the run returns once both listen.
APPS = f"""
import asyncio, functools, hashlib, http.server, json, socket, threading, time

def _plain():
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory='.')
    http.server.ThreadingHTTPServer(('127.0.0.1', {HTTP_PORT}), handler).serve_forever()

def _app():
    import tornado.httpserver, tornado.web, tornado.websocket
    asyncio.set_event_loop(asyncio.new_event_loop())

    class Echo(tornado.web.RequestHandler):
        def get(self):
            self.write({{"path": self.request.path, "query": self.request.query,
                        "headers": dict(self.request.headers)}})

    class Stream(tornado.web.RequestHandler):
        async def get(self):
            for i in range(3):
                self.write(f"part{{i}}\\n")
                await self.flush()
                await asyncio.sleep(0.4)

    @tornado.web.stream_request_body
    class Upload(tornado.web.RequestHandler):
        def prepare(self):
            self.digest, self.size = hashlib.sha256(), 0
        def data_received(self, chunk):
            self.digest.update(chunk)
            self.size += len(chunk)
        def post(self):
            self.write({{"size": self.size, "sha256": self.digest.hexdigest()}})

    class Echoes(tornado.websocket.WebSocketHandler):
        def check_origin(self, origin):
            return True
        def on_message(self, message):
            self.write_message(message, binary=isinstance(message, bytes))

    app = tornado.web.Application([(r"/echo.*", Echo), (r"/stream", Stream), (r"/upload", Upload),
                                   (r"/ws", Echoes)])
    tornado.httpserver.HTTPServer(app, max_body_size=64 * 2**20).listen({APP_PORT}, '127.0.0.1')
    asyncio.get_event_loop().run_forever()

for target in (_plain, _app):
    threading.Thread(target=target, daemon=True).start()
for port in ({HTTP_PORT}, {APP_PORT}):
    for _ in range(100):
        try:
            socket.create_connection(('127.0.0.1', port), 1).close()
            break
        except OSError:
            time.sleep(0.05)
print('listening')
"""


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(env={"ERA_API_KEY": KEY, "ERA_PROXY_HOST": PROXY_HOST,
                             "ERA_PROXY_MAX_BODY": str(PROXY_MAX_BODY)}).start()
    yield srv
    srv.cleanup()


@pytest.fixture(scope="module")
def sessions(server):
    """provisioner -> a session whose run started both apps."""
    made = {}
    for provisioner in PROVISIONERS:
        sid = f"px-{provisioner}"
        server.json("POST", "/api/sessions", {"id": sid, "provisioner": provisioner}, AUTH, expect=201)
        server.request("PUT", f"/api/sessions/{sid}/files/hello.txt", b"hello from the sandbox\n", AUTH)
        made[provisioner] = sid
    return made


@pytest.fixture(params=PROVISIONERS)
def sid(request, server, sessions):
    if request.param == "docker":
        require_docker()
    sid = sessions[request.param]
    status, _ = server.request("GET", f"/proxy/{sid}/{APP_PORT}/echo", None, AUTH)
    if status != 200:  # first use on this provisioner: start the apps
        result = server.json("POST", f"/api/sessions/{sid}/run", {"code": APPS, "timeout": 60}, AUTH)
        assert result["stdout"] == "listening\n", result
    return sid


def _run(server, sid, code):
    result = server.json("POST", f"/api/sessions/{sid}/run", {"code": code, "timeout": 30}, AUTH)
    assert result["exit_code"] == 0, result
    return result["stdout"]


def test_an_http_server_in_a_run_answers_while_the_session_reaches_nothing(server, sid):
    status, headers, body = server.request_full("GET", f"/proxy/{sid}/{HTTP_PORT}/hello.txt", None, AUTH)
    assert (status, body) == (200, b"hello from the sandbox\n")
    csp = headers["Content-Security-Policy"]
    assert csp.startswith("sandbox ") and "allow-scripts" in csp and "allow-same-origin" not in csp
    # The session still has no network: not the server it is proxied by, not the host.
    probe = (f"import socket\nfor addr in [('127.0.0.1', {server.port}), ('10.255.255.1', 80)]:\n"
             "    try:\n        socket.create_connection(addr, 1); print('reached', addr)\n"
             "    except OSError:\n        print('refused')\n")
    assert _run(server, sid, probe) == "refused\nrefused\n"


def test_method_path_query_and_headers_go_through_but_our_key_does_not(server, sid):
    status, headers, body = server.request_full("GET", f"/proxy/{sid}/{APP_PORT}/echo/a/b%20c%3Fd?x=1&y=%20z",
                                                None, {**AUTH, "X-App": "yes"})
    seen = json.loads(body)
    assert status == 200, body
    assert (seen["path"], seen["query"]) == ("/echo/a/b%20c%3Fd", "x=1&y=%20z")  # as sent, still encoded
    assert len(headers.get_all("Date")) == 1  # the app's, not the app's and ours
    assert seen["headers"]["X-App"] == "yes" and seen["headers"]["X-Forwarded-Prefix"] == f"/proxy/{sid}/{APP_PORT}"
    assert "Authorization" not in seen["headers"] and KEY not in body.decode()
    # The bare form reaches the app's "/" (here, the directory listing of http.server).
    status, body = server.request("GET", f"/proxy/{sid}/{HTTP_PORT}", None, AUTH)
    assert status == 200 and b"hello.txt" in body


def test_a_streamed_response_arrives_as_it_is_sent(server, sid):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", f"/proxy/{sid}/{APP_PORT}/stream", headers=AUTH)
    response = conn.getresponse()
    assert response.status == 200
    lines, arrived = [], []
    for line in response:
        lines.append(line)
        arrived.append(time.monotonic())
    conn.close()
    assert lines == [b"part0\n", b"part1\n", b"part2\n"]
    assert arrived[-1] - arrived[0] > 0.6  # as the app flushed, not all at the end


def test_a_10mb_upload_is_streamed_to_the_app(server, sid):
    data = os.urandom(10 * 1024**2)
    status, body = server.request("POST", f"/proxy/{sid}/{APP_PORT}/upload", data, AUTH, timeout=60)
    assert status == 200, body[:300]
    assert json.loads(body) == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def chunks():  # without a Content-Length: chunked on the way in and on the way up
        for i in range(0, len(data), 1024**2):
            yield data[i:i + 1024**2]

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", f"/proxy/{sid}/{APP_PORT}/upload", chunks(), AUTH, encode_chunked=True)
    response = conn.getresponse()
    assert json.loads(response.read())["sha256"] == hashlib.sha256(data).hexdigest()
    conn.close()


async def test_a_websocket_echo_through_the_proxy(server, sid):
    url = f"{server.ws_base}/proxy/{sid}/{APP_PORT}/ws"
    ws = await websocket_connect(HTTPRequest(url, headers=AUTH))
    try:
        for message in ["hello", b"\x00\x01binary", "x" * 200_000]:
            await ws.write_message(message, binary=isinstance(message, bytes))
            assert await ws.read_message() == message
    finally:
        ws.close()
    with pytest.raises(Exception):  # the key is needed for the upgrade too
        await websocket_connect(url)


def test_the_host_form_reaches_the_same_port_on_an_origin_of_its_own(server, sid):
    host = PROXY_HOST.format(port=APP_PORT, id=sid)
    answer = server.json("GET", f"/api/sessions/{sid}/host?port={APP_PORT}", None, AUTH)
    assert answer == {"url": f"http://{host}/", "session_id": sid, "port": APP_PORT}
    # /api/... on a port's host name is the app's path, never our API.
    status, headers, body = server.request_full("GET", "/api/sessions?q=1", None, {**AUTH, "Host": host})
    assert status == 404 and "Content-Security-Policy" not in headers  # tornado's 404 from the app
    status, body = server.request("GET", "/echo/h?k=v", None, {**AUTH, "Host": host})
    seen = json.loads(body)
    assert (status, seen["path"], seen["query"]) == (200, "/echo/h", "k=v")
    assert_error_shape(*server.request("GET", "/echo", None, {"Host": host}), 403)


def test_a_session_cannot_reach_another_sessions_port(server, sessions, sid):
    other = "px-other"
    if server.request("GET", f"/api/sessions/{other}", None, AUTH)[0] == 404:
        server.json("POST", "/api/sessions", {"id": other}, AUTH, expect=201)
    # Session A's app listens on APP_PORT; B's proxy for that port reaches B's own sandbox.
    status, body = server.request("GET", f"/proxy/{other}/{APP_PORT}/echo", None, AUTH)
    doc = json.loads(body)
    assert status == 502 and "nothing listens" in doc["error"] and "hint" in doc, doc
    assert _run(server, other, f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {APP_PORT}), 1)\n"
                               "    print('reached')\nexcept OSError:\n    print('refused')\n") == "refused\n"


def test_allow_public_access_off_needs_the_key_on_needs_none(server, sid):
    path = f"/proxy/{sid}/{APP_PORT}/echo"
    doc = assert_error_shape(*server.request("GET", path), 403)
    assert "allowPublicAccess" in doc["hint"]
    assert_error_shape(*server.request("GET", path, None, {"Authorization": "Bearer wrong"}), 403)
    server.json("PATCH", f"/api/sessions/{sid}", {"allowPublicAccess": True}, AUTH)
    try:
        status, body = server.request("GET", path)
        assert status == 200 and json.loads(body)["path"] == "/echo"
    finally:
        server.json("PATCH", f"/api/sessions/{sid}", {"allowPublicAccess": False}, AUTH)
    assert server.request("GET", path)[0] == 403


def test_nothing_listening_is_a_502_with_a_hint_and_bad_ports_a_400(server, sid):
    status, body = server.request("GET", f"/proxy/{sid}/{NOBODY_PORT}/", None, AUTH)
    doc = json.loads(body)
    assert status == 502 and doc["status_code"] == 502 and "127.0.0.1" in doc["hint"], doc
    for port in ("0", "65536", "http"):
        assert_error_shape(*server.request("GET", f"/proxy/{sid}/{port}/", None, AUTH), 400)
        assert_error_shape(*server.request("GET", f"/api/sessions/{sid}/host?port={port}", None, AUTH), 400)
    assert_error_shape(*server.request("GET", f"/proxy/absent-session/{APP_PORT}/", None, AUTH), 404)
    # Without the key an unknown session looks like a private one: ids cannot be probed.
    assert_error_shape(*server.request("GET", f"/proxy/absent-session/{APP_PORT}/"), 403)


RELAY = """
import json, os
if os.environ.get('ERA_HTTP_PATH') == '/fail':
    raise ValueError('relay failed on purpose')
if os.environ.get('ERA_HTTP_PATH') == '/text':
    print('plain words')
else:
    print(json.dumps({"status": 201, "contentType": "application/json", "headers": {"X-Relay": "yes"},
                      "body": {k: os.environ.get(k) for k in ["ERA_REQUEST_MODE", "ERA_HTTP_METHOD", "ERA_HTTP_PATH",
                               "ERA_HTTP_QUERY", "ERA_HTTP_BODY", "ERA_PROXY_URL"]}
                              | {"headers": json.loads(os.environ['ERA_HTTP_HEADERS'])}}))
"""


def test_relay_mode_runs_the_stored_code_with_eras_variables(server, sid):
    relay = f"{sid}-relay"
    if server.request("GET", f"/api/sessions/{relay}", None, AUTH)[0] == 404:
        provisioner = sid.removeprefix("px-")
        server.json("POST", "/api/sessions", {"id": relay, "provisioner": provisioner}, AUTH, expect=201)
        server.json("PUT", f"/api/sessions/{relay}/code", {"code": RELAY}, AUTH)
    status, headers, body = server.request_full("POST", f"/proxy/{relay}/{NOBODY_PORT}/hook?a=1", b'{"event": "x"}',
                                                {**AUTH, "X-Sender": "test"})
    assert status == 201 and headers["X-Relay"] == "yes" and headers["Content-Type"] == "application/json", body
    seen = json.loads(body)
    assert {k: v for k, v in seen.items() if k != "headers"} == {
        "ERA_REQUEST_MODE": "proxy", "ERA_HTTP_METHOD": "POST", "ERA_HTTP_PATH": "/hook", "ERA_HTTP_QUERY": "a=1",
        "ERA_HTTP_BODY": '{"event": "x"}',
        "ERA_PROXY_URL": f"http://{PROXY_HOST.format(port=NOBODY_PORT, id=relay)}/"}
    assert seen["headers"]["X-Sender"] == "test" and "Authorization" not in seen["headers"]
    status, headers, body = server.request_full("GET", f"/proxy/{relay}/{NOBODY_PORT}/text", None, AUTH)
    assert (status, body, headers["Content-Type"].split(";")[0]) == (200, b"plain words\n", "text/plain")
    status, body = server.request("GET", f"/proxy/{relay}/{NOBODY_PORT}/fail", None, AUTH)
    assert status == 500 and b"relay failed on purpose" in body
    # The body travels in an environment variable: past 1 MiB it is refused, not truncated.
    assert_error_shape(*server.request("POST", f"/proxy/{relay}/{NOBODY_PORT}/big", b"x" * (1024**2 + 1), AUTH), 413)


def test_a_body_declared_over_the_proxy_limit_is_413(server, sid):
    import socket

    with socket.create_connection(("127.0.0.1", server.port), 10) as conn:
        conn.sendall(f"POST /proxy/{sid}/{APP_PORT}/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Length: {PROXY_MAX_BODY + 1}\r\n\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:300]
    assert_error_shape(413, body, 413)


def test_a_session_with_internet_access_has_its_own_loopback(server, sessions):
    # allowInternetAccess: true keeps its own network namespace (the egress proxy is its
    # way out), so /proxy opens its ports, never the server's own 127.0.0.1: the server's
    # port is not listening there. (With ERA_EGRESS_LOCAL=host it shares the server's
    # network and /proxy answers 422: tests/test_egress_local.py.)
    sid = "px-net"
    if server.request("GET", f"/api/sessions/{sid}", None, AUTH)[0] == 404:
        server.json("POST", "/api/sessions", {"id": sid, "allowInternetAccess": True}, AUTH, expect=201)
    status, body = server.request("GET", f"/proxy/{sid}/{server.port}/health", None, AUTH)
    doc = json.loads(body)
    assert status == 502 and f"nothing listens on port {server.port}" in doc["error"], doc
