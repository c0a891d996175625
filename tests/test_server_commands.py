"""The commands routes against a real server and kernels: ``POST .../commands`` (JSON and
``?stream=true``), background processes under ``.../processes``, the session
WebSocket's ``command`` message, and the ``.../terminal`` WebSocket as xterm.js speaks it
(binary keystrokes and output, resize messages, hang-up on close)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from tests.support.api_errors import assert_error_shape
from tests.support.era_server import shared_server

from .conftest import kernel_processes

SID = "cmd-main"


@pytest.fixture(scope="module")
def server():
    srv = shared_server()
    status, _ = srv.request("GET", f"/api/sessions/{SID}")
    if status == 404:
        srv.json("POST", "/api/sessions", {"id": SID}, expect=201)
    return srv


def test_a_command_answers_its_result(server):
    r = server.json("POST", f"/api/sessions/{SID}/commands", {"cmd": ["bash", "-c", "echo out; echo err >&2; exit 4"]})
    assert (r["exit_code"], r["stdout"], r["stderr"], r["timed_out"]) == (4, "out\n", "err\n", False), r
    assert isinstance(r["pid"], int) and r["duration_ms"] >= 0
    r = server.json("POST", f"/api/sessions/{SID}/commands", {"cmd": "sleep 30", "shell": True, "timeout": 0.5})
    assert (r["exit_code"], r["timed_out"]) == (124, True)
    for body, field in [({"cmd": ["pwd"], "cwd": "../x"}, "cwd"), ({"cmd": 5}, "cmd"),
                        ({"cmd": ["cat"], "stdin": "x" * (1024**2 + 1)}, None)]:
        status, answer = server.request("POST", f"/api/sessions/{SID}/commands", body)
        if field is None:  # past ERA_MAX_BODY of the test server (1 MiB): the body itself is refused
            assert_error_shape(status, answer, 413)
        else:
            assert assert_error_shape(status, answer, 400)["field"] == field
    status, answer = server.request("POST", "/api/sessions/nope-none/commands", {"cmd": ["true"]})
    assert_error_shape(status, answer, 404)


def test_a_streamed_command_sends_its_output_as_it_comes(server):
    import http.client

    host, port = server.base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"cmd": "for i in 1 2 3; do echo $i; sleep 0.3; done", "shell": True})
    conn.request("POST", f"/api/sessions/{SID}/commands?stream=true", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    events, arrived = [], []
    for raw in response:
        line = raw.decode().strip()
        if line.startswith("data: "):
            events.append(json.loads(line[6:]))
            arrived.append(time.monotonic())
    conn.close()
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done", kinds
    assert "".join(e["content"] for e in events if e["type"] == "stdout") == "1\n2\n3\n"
    assert events[-1]["exit_code"] == 0
    outs = [t for t, e in zip(arrived, events) if e["type"] == "stdout"]
    assert outs[-1] - outs[0] > 0.4  # streamed as printed, not all at the end


def test_background_processes_over_http(server):
    bg = server.json("POST", f"/api/sessions/{SID}/commands", {"cmd": ["cat"], "background": True}, expect=202)
    pid = bg["pid"]
    base = f"/api/sessions/{SID}/processes/{pid}"
    assert server.json("POST", f"{base}/stdin", {"data": "hello\n"})["written"] == 6
    page = server.json("GET", f"{base}/output?after=0&wait=10")
    assert page["events"][0]["content"] == "hello\n", page
    listed = server.json("GET", f"/api/sessions/{SID}/processes")
    assert any(p["pid"] == pid and p["state"] == "running" for p in listed["processes"])
    status, answer = server.request("POST", f"{base}/signal", {"signal": "SIGSYS"})
    assert assert_error_shape(status, answer, 400)["field"] == "signal"
    assert server.json("POST", f"{base}/signal", {"signal": "TERM"})["signal"] == "SIGTERM"
    # The stream replays from after=0 and ends with the exit.
    status, raw = server.request("GET", f"{base}/stream?after=0")
    assert status == 200
    events = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert events[0]["content"] == "hello\n" and events[-1]["type"] == "exit" and events[-1]["exit_code"] == 143
    status, answer = server.request("POST", f"{base}/stdin", {"data": "late"})
    assert_error_shape(status, answer, 409)
    for path in (f"/api/sessions/{SID}/processes/99999999/output", f"/api/sessions/{SID}/processes/x/stdin"):
        status, answer = server.request("GET" if path.endswith("output") else "POST", path, {"data": ""})
        assert_error_shape(status, answer, 404)


async def test_the_session_websocket_runs_commands(server):
    conn = await websocket_connect(f"{server.ws_base}/api/sessions/{SID}/ws")
    await conn.read_message()  # status
    conn.write_message(json.dumps({"type": "command", "id": "c1", "cmd": ["bash", "-c", "echo one; echo two >&2"]}))
    seen = []
    while True:
        message = json.loads(await asyncio.wait_for(conn.read_message(), 30))
        seen.append(message)
        if message["type"] == "command_result":
            break
    streamed = [(m["type"], m["content"]) for m in seen if m.get("command")]
    assert sorted(streamed) == [("stderr", "two\n"), ("stdout", "one\n")], seen
    assert seen[-1]["id"] == "c1" and seen[-1]["result"]["exit_code"] == 0
    conn.close()
    # Each message is one the OpenAPI document describes (x-websocket), both ways.
    spec = server.json("GET", "/api/openapi.json")
    ws = spec["paths"]["/api/sessions/{id}/ws"]["get"]["x-websocket"]
    described = {m: {s.rsplit("/", 1)[-1] for s in _refs(ws[m])} for m in ("client-messages", "server-messages")}
    assert "WsCommand" in described["client-messages"], described
    assert {"OutputEvent", "WsCommandResult"} <= described["server-messages"], described
    from pydantic import TypeAdapter

    from server import schemas

    union = TypeAdapter(schemas.OutputEvent | schemas.WsCommandResult)
    for message in seen:
        if message.get("command") or message["type"] == "command_result":
            assert union.validate_python(message)
    TypeAdapter(schemas.WsCommand).validate_python({"type": "command", "id": "c1", "cmd": ["bash"]})


def _refs(node) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if "$ref" in node else []) + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


async def _read_until(conn, needle: bytes, seen: bytearray, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while needle not in seen:
        message = await asyncio.wait_for(conn.read_message(), max(0.1, deadline - time.monotonic()))
        assert message is not None, f"closed; saw {bytes(seen[-300:])!r}"
        seen += message if isinstance(message, bytes) else message.encode()


async def test_a_terminal_types_reads_resizes_and_exits(server):
    conn = await websocket_connect(f"{server.ws_base}/api/sessions/{SID}/terminal?rows=24&cols=80")
    seen = bytearray()
    conn.write_message(b"echo hi-$((6*7))\r", binary=True)
    await _read_until(conn, b"hi-42", seen)
    conn.write_message(json.dumps({"type": "resize", "rows": 33, "cols": 101}))
    conn.write_message("stty size\r")  # xterm.js's attach addon sends keystrokes as text
    await _read_until(conn, b"33 101", seen)
    conn.write_message(b"exit\r", binary=True)
    for _ in range(100):
        if await asyncio.wait_for(conn.read_message(), 15) is None:
            break
    assert conn.close_code == 1000


async def test_several_terminals_in_one_session_are_separate_shells(server):
    first = await websocket_connect(f"{server.ws_base}/api/sessions/{SID}/terminal")
    second = await websocket_connect(f"{server.ws_base}/api/sessions/{SID}/terminal")
    seen_first, seen_second = bytearray(), bytearray()
    first.write_message(b"X=first; echo shell-$$-$X\r", binary=True)
    second.write_message(b"echo shell-$$-${X:-unset}\r", binary=True)
    await _read_until(first, b"-first\r", seen_first)
    await _read_until(second, b"-unset\r", seen_second)
    pids = [bytes(s).rsplit(b"shell-", 1)[1].split(b"-")[0] for s in (seen_first, seen_second)]
    assert pids[0] != pids[1] and all(p.isdigit() for p in pids), pids  # two shells
    assert b"-unset" not in seen_first and b"-first\r" not in seen_second  # neither saw the other's output
    first.close()  # hangs up the first shell only
    for _ in range(50):
        listed = server.json("GET", f"/api/sessions/{SID}/processes")["processes"]
        terminals = {p["pid"]: p["state"] for p in listed if p["kind"] == "terminal"}
        if terminals.get(int(pids[0])) != "running":
            break
        await asyncio.sleep(0.1)
    assert terminals.get(int(pids[0])) != "running" and terminals[int(pids[1])] == "running", terminals
    second.write_message(b"echo still-$((1+1))\r", binary=True)
    await _read_until(second, b"still-2", seen_second)
    second.close()


async def test_closing_a_terminal_hangs_up_its_shell(server):
    conn = await websocket_connect(f"{server.ws_base}/api/sessions/{SID}/terminal")
    seen = bytearray()
    conn.write_message(b"sleep 419; echo after\r", binary=True)
    await _read_until(conn, b"sleep 419", seen)
    for _ in range(50):
        if kernel_processes("sleep 419"):
            break
        await asyncio.sleep(0.1)
    assert kernel_processes("sleep 419")
    conn.close()
    for _ in range(100):
        if not kernel_processes("sleep 419"):
            break
        await asyncio.sleep(0.1)
    assert not kernel_processes("sleep 419")


async def test_a_terminal_on_an_unknown_session_is_a_json_404(server):
    with pytest.raises(HTTPClientError) as caught:
        await websocket_connect(HTTPRequest(f"{server.ws_base}/api/sessions/no-such-sid/terminal"))
    assert caught.value.code == 404


@pytest.mark.parametrize("provisioner", ["local", "docker"])
def test_processes_of_a_killed_server_are_gone_and_reaped(provisioner):
    """SECURITY.md case 10 for commands: a server SIGKILLed with a background process
    running leaves nothing once it is started again (they lived in its kernels' sandboxes,
    which die with it or are reaped at start). The new server still lists the process, as
    killed with its server, and serves what it printed before (the journal)."""
    import signal

    from tests.support.era_server import ServerProcess

    if provisioner == "docker":
        from .conftest import require_docker

        require_docker()
    srv = ServerProcess().start()
    try:
        sid = srv.json("POST", "/api/sessions", {"provisioner": provisioner}, expect=201)["id"]
        bg = srv.json("POST", f"/api/sessions/{sid}/commands",
                      {"cmd": "echo before-the-kill; sleep 4243", "shell": True, "background": True}, expect=202)
        out = srv.json("GET", f"/api/sessions/{sid}/processes/{bg['pid']}/output?wait=10")
        assert out["events"][0]["content"] == "before-the-kill\n", out
        time.sleep(0.2)  # past the journal's group-commit window (20 ms): a SIGKILL may lose only that
        assert kernel_processes("sleep 4243")
        srv.stop(signal.SIGKILL)
        srv.start()  # its start reaps what a dead owner left (containers, cgroups)
        for _ in range(100):
            if not kernel_processes("sleep 4243"):
                break
            time.sleep(0.1)
        assert not kernel_processes("sleep 4243")
        (listed,) = srv.json("GET", f"/api/sessions/{sid}/processes")["processes"]
        assert (listed["pid"], listed["state"], listed["exit_code"]) == (bg["pid"], "killed", None), listed
        assert "server" in listed["reason"]
        out = srv.json("GET", f"/api/sessions/{sid}/processes/{bg['pid']}/output")
        assert [e["type"] for e in out["events"]] == ["stdout", "exit"] and out["state"] == "killed", out
        srv.json("POST", f"/api/sessions/{sid}/processes/{bg['pid']}/signal", {"signal": "TERM"}, expect=409)
    finally:
        srv.cleanup()
