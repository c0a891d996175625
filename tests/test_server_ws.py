"""WebSocket /api/sessions/{id}/ws against a real server and kernel: fan-out to every
client, input() round trip, run ids, interrupt, disconnects, bad messages, 1009."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time

import pytest
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from tests.support.era_server import MAIN_ENV, shared_server

SID = "ws-main"


@pytest.fixture(scope="module")
def server():
    srv = shared_server()
    status, _ = srv.request("GET", f"/api/sessions/{SID}")
    if status == 404:
        srv.json("POST", "/api/sessions", {"id": SID}, expect=201)
    return srv


async def connect(server, sid=SID):
    conn = await websocket_connect(f"{server.ws_base}/api/sessions/{sid}/ws")
    hello = json.loads(await conn.read_message())
    assert hello["type"] == "status" and hello["session_id"] == sid
    return conn


async def read_until(conn, predicate, timeout=30.0):
    """Messages up to and including the first that satisfies ``predicate``."""
    seen = []
    while True:
        raw = await asyncio.wait_for(conn.read_message(), timeout)
        assert raw is not None, f"closed after {seen}"
        message = json.loads(raw)
        # Engine events carry their journal seq and run record id (replay is tested in
        # test_server_runs); here the rest of each message is compared as it always was.
        assert isinstance(message.pop("seq", 0), int)
        if message["type"] != "error" or "status_code" not in message:
            assert isinstance(message.pop("run_id", ""), (str, type(None)))
        seen.append(message)
        if predicate(message):
            return seen


def done_of(run_id):
    return lambda m: m["type"] == "done" and m["id"] == run_id


async def test_every_client_sees_every_run(server):
    a, b = await connect(server), await connect(server)
    a.write_message(json.dumps({"type": "run", "id": "fan-1", "code": "print('to all')"}))
    for conn in (a, b):
        messages = await read_until(conn, done_of("fan-1"))
        assert {"type": "stdout", "content": "to all\n", "id": "fan-1"} in messages
        assert all(m.get("id") == "fan-1" for m in messages if m["type"] in ("stdout", "done"))
    assert (await read_until(a, lambda m: m["type"] == "result"))[-1]["result"]["stdout"] == "to all\n"
    # A REST run on the same session reaches the sockets too.
    result = await asyncio.to_thread(server.json, "POST", f"/api/sessions/{SID}/run", {"code": "print('rest')"})
    for conn in (a, b):
        messages = await read_until(conn, done_of(result["run_id"]))
        assert any(m["type"] == "stdout" and m["content"] == "rest\n" for m in messages)
    a.close()
    b.close()


async def test_input_round_trip_answered_by_any_client(server):
    asker, answerer = await connect(server), await connect(server)
    asker.write_message(json.dumps({"type": "run", "id": "ask-1",
                                    "code": "name = input('name? ')\nprint('hello', name)"}))
    request = (await read_until(answerer, lambda m: m["type"] == "input_request"))[-1]
    assert request == {"type": "input_request", "prompt": "name? ", "password": False, "id": "ask-1"}
    answerer.write_message(json.dumps({"type": "input_reply", "value": "ada"}))
    messages = await read_until(asker, done_of("ask-1"))
    assert any(m["type"] == "input_request" for m in messages)  # the asker was asked too
    assert {"type": "stdout", "content": "hello ada\n", "id": "ask-1"} in messages
    assert messages[-1]["exit_code"] == 0
    asker.close()
    answerer.close()


async def test_run_ids_are_generated_and_results_go_to_the_requester(server):
    conn = await connect(server)
    conn.write_message(json.dumps({"type": "run", "code": "1 + 1"}))
    messages = await read_until(conn, lambda m: m["type"] == "result")
    run_id = messages[-1]["id"]
    assert run_id.startswith("run_")
    assert messages[-1]["result"]["outputs"][0]["data"]["text/plain"] == "2"
    assert any(m["type"] == "done" and m["id"] == run_id for m in messages)
    conn.close()


async def test_a_client_leaving_mid_run_does_not_stop_the_run(server):
    leaver, watcher = await connect(server), await connect(server)
    leaver.write_message(json.dumps({"type": "run", "id": "leave-1",
                                     "code": "import time\ntime.sleep(0.5)\nprint('finished anyway')"}))
    await read_until(leaver, lambda m: m["type"] == "status" and m.get("state") == "busy")
    leaver.close()
    messages = await read_until(watcher, done_of("leave-1"))
    assert {"type": "stdout", "content": "finished anyway\n", "id": "leave-1"} in messages
    watcher.close()


async def test_interrupt_over_the_socket(server):
    conn = await connect(server)
    conn.write_message(json.dumps({"type": "run", "id": "long-1",
                                   "code": "import time\nprint('go', flush=True)\ntime.sleep(60)"}))
    await read_until(conn, lambda m: m["type"] == "stdout")
    conn.write_message(json.dumps({"type": "interrupt"}))
    messages = await read_until(conn, done_of("long-1"), timeout=20)
    assert any(m["type"] == "error" and m.get("ename") == "KeyboardInterrupt" for m in messages)
    assert messages[-1]["exit_code"] == 1
    conn.close()


@pytest.mark.parametrize("raw, status", [
    ("not json", 400), ("[1]", 400), ('{"type": 5}', 400), ('{"type": "dance"}', 400),
    ('{"type": "input_reply", "value": "x"}', 409), ('{"type": "input_reply", "value": 5}', 400),
    ('{"type": "run", "id": "bad id!", "code": "1"}', 400), ('{"type": "run", "code": 5, "id": "typed"}', 400),
    ('{"type": "run", "code": "1", "timeout": -1}', 400), ("[" * 20000 + "]" * 20000, 400),
])
async def test_bad_messages_get_errors_in_the_api_shape(server, raw, status):
    conn = await connect(server)
    conn.write_message(raw)
    message = (await read_until(conn, lambda m: m["type"] == "error" and "status_code" in m))[-1]
    assert message["status_code"] == status and isinstance(message["error"], str)
    assert set(message) <= {"type", "id", "error", "status_code", "field"}
    if '"id": "typed"' in raw:
        assert message["id"] == "typed" and message["field"] == "code"
    # the socket still works after an error
    conn.write_message(json.dumps({"type": "run", "id": f"after-{status}", "code": "print('ok')"}))
    await read_until(conn, done_of(f"after-{status}"))
    conn.close()


async def test_binary_frames_are_refused(server):
    conn = await connect(server)
    conn.write_message(b"\x00\x01", binary=True)
    message = (await read_until(conn, lambda m: m["type"] == "error"))[-1]
    assert message["status_code"] == 400
    conn.close()


async def test_oversized_frame_closes_with_1009(server):
    conn = await connect(server)
    conn.write_message("x" * (int(MAIN_ENV["ERA_MAX_BODY"]) + 1))
    while await asyncio.wait_for(conn.read_message(), 10) is not None:
        pass
    assert conn.close_code == 1009


async def test_handshake_refusals_are_json(server):
    with pytest.raises(HTTPClientError) as info:
        await websocket_connect(f"{server.ws_base}/api/sessions/absent-ws/ws")
    assert info.value.code == 404
    body = json.loads(info.value.response.body)
    assert body["status_code"] == 404
    # Without ERA_ALLOWED_ORIGINS, a browser Origin must be the server's own host.
    evil = HTTPRequest(f"{server.ws_base}/api/sessions/{SID}/ws", headers={"Origin": "http://evil.example"})
    with pytest.raises(HTTPClientError) as info:
        await websocket_connect(evil)
    assert info.value.code == 403 and json.loads(info.value.response.body)["status_code"] == 403
    own = HTTPRequest(f"{server.ws_base}/api/sessions/{SID}/ws",
                      headers={"Origin": f"http://127.0.0.1:{server.port}"})
    (await websocket_connect(own)).close()


async def test_deleting_a_session_closes_its_sockets(server):
    await asyncio.to_thread(server.json, "POST", "/api/sessions", {"id": "ws-gone"}, expect=201)
    conn = await connect(server, "ws-gone")
    await asyncio.to_thread(server.json, "DELETE", "/api/sessions/ws-gone")
    while await asyncio.wait_for(conn.read_message(), 10) is not None:
        pass
    assert conn.close_code == 4404


def _silent_ws(port: int, sid: str) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: small window
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET /api/sessions/{sid}/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def test_a_client_that_stops_reading_is_dropped_not_buffered(server):
    server.json("POST", "/api/sessions", {"id": "ws-flood"}, expect=201)
    silent = _silent_ws(server.port, "ws-flood")
    try:
        flood = "for _ in range(6):\n    print('x' * 1_000_000)"
        for _ in range(4):  # 24 MB of events for a client that reads none of them
            assert server.json("POST", "/api/sessions/ws-flood/run", {"code": flood})["exit_code"] == 0
        deadline = time.monotonic() + 20
        while server.json("GET", "/api/resources/stats")["server"]["websocket_clients"] > 0:
            assert time.monotonic() < deadline, "the silent client was never dropped"
            time.sleep(0.2)
        assert server.json("GET", "/health")["ready"] is True
        assert server.json("POST", "/api/sessions/ws-flood/run", {"code": "print('fine')"})["stdout"] == "fine\n"
    finally:
        silent.close()
        server.json("DELETE", "/api/sessions/ws-flood")


# ---- socket caps (ERA_MAX_SOCKETS_PER_SESSION / _PER_CLIENT) ----------------------------------------
async def _refused(url):
    with pytest.raises(HTTPClientError) as info:
        await websocket_connect(url)
    assert info.value.code == 429
    body = json.loads(info.value.response.body)
    assert set(body) <= {"error", "status_code", "field"} and body["status_code"] == 429, body
    assert info.value.response.headers["Retry-After"]
    return body


async def _connect_eventually(server, sid, timeout=10.0):
    """The slot is freed when the server sees the close, a moment after the client sends it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await connect(server, sid)
        except HTTPClientError as exc:
            assert exc.code == 429 and time.monotonic() < deadline, exc
            await asyncio.sleep(0.05)


