"""Contenders and clients for bench_all.py: ERA servers, Jupyter Kernel Gateway, raw jupyter_client.

Builds on bench_server.py (ports, health probe, server and gateway processes); adds what
the side-by-side suite needs on top: a keep-alive asyncio HTTP client (twenty of them
drive the load test), a Kernel Gateway WebSocket client that multiplexes runs by msg_id,
the raw AsyncKernelManager floor on ERA's own kernel argv, and process-tree and
container memory readings.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import bench_server
import psutil
from bench_server import http_health
from tornado.websocket import websocket_connect

LOOPBACK = "127.0.0.1"
SPEC = "era-bench-python"  # the same argv as ERA's local python kernel, without provisioner or sandbox
TIMEOUT = 120.0


def write_kernelspec(root: Path) -> Path:
    """``root/kernels/era-bench-python/kernel.json``, argv from ``python_kernel_argv()``."""
    from era_kernel.languages import python_kernel_argv

    spec_dir = root / "kernels" / SPEC
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": python_kernel_argv(), "display_name": "ERA bench python", "language": "python"}))
    return root / "kernels"


# ---- HTTP ----------------------------------------------------------------------------------------
class Http:
    """Keep-alive HTTP/1.1 with JSON bodies over asyncio streams (one request at a time)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: Any = None, timeout: float = TIMEOUT) -> tuple[int, Any]:
        try:
            return await asyncio.wait_for(self._request(method, path, body), timeout)
        except BaseException:
            self.close()  # a half-read response leaves the connection unusable
            raise

    async def _request(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(LOOPBACK, self.port)
        assert self.reader is not None
        data = b"" if body is None else json.dumps(body).encode()
        self.writer.write(f"{method} {path} HTTP/1.1\r\nHost: {LOOPBACK}:{self.port}\r\n"
                          f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head[1:] if ":" in line)}
        if status in (204, 304) or method == "HEAD":
            payload = b""
        elif "content-length" in headers:
            payload = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            payload = b""
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                payload += (await self.reader.readexactly(size + 2))[:-2]
            await self.reader.readuntil(b"\r\n")
        else:
            payload = await self.reader.read()
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close":
            self.close()
        try:
            return status, json.loads(payload) if payload else None
        except ValueError:
            return status, payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


