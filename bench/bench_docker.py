"""Container kernels vs local kernels (the README's Docker table): start to ready, warm
execute round trip, image size.

    eval "$(scripts/bootstrap-docker.sh)"
    .venv/bin/python bench/bench_docker.py [--starts 10] [--executes 200]

Goals: container start to ready p50 <= 1.0 s; warm round trip within 1.1x of a kernel
started by the era-local provisioner. Both kernels are ERA's shipped Python kernelspecs
(era-python on era-docker, era-python-local on era-local), talk IPC and run the same
client; the round trip is ``execute_interactive("pass")`` (request to reply and idle).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels import DOCKER, LOCAL, era_options, round_trips, start_times  # noqa: E402
from measure import pct  # noqa: E402

CONTAINER_UID = 1000


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=10)
    parser.add_argument("--executes", type=int, default=200)
    args = parser.parse_args()

    import docker

    from era_kernel.images import ensure_image

    image = await ensure_image("python")
    size = docker.from_env().images.get(image).attrs["Size"]
    with era_options() as era:
        in_docker = dict(era, uid=CONTAINER_UID)
        docker_starts = await start_times(DOCKER, in_docker, args.starts)
        local_starts = await start_times(LOCAL, era, args.starts)
        docker_rt = await round_trips(DOCKER, in_docker, args.executes, "pass", warmup=20)
        local_rt = await round_trips(LOCAL, era, args.executes, "pass", warmup=20)

    start_p50, ratio = pct(docker_starts, 50) / 1000, pct(docker_rt, 50) / pct(local_rt, 50)
    rows = [
        ("start to ready p50 (s)", f"{start_p50:.3f}", f"{pct(local_starts, 50) / 1000:.3f}",
         "<= 1.0" + (" ok" if start_p50 <= 1.0 else " MISSED")),
        ("execute round trip p50 (ms)", f"{pct(docker_rt, 50):.2f}", f"{pct(local_rt, 50):.2f}",
         f"ratio {ratio:.2f}x <= 1.1" + (" ok" if ratio <= 1.1 else " MISSED")),
        ("image size (MiB)", f"{size / 1024**2:.0f}", "-", image),
    ]
    header = ("metric", "era-docker", "era-local", "goal")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
