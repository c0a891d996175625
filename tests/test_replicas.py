"""Replicas (README: Replicas): three real ``era_server`` processes on one PostgreSQL store
and one S3 workspace store (moto), behind HAProxy with the repository's own config
(deploy/haproxy.cfg, round robin: most requests land on a replica that does not serve
the session and are forwarded). Each session is served by the replica holding its lease.
The owner of some sessions is SIGKILLed and the others take them over; an owner paused
(SIGSTOP) past its lease wakes up to find its writes refused. One module-scoped cluster
for every test, in the order written (later tests use what earlier ones left).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import time
import uuid

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect

from .support.era_server import ServerProcess
from .support.loopback import free_port, stop_process, wait_answering
from .support.s3 import CREDENTIALS, moto_endpoint
from .test_jupyter_gateway import run_over_channels

BUCKET = "era-replicas"
TTL = 3.0  # ERA_LEASE_TTL: short, so that takeovers happen within the test's time
# Ten kernels started at once on a loaded 2-core CI machine, their files fetched from S3.
KERNEL_START_S = 12.0
SESSIONS = 30
DATA_N: dict[str, int] = {}  # session id -> the n in its data


HAPROXY_CFG = Path(__file__).resolve().parent.parent / "deploy" / "haproxy.cfg"


class Balancer:
    """HAProxy on loopback in front of the replicas, talked to as a server is."""

    def __init__(self, replicas: list[ServerProcess]):
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not os.path.exists(haproxy) and os.environ.get("ERA_REQUIRE_HAPROXY") != "1":
            pytest.skip("HAProxy is not installed (apt-get install haproxy; ERA_REQUIRE_HAPROXY=1 makes this fail)")
        self.port = free_port()
        env = {**os.environ, "ERA_BALANCER_BIND": f"127.0.0.1:{self.port}",
               **{f"ERA_REPLICA_{n + 1}": f"127.0.0.1:{r.port}" for n, r in enumerate(replicas)}}
        self.log = tempfile.NamedTemporaryFile(prefix="era-haproxy-", suffix=".log")
        # The repository's own config, as scripts/cluster.sh runs it.
        self.proc = subprocess.Popen([haproxy, "-db", "-f", str(HAPROXY_CFG)], env=env, stdout=subprocess.DEVNULL,
                                     stderr=self.log)
        # Up once its health checks took every replica in (rise 2, inter 1 s).
        wait_answering(self._all_up, self.proc, 20, "haproxy", interval=0.2,
                       details=lambda: Path(self.log.name).read_text()[-2000:])

    def _all_up(self) -> bool:
        seen = set()
        for _ in range(6):  # round robin: every replica answers within a few requests
            try:
                seen.add(self.json("GET", "/api/resources/stats", expect=None, timeout=5).get("replica"))
            except (OSError, ValueError):
                return False
        return len(seen) == 3

    request_full = ServerProcess.request_full
    request = ServerProcess.request
    json = ServerProcess.json
    health = ServerProcess.health
    base = ServerProcess.base
    ws_base = ServerProcess.ws_base

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


@pytest.fixture(scope="module")
def cluster(postgres_cluster):
    schema, url = postgres_cluster.new_schema()
    with moto_endpoint(BUCKET) as endpoint:
        options = {**CREDENTIALS, "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        env = {"ERA_STORE_URL": url, "ERA_WORKSPACE_URL": f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}",
               "ERA_WORKSPACE_OPTIONS": json.dumps(options), "ERA_POOL_SIZE": "0", "ERA_LEASE_TTL": str(TTL),
               "ERA_REPLICA_HEARTBEAT": "0.5", "ERA_SCHEDULE_RESCAN": "1", "ERA_MAX_KERNELS": "40"}
        replicas = Replicas(ServerProcess(env={**env, "ERA_REPLICA_ID": f"r{n}"}) for n in range(3))
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda r: r.start(ready_timeout=60), replicas))
        balancer = None
        try:
            balancer = Balancer(replicas)
            replicas.balancer = balancer
            yield replicas
        finally:
            if balancer is not None:
                balancer.stop()
            for r in replicas:
                if r.proc is not None and r.proc.poll() is None:
                    os.kill(r.proc.pid, signal.SIGCONT)
            for r in replicas:
                r.cleanup()
            postgres_cluster.drop_schema(schema)


class Replicas(list):
    balancer: Balancer


def others(cluster, owner_id: str) -> list[ServerProcess]:
    return [r for r in cluster if r.env["ERA_REPLICA_ID"] != owner_id and r.proc.poll() is None]


def by_id(cluster, replica_id: str) -> ServerProcess:
    return next(r for r in cluster if r.env["ERA_REPLICA_ID"] == replica_id)


@pytest.fixture(scope="module")
def sessions(cluster):
    """SESSIONS persistent sessions made through the balancer (round robin: each replica
    makes and serves about a third), session id -> its owner."""
    made: dict[str, str] = {}

    def make(n: int) -> None:
        doc = cluster.balancer.json("POST", "/api/sessions", {"language": "python", "persistent": True,
                                                              "data": {"n": n}}, expect=201)
        assert doc["owner"] in ("r0", "r1", "r2"), doc
        made[doc["id"]] = doc["owner"]
        DATA_N[doc["id"]] = n

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        list(pool.map(make, range(SESSIONS)))
    return made


def test_sessions_made_through_the_balancer_run_code_through_it_on_their_owner(cluster, sessions):
    def run(item: tuple[int, tuple[str, str]]) -> None:
        n, (sid, owner) = item
        code = f"x = {n}\nopen('kept.txt', 'w').write('file {n}')\nprint(x * 2)"
        result = cluster.balancer.json("POST", f"/api/sessions/{sid}/run", {"code": code}, timeout=120)
        assert result["exit_code"] == 0 and result["stdout"] == f"{n * 2}\n", result
        doc = others(cluster, owner)[n % 2].json("GET", f"/api/sessions/{sid}")  # asked where it is not served
        assert doc["owner"] == owner and doc["kernel"]["state"] in ("idle", "busy"), doc

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        list(pool.map(run, enumerate(sorted(sessions.items()))))
    # Each replica serves the third it made, and the stats add them up across the cluster.
    for replica in cluster:
        stats = replica.json("GET", "/api/resources/stats")
        mine = sum(1 for owner in sessions.values() if owner == stats["replica"])
        assert stats["leases"]["held"] == mine and stats["live_kernels"] == mine, stats
    deadline = time.monotonic() + 5  # the totals come from heartbeats: a beat behind
    while (cluster_stats := cluster[0].json("GET", "/api/resources/stats")["cluster"])["live_kernels"] != SESSIONS:
        assert time.monotonic() < deadline, cluster_stats
        time.sleep(0.25)
    assert sorted(r["id"] for r in cluster_stats["replicas"]) == ["r0", "r1", "r2"]
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

    # A gateway kernel (a session JupyterLab made) on the owner, its channels opened elsewhere.
    kernel = by_id(cluster, owner).json("POST", "/api/kernels", {"name": "era-python-local"}, expect=201)

    async def over_jupyter_channels() -> dict:
        conn = await websocket_connect(f"{via.ws_base}/api/kernels/{kernel['id']}/channels")
        try:
            return await run_over_channels(conn, "print('via the gateway')")
        finally:
            conn.close()

    seen = asyncio.run(over_websocket())
    stdout = [(t, m["content"]) for t, m in seen if m.get("type") == "stdout"]
    assert [c for _, c in stdout] == ["first\n", "second\n"], seen
    assert stdout[1][0] - stdout[0][0] > 0.7, stdout  # the first came while the code still slept
    chunks = asyncio.run(over_sse())
    first = next(t for t, c in chunks if b"first" in c)
    second = next(t for t, c in chunks if b"second" in c)
    assert second - first > 0.7, chunks
    # Bytes both ways through a replica that does not serve the session: a file up and down.
    blob = bytes(range(256)) * 4096
    status, _ = via.request("PUT", f"/api/sessions/{sid}/files/blob.bin", blob)
    assert status == 200
    status, headers, body = others(cluster, owner)[1].request_full("GET", f"/api/sessions/{sid}/files/blob.bin")
    assert status == 200 and body == blob and headers.get("X-Content-Type-Options") == "nosniff"
    gateway = asyncio.run(over_jupyter_channels())
    assert gateway["stream"] == "via the gateway\n" and gateway["reply"]["status"] == "ok", gateway


ECHO_APP = """
import http.server, threading
class Echo(http.server.BaseHTTPRequestHandler):
    def answer(self, body):
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self.answer(('GET ' + self.path).encode())
    def do_POST(self):
        self.answer(self.rfile.read(int(self.headers['Content-Length'])))
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(('127.0.0.1', 8000), Echo)
threading.Thread(target=server.serve_forever, daemon=True).start()
print('listening')
"""


def test_a_sessions_port_answers_through_a_replica_that_does_not_serve_it(cluster, sessions):
    """/proxy/{id}/{port}/... reaching another replica goes to the owner's sandbox, both ways."""
    sid, owner = sorted(sessions.items())[2]
    started = cluster.balancer.json("POST", f"/api/sessions/{sid}/run", {"code": ECHO_APP}, timeout=60)
    assert started["stdout"] == "listening\n", started
    blob = bytes(range(256)) * 2048
    for via in [*others(cluster, owner), cluster.balancer]:
        status, headers, body = via.request_full("GET", f"/proxy/{sid}/8000/some/where?q=1")
        assert (status, body) == (200, b"GET /some/where?q=1"), (status, body)
        csp = [v for k, v in headers.items() if k.lower() == "content-security-policy"]
        assert len(csp) == 1 and csp[0].startswith("sandbox"), headers  # the owner's, not added twice
        status, _, body = via.request_full("POST", f"/proxy/{sid}/8000/echo", blob)
        assert status == 200 and body == blob