# ---- process trees and containers ----------------------------------------------------------------
def tree_rss(pid: int) -> int:
    """RSS in bytes of a process and all its descendants."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def kernel_trees(parent_pid: int) -> list[int]:
    """Children of ``parent_pid`` whose tree runs an ipykernel: one per kernel (bwrap included)."""
    found = []
    for child in psutil.Process(parent_pid).children():
        try:
            tree = [child, *child.children(recursive=True)]
            if any("ipykernel" in " ".join(p.cmdline()) for p in tree):
                found.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def descendant_pids(pid: int) -> list[int]:
    """Every process below ``pid`` now (to reap after it stops); [] when it is gone."""
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def reap_descendants(pids: list[int]) -> None:
    """Kill processes we started (descendants seen before a stop) that outlived it."""
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass


def tree_cpu(pid: int) -> float:
    total = 0.0
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


async def settle_cpu(pid: int, quiet: float = 0.05, timeout: float = 60.0) -> None:
    """Wait until a process tree uses under ``quiet`` CPU seconds per half second."""
    deadline, before = time.perf_counter() + timeout, tree_cpu(pid)
    while time.perf_counter() < deadline:
        await asyncio.sleep(0.5)
        now = tree_cpu(pid)
        if now - before < quiet:
            return
        before = now


def docker_client():
    import docker

    return docker.from_env(timeout=60)


def container_memory(owner_pid: int, limit: int) -> list[int]:
    """Memory of up to ``limit`` era containers launched by ``owner_pid``, as `docker stats` counts it
    (cgroup usage minus inactive file cache)."""
    client = docker_client()
    try:
        containers = client.containers.list(filters={"label": ["era.managed=1", f"era.owner={owner_pid}"]})
        values = []
        for container in containers[:limit]:
            try:
                stats = container.stats(stream=False, one_shot=True)
            except Exception:
                stats = container.stats(stream=False)
            mem = stats.get("memory_stats") or {}
            inner = mem.get("stats") or {}
            if "usage" in mem:
                values.append(mem["usage"] - inner.get("inactive_file", inner.get("total_inactive_file", 0)))
        return values
    finally:
        client.close()


def remove_containers(owner_pid: int) -> int:
    """Remove era containers launched by ``owner_pid`` (a server of ours) that outlived it."""
    try:
        client = docker_client()
    except Exception:
        return 0
    try:
        containers = client.containers.list(all=True, filters={"label": [f"era.owner={owner_pid}"]})
        for container in containers:
            container.remove(force=True)
        return len(containers)
    finally:
        client.close()


# ---- ERA server ----------------------------------------------------------------------------------
class Era(bench_server.EraServer):
    """bench_server's EraServer with extra env (pool, provisioner), a start deadline and a full cleanup."""

    def __init__(self, label: str, env: dict[str, str]) -> None:
        super().__init__()
        self.label, self.env = label, env
        self.log = Path(self.tmp) / "server.log"

    def start(self, timeout: float = 120.0) -> "Era":
        env = dict(os.environ, ERA_DATA_DIR=self.tmp, ERA_RUNTIME_DIR=self.runtime, ERA_LOG_LEVEL="WARNING",
                   **self.env)
        env.pop("ERA_API_KEY", None)
        t0 = time.perf_counter()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "era_server", "--port", str(self.port)], env=env,
                                         stdout=subprocess.DEVNULL, stderr=log)
        while not (health := http_health(self.port)) or not health.get("ready"):
            if self.proc.poll() is not None or time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"{self.label} server did not become ready: {self.log_tail()}")
            time.sleep(0.02)
        self.ready_s = time.perf_counter() - t0
        return self

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            shutil.rmtree(self.runtime, ignore_errors=True)
            return
        pids = descendant_pids(self.proc.pid)
        try:
            super().stop()
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        finally:
            reap_descendants(pids)
            if self.env.get("ERA_PROVISIONER") == "docker":
                remove_containers(self.proc.pid)
            shutil.rmtree(self.tmp, ignore_errors=True)
            shutil.rmtree(self.runtime, ignore_errors=True)


# ---- Jupyter Kernel Gateway ----------------------------------------------------------------------
class Gateway(bench_server.KernelGateway):
    """``python -m kernel_gateway`` on loopback, every kernel forced to ERA's python argv."""

    def __init__(self, prespawn: int = 0) -> None:
        super().__init__()
        self.prespawn = prespawn
        write_kernelspec(Path(self.tmp))

    async def launch(self, timeout: float = 120.0) -> "Gateway":
        env = dict(os.environ, JUPYTER_RUNTIME_DIR=self.tmp, JUPYTER_DATA_DIR=self.tmp)
        argv = [sys.executable, "-m", "kernel_gateway", f"--KernelGatewayApp.ip={LOOPBACK}",
                f"--KernelGatewayApp.port={self.port}", "--KernelGatewayApp.log_level=ERROR",
                f"--KernelGatewayApp.force_kernel_name={SPEC}",
                "--JupyterWebsocketPersonality.list_kernels=True"]  # prespawned kernels are found by listing
        if self.prespawn:
            argv.append(f"--KernelGatewayApp.prespawn_count={self.prespawn}")
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        http, t0 = Http(self.port), time.perf_counter()
        try:
            while True:
                if self.proc.poll() is not None or time.perf_counter() - t0 > timeout:
                    raise RuntimeError("Kernel Gateway did not start")
                try:
                    status, kernels = await http.request("GET", "/api/kernels", timeout=5)
                    if status == 200 and len(kernels) >= self.prespawn:
                        break
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                    pass
                await asyncio.sleep(0.05)
        finally:
            http.close()
        # Listed prespawned kernels are launched, not booted, and stay "starting" until a client
        # connects: wait for the gateway's process tree to go quiet instead.
        await settle_cpu(self.proc.pid)
        self.listen_s = time.perf_counter() - t0
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        pids = descendant_pids(self.proc.pid)
        try:
            super().stop()
        finally:
            reap_descendants(pids)


