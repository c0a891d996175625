"""An ERA kernel driven straight through jupyter_client, with ERA's shipped kernelspecs and
provisioners but no engine and no server: its start to ready and its warm round trips.
bench_engine.py and bench_docker.py time these."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from jupyter_client import AsyncKernelManager

from era_kernel.kernelspecs import EraKernelSpecManager

LOCAL, DOCKER = "era-python-local", "era-python"  # kernelspec names: era-local and era-docker provisioners


@contextlib.contextmanager
def era_options() -> Iterator[dict]:
    """The ``era`` options ERA's provisioners take from ``start_kernel``: a workspace and a
    runtime dir, removed after."""
    scratch = Path(tempfile.mkdtemp(prefix="era-bench-"))
    runtime = Path(tempfile.mkdtemp(prefix="erb", dir="/tmp"))  # short: IPC socket paths fit in 107 bytes
    workspace = scratch / "ws"
    workspace.mkdir()
    workspace.chmod(0o777)  # a local kernel runs as an unprivileged uid, a container as 1000
    try:
        yield {"workspace": str(workspace), "runtime_dir": str(runtime)}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(runtime, ignore_errors=True)


async def start_kernel(name: str, era: dict) -> tuple[AsyncKernelManager, object, float]:
    """A started kernel, its client and the seconds from start_kernel to ready."""
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=EraKernelSpecManager())
    t0 = time.perf_counter()
    await km.start_kernel(era=era)
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=60)
    return km, kc, time.perf_counter() - t0


async def stop_kernel(km: AsyncKernelManager, kc) -> None:
    kc.stop_channels()
    await km.shutdown_kernel(now=True)


async def start_times(name: str, era: dict, n: int) -> list[float]:
    times = []
    for _ in range(n):
        km, kc, seconds = await start_kernel(name, era)
        times.append(seconds)
        await stop_kernel(km, kc)
    return times


async def round_trips(name: str, era: dict, n: int, code: str, warmup: int = 10) -> list[float]:
    """``execute_interactive(code)`` (request to reply and idle) on one kernel, warm-up dropped."""
    km, kc, _ = await start_kernel(name, era)
    try:
        times = []
        for i in range(warmup + n):
            t0 = time.perf_counter()
            await kc.execute_interactive(code, output_hook=lambda msg: None, timeout=10)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        return times
    finally:
        await stop_kernel(km, kc)
