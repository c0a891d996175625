"""Runs as records over real HTTP, against a real server and kernels: background runs
(202, status, result), the FIFO queue and its positions, cancel, the journal read after an
offset (JSON, long-poll, SSE with Last-Event-ID), WebSocket subscribe-and-replay, the
queue limit, and the bad input each of them refuses."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from tornado.websocket import websocket_connect

from tests.support.era_server import shared_server

SID = "runs-main"
FINISHED = {"completed", "failed", "cancelled", "interrupted"}


@pytest.fixture(scope="module")
def server():
    srv = shared_server()
    status, _ = srv.request("GET", f"/api/sessions/{SID}")
    if status == 404:
        srv.json("POST", "/api/sessions", {"id": SID}, expect=201)
    return srv


def background(server, code, sid=SID, expect=202, **extra):
    return server.json("POST", f"/api/sessions/{sid}/run", {"code": code, "background": True, **extra},
                       expect=expect)


def wait_finished(server, run_id, sid=SID, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        record = server.json("GET", f"/api/sessions/{sid}/runs/{run_id}")
        if record["status"] in FINISHED:
            return record
        assert time.monotonic() < deadline, record
        time.sleep(0.05)


def sse_events(raw: bytes) -> list[dict]:
    """Complete frames only (what an EventSource delivers): id, event and data of each."""
    text = raw.decode()
    head, _, body = text.partition("\r\n\r\n")
    frames = body.split("\n\n")[:-1]  # the last piece has no terminator yet: not delivered
    events = []
    for frame in frames:
        fields = dict(line.split(": ", 1) for line in frame.split("\n") if line and not line.startswith(":"))
        if "data" in fields:
            events.append({"id": fields.get("id"), "event": fields["event"], "data": json.loads(fields["data"])})
    return events


async def sse_get(port: int, path: str, last_event_id: int | None = None, max_bytes: int | None = None,
                  timeout: float = 60.0) -> tuple[bytes, bool]:
    """GET an SSE stream over a raw HTTP/1.0 connection (no chunking: the bytes are the
    stream), reading until it ends or ``max_bytes`` arrived; (bytes, ended)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    headers = "Accept: text/event-stream\r\n"
    if last_event_id is not None:
        headers += f"Last-Event-ID: {last_event_id}\r\n"
    writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode())
    data = b""
    ended = False
    try:
        while max_bytes is None or len(data) < max_bytes:
            chunk = await asyncio.wait_for(reader.read(4096 if max_bytes is None else
                                                       max(1, min(4096, max_bytes - len(data)))), timeout)
            if not chunk:
                ended = True
                break
            data += chunk
    finally:
        writer.close()
    return data, ended


# ---- background runs and the queue ------------------------------------------------------------
def test_a_background_run_answers_202_at_once_and_its_record_gives_the_synchronous_result(server):
    accepted = background(server, "import time; time.sleep(0.3); print('from the background'); 6 * 7")
    assert set(accepted) == {"run_id", "status", "position"}
    assert accepted["status"] in ("queued", "running") and accepted["position"] in (0, 1)
    record = wait_finished(server, accepted["run_id"])
    assert record["status"] == "completed" and record["reason"] is None
    assert record["source"] == "background" and record["session_id"] == SID
    assert record["stdout"] == "from the background\n" and record["exit_code"] == 0
    assert record["outputs"][-1]["data"]["text/plain"] == "42"
    assert record["submitted_at"] <= record["started_at"] <= record["finished_at"]
    sync = server.json("POST", f"/api/sessions/{SID}/run", {"code": "print('from the background'); 6 * 7"})
    assert set(sync) - {"session_id"} <= set(record), "the record holds every field a synchronous run answers"
    history = server.json("GET", f"/api/sessions/{SID}/runs")["runs"]
    assert [r["run_id"] for r in history[-2:]] == [accepted["run_id"], sync["run_id"]]
    assert history[-1]["source"] == "rest"


