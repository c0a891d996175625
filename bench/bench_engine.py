"""Engine overhead: warm run round trip through SessionManager.run vs raw jupyter_client,
and kernel start-to-ready with and without bubblewrap. Not a test: prints a table.

    .venv/bin/python bench/bench_engine.py [--runs 200] [--starts 10]

Both sides drive the same kind of kernel (ipykernel under the era-local provisioner,
sandboxed when bubblewrap is present) on the same machine, in the same process.
"""

from __future__ import annotations

import argparse
import os
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from jupyter_client import AsyncKernelManager

from era_kernel.config import Settings
from era_kernel.kernelspecs import EraKernelSpecManager
from era_kernel.sessions import SessionManager


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))] * 1000


async def raw_round_trips(runs: int, workspace: Path, runtime: Path) -> list[float]:
    km = AsyncKernelManager(kernel_name="era-python-local", kernel_spec_manager=EraKernelSpecManager())
    await km.start_kernel(era={"workspace": str(workspace), "runtime_dir": str(runtime)})
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=30)
    samples = []
    try:
        for i in range(runs + 10):
            t = time.perf_counter()
            await kc.execute_interactive("x = 1", output_hook=lambda m: None, timeout=10)
            if i >= 10:
                samples.append(time.perf_counter() - t)
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    return samples


async def engine_round_trips(engine: SessionManager, runs: int) -> list[float]:
    sid = (await engine.create({}))["id"]
    samples = []
    for i in range(runs + 10):
        t = time.perf_counter()
        await engine.run(sid, {"code": "x = 1"})
        if i >= 10:
            samples.append(time.perf_counter() - t)
    await engine.delete(sid)
    return samples


async def start_times(starts: int, sandbox: str, workspace: Path, runtime: Path) -> list[float]:
    samples = []
    for _ in range(starts):
        km = AsyncKernelManager(kernel_name="era-python-local", kernel_spec_manager=EraKernelSpecManager())
        t = time.perf_counter()
        # Unsandboxed, the kernel keeps our uid (a dropped uid cannot reach a Python under /root).
        era = {"workspace": str(workspace), "runtime_dir": str(runtime), "sandbox": sandbox}
        if sandbox == "none":
            era["uid"] = os.getuid()
        await km.start_kernel(era=era)
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=30)
        samples.append(time.perf_counter() - t)
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    return samples


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--starts", type=int, default=10)
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="erabench"))
    runtime = Path(tempfile.mkdtemp(prefix="erb", dir="/tmp"))
    workspace = data / "ws"
    workspace.mkdir()
    workspace.chmod(0o777)
    engine = SessionManager(Settings.from_env({}, data_dir=str(data / "engine"), runtime_dir=str(runtime)))
    await engine.start()
    try:
        # Interleave the two sides so drift on the machine hits both alike.
        raw, eng = [], []
        for _ in range(2):
            raw += await raw_round_trips(args.runs // 2, workspace, runtime)
            eng += await engine_round_trips(engine, args.runs // 2)
        rows = [("raw jupyter_client execute_interactive", raw), ("SessionManager.run", eng)]
        print(f"\nwarm run round trip, {args.runs} runs each (ms)")
        print(f"{'path':42} {'p50':>8} {'p90':>8}")
        for name, samples in rows:
            print(f"{name:42} {pct(samples, 50):8.2f} {pct(samples, 90):8.2f}")
        print(f"{'ratio engine / raw':42} {pct(eng, 50) / pct(raw, 50):8.2f}x {pct(eng, 90) / pct(raw, 90):7.2f}x")

        print(f"\nkernel start to ready, {args.starts} starts each (s)")
        modes = ["bwrap", "none"] if shutil.which("bwrap") else ["none"]
        for mode in modes:
            samples = await start_times(args.starts, mode, workspace, runtime)
            print(f"{'sandbox=' + mode:42} p50 {statistics.median(samples):.3f}  max {max(samples):.3f}")
    finally:
        await engine.shutdown()
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(runtime, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
