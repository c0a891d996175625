"""Container kernels vs local kernels: start-to-ready, warm execute round trip, image size.

    eval "$(scripts/bootstrap-docker.sh)"
    .venv/bin/python bench/bench_docker.py [--starts 10] [--executes 200]

Goals: container start-to-ready p50 <= 1.0 s; warm execute round trip within 1.1x of a
kernel started by the era-local provisioner. Both kernels talk IPC and run the same
client; the round trip is ``execute_interactive("pass")`` (request to reply and idle).
Not a test: prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager

KERNEL_UID = 1000


def write_kernelspecs(root: Path) -> None:
    specs = {
        "bench-docker": {"argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                         "provisioner": "era-docker"},
        "bench-local": {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                        "provisioner": "era-local"},
    }
    for name, spec in specs.items():
        (root / name).mkdir(parents=True)
        (root / name / "kernel.json").write_text(json.dumps({
            "argv": spec["argv"], "display_name": name, "language": "python", "interrupt_mode": "message",
            "metadata": {"kernel_provisioner": {"provisioner_name": spec["provisioner"]}}}))


async def start(ksm: KernelSpecManager, name: str, era: dict) -> tuple[AsyncKernelManager, object, float]:
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
    started = time.perf_counter()
    await km.start_kernel(era=era)
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=60)
    return km, kc, time.perf_counter() - started


async def stop(km: AsyncKernelManager, kc) -> None:
    kc.stop_channels()
    await km.shutdown_kernel(now=True)


async def start_times(ksm, name: str, era: dict, n: int) -> list[float]:
    times = []
    for _ in range(n):
        km, kc, elapsed = await start(ksm, name, era)
        times.append(elapsed)
        await stop(km, kc)
    return times


async def round_trips(ksm, name: str, era: dict, n: int) -> list[float]:
    km, kc, _ = await start(ksm, name, era)
    try:
        for _ in range(20):  # warm up
            await kc.execute_interactive("pass", timeout=10)
        times = []
        for _ in range(n):
            started = time.perf_counter()
            await kc.execute_interactive("pass", timeout=10)
            times.append(time.perf_counter() - started)
        return times
    finally:
        await stop(km, kc)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=10)
    parser.add_argument("--executes", type=int, default=200)
    args = parser.parse_args()

    from era_kernel.images import ensure_image

    image = await ensure_image("python")
    import docker

    size = docker.from_env().images.get(image).attrs["Size"]

    scratch = Path(tempfile.mkdtemp(prefix="era-bench-"))
    runtime_dir = tempfile.mkdtemp(prefix="era-b", dir="/tmp")  # short: IPC path limit
    try:
        write_kernelspecs(scratch / "kernels")
        workspace = scratch / "ws"
        workspace.mkdir()
        os.chmod(workspace, 0o777)  # the local kernel runs as nobody, the container as 1000
        ksm = KernelSpecManager(kernel_dirs=[str(scratch / "kernels")])
        docker_era = {"workspace": str(workspace), "runtime_dir": runtime_dir, "uid": KERNEL_UID}
        local_era = {"workspace": str(workspace), "runtime_dir": runtime_dir}

        docker_starts = await start_times(ksm, "bench-docker", docker_era, args.starts)
        local_starts = await start_times(ksm, "bench-local", local_era, args.starts)
        docker_rt = await round_trips(ksm, "bench-docker", docker_era, args.executes)
        local_rt = await round_trips(ksm, "bench-local", local_era, args.executes)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(runtime_dir, ignore_errors=True)

    ratio = statistics.median(docker_rt) / statistics.median(local_rt)
    start_p50 = statistics.median(docker_starts)
    rows = [
        ("start to ready p50 (s)", f"{start_p50:.3f}", f"{statistics.median(local_starts):.3f}",
         "<= 1.0" + (" ok" if start_p50 <= 1.0 else " MISSED")),
        ("start to ready p90 (s)", f"{pct(docker_starts, 0.9):.3f}", f"{pct(local_starts, 0.9):.3f}", ""),
        ("execute round trip p50 (ms)", f"{1000 * statistics.median(docker_rt):.2f}",
         f"{1000 * statistics.median(local_rt):.2f}", f"ratio {ratio:.2f}x <= 1.1" + (" ok" if ratio <= 1.1 else " MISSED")),
        ("execute round trip p90 (ms)", f"{1000 * pct(docker_rt, 0.9):.2f}", f"{1000 * pct(local_rt, 0.9):.2f}", ""),
        ("image size (MiB)", f"{size / 1024**2:.0f}", "-", image),
    ]
    widths = [max(len(r[i]) for r in rows + [("metric", "era-docker", "era-local", "goal")]) for i in range(4)]
    for row in [("metric", "era-docker", "era-local", "goal"), *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
