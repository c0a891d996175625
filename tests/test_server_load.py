"""Load: 50 sessions x 10 concurrent runs over REST, all in flight at once. Each run prints
a unique token; every result must carry exactly its own token (no run lost or mixed)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from tornado.httpclient import AsyncHTTPClient

from tests.support.era_server import ServerProcess

SESSIONS = 50
RUNS_PER_SESSION = 10


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(env={"ERA_MAX_KERNELS": str(SESSIONS + 4)}).start()
    yield srv
    srv.cleanup()


async def test_fifty_sessions_ten_concurrent_runs_each(server):
    client = AsyncHTTPClient(force_instance=True, max_clients=SESSIONS * RUNS_PER_SESSION + 10)

    async def call(method, path, body=None):
        response = await client.fetch(f"{server.base}{path}", method=method,
                                      body=None if body is None else json.dumps(body),
                                      allow_nonstandard_methods=True, raise_error=False,
                                      request_timeout=600, connect_timeout=60)
        return response.code, json.loads(response.body)

    try:
        created = await asyncio.gather(*(call("POST", "/api/sessions", {"id": f"load-{n:02d}"})
                                         for n in range(SESSIONS)))
        assert all(code == 201 for code, _ in created), [c for c in created if c[0] != 201][:3]
        jobs = [(f"load-{n:02d}", f"tok-{n:02d}-{i}-{time.time_ns()}")
                for n in range(SESSIONS) for i in range(RUNS_PER_SESSION)]
        started = time.monotonic()
        results = await asyncio.gather(*(call("POST", f"/api/sessions/{sid}/run",
                                              {"code": f"import time\ntime.sleep(0.01)\nprint({token!r})"})
                                         for sid, token in jobs))
        elapsed = time.monotonic() - started
        for (sid, token), (code, result) in zip(jobs, results):
            assert code == 200, (sid, result)
            assert result["exit_code"] == 0 and result["session_id"] == sid, result
            assert result["stdout"] == token + "\n", (token, result["stdout"])
        assert len({r["run_id"] for _, r in results}) == len(jobs)
        # every run is in its own session's history, once
        histories = await asyncio.gather(*(call("GET", f"/api/sessions/load-{n:02d}/runs")
                                           for n in range(SESSIONS)))
        for n, (code, history) in enumerate(histories):
            mine = sorted(r["stdout"] for r in history["runs"])
            assert mine == sorted(token + "\n" for sid, token in jobs if sid == f"load-{n:02d}")
        health = await call("GET", "/health")
        assert health[0] == 200
        print(f"\n{len(jobs)} runs over {SESSIONS} sessions in {elapsed:.1f}s")
    finally:
        await call("DELETE", "/api/sessions?prefix=load-")
        client.close()
