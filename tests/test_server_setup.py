"""Package setup as a user sees it over HTTP: create returns at once with "pending",
the log streams live on the session's WebSocket and on the SSE stream of a run that
waits for it, and the installed package imports in the kernel. Real PyPI."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

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
