"""docs/security.md cases 1 and 2 over HTTP, on real servers: 200 concurrent creates
against a kernel limit (never more kernels than the limit, every answer a 201 or a 429
with Retry-After, nothing left behind), and 50 kernels started cold at once while
``/health`` keeps answering.

Kernels are counted for real: distinct kernel cgroups of the server that hold a live
process (a kernel enters its group at its first instruction, so a start in progress
counts), read from /proc by a sampler thread while the burst runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tornado.httpclient import AsyncHTTPClient

from tests.support.era_server import ServerProcess
from tests.support.kernel_cgroups import cgroup_dirs, kernel_groups

LIMIT = 4
BURST = 200
COLD = 50
# /health while the 50 start, in seconds: its 99th percentile when the test has the
# machine to itself, and bounds that hold even when other work overloads it (a shared
# 2-core box at a load average of 15 measured a median of 0.2-0.5 s, a p99 of 2-3 s,
# while the server itself used 2-3 s of CPU: the rest was waiting for a core).
# The case asks that /health keep answering; 2 s is what a balancer's check allows with
# room (deploy/haproxy.cfg: 10 s; Kubernetes: 1 s, three failures in a row). Measured here
# with the machine to itself: p99 1.0-1.4 s while 50 forked kernels started, the handler
# itself waiting up to HEALTH_DETAIL_WAIT (0.5 s) for fresh aggregates on busy threads.
HEALTH_P99 = 2.0
HEALTH_MEDIAN = 1.0
HEALTH_MAX = 5.0
# Forked kernels cost a fraction of a bubblewrap start: 50 of them fit a CI budget on 2 cores.
FORK = {"ERA_LOCAL_LAUNCHER": "fork"} if os.getuid() == 0 else {}


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sampler(threading.Thread):
    """Samples ``probe`` in a loop until stopped; keeps the peak."""

    def __init__(self, probe):
        super().__init__(daemon=True)
        self.probe, self.peak, self.samples, self.running = probe, 0, 0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.probe())
            self.samples += 1
            time.sleep(0.01)

    def stop(self) -> None:
        self.running = False
        self.join(10)


def fetcher(server: ServerProcess, concurrency: int):
    client = AsyncHTTPClient(force_instance=True, max_clients=concurrency + 10)

    async def call(method: str, path: str, body=None, timeout: float = 120):
        response = await client.fetch(f"{server.base}{path}", method=method,
                                      body=None if body is None else json.dumps(body),
                                      allow_nonstandard_methods=True, raise_error=False,
                                      request_timeout=timeout, connect_timeout=timeout)
        return response

    return client, call


@pytest.fixture(scope="module")
def limited():
    if os.getuid() != 0:
        pytest.skip("counting kernels needs their cgroups (root)")
    srv = ServerProcess(env={"ERA_MAX_KERNELS": str(LIMIT), "ERA_POOL_SIZE": "0", **FORK}).start()
    yield srv
    srv.cleanup()


async def test_200_concurrent_creates_never_pass_the_kernel_limit(limited):
    server = limited
    sampler = Sampler(lambda: len(kernel_groups(server.proc.pid)))
    client, call = fetcher(server, BURST)
    sampler.start()
    started = time.monotonic()
    try:
        answers = await asyncio.wait_for(asyncio.gather(
            *(call("POST", "/api/sessions", {"id": f"burst-{n:03d}"}) for n in range(BURST))), 180)
        elapsed = time.monotonic() - started
        created = [json.loads(r.body)["id"] for r in answers if r.code == 201]
        refused = [r for r in answers if r.code == 429]
        others = [(r.code, r.body[:200]) for r in answers if r.code not in (201, 429)]
        assert not others, others  # never a 500, a 503 or a hang
        for response in refused:
            body = json.loads(response.body)
            assert float(response.headers["Retry-After"]) > 0 and body["status_code"] == 429, body
        assert created and refused, (len(created), len(refused))
        # Every created session works (a culled kernel comes back on its next run) ...
        for sid in created[:LIMIT + 1]:
            ran = await call("POST", f"/api/sessions/{sid}/run", {"code": "print('ok')"})
            assert ran.code == 200 and json.loads(ran.body)["stdout"] == "ok\n", ran.body
        sampler.stop()
        assert sampler.samples >= 5, "the sampler saw the burst"
        assert 1 <= sampler.peak <= LIMIT, f"{sampler.peak} kernels at once against a limit of {LIMIT}"
        # ... and a refused one left no record and no workspace.
        listed = json.loads((await call("GET", "/api/sessions?limit=500")).body)
        assert sorted(s["id"] for s in listed["sessions"]) == sorted(created)
        workspaces = Path(server.env["ERA_DATA_DIR"]) / "workspaces"
        if workspaces.is_dir():
            assert len([p for p in workspaces.iterdir() if p.name.startswith("burst-")]) <= len(created)
        print(f"\n{BURST} creates in {elapsed:.1f}s: {len(created)} created, {len(refused)} refused (429), "
              f"peak {sampler.peak} kernels, {sampler.samples} samples")
    finally:
        sampler.stop()
        await call("DELETE", "/api/sessions?prefix=burst-")
        client.close()
    # Nothing leaks: no kernel process, cgroup, kernel directory or record is left.
    deadline = time.monotonic() + 15
    while (kernel_groups(server.proc.pid) or cgroup_dirs(server.proc.pid)) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not kernel_groups(server.proc.pid) and not cgroup_dirs(server.proc.pid)
    assert not list((Path(server.runtime) / "k").glob("*")), list((Path(server.runtime) / "k").iterdir())
    assert server.json("GET", "/api/sessions")["count"] == 0
    assert server.json("GET", "/health")["status"] == "ok"


# ---- case 2: a cold burst ----------------------------------------------------------------
@pytest.fixture(scope="module")
def roomy():
    if os.getuid() != 0:
        pytest.skip("counting kernels needs their cgroups (root)")
    srv = ServerProcess(env={"ERA_MAX_KERNELS": str(COLD + 4), "ERA_POOL_SIZE": "0", **FORK}).start()
    yield srv
    srv.cleanup()


# A prober of its own, in another process: in this one, the test's own threads and event
# loop (50 requests in flight, the sampler) would hold the GIL and time themselves.
PROBER = """
import http.client, sys, time
port, out = int(sys.argv[1]), []
while True:
    started = time.perf_counter()
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
    conn.request('GET', '/health')
    ok = conn.getresponse().status == 200
    conn.close()
    print(time.perf_counter() - started if ok else 'inf', flush=True)
    time.sleep(0.02)
