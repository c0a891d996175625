"""Sockets follow the engine's lifecycle whoever causes it: a session the culler deletes
(past its max age) closes its /ws and Jupyter channels sockets with 4404, and a channels
socket whose kernel was culled for idleness follows the kernel a later run starts."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from tornado.websocket import websocket_connect

from tests.support.era_server import ServerProcess

# Culling passes twice a second; idle kernels go after 2 s. Nothing else runs on this server.
ENV = {"ERA_CULL_INTERVAL": "0.5", "ERA_KERNEL_IDLE_TIMEOUT": "2", "ERA_POOL_SIZE": "0"}


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(env=ENV).start()
    yield srv
    srv.cleanup()


async def closed_with(conn, timeout: float = 20.0) -> int | None:
    """Read until the server closes the socket; its close code."""
    deadline = time.monotonic() + timeout
    while await asyncio.wait_for(conn.read_message(), max(0.1, deadline - time.monotonic())) is not None:
        pass
    return conn.close_code


async def test_a_session_deleted_by_the_culler_closes_its_sockets_with_4404(server):
    # A plain session and a gateway kernel (a session with the kernel metadata), both expiring.
    await asyncio.to_thread(server.json, "POST", "/api/sessions", {"id": "life-old", "max_age": 4}, expect=201)
    await asyncio.to_thread(server.json, "POST", "/api/sessions", {
        "id": "life-old-kernel", "max_age": 4,
        "metadata": {"jupyter_kernel": True, "kernelspec": "era-python-local"}}, expect=201)
    hub_socket = await websocket_connect(f"{server.ws_base}/api/sessions/life-old/ws")
    assert json.loads(await hub_socket.read_message())["type"] == "status"
    channel_socket = await websocket_connect(f"{server.ws_base}/api/kernels/life-old-kernel/channels")
    assert await closed_with(hub_socket) == 4404
    assert await closed_with(channel_socket) == 4404
    for sid in ("life-old", "life-old-kernel"):
        assert (await asyncio.to_thread(server.request, "GET", f"/api/sessions/{sid}"))[0] == 404


async def test_a_channels_socket_follows_the_kernel_that_replaces_a_culled_one(server):
    kid = (await asyncio.to_thread(server.json, "POST", "/api/kernels", {"name": "era-python-local"},
                                   expect=201))["id"]
    ws = await websocket_connect(f"{server.ws_base}/api/kernels/{kid}/channels")
    try:
        deadline = time.monotonic() + 20
        while (await asyncio.to_thread(server.json, "GET", f"/api/sessions/{kid}"))["kernel"]["state"] != "none":
            assert time.monotonic() < deadline, "the idle kernel was never culled"
            await asyncio.sleep(0.2)
        # A REST run starts the next kernel; the socket hears that kernel's IOPub from then on.
        for text in ("cold start", "heard by the channel"):
            result = await asyncio.to_thread(server.json, "POST", f"/api/sessions/{kid}/run",
                                             {"code": f"print({text!r})"})
            assert result["stdout"] == f"{text}\n"
        while True:
            message = json.loads(await asyncio.wait_for(ws.read_message(), 10))
            if message["msg_type"] == "stream" and message["content"]["text"] == "heard by the channel\n":
                assert message["channel"] == "iopub"
                break
    finally:
        ws.close()
        await asyncio.to_thread(server.request, "DELETE", f"/api/kernels/{kid}")
