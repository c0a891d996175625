"""Package setup as a user sees it over HTTP: create returns at once with "pending",
the log streams live on the session's WebSocket and on the SSE stream of a run that
waits for it, and the installed package imports in the kernel. Real PyPI."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from tests.conftest import require_docker
from tests.support.era_server import shared_server


async def test_setup_over_http_ws_and_sse():
    server = shared_server()
    sid = f"setup-{uuid.uuid4().hex[:8]}"
    # A pinned version unlikely to be cached by another test: a real build, with a log.
    spec = {"pip": ["six==1.16.0"], "commands": ["echo setup-command-ran"]}
    socket = None
    started = time.monotonic()
    doc = server.json("POST", "/api/sessions", {"id": sid, "setup": spec}, expect=201)
    assert time.monotonic() - started < 2, "create returns at once"
    assert doc["setup_status"] in ("pending", "running", "completed")
    socket = await websocket_connect(f"{server.ws_base}/api/sessions/{sid}/ws")

    # A streamed run sent now waits for the setup, and shows its log first.
    request = HTTPRequest(f"{server.base}/api/sessions/{sid}/stream", method="POST",
                          body=json.dumps({"code": "import six; print('six', six.__version__)", "timeout": 300}),
                          request_timeout=320)
    chunks: list[bytes] = []
    request.streaming_callback = chunks.append
    await AsyncHTTPClient().fetch(request)
    events = [json.loads(line[6:]) for line in b"".join(chunks).decode().splitlines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "done" and events[-1]["exit_code"] == 0
    assert {"type": "stdout", "content": "six 1.16.0\n"}.items() <= [e for e in events if e["type"] == "stdout"][0].items()
    if doc["setup_status"] != "completed":  # we saw the setup happen: its log came first
        assert "setup" in kinds and kinds.index("setup") < kinds.index("stdout")

    final = server.json("GET", f"/api/sessions/{sid}", expect=200)
    assert final["setup_status"] == "completed"
    assert "setup-command-ran" in final["setup_result"]["logs"]
    socket.close()

    # Same spec again: the environment is reused at once.
    again = f"{sid}-again"
    started = time.monotonic()
    server.json("POST", "/api/sessions", {"id": again, "setup": spec}, expect=201)
    while server.json("GET", f"/api/sessions/{again}", expect=200)["setup_status"] != "completed":
        assert time.monotonic() - started < 5
        await asyncio.sleep(0.05)
    assert server.json("GET", f"/api/sessions/{again}", expect=200)["setup_result"]["source"] in ("cache", "store")


async def test_failed_setup_keeps_the_session_usable():
    server = shared_server()
    sid = f"setup-bad-{uuid.uuid4().hex[:8]}"
    server.json("POST", "/api/sessions", {"id": sid, "setup": {"pip": ["era-no-such-package-0f3a9c"]}}, expect=201)
    deadline = time.monotonic() + 120
    while (doc := server.json("GET", f"/api/sessions/{sid}", expect=200))["setup_status"] in ("pending", "running"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    assert doc["setup_status"] == "failed"
    assert "era-no-such-package-0f3a9c" in doc["setup_result"]["error"]
    result = server.json("POST", f"/api/sessions/{sid}/run", {"code": "print('still usable')"}, expect=200)
    assert result["stdout"] == "still usable\n"


async def _settle(server, sid: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while (doc := server.json("GET", f"/api/sessions/{sid}", expect=200))["setup_status"] in ("pending", "running"):
        assert time.monotonic() < deadline, doc
        await asyncio.sleep(0.1)
    return doc


@pytest.mark.parametrize("provisioner", ["local", "docker"])
async def test_era_setup_example_over_http_with_the_files_api(provisioner):
    """ERA's README example as an ERA client sends it: the commands' /tmp file read by a
    run, their workspace file listed and downloaded through the files API, envs seen by
    the commands only, and ERA's result fields in the session document."""
    if provisioner == "docker":
        require_docker()
    server = shared_server()
    sid = f"era-setup-{uuid.uuid4().hex[:8]}"
    setup = {"commands": ["mkdir -p /tmp/data", "echo 'a,b' > /tmp/data/test.csv",
                          "echo \"rows: $(wc -l < /tmp/data/test.csv) $TOKEN\" > report.txt"],
             "envs": {"TOKEN": "t0k"}}
    server.json("POST", "/api/sessions", {"id": sid, "provisioner": provisioner, "setup": setup}, expect=201)
    doc = await _settle(server, sid)
    result = doc["setup_result"]
    assert doc["setup_status"] == "completed" and result["success"] is True, result
    assert result["commands_run"] == setup["commands"] and result["error"] is None
    run = server.json("POST", f"/api/sessions/{sid}/run", {"code": (
        "import os\nprint(open('/tmp/data/test.csv').read().strip(), open('report.txt').read().strip(), "
        "os.environ.get('TOKEN'))"), "timeout": 120}, expect=200)
    assert run["stdout"] == "a,b rows: 1 t0k None\n", run
    files = server.json("GET", f"/api/sessions/{sid}/files", expect=200)["files"]
    assert "report.txt" in [f["path"] for f in files]
    status, body = server.request("GET", f"/api/sessions/{sid}/files/report.txt")
    assert status == 200 and body == b"rows: 1 t0k\n"
    assert server.request("DELETE", f"/api/sessions/{sid}")[0] in (200, 204)


@pytest.mark.parametrize("setup, field", [
    ({"pip": {"requirements": "requests\n-r /etc/passwd\n"}}, "setup.pip.requirements line 2"),
    ({"pip": {"requirements": "x @ https://evil.example/x.whl"}}, "setup.pip.requirements line 1"),
    ({"pip": {"requirement": "requests"}}, "setup.pip"),
    ({"npm": {"packageJson": "{oops"}}, "setup.npm.packageJson"),
    ({"npm": {"packageJson": '{"dependencies": {"x": "file:/etc"}}'}}, "setup.npm.packageJson.dependencies.x"),
    ({"go": {"goMod": "module m\nrequire example.com/x\n"}}, "setup.go.goMod line 2"),
    ({"commands": ["true"], "envs": {"A": 1}}, "setup.envs.A"),
    ({"commands": ["true"], "envs": "A=1"}, "setup.envs"),
])
async def test_bad_setup_forms_are_400_naming_the_field(setup, field):
    server = shared_server()
    sid = f"bad-form-{uuid.uuid4().hex[:8]}"
    status, body = server.request("POST", "/api/sessions", {"id": sid, "setup": setup})
    assert status == 400, body
    error = json.loads(body)
    assert error["field"] == field, error
    assert "Traceback" not in body.decode()
    assert server.request("GET", f"/api/sessions/{sid}")[0] == 404
