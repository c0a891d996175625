"""Cells a Jupyter client runs through the gateway are run records too (source
"gateway"): in the history, addressable by id, with their output in the journal, and
ended ``interrupted`` when their kernel goes away under them. Real server, real kernel,
a real WebSocket client speaking the Jupyter protocol."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from tornado.websocket import websocket_connect

from tests.support.era_server import ServerProcess
from tests.test_jupyter_gateway import execute_request, run_over_channels


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(env={"ERA_POOL_SIZE": "0"}).start()
    yield srv
    srv.cleanup()


def gateway_runs(server, kid):
    return [r for r in server.json("GET", f"/api/sessions/{kid}/runs")["runs"] if r.get("source") == "gateway"]


async def test_a_gateway_cell_is_a_run_record_with_its_output_in_the_journal(server):
    kid = server.json("POST", "/api/kernels", {"name": "era-python-local"}, expect=201)["id"]
    ws = await websocket_connect(f"{server.ws_base}/api/kernels/{kid}/channels")
    try:
        seen = await run_over_channels(ws, "print(6*7)")
        assert seen["stream"] == "42\n"
        failed = await run_over_channels(ws, "1/0")
        assert failed["reply"]["status"] == "error"
    finally:
        ws.close()
    deadline = time.monotonic() + 10
    while len(gateway_runs(server, kid)) < 2:
        assert time.monotonic() < deadline, server.json("GET", f"/api/sessions/{kid}/runs")
        time.sleep(0.05)
    ok, error = gateway_runs(server, kid)
    assert (ok["status"], ok["exit_code"], ok["stdout"], ok["code"]) == ("completed", 0, "42\n", "print(6*7)")
    assert (error["status"], error["exit_code"], error["error"]["ename"]) == ("failed", 1, "ZeroDivisionError")
    assert server.json("GET", f"/api/sessions/{kid}/runs/{ok['run_id']}")["source"] == "gateway"
    events = server.json("GET", f"/api/sessions/{kid}/runs/{ok['run_id']}/events")["events"]
    assert [e["content"] for e in events if e["type"] == "stdout"] == ["42\n"]
    assert events[-1]["type"] == "done" and events[-1]["exit_code"] == 0
    server.request("DELETE", f"/api/kernels/{kid}")


async def test_a_gateway_cell_whose_kernel_is_restarted_under_it_ends_interrupted(server):
    kid = server.json("POST", "/api/kernels", {"name": "era-python-local"}, expect=201)["id"]
    ws = await websocket_connect(f"{server.ws_base}/api/kernels/{kid}/channels")
    try:
        ws.write_message(json.dumps(execute_request("import time; print('going', flush=True); time.sleep(60)")))
        deadline = time.monotonic() + 30
        while True:  # the cell is running: its first line has come (not a fixed second)
            message = json.loads(await asyncio.wait_for(ws.read_message(), max(deadline - time.monotonic(), 0.1)))
            if message["msg_type"] == "stream" and "going" in message["content"]["text"]:
                break
        await asyncio.to_thread(server.json, "POST", f"/api/sessions/{kid}/restart")
        deadline = time.monotonic() + 20
        while not gateway_runs(server, kid):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        record = gateway_runs(server, kid)[0]
        assert record["status"] == "interrupted" and "restart" in record["reason"], record
    finally:
        ws.close()
        server.request("DELETE", f"/api/kernels/{kid}")
