"""docs/security.md cases 10 and 7 on real servers.

Case 10: a server SIGKILLed with 20 live kernels (local ones, Docker ones, and a Docker
container caught in ``created``), then started again on the same data directory.
Nothing of the first life is left (kernel processes, containers in any state, cgroups,
IPC directories, stacked mounts) and every session is listed with its data, files and
history, and runs. Case 7: a kernel SIGKILLed from the host in the middle of a run.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from tornado.httpclient import AsyncHTTPClient

from era_kernel.provisioning.owner import start_time
from era_kernel.workspaces.loopfs import mounts_under
from tests.conftest import require_docker
from tests.support.era_server import ServerProcess
from tests.support.kernel_cgroups import cgroup_dirs, kernel_groups

LIVE = 20
DOCKER_RUNNING = 2  # plus one container in `created`: 3 of the 20 on Docker
FORK = {"ERA_LOCAL_LAUNCHER": "fork"} if os.getuid() == 0 else {}


def docker_or_none():
    """The Docker client, or None where Docker is missing (require_docker's rule: a
    skip locally, a failure under ERA_REQUIRE_DOCKER=1). The local half runs anyway."""
    try:
        require_docker()
    except pytest.skip.Exception:
        return None
    from era_kernel.provisioning.docker import shared_docker_client

    return shared_docker_client()


def containers_of(client, owner: int, status: str | None = None) -> list[dict]:
    filters = {"label": [f"era.owner={owner}"]}
    if status:
        filters["status"] = status
    return client.api.containers(all=True, filters=filters)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def catch_a_created_container(server: ServerProcess, client, sid: str) -> tuple[str, bool]:
    """Start a Docker session's create and kill the server while its container is still in
    ``created`` (made, not started), as a crash between the two steps would leave it.
    When the poll misses that window, a container with the server's own labels stands in
    for it. Returns the container's id and whether it was caught for real."""
    owner = server.proc.pid
    thread = threading.Thread(target=lambda: server.request("POST", "/api/sessions",
                                                            {"id": sid, "provisioner": "docker"}, timeout=60),
                              daemon=True)
    before = {c["Id"] for c in containers_of(client, owner)}
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        fresh = [c for c in containers_of(client, owner) if c["Id"] not in before]
        if fresh and fresh[0]["State"] == "created":
            server.proc.send_signal(signal.SIGKILL)
            return fresh[0]["Id"], True
        if fresh:
            break  # started before we looked: missed
        time.sleep(0.003)
    from era_kernel.images.build import current_image

    stand_in = client.api.create_container(
        current_image("python"), ["sleep", "600"], host_config=client.api.create_host_config(network_mode="none"),
        labels={"era.managed": "1", "era.kernel": f"stand-in-{owner}", "era.owner": str(owner),
                "era.owner_start": str(start_time(owner))})
    server.proc.send_signal(signal.SIGKILL)
    return stand_in["Id"], False