def test_mcp_tools_for_a_session_work_on_a_replica_that_does_not_serve_it(cluster, sessions):
    """The MCP tools call the HTTP API of the replica they reached, which forwards."""
    sid, owner = sorted(sessions.items())[3]
    for via in others(cluster, owner):
        answer = via.json("POST", "/mcp/v1", {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
            "name": "era_run_in_session", "arguments": {"session_id": sid, "code": "print('via mcp')"}}})
        assert answer["result"]["isError"] is False and "via mcp" in answer["result"]["content"][0]["text"], answer
    assert by_id(cluster, owner).json("GET", f"/api/sessions/{sid}")["owner"] == owner  # it stayed where it was


def test_one_schedule_fires_once_per_slot_with_three_replicas(cluster, sessions):
    sid, owner = sorted(sessions.items())[2]
    via = cluster.balancer
    schedule = via.json("POST", f"/api/sessions/{sid}/schedules", {"cron": "*/2 * * * * *", "code": "print('tick')"},
                        expect=201)
    # Until a third slot has fired: by then each earlier slot was seen by all three
    # schedulers (they rescan every second; slots are two seconds apart), so a double
    # firing of it would be in the history. (It slept 7.5 s, three or four slots, before.)
    deadline = time.monotonic() + 30
    while len({r["slot"] for r in via.json("GET", f"/api/sessions/{sid}/runs")["runs"]
               if r.get("schedule_id") == schedule["id"]}) < 3:
        assert time.monotonic() < deadline, "the schedule did not fire three slots"
        time.sleep(0.2)
    time.sleep(1.0)  # the third slot's own rescans too
    via.request("DELETE", f"/api/sessions/{sid}/schedules/{schedule['id']}")
    runs = [r for r in via.json("GET", f"/api/sessions/{sid}/runs")["runs"] if r.get("schedule_id") == schedule["id"]]
    slots = [r["slot"] for r in runs]
    assert len(slots) >= 2 and len(set(slots)) == len(slots), slots
    assert all(r["stdout"] == "tick\n" for r in runs), runs


