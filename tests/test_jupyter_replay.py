"""The Jupyter channels replay (server/gateway_replay.py): what a kernel sends while no
client is connected reaches the next connection with the same ``session_id``, in order,
once, within ``ERA_GATEWAY_REPLAY_MAX_BYTES``; another ``session_id`` discards it.

Real server on loopback, real kernels, real WebSocket clients. A client that leaves
sends its close frame and keeps reading until the server's (``leave``), so "what the
first connection received" is exactly what the server sent it before it left.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
from tornado.websocket import websocket_connect

from era_server.gateway_replay import ReplayBuffer
from tests.conftest import require_docker
from tests.support.era_server import ServerProcess
from tests.support.jupyter_server import jupyter_api
from tests.support.loopback import stop_process
from tests.test_jupyter_gateway import execute_request, start_jupyter

MAX_BYTES = 64 * 1024  # lowered so the bound test needs only ~1 MB of output
COUNTING = "import time\nfor i in range(1, 201):\n    print(i)\n    time.sleep(0.02)\n"
EXPECTED = "".join(f"{i}\n" for i in range(1, 201))


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(env={"ERA_POOL_SIZE": "0", "ERA_GATEWAY_REPLAY_MAX_BYTES": str(MAX_BYTES)})
    srv.start()
    yield srv
    srv.cleanup()


class Seen:
    """What one connection received for one request, in arrival order."""

    def __init__(self, msg_id: str) -> None:
        self.msg_id = msg_id
        self.stdout = ""
        self.stderr = ""
        self.replies: list[dict] = []
        self.idle = 0
        self.frames: list[str | bytes] = []  # every frame of this request, raw

    def add(self, raw: str | bytes) -> None:
        message = json.loads(raw)
        if message["parent_header"].get("msg_id") != self.msg_id:
            return
        self.frames.append(raw)
        kind = message["msg_type"]
        if kind == "stream":
            if message["content"]["name"] == "stdout":
                self.stdout += message["content"]["text"]
            else:
                self.stderr += message["content"]["text"]
        elif kind == "execute_reply":
            assert message["channel"] == "shell"
            self.replies.append(message["content"])
        elif kind == "status" and message["content"]["execution_state"] == "idle":
            self.idle += 1

    @property
    def done(self) -> bool:
        return bool(self.replies) and self.idle > 0


def channels_url(server: ServerProcess, kid: str, session: str) -> str:
    return f"{server.ws_base}/api/kernels/{kid}/channels?session_id={session}"


async def read_until(ws, seen: Seen, condition, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; stdout so far: {seen.stdout[-200:]!r}"
        raw = await asyncio.wait_for(ws.read_message(), left)
        assert raw is not None, "socket closed"
        seen.add(raw)


async def read_quiet(ws, seen: Seen, quiet: float = 1.0) -> None:
    """Read until nothing arrives for ``quiet`` seconds (what more could come, doubled, does)."""
    while True:
        try:
            raw = await asyncio.wait_for(ws.read_message(), quiet)
        except asyncio.TimeoutError:
            return
        assert raw is not None, "socket closed"
        seen.add(raw)


async def read_to_barrier(ws, seen: Seen, timeout: float = 30) -> None:
    """Read everything sent before the reply to a request made now (a kernel_info_request):
    a replay is sent ahead of every live message of the new connection
    (server/jupyter.py: live ones queue behind it), so what the connection would ever be
    replayed has arrived when that reply does. No quiet period to wait out."""
    barrier = {"header": {"msg_id": uuid.uuid4().hex, "msg_type": "kernel_info_request", "username": "t",
                          "session": uuid.uuid4().hex, "version": "5.3", "date": ""},
               "parent_header": {}, "metadata": {}, "channel": "shell", "content": {}}
    ws.write_message(json.dumps(barrier))
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "no kernel_info_reply"
        raw = await asyncio.wait_for(ws.read_message(), left)
        assert raw is not None, "socket closed"
        seen.add(raw)
        message = json.loads(raw)
        if message["msg_type"] == "kernel_info_reply" and message["parent_header"].get("msg_id") == barrier["header"]["msg_id"]:
            return


async def leave(ws, seen: Seen) -> None:
    """Close cleanly, reading what the server sent before it saw the close (a client that
    stopped reading first would lose those frames, and the test could not tell why)."""
    ws.close()
    while (raw := await asyncio.wait_for(ws.read_message(), 30)) is not None:
        seen.add(raw)


async def wait_idle(server: ServerProcess, kid: str, timeout: float = 90) -> None:
    """The raw client's cell has finished (the kernel's state follows its status messages)."""
    deadline = time.monotonic() + timeout
    while server.json("GET", f"/api/kernels/{kid}")["execution_state"] != "idle":
        assert time.monotonic() < deadline, "the cell did not finish"
        await asyncio.sleep(0.1)


async def start_and_leave(server: ServerProcess, kid: str, session: str, code: str, lines: int) -> Seen:
    """Connect under ``session``, run ``code``, leave once ``lines`` lines arrived, wait for the cell to end."""
    ws = await websocket_connect(channels_url(server, kid, session))
    request = execute_request(code)
    seen = Seen(request["header"]["msg_id"])
    ws.write_message(json.dumps(request))
    await read_until(ws, seen, lambda: seen.stdout.count("\n") >= lines)
    await leave(ws, seen)
    await wait_idle(server, kid)
    return seen


# ---- the same session id gets exactly what it missed ------------------------------------------
@pytest.mark.parametrize("spec", ["era-python-local", "era-python"])
async def test_reconnect_gets_exactly_the_missing_output(server, spec):
    if spec == "era-python":
        require_docker()
    kid = server.json("POST", "/api/kernels", {"name": spec}, expect=201, timeout=180)["id"]
    session = uuid.uuid4().hex
    try:
        first = await start_and_leave(server, kid, session, COUNTING, lines=10)
        assert 10 <= first.stdout.count("\n") < 200 and not first.replies, "left mid-cell"
        assert server.json("GET", f"/api/kernels/{kid}")["connections"] == 0

        ws = await websocket_connect(channels_url(server, kid, session))
        second = Seen(first.msg_id)
        await read_until(ws, second, lambda: second.done)
        await read_quiet(ws, second)  # nothing is sent twice
        # Nothing lost, nothing doubled, in order: the two halves make the whole output.
        assert first.stdout + second.stdout == EXPECTED
        assert second.replies == [second.replies[0]] and second.replies[0]["status"] == "ok"
        assert second.idle == 1 and second.stderr == ""  # nothing was dropped: no notice
        # The replay is over; the socket is an ordinary live one.
        live = execute_request("print('live')")
        ws.write_message(json.dumps(live))
        after = Seen(live["header"]["msg_id"])
        await read_until(ws, after, lambda: after.done)
        assert after.stdout == "live\n"
        ws.close()
    finally:
        server.request("DELETE", f"/api/kernels/{kid}")


# ---- the same, through a real jupyter_server using us as its gateway ------------------------------
async def test_reconnect_through_jupyter_server(server, tmp_path):
    """What JupyterLab does: its socket goes to jupyter_server, whose GatewayClient opens
    ours with the browser's ``session_id``; jupyter_server keeps no buffer for gateway
    kernels, so a reconnecting browser gets the missed output from our replay."""
    proc, base, token = start_jupyter(server.base, tmp_path)
    try:
        kid = jupyter_api(base, token, "/api/kernels", {"name": "era-python-local"})["id"]
        session = uuid.uuid4().hex
        url = f"{base.replace('http', 'ws')}/api/kernels/{kid}/channels?session_id={session}&token={token}"
        ws = await websocket_connect(url)
        request = execute_request(COUNTING)
        first = Seen(request["header"]["msg_id"])
        ws.write_message(json.dumps(request))
        await read_until(ws, first, lambda: first.stdout.count("\n") >= 10)
        await leave(ws, first)
        await wait_idle(server, kid)
        assert not first.replies

        ws = await websocket_connect(url)
        second = Seen(first.msg_id)
        await read_until(ws, second, lambda: second.done)
        await read_quiet(ws, second)
        ws.close()
        # jupyter_server drops what reaches it from us after its client left (its
        # GatewayWebSocketConnection stops reading), so there may be a gap between the two
        # halves, but never an overlap: the replay is the rest of the cell, each line once.
        assert EXPECTED.startswith(first.stdout) and EXPECTED.endswith(second.stdout)
        assert len(first.stdout) + len(second.stdout) <= len(EXPECTED) and "200\n" in second.stdout
        assert len(second.replies) == 1 and second.replies[0]["status"] == "ok" and second.idle == 1
        jupyter_api(base, token, f"/api/kernels/{kid}", method="DELETE")
    finally:
        stop_process(proc)


# ---- another session id gets nothing, and the buffer is gone ----------------------------------
async def test_other_session_discards_the_buffer(server):
    kid = server.json("POST", "/api/kernels", {"name": "era-python-local"}, expect=201)["id"]
    session, other = uuid.uuid4().hex, uuid.uuid4().hex
    try:
        first = await start_and_leave(server, kid, session, COUNTING, lines=10)
        assert first.stdout.count("\n") < 200

        ws = await websocket_connect(channels_url(server, kid, other))
        stranger = Seen(first.msg_id)
        await read_to_barrier(ws, stranger)
        assert stranger.frames == []
        ws.close()
        await asyncio.sleep(0.3)  # its close is seen (and parks an empty buffer under its own key)

        # The first session comes back too late: the other one's connection discarded its buffer.
        ws = await websocket_connect(channels_url(server, kid, session))
        late = Seen(first.msg_id)
        await read_to_barrier(ws, late)
        assert late.frames == []
        ws.close()

        # Without a session id nothing is kept: nothing could ever claim it.
        ws = await websocket_connect(f"{server.ws_base}/api/kernels/{kid}/channels")
        anonymous = await start_and_leave_on(ws, server, kid, COUNTING)
        ws = await websocket_connect(f"{server.ws_base}/api/kernels/{kid}/channels")
        again = Seen(anonymous.msg_id)
        await read_to_barrier(ws, again)
        assert again.frames == []
        ws.close()
    finally:
        server.request("DELETE", f"/api/kernels/{kid}")


async def start_and_leave_on(ws, server: ServerProcess, kid: str, code: str) -> Seen:
    request = execute_request(code)
    seen = Seen(request["header"]["msg_id"])
    ws.write_message(json.dumps(request))
    await read_until(ws, seen, lambda: seen.stdout.count("\n") >= 10)
    await leave(ws, seen)
    await wait_idle(server, kid)
    return seen


# ---- the bound ------------------------------------------------------------------------------------
async def test_replay_is_bounded_and_keeps_the_newest(server):
    kid = server.json("POST", "/api/kernels", {"name": "era-python-local"}, expect=201)["id"]
    session = uuid.uuid4().hex
    # ~1 MB of stdout in ~2000 messages (each flushed), all sent after the client left.
    code = ("import time\ntime.sleep(0.5)\nfor i in range(1, 2001):\n"
            "    print(f'{i:05d} ' + 'x' * 400, flush=True)\n")
    expected = "".join(f"{i:05d} {'x' * 400}\n" for i in range(1, 2001))
    try:
        first = await start_and_leave(server, kid, session, code, lines=0)
        assert first.stdout == "" and not first.replies

        ws = await websocket_connect(channels_url(server, kid, session))
        second = Seen(first.msg_id)
        await read_until(ws, second, lambda: second.done)
        await read_quiet(ws, second)
        ws.close()
        # The newest output, contiguous up to the last line; the reply and the final idle
        # status kept; the client told what was dropped, in the cell's own output.
        assert second.stdout and len(second.stdout) < len(expected) // 4
        assert expected.endswith(second.stdout)
        assert second.replies[0]["status"] == "ok" and second.idle == 1
        assert "dropped" in second.stderr and "ERA_GATEWAY_REPLAY_MAX_BYTES" in second.stderr
        notice = sum(len(f) for f in second.frames if b'"stderr"' in (f if isinstance(f, bytes) else f.encode()))
        assert sum(len(f) for f in second.frames) - notice <= MAX_BYTES
    finally:
        server.request("DELETE", f"/api/kernels/{kid}")


async def test_large_replay_is_paced_to_the_reader():
    """~24 MB buffered (the default bound is 64 MiB) is more than a socket may have
    unflushed (16 MiB, then it is closed as a slow client): the replay must wait for the
    client to read rather than write it all at once."""
    srv = ServerProcess(env={"ERA_POOL_SIZE": "0"}).start()
    try:
        kid = srv.json("POST", "/api/kernels", {"name": "era-python-local"}, expect=201)["id"]
        session = uuid.uuid4().hex
        code = "import time\ntime.sleep(0.5)\nfor i in range(240):\n    print(f'{i:04d}' + 'x' * 100_000, flush=True)\n"
        first = await start_and_leave(srv, kid, session, code, lines=0)
        ws = await websocket_connect(channels_url(srv, kid, session), max_message_size=1024**2)
        second = Seen(first.msg_id)
        await read_until(ws, second, lambda: second.done)  # asserts the socket stays open
        ws.close()
        assert first.stdout + second.stdout == "".join(f"{i:04d}{'x' * 100_000}\n" for i in range(240))
        assert second.stderr == "" and second.replies[0]["status"] == "ok"
    finally:
        srv.cleanup()


def test_buffer_bounds_and_order():
    """The buffer itself: the message count bound, output dropped before bookkeeping,
    the arrival order kept across both, and one notice per run of drops."""
    buffer = ReplayBuffer(max_messages=5, max_bytes=1000)
    reply = {"msg_type": "execute_reply", "parent_header": {"msg_id": "r"}}
    out = {"msg_type": "stream", "parent_header": {"msg_id": "r"}}
    buffer.append("shell", "reply", reply)
    for n in range(8):
        buffer.append("iopub", f"out{n}", out)
    assert len(buffer) == 5 and buffer.dropped == 4
    notice = buffer.take_notice()
    assert notice["parent_header"] == {"msg_id": "r"} and "4 message(s)" in notice["content"]["text"]
    assert buffer.take_notice() is None
    assert [buffer.popleft()[2] for _ in range(5)] == ["reply", "out4", "out5", "out6", "out7"]
    # The byte bound: a frame too big to fit alone is dropped, not everything else.
    buffer.append("iopub", "a" * 600, out)
    buffer.append("iopub", "b" * 2000, out)
    buffer.append("iopub", "c" * 600, out)
    assert buffer.size == 600 and buffer.dropped == 2 and buffer.popleft()[2] == "c" * 600
