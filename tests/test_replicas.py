"""Replicas (README: Replicas): three real ``era_server`` processes on one PostgreSQL store
and one S3 workspace store (moto), each session served by the replica holding its lease.

Requests go to any replica, as a balancer would send them (round robin here, so that
most land on a replica that does not serve the session and are forwarded). Then the
owner of some sessions is SIGKILLed and another replica takes them over; an owner
paused (SIGSTOP) past its lease wakes up to find its writes refused. One module-scoped
cluster for every test, in the order written (later tests use what earlier ones left).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import os
import signal
import time
import uuid

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from .support.era_server import ServerProcess
from .support.s3 import CREDENTIALS, moto_endpoint

BUCKET = "era-replicas"
TTL = 3.0  # ERA_LEASE_TTL: short, so that takeovers happen within the test's time
# Ten kernels started at once on a loaded 2-core CI machine, their files fetched from S3.
KERNEL_START_S = 10.0
SESSIONS = 30
DATA_N: dict[str, int] = {}  # session id -> the n in its data


@pytest.fixture(scope="module")
def cluster(postgres_cluster):
    schema, url = postgres_cluster.new_schema()
    with moto_endpoint(BUCKET) as endpoint:
        options = {**CREDENTIALS, "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        env = {"ERA_STORE_URL": url, "ERA_WORKSPACE_URL": f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}",
               "ERA_WORKSPACE_OPTIONS": json.dumps(options), "ERA_POOL_SIZE": "0", "ERA_LEASE_TTL": str(TTL),
               "ERA_REPLICA_HEARTBEAT": "0.5", "ERA_SCHEDULE_RESCAN": "1", "ERA_MAX_KERNELS": "40"}
        replicas = [ServerProcess(env={**env, "ERA_REPLICA_ID": f"r{n}"}) for n in range(3)]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda r: r.start(ready_timeout=60), replicas))
        try:
            yield replicas
        finally:
            for r in replicas:
                if r.proc is not None and r.proc.poll() is None:
                    os.kill(r.proc.pid, signal.SIGCONT)
            for r in replicas:
                r.cleanup()
            postgres_cluster.drop_schema(schema)


def others(cluster, owner_id: str) -> list[ServerProcess]:
    return [r for r in cluster if r.env["ERA_REPLICA_ID"] != owner_id and r.proc.poll() is None]


def by_id(cluster, replica_id: str) -> ServerProcess:
    return next(r for r in cluster if r.env["ERA_REPLICA_ID"] == replica_id)


@pytest.fixture(scope="module")
def sessions(cluster):
    """SESSIONS persistent sessions, made round robin on the replicas (so each serves a
    third), each with a file, data and a variable from one run made through another replica."""
    made: dict[str, str] = {}  # session id -> the replica that made it

    def make(n: int) -> None:
        creator = cluster[n % 3]
        doc = creator.json("POST", "/api/sessions", {"language": "python", "persistent": True,
                                                     "data": {"n": n}}, expect=201)
        made[doc["id"]] = creator.env["ERA_REPLICA_ID"]
        DATA_N[doc["id"]] = n

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        list(pool.map(make, range(SESSIONS)))
    return made


def test_sessions_made_on_any_replica_run_through_any_other_and_say_their_owner(cluster, sessions):
    def run(item: tuple[int, tuple[str, str]]) -> None:
        n, (sid, owner) = item
        via = others(cluster, owner)[n % 2]  # never the owner: forwarded
        code = f"x = {n}\nopen('kept.txt', 'w').write('file {n}')\nprint(x * 2)"
        result = via.json("POST", f"/api/sessions/{sid}/run", {"code": code}, timeout=120)
        assert result["exit_code"] == 0 and result["stdout"] == f"{n * 2}\n", result
        doc = via.json("GET", f"/api/sessions/{sid}")
        assert doc["owner"] == owner and doc["kernel"]["state"] in ("idle", "busy"), doc

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        list(pool.map(run, enumerate(sorted(sessions.items()))))
    # Each replica serves the third it made, and the stats add them up across the cluster.
    stats = cluster[0].json("GET", "/api/resources/stats")
    assert stats["leases"]["held"] == SESSIONS // 3, stats["leases"]
    assert {r["id"]: r["live_kernels"] for r in stats["cluster"]["replicas"]} == {"r0": 10, "r1": 10, "r2": 10} \
        or stats["cluster"]["live_kernels"] >= SESSIONS - 3, stats["cluster"]  # heartbeats lag a beat
    listed = cluster[1].json("GET", "/api/sessions?limit=100")
    assert {s["id"]: s["owner"] for s in listed["sessions"]} == sessions


def test_a_websocket_and_an_sse_stream_on_a_replica_that_does_not_serve_the_session_see_output_live(cluster,
                                                                                                      sessions):
    sid, owner = sorted(sessions.items())[1]
    via = others(cluster, owner)[0]
    code = "import time\nprint('first', flush=True)\ntime.sleep(1.0)\nprint('second', flush=True)"

    async def over_websocket() -> list[tuple[float, dict]]:
        conn = await websocket_connect(f"{via.ws_base}/api/sessions/{sid}/ws")
        try:
            await conn.write_message(json.dumps({"type": "run", "code": code, "id": "w1"}))
            seen, t0 = [], time.monotonic()
            while True:
                msg = json.loads(await asyncio.wait_for(conn.read_message(), 30))
                seen.append((time.monotonic() - t0, msg))
                if msg.get("type") == "done":
                    return seen
        finally:
            conn.close()

    async def over_sse() -> list[tuple[float, bytes]]:
        chunks, t0 = [], time.monotonic()
        request = HTTPRequest(f"{via.base}/api/sessions/{sid}/stream", method="POST", body=json.dumps({"code": code}),
                              streaming_callback=lambda c: chunks.append((time.monotonic() - t0, c)),
                              request_timeout=60)
        response = await AsyncHTTPClient().fetch(request)
        assert response.code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
        return chunks

    seen = asyncio.run(over_websocket())
    stdout = [(t, m["content"]) for t, m in seen if m.get("type") == "stdout"]
    assert [c for _, c in stdout] == ["first\n", "second\n"], seen
    assert stdout[1][0] - stdout[0][0] > 0.7, stdout  # the first came while the code still slept
    chunks = asyncio.run(over_sse())
    first = next(t for t, c in chunks if b"first" in c)
    second = next(t for t, c in chunks if b"second" in c)
    assert second - first > 0.7, chunks


def test_one_schedule_fires_once_per_slot_with_three_replicas(cluster, sessions):
    sid, owner = sorted(sessions.items())[2]
    via = others(cluster, owner)[0]
    schedule = via.json("POST", f"/api/sessions/{sid}/schedules", {"cron": "*/2 * * * * *", "code": "print('tick')"},
                        expect=201)
    time.sleep(7.5)  # three or four slots, each seen by three schedulers (rescans every second)
    via.request("DELETE", f"/api/sessions/{sid}/schedules/{schedule['id']}")
    runs = [r for r in via.json("GET", f"/api/sessions/{sid}/runs")["runs"] if r.get("schedule_id") == schedule["id"]]
    slots = [r["slot"] for r in runs]
    assert len(slots) >= 2 and len(set(slots)) == len(slots), slots
    assert all(r["stdout"] == "tick\n" for r in runs), runs


def test_sessions_of_a_killed_replica_answer_again_through_the_others_with_files_data_and_history(cluster, sessions):
    victim = cluster[0]
    victim_id = victim.env["ERA_REPLICA_ID"]
    owned = sorted(sid for sid, owner in sessions.items() if owner == victim_id)
    assert len(owned) == SESSIONS // 3
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(10)
    t0 = time.monotonic()
    rest = others(cluster, victim_id)
    took: dict[str, float] = {}

    def again(item: tuple[int, str]) -> None:
        n, sid = item
        via = rest[n % 2]
        deadline = t0 + TTL + KERNEL_START_S + 10
        while True:  # while the lease runs out: a 503 that says so
            status, body = via.request("POST", f"/api/sessions/{sid}/run", {
                "code": "import json\nprint(open('kept.txt').read(), json.load(open('.session_data.json')), "
                        "'x' in dir())"}, timeout=60)
            if status == 200:
                break
            assert status == 503 and time.monotonic() < deadline, (status, body)
            time.sleep(0.2)
        took[sid] = time.monotonic() - t0
        result = json.loads(body)
        n_of = sessions_index(sid)
        # Files from S3, data from the store; the variable x was the dead kernel's only.
        assert result["stdout"] == f"file {n_of} {{'n': {DATA_N[sid]}}} False\n", result
        runs = via.json("GET", f"/api/sessions/{sid}/runs")["runs"]
        assert len(runs) >= 2 and runs[0]["stdout"] == f"{n_of * 2}\n", runs
        events = via.json("GET", f"/api/sessions/{sid}/events")["events"]
        restarted = [e for e in events if e["type"] == "kernel_restarted" and e["reason"] == "taken over"]
        assert len(restarted) == 1 and victim_id in restarted[0]["message"], events
        assert via.json("GET", f"/api/sessions/{sid}")["owner"] in ("r1", "r2")

    def sessions_index(sid: str) -> int:
        return sorted(sessions).index(sid)

    with concurrent.futures.ThreadPoolExecutor(len(owned)) as pool:  # all at once: none waits behind another
        list(pool.map(again, enumerate(owned)))
    print("answered again after SIGKILL (s):", sorted(round(t, 2) for t in took.values()))
    assert max(took.values()) < TTL + KERNEL_START_S, took


def test_a_paused_owner_that_lost_its_lease_cannot_write_when_it_wakes(cluster, sessions):
    live = [r for r in cluster if r.proc.poll() is None]
    sleeper, other = live[0], live[1]
    sleeper_id = sleeper.env["ERA_REPLICA_ID"]
    sid = next(sid for sid, owner in sorted(sessions.items()) if owner == sleeper_id)
    started = sleeper.json("POST", f"/api/sessions/{sid}/run", {
        "code": "import time\ntime.sleep(1.5)\nopen('late.txt', 'w').write('late')\nprint('late')",
        "background": True}, expect=202)
    time.sleep(0.5)  # running on the sleeper
    os.kill(sleeper.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(TTL + 0.5)
        # The other replica takes the session over: the run the sleeper had is interrupted.
        result = other.json("POST", f"/api/sessions/{sid}/run", {"code": "print('mine')"}, timeout=60)
        assert result["stdout"] == "mine\n", result
        assert other.json("GET", f"/api/sessions/{sid}")["owner"] == other.env["ERA_REPLICA_ID"]
    finally:
        os.kill(sleeper.proc.pid, signal.SIGCONT)
    # Awake: its kernel finishes the sleep and the run ends there, but nothing it writes lands.
    deadline = time.monotonic() + 10
    while not any(line for line in sleeper.lines if "lease_lost" in line):
        assert time.monotonic() < deadline, sleeper.log_tail(40)
        time.sleep(0.2)
    record = other.json("GET", f"/api/sessions/{sid}/runs/{started['run_id']}")
    assert record["status"] == "interrupted", record
    # Once more after a while: the sleeper's late result never overwrote the record.
    time.sleep(1.0)
    assert other.json("GET", f"/api/sessions/{sid}/runs/{started['run_id']}")["status"] == "interrupted"
    runs = other.json("GET", f"/api/sessions/{sid}/runs")["runs"]
    assert [r["stdout"] for r in runs if r.get("status", "completed") == "completed"][-1] == "mine\n"
    refused = [line for line in sleeper.lines if "LeaseLost" in line or "lease" in line.lower()]
    assert refused, sleeper.log_tail(40)


def test_fifty_sessions_times_twenty_runs_through_any_replica_without_an_error(cluster):
    live = [r for r in cluster if r.proc.poll() is None]
    turn = itertools.count()
    sids = []

    def make(_: int) -> None:
        sids.append(live[next(turn) % len(live)].json("POST", "/api/sessions", {"language": "python"},
                                                     expect=201)["id"])

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(make, range(50)))

    def work(sid: str) -> int:
        errors = 0
        for k in range(20):
            status, body = live[next(turn) % len(live)].request("POST", f"/api/sessions/{sid}/run",
                                                                 {"code": f"print({k})"}, timeout=120)
            if status != 200 or json.loads(body)["stdout"] != f"{k}\n":
                errors += 1
        return errors

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        errors = sum(pool.map(work, sids))
    assert errors == 0
    print(f"1000 runs through {len(live)} replicas in {time.monotonic() - t0:.1f} s")