"""


async def test_fifty_cold_starts_at_once_while_health_answers(roomy):
    """A create answers at once and starts its kernel in the background; a run waits for
    it. So 50 creates at once are 50 kernel starts at once, and 50 runs right after wait
    for every one of them to be ready (or to fail with an error: none may)."""
    server = roomy
    timeout = 60.0  # ERA_KERNEL_START_TIMEOUT's default: each start ends inside it, either way
    prober = subprocess.Popen([sys.executable, "-c", PROBER, str(server.port)], stdout=subprocess.PIPE, text=True)
    sampler = Sampler(lambda: len(kernel_groups(server.proc.pid)))
    client, call = fetcher(server, COLD)
    load_before = os.getloadavg()[0]
    sampler.start()
    started = time.monotonic()
    cpu0 = cpu_seconds(server.proc.pid)
    try:
        created = await asyncio.gather(*(call("POST", "/api/sessions", {"id": f"cold-{n:02d}"}) for n in range(COLD)))
        assert [r.code for r in created] == [201] * COLD, [(r.code, r.body[:300]) for r in created if r.code != 201]
        runs = await asyncio.gather(*(call("POST", f"/api/sessions/cold-{n:02d}/run", {"code": f"print({n})"},
                                           timeout=timeout + 30) for n in range(COLD)))
        elapsed = time.monotonic() - started
        cpu = cpu_seconds(server.proc.pid) - cpu0
        assert [json.loads(r.body).get("stdout") for r in runs] == [f"{n}\n" for n in range(COLD)], \
            [r.body[:300] for r in runs if r.code != 200][:3]
        assert elapsed < timeout
        prober.terminate()
        latencies = sorted(float(line) for line in prober.communicate(timeout=30)[0].split())
        sampler.stop()
        assert sampler.peak == COLD, sampler.peak  # they were all live at once
        inside = max(e["duration_ms"] for e in server.logs() if e.get("path") == "/health")
        assert len(latencies) >= 5, latencies
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        print(f"\n{COLD} cold starts, all ready and run in {elapsed:.1f}s; /health: {len(latencies)} probes, "
              f"median {latencies[len(latencies) // 2] * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms "
              f"(slowest inside the server {inside:.0f} ms); the server used {cpu:.1f} s of CPU; load average "
              f"{load_before:.1f} before")
        median = latencies[len(latencies) // 2]
        assert latencies[-1] < HEALTH_MAX and median < HEALTH_MEDIAN, latencies  # answered, all the while
        if load_before < os.cpu_count():  # the machine to itself, as in CI: the bound the case sets
            assert p99 < HEALTH_P99, f"/health p99 {p99 * 1000:.0f} ms during the burst"
    finally:
        if prober.poll() is None:
            prober.kill()
            prober.wait()
        sampler.stop()
        await call("DELETE", "/api/sessions?prefix=cold-")
        client.close()
    deadline = time.monotonic() + 20
    while kernel_groups(server.proc.pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not kernel_groups(server.proc.pid)
