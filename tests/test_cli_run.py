"""``era run`` as a user runs it: a one-shot kernel, the run's exit code, and nothing of a
server on the same data directory touched."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.support.era_server import ServerProcess

from .conftest import kernel_processes


def era_run(env: dict[str, str], code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "era_kernel.cli", "run", code], env=env, capture_output=True,
                          text=True, timeout=120)


def wait_pool_full(server: ServerProcess, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pools = server.json("GET", "/api/resources/stats")["pool"]["pools"]
        if all(p["ready"] == p["target"] for p in pools.values()):
            return
        time.sleep(0.1)
    raise AssertionError("the server's pool never filled")


def test_era_run_beside_a_server_leaves_its_kernels_and_directories_alone():
    """``era run`` used to run a whole server start on the data directory: it reaped,
    removed the server's unclaimed pool directories and started a pool of its own."""
    server = ServerProcess(env={"ERA_POOL_SIZE": "2"}).start()
    try:
        data = Path(server.env["ERA_DATA_DIR"])
        sid = server.json("POST", "/api/sessions", {"id": "kept"}, expect=201)["id"]
        assert server.json("POST", f"/api/sessions/{sid}/run", {"code": "x = 41"})["exit_code"] == 0
        wait_pool_full(server)
        pool_dirs = sorted(p.name for p in (data / "pool").iterdir())
        kernels = set(kernel_processes(server.env["ERA_RUNTIME_DIR"]))
        assert len(pool_dirs) >= 2 and kernels  # two waiting (and the session's, if it claimed one)

        env = dict(os.environ, ERA_DATA_DIR=str(data), ERA_RUNTIME_DIR=server.env["ERA_RUNTIME_DIR"])
        env.pop("ERA_POOL_SIZE", None)  # the default: a server would start a pool of 2
        done = era_run(env, "import sys; print('one-shot'); sys.exit(3)")
        assert done.returncode == 3 and done.stdout == "one-shot\n", done.stderr[-2000:]

        assert sorted(p.name for p in (data / "pool").iterdir()) == pool_dirs
        assert kernels <= set(kernel_processes(server.env["ERA_RUNTIME_DIR"])), "the server's kernels live on"
        assert server.json("POST", f"/api/sessions/{sid}/run", {"code": "print(x + 1)"})["stdout"] == "42\n"
        assert not list((data / "scratch").iterdir()), "the one-shot directory is gone"
    finally:
        server.cleanup()