class KgKernel:
    """One WebSocket on ``/api/kernels/{id}/channels``; runs multiplexed by msg_id."""

    def __init__(self, port: int, kernel_id: str) -> None:
        self.port, self.kernel_id = port, kernel_id
        self.session = uuid.uuid4().hex
        self.pending: dict[str, asyncio.Queue] = {}
        self.ws = None
        self.reader: asyncio.Task | None = None

    async def connect(self) -> "KgKernel":
        self.ws = await websocket_connect(f"ws://{LOOPBACK}:{self.port}/api/kernels/{self.kernel_id}/channels")
        self.reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        while True:
            raw = await self.ws.read_message()
            if raw is None:
                for queue in self.pending.values():
                    queue.put_nowait(None)
                return
            msg = json.loads(raw)
            queue = self.pending.get((msg.get("parent_header") or {}).get("msg_id"))
            if queue is not None:
                queue.put_nowait(msg)

    async def execute(self, code: str) -> tuple[float, float, str]:
        """(seconds to the first stream message, to reply + idle, stdout)."""
        msg_id = uuid.uuid4().hex
        queue = self.pending[msg_id] = asyncio.Queue()
        message = {"header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "bench",
                              "session": self.session, "version": "5.3", "date": ""},
                   "parent_header": {}, "metadata": {}, "channel": "shell",
                   "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                               "allow_stdin": False, "stop_on_error": True}}
        t0 = time.perf_counter()
        first, out, replied, idle = float("nan"), [], False, False
        try:
            self.ws.write_message(json.dumps(message))
            while not (replied and idle):
                msg = await asyncio.wait_for(queue.get(), TIMEOUT)
                if msg is None:
                    raise ConnectionError("gateway WebSocket closed")
                kind = msg["msg_type"]
                if kind == "stream":
                    if first != first:
                        first = time.perf_counter() - t0
                    out.append(msg["content"]["text"])
                elif kind == "execute_reply":
                    replied = True
                elif kind == "status" and msg["content"]["execution_state"] == "idle":
                    idle = True
            return first, time.perf_counter() - t0, "".join(out)
        finally:
            del self.pending[msg_id]

    def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        if self.ws is not None:
            self.ws.close()


# ---- the floor: raw jupyter_client ---------------------------------------------------------------
class RawKernel:
    """AsyncKernelManager + AsyncKernelClient on a plain local ipykernel (ERA's python argv)."""

    def __init__(self, kernel_dirs: Path) -> None:
        from jupyter_client import AsyncKernelManager
        from jupyter_client.kernelspec import KernelSpecManager

        # IPC transport, as ERA's kernels use (TCP would add loopback TCP to the floor).
        self.runtime = tempfile.mkdtemp(prefix="ebr", dir="/tmp")  # short: IPC socket path limit
        self.km = AsyncKernelManager(kernel_name=SPEC, kernel_spec_manager=KernelSpecManager(
            kernel_dirs=[str(kernel_dirs)], ensure_native_kernel=False), transport="ipc",
            ip=os.path.join(self.runtime, "k"), connection_file=os.path.join(self.runtime, "kernel.json"))
        self.kc = None

    async def start(self) -> "RawKernel":
        await self.km.start_kernel()
        self.kc = self.km.client()
        self.kc.start_channels()
        await self.kc.wait_for_ready(timeout=60)
        return self

    @property
    def pid(self) -> int:
        return self.km.provisioner.process.pid

    async def execute(self, code: str) -> tuple[float, float, str]:
        """(seconds to the first stream message, to reply + idle, stdout)."""
        t0 = time.perf_counter()
        msg_id = self.kc.execute(code)
        first, out = float("nan"), []
        while True:
            msg = await self.kc.get_iopub_msg(timeout=30)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                if first != first:
                    first = time.perf_counter() - t0
                out.append(msg["content"]["text"])
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        while (await self.kc.get_shell_msg(timeout=30))["parent_header"].get("msg_id") != msg_id:
            pass
        return first, time.perf_counter() - t0, "".join(out)

    async def stop(self) -> None:
        try:
            if self.kc is not None:
                self.kc.stop_channels()
            if self.km.has_kernel:
                await self.km.shutdown_kernel(now=True)
        finally:
            shutil.rmtree(self.runtime, ignore_errors=True)

