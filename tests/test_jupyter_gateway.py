"""The Jupyter kernel gateway routes (server/jupyter.py), over loopback only: plain HTTP,
the channels WebSocket, and a real ``jupyter server --gateway-url=<ours>`` in front."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import pytest
from tornado.httpclient import HTTPClientError
from tornado.websocket import websocket_connect

from tests.conftest import require_docker
from tests.support.api_errors import assert_error_shape
from tests.support.era_server import ServerProcess
from tests.support.jupyter_server import jupyter_api, start_jupyter_server
from tests.support.loopback import stop_process

KEY = "era-gateway-key-8d21c7"


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(env={"ERA_POOL_SIZE": "0"})
    srv.start()
    yield srv
    srv.cleanup()


def execute_request(code: str, allow_stdin: bool = False) -> dict:
    return {"header": {"msg_id": uuid.uuid4().hex, "msg_type": "execute_request", "username": "t",
                       "session": uuid.uuid4().hex, "version": "5.3", "date": ""},
            "parent_header": {}, "metadata": {}, "channel": "shell",
            "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                        "allow_stdin": allow_stdin, "stop_on_error": True}}


async def run_over_channels(ws, code: str, on_input=None, timeout: float = 60) -> dict:
    """Send one execute_request; gather what comes back with it as parent until idle."""
    request = execute_request(code, allow_stdin=on_input is not None)
    msg_id = request["header"]["msg_id"]
    ws.write_message(json.dumps(request))
    seen = {"stream": "", "reply": None, "idle": False, "types": []}
    deadline = time.time() + timeout
    while not (seen["reply"] and seen["idle"]):
        assert time.time() < deadline, seen
        raw = await ws.read_message()
        assert raw is not None, "socket closed"
        message = json.loads(raw)
        if message["parent_header"].get("msg_id") != msg_id:
            continue
        seen["types"].append((message["channel"], message["msg_type"]))
        if message["msg_type"] == "stream":
            seen["stream"] += message["content"]["text"]
        elif message["msg_type"] == "execute_reply":
            assert message["channel"] == "shell"
            seen["reply"] = message["content"]
        elif message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
            assert message["channel"] == "iopub"
            seen["idle"] = True
        elif message["msg_type"] == "input_request":
            assert message["channel"] == "stdin"
            reply = {"header": {"msg_id": uuid.uuid4().hex, "msg_type": "input_reply", "username": "t",
                                "session": request["header"]["session"], "version": "5.3", "date": ""},
                     "parent_header": message["header"], "metadata": {}, "channel": "stdin",
                     "content": {"value": on_input(message["content"]["prompt"])}}
            ws.write_message(json.dumps(reply))
    return seen


# ---- plain HTTP ------------------------------------------------------------------------------
def test_kernelspecs_listing(server):
    doc = server.json("GET", "/api/kernelspecs")
    specs = doc["kernelspecs"]
    assert doc["default"] in specs
    assert "era-python-local" in specs and "era-node-local" in specs
    entry = specs["era-python-local"]
    assert entry["name"] == "era-python-local" and isinstance(entry["resources"], dict)
    assert entry["spec"]["language"] == "python" and entry["spec"]["display_name"]
    assert server.json("GET", "/api/kernelspecs/era-python-local")["spec"]["language"] == "python"
    assert_error_shape(*server.request("GET", "/api/kernelspecs/no-such-spec"), 404)


def test_kernel_lifecycle_over_http(server):
    server.json("POST", "/api/sessions", {"id": "plain-gw-session"}, expect=201)
    model = server.json("POST", "/api/kernels", {"name": "era-python-local",
                                                 "env": {"KERNEL_GW_TEST": "yes", "NOT_PASSED": "no"}}, expect=201)
    kid = model["id"]
    try:
        assert set(model) == {"id", "name", "last_activity", "execution_state", "connections"}
        assert model["name"] == "era-python-local" and model["execution_state"] == "idle"
        assert model["connections"] == 0
        time.strptime(model["last_activity"], "%Y-%m-%dT%H:%M:%S.%fZ")
        listed = server.json("GET", "/api/kernels")
        assert [k["id"] for k in listed] == [kid]  # the ordinary session is not a kernel
        assert server.json("GET", f"/api/kernels/{kid}")["id"] == kid
        # The same session runs ERA code too; only KERNEL_* env reached it.
        result = server.json("POST", f"/api/sessions/{kid}/run",
                             {"code": "import os; print(os.environ.get('KERNEL_GW_TEST'), "
                                      "os.environ.get('NOT_PASSED'))"})
        assert result["stdout"] == "yes None\n"
        assert server.request("POST", f"/api/kernels/{kid}/interrupt", {})[0] == 204
        restarted = server.json("POST", f"/api/kernels/{kid}/restart", {})
        assert restarted["id"] == kid and restarted["execution_state"] == "idle"
        assert server.json("POST", f"/api/sessions/{kid}/run", {"code": "print(1)"})["stdout"] == "1\n"
    finally:
        status, _ = server.request("DELETE", f"/api/kernels/{kid}")
    assert status == 204
    assert_error_shape(*server.request("GET", f"/api/kernels/{kid}"), 404)
    assert_error_shape(*server.request("GET", "/api/sessions/" + kid), 404)
    assert server.json("GET", "/api/kernels") == []
    # Ordinary sessions and unknown ids are not kernels.
    for path in ("/api/kernels/plain-gw-session", "/api/kernels/absent", "/api/kernels/bad%20id"):
        assert_error_shape(*server.request("GET", path), 404)
        assert_error_shape(*server.request("DELETE", path), 404)
        assert_error_shape(*server.request("POST", path + "/restart", {}), 404)
    assert_error_shape(*server.request("POST", "/api/kernels", {"name": "no-such-spec"}), 404)
    assert_error_shape(*server.request("POST", "/api/kernels", {"name": "era-python-local", "env": "x"}), 400)
    assert_error_shape(*server.request("POST", "/api/kernels", "[1]"), 400)
    server.json("DELETE", "/api/sessions/plain-gw-session")


def test_kernel_limit_is_429_with_retry_after():
    srv = ServerProcess(env={"ERA_MAX_KERNELS": "1", "ERA_POOL_SIZE": "0"}).start()
    try:
        first = srv.json("POST", "/api/kernels", {"name": "era-python-local"}, expect=201)
        busy = threading.Thread(target=srv.json, args=("POST", f"/api/sessions/{first['id']}/run",
                                                       {"code": "import time; time.sleep(2)"}))
        busy.start()  # a busy kernel is never culled to make room: the answer must be 429
        deadline = time.monotonic() + 30
        while srv.json("GET", f"/api/kernels/{first['id']}")["execution_state"] != "busy":  # not a fixed 1 s
            assert time.monotonic() < deadline, "the cell never started"
            time.sleep(0.05)
        status, headers, body = srv.request_full("POST", "/api/kernels", {"name": "era-python-local"})
        busy.join()
        assert_error_shape(status, body, 429)
        assert headers["Retry-After"]
    finally:
        srv.cleanup()


# ---- the channels WebSocket -------------------------------------------------------------------
async def test_channels_execute_and_input(server):
    kid = server.json("POST", "/api/kernels", {"name": "era-python-local"}, expect=201)["id"]
    try:
        ws = await websocket_connect(f"{server.ws_base}/api/kernels/{kid}/channels")
        assert server.json("GET", f"/api/kernels/{kid}")["connections"] == 1
        seen = await run_over_channels(ws, "print(6*7)")
        assert seen["stream"] == "42\n"
        assert seen["reply"]["status"] == "ok"
        assert ("iopub", "execute_input") in seen["types"]
        prompts = []
        seen = await run_over_channels(ws, "v = input('x?'); print('got', v)",
                                       on_input=lambda p: prompts.append(p) or "hello")
        assert prompts == ["x?"] and seen["stream"].endswith("got hello\n")
        # kernel_info over shell; an ERA run beside the socket sees the socket's variables.
        info = {"header": {"msg_id": uuid.uuid4().hex, "msg_type": "kernel_info_request", "username": "t",
                           "session": "s", "version": "5.3", "date": ""},
                "parent_header": {}, "metadata": {}, "content": {}, "channel": "shell"}
        ws.write_message(json.dumps(info))
        while True:
            message = json.loads(await ws.read_message())
            if message["msg_type"] == "kernel_info_reply":
                assert message["parent_header"]["msg_id"] == info["header"]["msg_id"]
                assert message["content"]["language_info"]["name"] == "python"
                break
        result = server.json("POST", f"/api/sessions/{kid}/run", {"code": "print(v)"})
        assert result["stdout"] == "hello\n"
        # ... and the socket still works after it.
        assert (await run_over_channels(ws, "print(v * 2)"))["stream"] == "hellohello\n"
        ws.close()
    finally:
        server.request("DELETE", f"/api/kernels/{kid}")


async def test_channels_refusals_are_json(server):
    for path, expected in (("/api/kernels/absent/channels", 404), ("/api/kernels/bad%20id/channels", 404)):
        with pytest.raises(HTTPClientError) as info:
            await websocket_connect(f"{server.ws_base}{path}")
        assert info.value.code == expected
        assert_error_shape(expected, info.value.response.body, expected)


async def test_channels_on_docker_kernel(server):
    require_docker()
    specs = server.json("GET", "/api/kernelspecs")["kernelspecs"]
    assert specs["era-python"]["spec"]["metadata"]["kernel_provisioner"]["provisioner_name"] == "era-docker"
    kid = server.json("POST", "/api/kernels", {"name": "era-python"}, expect=201, timeout=180)["id"]
    try:
        assert server.json("GET", f"/api/sessions/{kid}")["provisioner"] == "docker"
        ws = await websocket_connect(f"{server.ws_base}/api/kernels/{kid}/channels")
        seen = await run_over_channels(ws, "import os; print(6*7, os.getcwd())")
        assert seen["stream"] == "42 /workspace\n" and seen["reply"]["status"] == "ok"
        ws.close()
    finally:
        server.request("DELETE", f"/api/kernels/{kid}")


# ---- a real jupyter_server using us as its gateway -----------------------------------------------
def start_jupyter(gateway_url: str, tmp_path, extra: list[str] | None = None):
    root = tmp_path / "notebooks"
    root.mkdir()
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"), JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"),
               JUPYTER_DATA_DIR=str(tmp_path / "data"))
    return start_jupyter_server(root, env, f"--gateway-url={gateway_url}", *(extra or []))


async def drive_jupyter_server(srv: ServerProcess, tmp_path, extra: list[str] | None = None,
                               our_headers: dict | None = None) -> None:
    proc, base, token = start_jupyter(srv.base, tmp_path, extra)
    try:
        specs = jupyter_api(base, token, "/api/kernelspecs")
        assert "era-python-local" in specs["kernelspecs"]
        kernel = jupyter_api(base, token, "/api/kernels", {"name": "era-python-local"})
        kid = kernel["id"]
        ours = srv.json("GET", "/api/kernels", headers=our_headers)
        assert [k["id"] for k in ours] == [kid]
        ws = await websocket_connect(f"{base.replace('http', 'ws')}/api/kernels/{kid}/channels?token={token}")
        seen = await run_over_channels(ws, "import os; print(6*7, os.environ['ERA_SESSION_ID'])")
        assert seen["stream"] == f"42 {kid}\n" and seen["reply"]["status"] == "ok"
        prompts = []
        seen = await run_over_channels(ws, "print('got', input('x?'))", on_input=lambda p: prompts.append(p) or "yo")
        assert prompts == ["x?"] and seen["stream"].endswith("got yo\n")
        ws.close()
        assert jupyter_api(base, token, f"/api/kernels/{kid}")["id"] == kid
        jupyter_api(base, token, f"/api/kernels/{kid}/interrupt", {})
        jupyter_api(base, token, f"/api/kernels/{kid}", method="DELETE")
        assert srv.json("GET", "/api/kernels", headers=our_headers) == []
    finally:
        stop_process(proc)


async def test_jupyter_server_uses_us_as_gateway(server, tmp_path):
    await drive_jupyter_server(server, tmp_path)


async def test_gateway_with_api_key(tmp_path):
    srv = ServerProcess(env={"ERA_API_KEY": KEY, "ERA_POOL_SIZE": "0"}).start()
    try:
        for path in ("/api/kernelspecs", "/api/kernels", "/api/kernelspecs/era-python-local"):
            assert_error_shape(*srv.request("GET", path), 401)
            assert_error_shape(*srv.request("GET", path, None, {"Authorization": "token wrong"}), 401)
            assert srv.request("GET", path, None, {"Authorization": f"token {KEY}"})[0] == 200
            assert srv.request("GET", path, None, {"Authorization": f"Bearer {KEY}"})[0] == 200
        with pytest.raises(HTTPClientError) as info:
            await websocket_connect(f"{srv.ws_base}/api/kernels/absent/channels")
        assert info.value.code == 401
        await drive_jupyter_server(srv, tmp_path, [f"--GatewayClient.auth_token={KEY}"],
                                   {"Authorization": f"Bearer {KEY}"})
    finally:
        srv.cleanup()


def test_binary_frames_round_trip():
    from era_server.jupyter import deserialize_binary_message, encode

    msg = {"header": {"msg_id": "m", "msg_type": "comm_msg"}, "msg_id": "m", "msg_type": "comm_msg",
           "parent_header": {}, "metadata": {}, "content": {"data": {}}, "buffers": [memoryview(b"\x00\x01"), b"xyz"]}
    frame = encode("iopub", msg)
    assert isinstance(frame, bytes)
    back = deserialize_binary_message(frame)
    assert back["buffers"] == [b"\x00\x01", b"xyz"] and back["channel"] == "iopub" and back["msg_id"] == "m"
    text = encode("shell", dict(msg, buffers=[]))
    assert json.loads(text)["channel"] == "shell"