def test_runs_wait_their_turn_in_order_and_report_their_position(server):
    server.json("POST", f"/api/sessions/{SID}/run", {"code": "import pathlib; pathlib.Path('order.txt').write_text('')"})
    first = background(server, "import time; time.sleep(1.5); open('order.txt', 'a').write('1')")
    second = background(server, "open('order.txt', 'a').write('2')")
    third = background(server, "open('order.txt', 'a').write('3')")
    assert (second["position"], third["position"]) == (1, 2)
    assert server.json("GET", f"/api/sessions/{SID}/runs/{third['run_id']}")["status"] == "queued"
    for accepted in (first, second, third):
        assert wait_finished(server, accepted["run_id"])["status"] == "completed"
    status, body = server.request("GET", f"/api/sessions/{SID}/files/order.txt")
    assert (status, body) == (200, b"123")


def test_cancel_drops_a_queued_run_and_interrupts_a_running_one(server):
    running = background(server, "import time\nprint('started', flush=True)\ntime.sleep(30)")
    queued = background(server, "open('never.txt', 'w').write('ran')")
    deadline = time.monotonic() + 30
    while server.json("GET", f"/api/sessions/{SID}/runs/{running['run_id']}")["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    dropped = server.json("DELETE", f"/api/sessions/{SID}/runs/{queued['run_id']}")
    assert (dropped["status"], dropped["reason"]) == ("cancelled", "cancelled by request")
    server.json("DELETE", f"/api/sessions/{SID}/runs/{running['run_id']}")
    record = wait_finished(server, running["run_id"])
    assert (record["status"], record["reason"]) == ("interrupted", "cancelled by request")
    assert "KeyboardInterrupt" in (record.get("error") or {}).get("ename", "")
    assert server.request("GET", f"/api/sessions/{SID}/files/never.txt")[0] == 404
    again = server.json("DELETE", f"/api/sessions/{SID}/runs/{running['run_id']}")
    assert again["status"] == "interrupted", "a finished run stays as it ended"
    assert server.json("POST", f"/api/sessions/{SID}/run", {"code": "print('alive')"})["stdout"] == "alive\n"


# ---- the journal ------------------------------------------------------------------------------
def test_the_journal_gives_a_runs_events_after_any_offset_and_long_polls_for_more(server):
    run = server.json("POST", f"/api/sessions/{SID}/run", {"code": "for i in range(3): print(i, flush=True)"})
    page = server.json("GET", f"/api/sessions/{SID}/runs/{run['run_id']}/events")
    events = page["events"]
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert "".join(e["content"] for e in events if e["type"] == "stdout") == "0\n1\n2\n"
    assert any(e["type"] == "done" for e in events) and page["status"] == "completed"
    middle = seqs[len(seqs) // 2]
    rest = server.json("GET", f"/api/sessions/{SID}/runs/{run['run_id']}/events?after={middle}")["events"]
    assert rest == [e for e in events if e["seq"] > middle]
    end = server.json("GET", f"/api/sessions/{SID}/runs/{run['run_id']}/events?after={page['last_seq']}&wait=0.3")
    assert end["events"] == [] and end["last_seq"] == page["last_seq"]

    slow = background(server, "import time; time.sleep(1); print('late', flush=True); time.sleep(1)")
    deadline = time.monotonic() + 30
    after, lines = 0, []
    while "late\n" not in lines:
        page = server.json("GET", f"/api/sessions/{SID}/runs/{slow['run_id']}/events?after={after}&wait=20")
        lines += [e["content"] for e in page["events"] if e["type"] == "stdout"]
        after = page["last_seq"]
        assert time.monotonic() < deadline
    wait_finished(server, slow["run_id"])


async def test_sse_events_carry_their_seq_and_a_stream_resumes_after_last_event_id(server):
    status, headers, body = await asyncio.to_thread(
        server.request_full, "POST", f"/api/sessions/{SID}/stream",
        {"code": "for i in range(5): print(i, flush=True)"})
    assert status == 200
    run_id = headers["X-Era-Run-Id"]
    events = sse_events(b"\r\n\r\n" + body)
    assert all(e["id"] is not None for e in events) and events[-1]["event"] == "done"
    assert {e["data"]["run_id"] for e in events} == {run_id}
    cut = events[2]
    raw, ended = await sse_get(server.port, f"/api/sessions/{SID}/runs/{run_id}/events", last_event_id=int(cut["id"]))
    assert ended
    resumed = [e for e in sse_events(raw) if e["event"] in {"stdout", "stderr", "done"}]
    assert [(e["id"], e["data"]) for e in resumed] == [(e["id"], e["data"]) for e in events[3:]]


async def test_a_websocket_subscribe_replays_a_run_then_follows_it_live(server):
    run = background(server, "import time\nfor i in range(20):\n    print(i, flush=True)\n    time.sleep(0.1)")
    time.sleep(0.8)  # some of it has run: the rest comes live
    conn = await websocket_connect(f"{server.ws_base}/api/sessions/{SID}/ws")
    await conn.read_message()  # hello
    conn.write_message(json.dumps({"type": "subscribe", "run_id": run["run_id"], "after": 0}))
    seen = []
    while True:
        message = json.loads(await asyncio.wait_for(conn.read_message(), 30))
        if message.get("id") == run["run_id"]:
            seen.append(message)
            if message["type"] == "done":
                break
    conn.close()
    seqs = [m["seq"] for m in seen]
    assert len(seqs) == len(set(seqs)), "every event once (live ones that came first are not sent again)"
    seen.sort(key=lambda m: m["seq"])
    assert "".join(m["content"] for m in seen if m["type"] == "stdout") == "".join(f"{i}\n" for i in range(20))


async def test_a_subscribe_sent_after_a_runs_first_live_event_loses_nothing_that_came_during_its_replay(server):
    # What the web console does on a run another client started: it sees the run's first
    # event live, then subscribes from 0 to fill in what came before. An event journaled
    # and sent live while that replay reads the journal (here the input() prompt, which is
    # journaled at once) must still come, once. The subscribe goes at several moments
    # after the first event, so that some replay overlaps the prompt.
    watcher = await websocket_connect(f"{server.ws_base}/api/sessions/{SID}/ws")
    runner = await websocket_connect(f"{server.ws_base}/api/sessions/{SID}/ws")
    await watcher.read_message()  # hello
    await runner.read_message()

    async def next_of(run_tag: str) -> dict:
        while True:
            try:
                message = json.loads(await asyncio.wait_for(watcher.read_message(), 10))
            except asyncio.TimeoutError:
                raise AssertionError(f"run {run_tag}: an event of it never came") from None
            if message.get("id") == run_tag:
                return message

    for attempt in range(16):
        tag = f"asks-{attempt}"
        runner.write_message(json.dumps({"type": "run", "id": tag, "code": "print('hi', input('name? '))"}))
        seen = [await next_of(tag)]
        await asyncio.sleep(attempt * 0.002)
        watcher.write_message(json.dumps({"type": "subscribe", "run_id": seen[0]["run_id"], "after": 0}))
        while seen[-1]["type"] != "input_request":
            seen.append(await next_of(tag))
        watcher.write_message(json.dumps({"type": "input_reply", "value": "era"}))
        while seen[-1]["type"] != "done":
            seen.append(await next_of(tag))
        seqs = [m["seq"] for m in seen]
        assert len(seqs) == len(set(seqs)), f"every event once ({attempt})"
        assert "".join(m["content"] for m in seen if m["type"] == "stdout") == "hi era\n"
    watcher.close()
    runner.close()


async def test_a_websocket_opened_with_run_id_and_after_replays_in_order_before_going_live(server):
    run = background(server, "import time\nfor i in range(20):\n    print(i, flush=True)\n    time.sleep(0.05)")
    time.sleep(0.5)
    first = server.json("GET", f"/api/sessions/{SID}/runs/{run['run_id']}/events")["events"]
    after = first[1]["seq"]
    conn = await websocket_connect(f"{server.ws_base}/api/sessions/{SID}/ws?run_id={run['run_id']}&after={after}")
    await conn.read_message()  # hello
    seen = []
    while not seen or seen[-1]["type"] != "done":
        message = json.loads(await asyncio.wait_for(conn.read_message(), 30))
        if message.get("id") == run["run_id"]:
            seen.append(message)
    conn.close()
    assert [m["seq"] for m in seen] == sorted({m["seq"] for m in seen}) and seen[0]["seq"] > after
    every = server.json("GET", f"/api/sessions/{SID}/runs/{run['run_id']}/events")["events"]
    assert [m["seq"] for m in seen] == [e["seq"] for e in every if e["seq"] > after][:len(seen)]
    status, _ = server.request("GET", f"/api/sessions/{SID}/ws?run_id=run_nope",
                               headers={"Connection": "Upgrade", "Upgrade": "websocket",
                                        "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert status == 404


# ---- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("path,status,field", [
    ("/runs/run_nope", 404, None), ("/runs/run_nope/events", 404, None),
    ("/runs/{run}/events?after=-1", 400, "after"), ("/runs/{run}/events?after=x", 400, "after"),
    ("/runs/{run}/events?wait=61", 400, "wait"), ("/runs/{run}/events?wait=soon", 400, "wait"),
    ("/runs/{run}/events?limit=0", 400, "limit"),
])
def test_unknown_runs_are_404_and_bad_offsets_400_naming_the_field(server, path, status, field):
    run = server.json("POST", f"/api/sessions/{SID}/run", {"code": "1"})
    got, body = server.request("GET", f"/api/sessions/{SID}" + path.format(run=run["run_id"]))
    assert got == status, body
    assert json.loads(body).get("field") == field
    assert server.request("GET", "/api/sessions/nobody/runs/run_x")[0] == 404
    assert server.request("DELETE", f"/api/sessions/{SID}/runs/run_nope")[0] == 404


def test_a_bad_last_event_id_is_a_400_and_a_run_of_another_session_is_not_found(server):
    run = server.json("POST", f"/api/sessions/{SID}/run", {"code": "1"})
    status, body = server.request("GET", f"/api/sessions/{SID}/runs/{run['run_id']}/events",
                                  headers={"Accept": "text/event-stream", "Last-Event-ID": "abc"})
    assert status == 400 and json.loads(body)["field"] == "Last-Event-ID"
    server.json("POST", "/api/sessions", {"id": "runs-other"}, expect=201)
    assert server.request("GET", f"/api/sessions/runs-other/runs/{run['run_id']}")[0] == 404


def test_background_is_refused_where_a_run_streams_on_its_connection(server):
    status, body = server.request("POST", f"/api/sessions/{SID}/stream", {"code": "1", "background": True})
    assert status == 400 and json.loads(body)["field"] == "background"
    status, body = server.request("POST", f"/api/sessions/{SID}/run", {"code": "1", "background": "yes"})
    assert status == 400 and json.loads(body)["field"] == "background"


async def test_a_websocket_id_is_the_clients_own_and_each_run_gets_its_record_id(server):
    conn = await websocket_connect(f"{server.ws_base}/api/sessions/{SID}/ws")
    await conn.read_message()
    run_ids = []
    for n in range(2):  # the same client id twice, one run after the other: two records
        conn.write_message(json.dumps({"type": "run", "id": "again", "code": f"print({n})"}))
        while True:
            message = json.loads(await asyncio.wait_for(conn.read_message(), 30))
            if message.get("id") == "again" and message["type"] == "stdout":
                assert message["run_id"].startswith("run_")
            if message.get("id") == "again" and message["type"] == "result":
                break
        run_ids.append(message["run_id"])
    conn.close()
    assert run_ids[0] != run_ids[1]
    for n, run_id in enumerate(run_ids):
        record = server.json("GET", f"/api/sessions/{SID}/runs/{run_id}")
        assert record["source"] == "ws" and record["stdout"] == f"{n}\n"


def test_past_the_queue_limit_a_background_run_is_429_with_retry_after():
    srv = shared_server("runs-queue-limit", env={"ERA_RUN_QUEUE_MAX": "2"})
    srv.json("POST", "/api/sessions", {"id": "limited"}, expect=201)
    first = background(srv, "import time; time.sleep(3)", sid="limited")
    wait = time.monotonic() + 30
    while srv.json("GET", f"/api/sessions/limited/runs/{first['run_id']}")["status"] != "running":
        assert time.monotonic() < wait
        time.sleep(0.05)
    background(srv, "1", sid="limited")
    background(srv, "2", sid="limited")
    status, headers, body = srv.request_full("POST", "/api/sessions/limited/run", {"code": "3", "background": True})
    assert status == 429 and int(headers["Retry-After"]) >= 1, body
    assert "ERA_RUN_QUEUE_MAX" in json.loads(body)["error"]


def test_a_background_run_that_cannot_start_ends_failed_with_its_reason(server):
    server.json("POST", "/api/sessions", {"id": "runs-no-code"}, expect=201)
    accepted = background(server, None, sid="runs-no-code")  # no code, and no stored program
    record = wait_finished(server, accepted["run_id"], sid="runs-no-code")
    assert record["status"] == "failed" and "code" in record["reason"], record

