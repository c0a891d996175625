"""The warm pool, admission and culling as an HTTP client sees them (real server process,
real kernels): pooled /api/execute and session creates, 429 with Retry-After when every
kernel is busy, the least recently used idle kernel culled to make room, max_age."""

from __future__ import annotations

import threading
import time

import pytest

from tests.support.api_errors import assert_error_shape
from tests.support.era_server import ServerProcess


def stats(srv: ServerProcess) -> dict:
    return srv.json("GET", "/api/resources/stats")


def wait_pool(srv: ServerProcess, ready: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pools = stats(srv)["pool"]["pools"]
        if all(p["ready"] >= ready for p in pools.values()):
            return
        time.sleep(0.05)
    raise AssertionError(f"pool not refilled: {stats(srv)['pool']}")


@pytest.fixture(scope="module")
def srv():
    server = ServerProcess(env={"ERA_MAX_KERNELS": "2", "ERA_POOL_SIZE": "1", "ERA_POOL_KERNELS": "python"}).start()
    yield server
    server.cleanup()


def test_pooled_execute_and_create_then_429_and_lru_culling(srv):
    wait_pool(srv, 1)
    claimed = stats(srv)["pool"]["claimed"]
    r = srv.json("POST", "/api/execute", {"code": "print(6*7)"})
    assert r["stdout"] == "42\n" and stats(srv)["pool"]["claimed"] == claimed + 1
    wait_pool(srv, 1)
    a = srv.json("POST", "/api/sessions", {"id": "pool-a"}, expect=201)["id"]
    assert stats(srv)["pool"]["claimed"] == claimed + 2
    b = srv.json("POST", "/api/sessions", {"id": "pool-b"}, expect=201)["id"]  # takes the refill's slot
    assert srv.json("POST", f"/api/sessions/{a}/run", {"code": "x = 'a'; print(x)"})["stdout"] == "a\n"
    assert srv.json("POST", f"/api/sessions/{b}/run", {"code": "x = 'b'; print(x)"})["stdout"] == "b\n"

    # Both kernels busy: a third kernel is refused, cleanly, and the running code is untouched.
    results: dict[str, dict] = {}

    def long_run(sid: str) -> None:
        results[sid] = srv.json("POST", f"/api/sessions/{sid}/run", {"code": "import time; time.sleep(2); print('done')"})

    threads = [threading.Thread(target=long_run, args=(sid,)) for sid in (a, b)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while any(srv.json("GET", f"/api/sessions/{sid}")["kernel"]["state"] != "busy" for sid in (a, b)):  # not a fixed 1 s
        assert time.monotonic() < deadline, "the runs never started"
        time.sleep(0.05)
    status, headers, body = srv.request_full("POST", "/api/sessions", {"id": "pool-c"})
    assert_error_shape(status, body, 429)
    assert int(headers["Retry-After"]) > 0
    status, _, body = srv.request_full("POST", "/api/execute", {"code": "1"})
    assert_error_shape(status, body, 429)
    for t in threads:
        t.join()
    assert results[a]["stdout"] == results[b]["stdout"] == "done\n"
    assert srv.request("GET", "/api/sessions/pool-c")[0] == 404  # nothing half-created

    # Idle now: the least recently used kernel (a's) makes room; a keeps its session.
    srv.json("POST", f"/api/sessions/{b}/run", {"code": "1"})
    c = srv.json("POST", "/api/sessions", {"id": "pool-c"}, expect=201)["id"]
    assert srv.json("POST", f"/api/sessions/{c}/run", {"code": "print('c')"})["stdout"] == "c\n"
    after = stats(srv)
    assert after["culled"]["lru"] >= 1 and after["kernel_slots"]["used"] <= 2
    assert srv.json("GET", f"/api/sessions/{a}")["kernel"]["state"] == "none"
    r = srv.json("POST", f"/api/sessions/{a}/run", {"code": "print(globals().get('x'))"})
    assert r["stdout"] == "None\n"  # a fresh kernel: the old one was culled
    srv.json("DELETE", "/api/sessions?prefix=pool-")


def test_max_age_is_validated_and_reported(srv):
    status, _, body = srv.request_full("POST", "/api/sessions", {"max_age": -5})
    assert assert_error_shape(status, body, 400)["field"] == "max_age"
    doc = srv.json("POST", "/api/sessions", {"id": "aged", "max_age": 3600}, expect=201)
    assert srv.json("GET", "/api/sessions/aged")["id"] == doc["id"]
    srv.json("DELETE", "/api/sessions/aged", expect=None)


@pytest.fixture(scope="module")
def growing():
    """A pool of one that may grow to four after a burst, and shrinks after 6 s idle.
    The idle time only has to outlast the refill to four that the test sees first
    (about 0.3 s here; it waited 15 s for nothing more before)."""
    server = ServerProcess(env={"ERA_MAX_KERNELS": "12", "ERA_POOL_SIZE": "1", "ERA_POOL_MAX": "4",
                                "ERA_POOL_IDLE": "6", "ERA_POOL_KERNELS": "python"}).start()
    yield server
    server.cleanup()


def pool_fill(srv: ServerProcess) -> dict:
    return stats(srv)["pool"]["pools"]["python:local"]


def wait_fill(srv: ServerProcess, done, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fill = pool_fill(srv)
        if done(fill):
            return fill
        time.sleep(0.1)
    raise AssertionError(f"pool: {stats(srv)['pool']}")


def test_a_burst_waits_on_the_pool_which_grows_to_it_then_shrinks_when_idle(growing):
    srv = growing
    wait_fill(srv, lambda f: f["ready"] == 1)
    before = stats(srv)["pool"]
    answers: dict[str, str] = {}

    def create_and_run(sid: str) -> None:
        srv.json("POST", "/api/sessions", {"id": sid}, expect=201)
        answers[sid] = srv.json("POST", f"/api/sessions/{sid}/run", {"code": f"print('{sid}')"})["stdout"]

    sids = [f"burst-{i}" for i in range(4)]
    threads = [threading.Thread(target=create_and_run, args=(sid,)) for sid in sids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == {sid: f"{sid}\n" for sid in sids}
    after = stats(srv)["pool"]
    # Every create got a pooled kernel: the one ready, the rest the next ones the pool
    # finished starting; none started a kernel of its own beside the pool's.
    assert after["claimed"] - before["claimed"] == 4 and after["misses"] == before["misses"]
    assert after["waited"] - before["waited"] >= 1
    # The pool grew to the burst it saw, and refills to it...
    assert pool_fill(srv)["target"] == 4
    fill = wait_fill(srv, lambda f: f["ready"] == 4, timeout=15)
    assert stats(srv)["kernel_slots"]["used"] == 4 + 4
    # ...then, with no new session for ERA_POOL_IDLE, shrinks back to ERA_POOL_SIZE.
    wait_fill(srv, lambda f: f["target"] == 1 and f["ready"] == 1 and f["starting"] == 0, timeout=30)
    deadline = time.monotonic() + 10
    while stats(srv)["kernel_slots"]["used"] != 4 + 1:  # the extra kernels' slots come back once they stopped
        assert time.monotonic() < deadline, stats(srv)
        time.sleep(0.1)
    srv.json("DELETE", "/api/sessions?prefix=burst-")