def test_sessions_of_a_killed_replica_answer_again_through_the_balancer_with_files_data_and_history(cluster,
                                                                                                   sessions):
    victim_id = max(("r0", "r1", "r2"), key=lambda r: sum(1 for o in sessions.values() if o == r))
    victim = by_id(cluster, victim_id)
    owned = sorted(sid for sid, owner in sessions.items() if owner == victim_id)
    assert len(owned) >= SESSIONS // 3
    # One session has a run going and one queued behind it when its replica dies.
    busy = owned[0]
    cut = cluster.balancer.json("POST", f"/api/sessions/{busy}/run", {
        "code": "import time\ntime.sleep(60)", "background": True}, expect=202)["run_id"]
    queued = cluster.balancer.json("POST", f"/api/sessions/{busy}/run", {
        "code": "print('queued before the crash')", "background": True}, expect=202)["run_id"]
    deadline = time.monotonic() + 30
    while cluster.balancer.json("GET", f"/api/sessions/{busy}/runs/{cut}")["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(10)
    t0 = time.monotonic()
    took: dict[str, float] = {}

    def again(item: tuple[int, str]) -> None:
        n, sid = item
        via = cluster.balancer
        deadline = t0 + TTL + KERNEL_START_S + 10
        while True:  # while the lease runs out: a 503 that says so
            status, body = via.request("POST", f"/api/sessions/{sid}/run", {
                "code": "import json\nprint(open('kept.txt').read(), json.load(open('.session_data.json')), "
                        "'x' in dir())"}, timeout=60)
            if status == 200:
                break
            # 503 until the lease expires (ours), or while HAProxy still sends to the dead one (its)
            assert status in (502, 503) and time.monotonic() < deadline, (status, body)
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
        assert via.json("GET", f"/api/sessions/{sid}")["owner"] not in (victim_id, None)

    def sessions_index(sid: str) -> int:
        return sorted(sessions).index(sid)

    with concurrent.futures.ThreadPoolExecutor(len(owned)) as pool:  # all at once: none waits behind another
        list(pool.map(again, enumerate(owned)))
    print("answered again after SIGKILL (s):", sorted(round(t, 2) for t in took.values()))
    # The queued run ran on the new owner; the one the crash cut is marked so.
    cut_record = cluster.balancer.json("GET", f"/api/sessions/{busy}/runs/{cut}")
    assert cut_record["status"] == "interrupted" and victim_id in cut_record["reason"], cut_record
    deadline = time.monotonic() + 5  # ran before the run above: its record lands a moment later
    while (queued_record := cluster.balancer.json("GET", f"/api/sessions/{busy}/runs/{queued}"))["status"] != \
            "completed":
        assert time.monotonic() < deadline, queued_record
        time.sleep(0.1)
    assert queued_record["stdout"] == "queued before the crash\n", queued_record
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


def test_fifty_sessions_times_twenty_runs_through_the_balancer_without_an_error(cluster, sessions):
    live = [r for r in cluster if r.proc.poll() is None]
    sids = list(sessions)  # the thirty above, and twenty more

    def make(_: int) -> None:
        sids.append(cluster.balancer.json("POST", "/api/sessions", {"language": "python"}, expect=201)["id"])

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(make, range(50 - len(sids))))

    errors: list[tuple[int, bytes]] = []

    def work(sid: str) -> None:
        for k in range(20):
            status, body = cluster.balancer.request("POST", f"/api/sessions/{sid}/run", {"code": f"print({k})"},
                                                    timeout=120)
            if status != 200 or json.loads(body)["stdout"] != f"{k}\n":
                errors.append((status, body[:300]))

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        list(pool.map(work, sids))
    assert not errors, (len(errors), errors[:5])
    print(f"1000 runs through {len(live)} replicas in {time.monotonic() - t0:.1f} s")