async def test_the_17th_socket_on_a_session_is_429_until_one_closes(server):
    sid = "ws-cap"
    await asyncio.to_thread(server.json, "POST", "/api/sessions", {"id": sid}, expect=201)
    conns = [await connect(server, sid) for _ in range(15)]
    raw = await asyncio.to_thread(_silent_ws, server.port, sid)  # the 16th: a raw socket
    try:
        body = await _refused(f"{server.ws_base}/api/sessions/{sid}/ws")
        assert "16" in body["error"]
        conns.pop().close()  # a clean close frees its slot
        conns.append(await _connect_eventually(server, sid))
        await _refused(f"{server.ws_base}/api/sessions/{sid}/ws")
        raw.close()  # so does a connection that just drops, without a close frame
        conns.append(await _connect_eventually(server, sid))
        # The others still work, and other sessions are not affected.
        conns[0].write_message(json.dumps({"type": "run", "id": "cap-1", "code": "print('still here')"}))
        await read_until(conns[0], done_of("cap-1"))
        (await connect(server)).close()
    finally:
        raw.close()
        for conn in conns:
            conn.close()
        await asyncio.to_thread(server.json, "DELETE", f"/api/sessions/{sid}")


async def test_sockets_per_client_are_capped_across_sessions_and_routes():
    from tests.support.era_server import ServerProcess

    srv = await asyncio.to_thread(lambda: ServerProcess(env={"ERA_MAX_SOCKETS_PER_CLIENT": "3",
                                                             "ERA_POOL_SIZE": "0"}).start())
    try:
        for sid in ("c-1", "c-2"):
            await asyncio.to_thread(srv.json, "POST", "/api/sessions", {"id": sid}, expect=201)
        kernel = await asyncio.to_thread(srv.json, "POST", "/api/kernels", {}, expect=201)
        conns = [await connect(srv, "c-1"), await connect(srv, "c-2"),
                 await websocket_connect(f"{srv.ws_base}/api/kernels/{kernel['id']}/channels")]
        body = await _refused(f"{srv.ws_base}/api/sessions/c-1/ws")
        assert "3" in body["error"]
        await _refused(f"{srv.ws_base}/api/kernels/{kernel['id']}/channels")
        conns.pop().close()  # the channels socket
        # Upgrades refused for another reason take no slot.
        for _ in range(3):
            with pytest.raises(HTTPClientError) as info:
                await websocket_connect(f"{srv.ws_base}/api/sessions/absent/ws")
            assert info.value.code == 404
        # Past prepare (a slot taken), then refused by the handshake itself: the slot comes back.
        upgrade = {"Upgrade": "websocket", "Connection": "Upgrade"}
        for headers, status in [(upgrade, 426), (dict(upgrade, **{"Sec-WebSocket-Version": "13"}), 400)] * 2:
            assert (await asyncio.to_thread(srv.request, "GET", "/api/sessions/c-1/ws", None, headers))[0] == status
        conns.append(await _connect_eventually(srv, "c-2"))
        await _refused(f"{srv.ws_base}/api/sessions/c-2/ws")
        for conn in conns:
            conn.close()
    finally:
        await asyncio.to_thread(srv.cleanup)
