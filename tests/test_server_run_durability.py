"""What a run survives, with real clients and a real server process: clients that drop
their connection at random points and reconnect (SSE with Last-Event-ID, WebSocket
subscribe) end with every line exactly once, and a server killed with SIGKILL comes
back with the running run ``interrupted`` ("server restarted"), its journal kept, and
the queued runs run once each on a fresh kernel."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time

from tornado.websocket import websocket_connect

from tests.support.era_server import ServerProcess, shared_server
from tests.test_server_runs import background, sse_events, sse_get, wait_finished

LINES = 1000
PRINT_LINES = ("import time\n"
               f"for i in range(1, {LINES + 1}):\n"
               "    print(i, flush=True)\n"
               "    if i % 10 == 0: time.sleep(0.02)\n")


def numbers(chunks: list[str]) -> list[int]:
    return [int(line) for line in "".join(chunks).splitlines()]


async def sse_client(port: int, sid: str, run_id: str, rng: random.Random) -> tuple[list[int], int]:
    """Read the run's events as SSE, hanging up after a random number of bytes and
    resuming from the last complete event's id, until the stream ends."""
    last_id, chunks, reconnects = None, [], 0
    while True:
        raw, ended = await sse_get(port, f"/api/sessions/{sid}/runs/{run_id}/events", last_event_id=last_id,
                                   max_bytes=None if reconnects >= 8 else rng.randint(200, 6000))
        for event in sse_events(raw):
            chunks += [event["data"]["content"]] if event["event"] == "stdout" else []
            last_id = int(event["id"])
        if ended:
            return numbers(chunks), reconnects
        reconnects += 1
        await asyncio.sleep(rng.uniform(0, 0.2))


async def ws_client(base: str, sid: str, run_id: str, rng: random.Random) -> tuple[list[int], int]:
    """Follow the run over a WebSocket, close it after a random number of messages,
    reconnect after the last seq seen, until the run's done event."""
    after, chunks, reconnects = 0, [], 0
    while True:
        # The URL form replays before any live event of the run: in order, so the last
        # seq seen is where the next connection resumes.
        conn = await websocket_connect(f"{base}/api/sessions/{sid}/ws?run_id={run_id}&after={after}")
        await conn.read_message()  # hello
        budget = None if reconnects >= 8 else rng.randint(1, 40)
        while budget is None or budget > 0:
            message = json.loads(await asyncio.wait_for(conn.read_message(), 60))
            if message.get("id") != run_id or "seq" not in message:
                continue
            assert message["seq"] > after, "nothing twice"
            after = message["seq"]
            if message["type"] == "stdout":
                chunks.append(message["content"])
            if message["type"] == "done":
                conn.close()
                return numbers(chunks), reconnects
            budget = None if budget is None else budget - 1
        conn.close()
        reconnects += 1
        await asyncio.sleep(rng.uniform(0, 0.2))


async def test_clients_that_drop_and_reconnect_at_random_points_see_every_line_exactly_once():
    server = shared_server()
    sid = "reconnect"
    if server.request("GET", f"/api/sessions/{sid}")[0] == 404:
        server.json("POST", "/api/sessions", {"id": sid}, expect=201)
    run = background(server, PRINT_LINES, sid=sid)
    clients = [sse_client(server.port, sid, run["run_id"], random.Random(seed)) for seed in range(3)]
    clients += [ws_client(server.ws_base, sid, run["run_id"], random.Random(100 + seed)) for seed in range(3)]
    results = await asyncio.wait_for(asyncio.gather(*clients), 120)
    expected = list(range(1, LINES + 1))
    for got, reconnects in results:
        assert got == expected
        assert reconnects >= 1, "each client dropped its connection at least once"
    # A late client, after the run ended, replays it whole.
    late, _ = await sse_client(server.port, sid, run["run_id"], random.Random(7))
    assert late == expected
    assert wait_finished(server, run["run_id"], sid=sid)["stdout"].splitlines() == [str(i) for i in expected]


def _restart(old: ServerProcess) -> ServerProcess:
    new = ServerProcess()
    new.env.update(ERA_DATA_DIR=old.env["ERA_DATA_DIR"], ERA_RUNTIME_DIR=old.env["ERA_RUNTIME_DIR"])
    return new.start()


def test_after_sigkill_the_running_run_is_interrupted_and_queued_runs_run_once_on_a_fresh_kernel():
    first = ServerProcess().start()
    second = None
    try:
        first.json("POST", "/api/sessions", {"id": "survivor"}, expect=201)
        first.json("POST", "/api/sessions/survivor/run", {"code": "state = 'from before'"})
        running = background(first, "import time\nopen('log.txt', 'a').write('running\\n')\n"
                                    "print('before the kill', flush=True)\ntime.sleep(60)", sid="survivor")
        queued = [background(first, f"open('log.txt', 'a').write('queued {n}\\n')\n"
                                    "print(globals().get('state', 'state lost'))", sid="survivor")
                  for n in range(2)]
        deadline = time.monotonic() + 30
        seen: list[dict] = []
        while not any(e.get("content") == "before the kill\n" for e in seen):
            seen = first.json("GET", f"/api/sessions/survivor/runs/{running['run_id']}/events?wait=5")["events"]
            assert time.monotonic() < deadline
        kernels = first.descendants()
        first.stop(signal.SIGKILL)
        for pid in kernels:  # what a killed server leaves: the new one must not depend on them
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

        second = _restart(first)
        cut = second.json("GET", f"/api/sessions/survivor/runs/{running['run_id']}")
        assert (cut["status"], cut["reason"]) == ("interrupted", "server restarted")
        kept = second.json("GET", f"/api/sessions/survivor/runs/{running['run_id']}/events")["events"]
        assert [e["seq"] for e in kept] == [e["seq"] for e in seen], "the committed journal is kept as it was"
        results = [wait_finished(second, q["run_id"], sid="survivor") for q in queued]
        for result in results:
            assert result["status"] == "completed" and result["kernel_state_lost"] is True
            assert result["stdout"] == "state lost\n", "a fresh kernel: nothing of the old one"
        status, log = second.request("GET", "/api/sessions/survivor/files/log.txt")
        assert (status, log) == (200, b"running\nqueued 0\nqueued 1\n"), "nothing ran twice"
        after = second.json("GET", f"/api/sessions/survivor/runs/{queued[0]['run_id']}/events")["events"]
        assert min(e["seq"] for e in after) > max(e["seq"] for e in seen), "seq goes on after a restart"
        history = [r["run_id"] for r in second.json("GET", "/api/sessions/survivor/runs")["runs"]]
        assert history[-3:] == [running["run_id"], *(q["run_id"] for q in queued)]
    finally:
        if second is not None:
            second.cleanup()
        first.cleanup()
