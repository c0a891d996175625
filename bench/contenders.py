"""What the side-by-side benchmarks start: an ERA server (the harness's, tuned for timing),
Jupyter Kernel Gateway (the peer) and a raw jupyter_client kernel (the floor), the last two
on ERA's own Python kernel argv. Everything listens on loopback and is stopped by its owner.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

# The harness lives with the tests (it is not installed): reach it from this checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clients import LOOPBACK, Http  # noqa: E402
from measure import settle_cpu  # noqa: E402
from tests.support.era_server import ServerProcess  # noqa: E402
from tests.support.loopback import free_port, stop_process  # noqa: E402

SPEC = "era-bench-python"  # ERA's local python kernel argv, without provisioner or sandbox


def write_kernelspec(root: Path) -> Path:
    """``root/kernels/era-bench-python/kernel.json`` with ``python_kernel_argv()``; returns
    ``root/kernels`` (a kernel_dirs entry; ``root`` works as a JUPYTER_DATA_DIR)."""
    from era_kernel.languages import python_kernel_argv

    spec_dir = root / "kernels" / SPEC
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": python_kernel_argv(), "display_name": "ERA bench python", "language": "python"}))
    return root / "kernels"


# ---- ERA ---------------------------------------------------------------------------------
class EraServer(ServerProcess):
    """The harness's server as benchmarks run it: its port chosen up front, so the time to
    the first /health is measurable; WARNING logs, so no access line per request is charged
    to the runs; and its Docker containers removed after it."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        # Default settings, as a new user meets them: the test harness turns the stock of
        # workspace volumes off and keeps a pool of two; "" is the default again (``env``
        # may still set them).
        super().__init__(env={"ERA_WORKSPACE_VOLUME_STOCK": "", "ERA_POOL_SIZE": "", **(env or {})},
                         port=free_port(), log_level="WARNING")

    def cleanup(self) -> None:
        owner = self.proc.pid if self.proc is not None else None
        try:
            super().cleanup()
        finally:
            if owner is not None and self.env.get("ERA_PROVISIONER") == "docker":
                remove_containers(owner)


def docker_client():
    import docker

    return docker.from_env(timeout=60)


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


# ---- the peer: Jupyter Kernel Gateway ----------------------------------------------------
class Gateway:
    """``python -m kernel_gateway`` (jupyter-websocket mode) on loopback, every kernel forced
    to ERA's python argv; ``prespawn`` kernels are started with it and found by listing."""

    def __init__(self, prespawn: int = 0) -> None:
        if importlib.util.find_spec("kernel_gateway") is None:
            raise RuntimeError("jupyter-kernel-gateway is not installed (pip install jupyter-kernel-gateway)")
        self.prespawn = prespawn
        self.port = free_port()
        self.tmp = tempfile.mkdtemp(prefix="jkg-")
        write_kernelspec(Path(self.tmp))
        self.proc: subprocess.Popen | None = None
        self.listen_s = 0.0  # process start to its first answer

    async def launch(self, timeout: float = 120.0) -> "Gateway":
        env = dict(os.environ, JUPYTER_RUNTIME_DIR=self.tmp, JUPYTER_DATA_DIR=self.tmp)
        argv = [sys.executable, "-m", "kernel_gateway", f"--KernelGatewayApp.ip={LOOPBACK}",
                f"--KernelGatewayApp.port={self.port}", "--KernelGatewayApp.log_level=ERROR",
                f"--KernelGatewayApp.force_kernel_name={SPEC}",
                "--JupyterWebsocketPersonality.list_kernels=True"]
        if self.prespawn:
            argv.append(f"--KernelGatewayApp.prespawn_count={self.prespawn}")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        http = Http(self.port)
        try:
            while True:
                if self.proc.poll() is not None or time.perf_counter() - t0 > timeout:
                    raise RuntimeError("Kernel Gateway did not start")
                try:
                    status, kernels = await http.request("GET", "/api/kernels", timeout=5)
                    if status == 200:
                        self.listen_s = self.listen_s or time.perf_counter() - t0
                        if len(kernels) >= self.prespawn:
                            break
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                    pass
                await asyncio.sleep(0.01)
        finally:
            http.close()
        # Listed prespawned kernels are launched, not booted, and stay "starting" until a
        # client connects: wait for the gateway's process tree to go quiet instead.
        await settle_cpu(self.proc.pid)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            try:
                left = [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
            except psutil.Error:
                left = []
            stop_process(self.proc)
            for pid in left:  # kernels it did not shut down
                try:
                    psutil.Process(pid).kill()
                except psutil.Error:
                    pass
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---- the floor: raw jupyter_client -------------------------------------------------------
class RawKernel:
    """AsyncKernelManager + AsyncKernelClient on a plain local ipykernel with ERA's python
    argv: no server, no provisioner, no sandbox."""

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