async def test_sigkill_with_twenty_live_kernels_then_restart_leaves_nothing_and_keeps_everything():
    client = docker_or_none()
    env = {"ERA_POOL_SIZE": "0", "ERA_MAX_KERNELS": str(LIVE + 10), **FORK}
    first = ServerProcess(env=env).start()
    servers = [first]
    http = AsyncHTTPClient(force_instance=True, max_clients=LIVE + 5)

    async def call(server, method, path, body=None):
        response = await http.fetch(f"{server.base}{path}", method=method,
                                    body=None if body is None else json.dumps(body), raise_error=False,
                                    allow_nonstandard_methods=True, request_timeout=120)
        return response.code, json.loads(response.body)

    local = LIVE - (DOCKER_RUNNING + 1 if client else 0)
    sessions = {f"kill-{n:02d}": "local" for n in range(local)}
    if client:
        sessions.update({f"kill-d{n}": "docker" for n in range(DOCKER_RUNNING)})
    try:
        async def prepare(sid: str, provisioner: str) -> None:
            code, doc = await call(first, "POST", "/api/sessions",
                                   {"id": sid, "provisioner": provisioner, "data": {"who": sid}})
            assert code == 201, doc
            code, ran = await call(first, "POST", f"/api/sessions/{sid}/run",
                                   {"code": f"open('f.txt', 'w').write({sid!r}); v = 1; print('up')"})
            assert code == 200 and ran["stdout"] == "up\n", ran

        started = time.monotonic()
        await asyncio.gather(*(prepare(sid, p) for sid, p in sessions.items()))
        owner = first.proc.pid
        pids = first.descendants()
        groups = cgroup_dirs(owner)
        assert len(kernel_groups(owner)) == local, "every local kernel is live in its own cgroup"
        caught = None
        if client:
            assert len(containers_of(client, owner, "running")) == DOCKER_RUNNING
            created_id, caught = catch_a_created_container(first, client, "kill-racing")
        else:
            first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        first_life = time.monotonic() - started
        if client:  # the containers outlive the server: only the restart can reap them
            left = {c["Id"]: c["State"] for c in containers_of(client, owner)}
            assert left.get(created_id) == "created" and len(left) >= DOCKER_RUNNING + 1, left

        second = ServerProcess(env={**env, "ERA_DATA_DIR": first.env["ERA_DATA_DIR"],
                                    "ERA_RUNTIME_DIR": first.env["ERA_RUNTIME_DIR"]})
        servers.append(second)
        second.start(ready_timeout=60)
        # Nothing of the first life: processes, containers in any state, cgroups, IPC
        # directories, and no mount stacked twice.
        deadline = time.monotonic() + 10
        while [p for p in pids if alive(p)] and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not [p for p in pids if alive(p)], "kernel processes of the killed server"
        if client:
            assert containers_of(client, owner) == [], "containers of the killed server, created ones included"
        assert not [g for g in groups if g.exists()] and not cgroup_dirs(owner), "cgroups of the killed server"
        assert not list((Path(first.runtime) / "k").glob("*")), "stale IPC directories"
        points = Counter(point for point, _ in mounts_under(Path(first.env["ERA_DATA_DIR"]).parent))
        assert all(n == 1 for n in points.values()), points
        assert not mounts_under(Path(first.runtime))

        # Everything else is there: each session with its data, file and history, and it runs.
        code, listed = await call(second, "GET", "/api/sessions?limit=500")
        ids = {s["id"] for s in listed["sessions"]} - {"kill-racing"}
        assert ids == set(sessions), ids ^ set(sessions)

        async def check(sid: str) -> None:
            code, doc = await call(second, "GET", f"/api/sessions/{sid}")
            assert doc["data"] == {"who": sid}
            code, history = await call(second, "GET", f"/api/sessions/{sid}/runs")
            assert history["count"] == 1 and "f.txt" in history["runs"][0]["code"]
            code, ran = await call(second, "POST", f"/api/sessions/{sid}/run",
                                   {"code": "print(open('f.txt').read(), 'v' in dir())"})
            assert code == 200 and ran["stdout"] == f"{sid} False\n", (sid, ran)

        await asyncio.gather(*(check(sid) for sid in sessions))
        if "kill-racing" in {s["id"] for s in listed["sessions"]}:  # its record made it: it must work too
            code, ran = await call(second, "POST", "/api/sessions/kill-racing/run", {"code": "print('racing')"})
            assert code == 200 and ran["stdout"] == "racing\n", ran
        print(f"\n{LIVE} kernels ({len(sessions) - local} on Docker, 1 container in created, "
              f"{'caught for real' if caught else 'a stand-in' if client else 'no Docker'}) up in "
              f"{first_life:.1f}s; restart ready in {second.ready_s:.1f}s, all {len(sessions)} ran again")
    finally:
        http.close()
        for server in reversed(servers):
            server.cleanup()
        if client:
            for item in containers_of(client, owner) if "owner" in locals() else []:
                client.api.remove_container(item["Id"], force=True)


def processes_in_group(server_pid: int, group: str) -> list[int]:
    """Every process in one kernel cgroup of the server (a name from ``kernel_groups``)."""
    marker = f"/era/{server_pid}.{group}"
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker in Path(f"/proc/{entry}/cgroup").read_text():
                    found.append(int(entry))
            except OSError:
                pass
    return found


def test_a_kernel_killed_from_the_host_mid_run_is_reported_and_replaced():
    """docs/security.md case 7 with the kill coming from outside: every process of the
    session's kernel is SIGKILLed from the host while a run sleeps in it. The caller gets
    KernelDied within the liveness interval, the next run gets a fresh kernel, and another
    session keeps its state."""
    if os.getuid() != 0:
        pytest.skip("finding a kernel's processes from the host uses its cgroup (root)")
    server = ServerProcess(env={"ERA_POOL_SIZE": "0", **FORK}).start()
    try:
        server.json("POST", "/api/sessions", {"id": "victim"}, expect=201)
        assert server.json("POST", "/api/sessions/victim/run", {"code": "y = 1"})["exit_code"] == 0
        (group,) = kernel_groups(server.proc.pid)
        server.json("POST", "/api/sessions", {"id": "bystander"}, expect=201)
        assert server.json("POST", "/api/sessions/bystander/run", {"code": "kept = 7"})["exit_code"] == 0
        answer: dict = {}

        def long_run() -> None:
            answer["doc"] = server.json("POST", "/api/sessions/victim/run",
                                        {"code": "import time\ntime.sleep(60)", "timeout": 120}, timeout=90)
            answer["at"] = time.monotonic()

        thread = threading.Thread(target=long_run)
        thread.start()
        deadline = time.monotonic() + 20
        while server.json("GET", "/api/sessions/victim")["kernel"]["state"] != "busy":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        victims = processes_in_group(server.proc.pid, group)
        assert victims
        killed_at = time.monotonic()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        thread.join(60)
        assert answer, "the run never answered"
        assert answer["at"] - killed_at < 5, f"answered {answer['at'] - killed_at:.1f} s after the kill"
        assert answer["doc"]["error"]["ename"] == "KernelDied", answer["doc"]
        again = server.json("POST", "/api/sessions/victim/run", {"code": "print('y' in dir())"})
        assert again["stdout"] == "False\n", again  # a fresh kernel
        assert server.json("POST", "/api/sessions/bystander/run", {"code": "print(kept)"})["stdout"] == "7\n"
        assert server.json("GET", "/health")["status"] == "ok"
    finally:
        server.cleanup()
