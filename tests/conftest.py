"""Shared fixtures: a real engine on real kernels, in throwaway directories."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from era_kernel.config import Settings
from era_kernel.sessions import SessionManager

ROOT = Path(__file__).resolve().parent.parent


def short_tmpdir(prefix: str = "era") -> Path:
    # IPC socket paths must stay under 107 bytes: pytest's tmp_path is too deep.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def require_docker() -> None:
    """Skip without a Docker engine and the era/python image, fail under ERA_REQUIRE_DOCKER=1."""
    try:
        from era_kernel.images.build import current_image

        if current_image("python") is None:
            raise RuntimeError("the era/python image is not built (era images build)")
    except Exception as exc:
        message = f"Docker provisioner unavailable: {exc}"
        if os.environ.get("ERA_REQUIRE_DOCKER") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def era_settings(request, tmp_path):
    """Engine settings in throwaway directories. Parametrize indirectly with a
    provisioner name ("local", "docker") to run a module on both."""
    provisioner = getattr(request, "param", "local")
    if provisioner == "docker":
        require_docker()
    runtime = short_tmpdir("ert")
    # No warm pool by default: each test's engine would start kernels nobody uses.
    # tests/test_engine_pool.py turns it on.
    settings = Settings.from_env({}, data_dir=str(tmp_path / "data"), runtime_dir=str(runtime),
                                 provisioner=provisioner, pool_size=0)
    yield settings
    shutil.rmtree(runtime, ignore_errors=True)


both_provisioners = pytest.mark.parametrize("era_settings", ["local", "docker"], indirect=True)


@pytest.fixture
async def engine(era_settings):
    manager = SessionManager(era_settings)
    await manager.start()
    yield manager
    await manager.shutdown()


@pytest.fixture
async def session(engine):
    """A ready Python session on the default (local) provisioner."""
    doc = await engine.create({"language": "python"})
    yield doc["id"]
    try:
        await engine.delete(doc["id"])
    except Exception:
        pass


def kernel_processes(marker: str) -> list[int]:
    """Pids whose command line mentions ``marker`` (a runtime or kernel dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd and int(entry.name) != os.getpid():
                pids.append(int(entry.name))
    return pids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_jupyter_server(root: Path, env: dict[str, str], *args: str) -> tuple[subprocess.Popen, str, str]:
    """A real jupyter_server on a free loopback port with a fresh token, once it answers:
    ``(process, base URL, token)``. The caller terminates it."""
    port, token = free_port(), secrets.token_hex(16)
    proc = subprocess.Popen([sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root",
                             "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
                             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
            return proc, base, token
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"jupyter_server did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)


def stop_jupyter_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def jupyter_api(base: str, token: str, path: str, body: dict | None = None, method: str | None = None) -> dict:
    """One REST call to a jupyter_server started by ``start_jupyter_server``."""
    request = urllib.request.Request(f"{base}{path}", method=method or ("POST" if body is not None else "GET"),
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        raw = response.read()
        return json.loads(raw) if raw else {}
