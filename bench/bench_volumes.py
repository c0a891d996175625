"""What workspace volumes cost (ERA_WORKSPACE_VOLUMES on against off), on real engines:

- a workspace directory alone: make and remove (SessionFiles.make_dir / remove_dir);
- a session: create (answered before its kernel is up), first run, delete;
- a one-shot run without a warm pool (scratch directory, kernel, discard);
- listing sessions whose volumes a stopped server released (no mount per session).

    .venv/bin/python bench/bench_volumes.py [--repeat 20] [--sessions 8]

Needs root, loop devices and mkfs.ext4 (as the volumes do). Prints one table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from era_kernel.config import Settings  # noqa: E402
from era_kernel.engine import SessionManager  # noqa: E402
from era_kernel.workspaces.volumes import release_everything_under  # noqa: E402


def ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:.1f}" if samples else "n/a"


async def measure(mode: str, repeat: int, sessions: int) -> dict[str, list[float]]:
    base = Path(tempfile.mkdtemp(prefix="erb", dir="/tmp"))
    settings = Settings.from_env({}, data_dir=str(base / "data"), runtime_dir=str(base / "rt"), pool_size=0,
                                 workspace_volumes=mode)
    out: dict[str, list[float]] = {k: [] for k in ("make_dir", "remove_dir", "create", "first_run", "delete",
                                                   "execute", "list")}
    engine = SessionManager(settings)
    await engine.start()
    try:
        for i in range(repeat):
            path = settings.data_dir / "scratch" / f"bench{i:04d}"
            t = time.perf_counter()
            await engine.files.make_dir(path, 100_900)
            out["make_dir"].append(time.perf_counter() - t)
            t = time.perf_counter()
            await engine.files.remove_dir(path)
            out["remove_dir"].append(time.perf_counter() - t)
        for _ in range(sessions):
            t = time.perf_counter()
            sid = (await engine.create({}))["id"]
            out["create"].append(time.perf_counter() - t)
            t = time.perf_counter()
            await engine.run(sid, {"code": "1"})
            out["first_run"].append(time.perf_counter() - t)
            t = time.perf_counter()
            await engine.delete(sid)
            out["delete"].append(time.perf_counter() - t)
        for _ in range(max(3, sessions // 2)):
            t = time.perf_counter()
            await engine.execute({"code": "1"})
            out["execute"].append(time.perf_counter() - t)
            await engine.settle()
        for i in range(50):
            await engine.create({"id": f"listed{i}"})
        await engine.settle()
    finally:
        await engine.shutdown()  # releases every volume: the next engine lists them unmounted
    engine = SessionManager(settings)
    await engine.start()
    try:
        for _ in range(5):
            t = time.perf_counter()
            assert len(await engine.list()) == 50
            out["list"].append(time.perf_counter() - t)
        mounted = len(engine.files.volumes.mounted())
        assert mounted == 0, f"listing mounted {mounted} volumes"
    finally:
        await engine.shutdown()
        release_everything_under(base)
        shutil.rmtree(base, ignore_errors=True)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--sessions", type=int, default=8)
    args = parser.parse_args()
    if os.getuid() != 0:
        sys.exit("volumes need root")
    off = await measure("off", args.repeat, args.sessions)
    on = await measure("on", args.repeat, args.sessions)
    rows = [("workspace directory: make", "make_dir"), ("workspace directory: remove", "remove_dir"),
            ("session create (answered)", "create"), ("first run (kernel start included)", "first_run"),
            ("session delete", "delete"), ("one-shot run, no pool", "execute"),
            ("list 50 sessions after a restart", "list")]
    print("| p50 (ms) | volumes off | volumes on | difference |")
    print("| --- | ---: | ---: | ---: |")
    for label, key in rows:
        a, b = statistics.median(off[key]) * 1000, statistics.median(on[key]) * 1000
        print(f"| {label} | {a:.1f} | {b:.1f} | {b - a:+.1f} |")


if __name__ == "__main__":
    asyncio.run(main())