def test_a_bulk_delete_through_one_replica_deletes_sessions_every_replica_serves(cluster, sessions):
    live = [r for r in cluster if r.proc.poll() is None]
    listing = cluster.balancer.json("GET", "/api/sessions?limit=1000")["sessions"]
    owners = {s["id"]: s["owner"] for s in listing if s["id"] in sessions}  # as they are now, after the moves
    doomed = [next(sid for sid, o in owners.items() if o == r.env["ERA_REPLICA_ID"]) for r in live]
    before = {r.env["ERA_REPLICA_ID"]: r.json("GET", "/api/resources/stats")["leases"]["held"] for r in live}
    answer = live[0].json("DELETE", "/api/sessions", {"ids": doomed})
    assert sorted(answer["deleted_sessions"]) == sorted(doomed), answer
    listed = {s["id"] for s in cluster.balancer.json("GET", "/api/sessions?limit=1000")["sessions"]}
    assert not listed & set(doomed)
    # Each owner lets go of its deleted session (and its kernel) at its next lease renewal.
    deadline = time.monotonic() + TTL + 2
    for r in live:
        rid = r.env["ERA_REPLICA_ID"]
        while r.json("GET", "/api/resources/stats")["leases"]["held"] != before[rid] - 1:
            assert time.monotonic() < deadline, (rid, r.json("GET", "/api/resources/stats")["leases"])
            time.sleep(0.2)
