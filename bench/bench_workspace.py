"""How fast the workspace store saves and restores a workspace (the README's Workspaces
table): incremental push, restore and large-file throughput.

    .venv/bin/python bench/bench_workspace.py [--files 1000] [--big-mib 100] [--repeat 20]
                                              [--backends file,s3]

For each backend: the first push of a workspace of ``--files`` small files, a push after
changing one file (goal: <= 50 ms on file://, <= 0.5 s on S3), a restore of all files
into an empty directory, and upload / download of one ``--big-mib`` file. S3 is moto's
server started as a separate process on 127.0.0.1 (so its CPU time is not charged to the
client), reached over loopback only.

Not a test: it prints a table and exits 0 either way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# The loopback helpers live with the tests (they are not installed): reach them from this checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from era_kernel.workspaces import WorkspaceStore  # noqa: E402
from measure import pct  # noqa: E402
from tests.support.loopback import free_port, stop_process, wait_answering  # noqa: E402

GOALS = {("file", "push 1 changed"): 0.050, ("s3", "push 1 changed"): 0.5}
CREDENTIALS = {"key": "bench", "secret": "bench"}


class MotoProcess:
    """moto's S3 server in its own process, on loopback."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "MotoProcess":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_answering(lambda: urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).read() is not None,
                       self.proc, 30, "moto server", interval=0.1)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=10)

    def options(self) -> dict:
        return {**CREDENTIALS, "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}


def make_workspace(root: Path, files: int) -> None:
    for i in range(files):
        path = root / f"dir{i % 20:02d}" / f"file{i:05d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(200 + (i * 37) % 3800))


async def timed(coro) -> tuple[float, object]:
    start = time.perf_counter()
    result = await coro
    return time.perf_counter() - start, result


async def bench_backend(name: str, store: WorkspaceStore, work: Path, args) -> list[tuple]:
    rows = []
    src = work / f"{name}-src"
    make_workspace(src, args.files)

    seconds, stats = await timed(store.push("bench", src))
    rows.append((name, f"push {args.files} new", [seconds], f"{stats['uploaded']} uploaded"))

    samples = []
    victim = src / "dir07" / "file00007.txt"
    for i in range(args.repeat):
        victim.write_bytes(os.urandom(500 + i))
        seconds, stats = await timed(store.push("bench", src))
        assert stats["uploaded"] == 1, stats
        samples.append(seconds)
    rows.append((name, "push 1 changed", samples, f"of {args.files}"))

    samples = []
    for i in range(3):
        dst = work / f"{name}-restore-{i}"
        seconds, stats = await timed(store.restore("bench", dst))
        assert stats["downloaded"] == args.files, stats
        samples.append(seconds)
        shutil.rmtree(dst)
    rows.append((name, f"restore {args.files}", samples, "into an empty dir"))

    big_src = work / f"{name}-big"
    big_src.mkdir()
    size = args.big_mib * 2**20
    with open(big_src / "big.bin", "wb") as fh:
        for _ in range(args.big_mib):
            fh.write(os.urandom(2**20))
    seconds, stats = await timed(store.push("big", big_src))
    rows.append((name, f"upload {args.big_mib} MiB", [seconds], f"{size / 2**20 / seconds:.0f} MiB/s"))
    big_dst = work / f"{name}-big-restored"
    seconds, stats = await timed(store.restore("big", big_dst))
    rows.append((name, f"download {args.big_mib} MiB", [seconds], f"{size / 2**20 / seconds:.0f} MiB/s"))
    shutil.rmtree(big_src)
    shutil.rmtree(big_dst)
    await store.delete("bench")
    await store.delete("big")
    return rows


def print_table(rows: list[tuple]) -> None:
    header = ("backend", "operation", "median", "p90", "n", "goal", "note")
    lines = [header]
    for backend, op, samples, note in rows:
        median, goal = pct(samples, 50), GOALS.get((backend, op))
        verdict = "" if goal is None else f"<= {goal * 1000:.0f} ms " + ("ok" if median <= goal * 1000 else "MISSED")
        lines.append((backend, op, f"{median:.1f} ms", f"{pct(samples, 90):.1f} ms", str(len(samples)), verdict, note))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for index, line in enumerate(lines):
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--big-mib", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--backends", default="file,s3")
    args = parser.parse_args()
    backends = args.backends.split(",")
    rows: list[tuple] = []
    with tempfile.TemporaryDirectory(prefix="era-bench-") as tmp:
        work = Path(tmp)
        if "file" in backends:
            rows += await bench_backend("file", WorkspaceStore.from_url(f"file://{work}/store"), work, args)
        if "s3" in backends:
            with MotoProcess() as moto:
                import boto3

                boto3.client("s3", endpoint_url=moto.endpoint, aws_access_key_id="bench",
                             aws_secret_access_key="bench", region_name="us-east-1").create_bucket(Bucket="era-bench")
                store = WorkspaceStore.from_url("s3://era-bench/workspaces", json.dumps(moto.options()))
                rows += await bench_backend("s3", store, work, args)
    print_table(rows)


if __name__ == "__main__":
    asyncio.run(main())
