"""What the engine adds to a run, and what a local kernel takes to start (the README's
Engine table): warm round trips through ``SessionManager.run`` vs raw jupyter_client on
the same sandboxed kernel, and kernel start to ready with and without bubblewrap.

    .venv/bin/python bench/bench_engine.py [--runs 200] [--starts 10]

Both sides drive the same kernel (ERA's era-python-local kernelspec under the era-local
provisioner, sandboxed when bubblewrap is present) on the same machine, in the same
process, alternating in two halves so drift on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels import LOCAL, era_options, round_trips, start_times  # noqa: E402
from measure import pct  # noqa: E402

from era_kernel.config import Settings  # noqa: E402
from era_kernel.sessions import SessionManager  # noqa: E402

CODE = "x = 1"


async def engine_round_trips(engine: SessionManager, runs: int, warmup: int = 10) -> list[float]:
    sid = (await engine.create({}))["id"]
    samples = []
    for i in range(warmup + runs):
        t = time.perf_counter()
        await engine.run(sid, {"code": CODE})
        if i >= warmup:
            samples.append(time.perf_counter() - t)
    await engine.delete(sid)
    return samples


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--starts", type=int, default=10)
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="era-bench-"))
    with era_options() as era:
        engine = SessionManager(Settings.from_env({}, data_dir=str(data), runtime_dir=era["runtime_dir"]))
        await engine.start()
        try:
            raw, eng = [], []
            for _ in range(2):
                raw += await round_trips(LOCAL, era, args.runs // 2, CODE)
                eng += await engine_round_trips(engine, args.runs // 2)
            starts = {}
            for mode in ["bwrap", "none"] if shutil.which("bwrap") else ["none"]:
                # Unsandboxed, the kernel keeps our uid (a dropped uid cannot reach a Python under /root).
                options = dict(era, sandbox=mode, **({"uid": os.getuid()} if mode == "none" else {}))
                starts[mode] = await start_times(LOCAL, options, args.starts)
        finally:
            await engine.shutdown()
            shutil.rmtree(data, ignore_errors=True)

    print(f"\nwarm run round trip, {args.runs} runs each (ms)")
    print(f"{'path':42} {'p50':>8} {'p90':>8}")
    for name, samples in (("raw jupyter_client execute_interactive", raw), ("SessionManager.run", eng)):
        print(f"{name:42} {pct(samples, 50):8.2f} {pct(samples, 90):8.2f}")
    print(f"{'ratio engine / raw (goal <= 1.2x)':42} {pct(eng, 50) / pct(raw, 50):8.2f}x "
          f"{pct(eng, 90) / pct(raw, 90):7.2f}x")
    print(f"\nkernel start to ready, {args.starts} starts each (s)")
    for mode, samples in starts.items():
        print(f"{'sandbox=' + mode:42} p50 {pct(samples, 50) / 1000:.3f}  max {max(samples):.3f}")


if __name__ == "__main__":
    asyncio.run(main())
