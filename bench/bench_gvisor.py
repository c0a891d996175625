"""gVisor vs runc (the README's gVisor table): the same era-docker kernel under Docker's
default runtime and under gVisor's runsc (ptrace platform), start to ready and warm
execute round trip.

    eval "$(scripts/bootstrap-docker.sh)"       # registers runsc with the engine
    .venv/bin/python bench/bench_gvisor.py [--starts 10] [--executes 200]

Both are ERA's shipped kernelspecs: era-python (runc) and era-python-gvisor (its
provisioner config says "isolation": "gvisor"), the same image, options and client,
interleaved start by start so a busy moment of the shared machine falls on both. The
round trip is ``execute_interactive("pass")`` (request to reply and idle), and a second
one with a small system-call-heavy cell (listing a directory and writing a file): gVisor's
cost is in system calls, which its user-space kernel serves.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels import DOCKER, era_options, round_trips, start_kernel, stop_kernel  # noqa: E402
from measure import pct  # noqa: E402

GVISOR = "era-python-gvisor"
CONTAINER_UID = 1000
SYSCALLS = "import os\nfor _ in range(20):\n    os.listdir('/usr/lib')\nopen('probe.txt', 'w').write('x' * 4096)"


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=10)
    parser.add_argument("--executes", type=int, default=200)
    args = parser.parse_args()

    from era_kernel.images import ensure_image

    await ensure_image("python")
    starts: dict[str, list[float]] = {DOCKER: [], GVISOR: []}
    with era_options() as era:
        era = dict(era, uid=CONTAINER_UID)
        for _ in range(args.starts):
            for name in (DOCKER, GVISOR):
                km, kc, seconds = await start_kernel(name, era)
                starts[name].append(seconds)
                await stop_kernel(km, kc)
        trips = {name: await round_trips(name, era, args.executes, "pass", warmup=20) for name in (DOCKER, GVISOR)}
        heavy = {name: await round_trips(name, era, args.executes // 4, SYSCALLS, warmup=5)
                 for name in (DOCKER, GVISOR)}

    def row(label: str, samples: dict[str, list[float]], scale: float = 1.0, digits: int = 2) -> tuple[str, ...]:
        runc, gvisor = pct(samples[DOCKER], 50) * scale, pct(samples[GVISOR], 50) * scale
        return label, f"{runc:.{digits}f}", f"{gvisor:.{digits}f}", f"{gvisor / runc:.2f}x"

    rows = [row("start to ready p50 (s)", starts, 1 / 1000, 3),
            row("execute round trip p50 (ms), `pass`", trips),
            row("execute round trip p50 (ms), 20 listdir + 4 KiB write", heavy)]
    header = ("metric", "runc", "gVisor (runsc, ptrace)", "gVisor / runc")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for line in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
