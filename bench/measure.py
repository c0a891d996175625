"""How the benchmarks take and summarize samples: percentiles, contenders interleaved round
by round, waiting for a process tree to go quiet, progress on stderr."""

from __future__ import annotations

import asyncio
import math
import sys
import time
from pathlib import Path
from typing import Awaitable, Callable, Hashable

import psutil

TIMEOUT = 120.0  # seconds any one sample may take before it counts as failed
Step = Callable[[], Awaitable[dict[Hashable, float]]]


def log(message: str) -> None:
    script = sys.argv[0].rsplit("/", 1)[-1].removesuffix(".py")
    print(f"[{script} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def pct(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of seconds, in ms; the median for q=50. NaNs are skipped."""
    values = sorted(s for s in samples if not math.isnan(s))
    if not values:
        return math.nan
    if q == 50:
        return (values[(len(values) - 1) // 2] + values[len(values) // 2]) / 2 * 1000
    return values[max(0, math.ceil(q / 100 * len(values)) - 1)] * 1000


async def interleaved(steps: dict[Hashable, Step], rounds: int, warmup: int,
                      on_error: Callable[[Hashable, BaseException], None] | None = None) -> dict[Hashable, list[float]]:
    """One call of each step per round, in rotating order, so a busy machine slows every
    contender alike and their ratios stay meaningful; warm-up rounds are dropped. A step
    returns {sample key: seconds}. Without ``on_error`` a failing step raises; with it, the
    failure is reported there and the step sits out the remaining rounds."""
    samples: dict[Hashable, list[float]] = {}
    names, failed = list(steps), set()
    for i in range(warmup + rounds):
        shift = i % max(1, len(names))
        for name in names[shift:] + names[:shift]:
            if name in failed:
                continue
            try:
                got = await asyncio.wait_for(steps[name](), TIMEOUT)
            except Exception as exc:
                if on_error is None:
                    raise
                failed.add(name)
                on_error(name, exc)
                continue
            if i >= warmup:
                for key, seconds in got.items():
                    samples.setdefault(key, []).append(seconds)
    return samples


def tree_cpu(pid: int) -> float:
    """CPU seconds used so far by a process and its descendants."""
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
    """Wait until a process tree uses under ``quiet`` CPU seconds per half second (kernels
    still booting would otherwise be charged to whatever is measured next)."""
    deadline, before = time.perf_counter() + timeout, tree_cpu(pid)
    while time.perf_counter() < deadline:
        await asyncio.sleep(0.5)
        now = tree_cpu(pid)
        if now - before < quiet:
            return
        before = now


def pss_kib(pid: int) -> int:
    """PSS of one process (``/proc/<pid>/smaps_rollup``), KiB; 0 when it is gone. Pages
    shared by N processes count 1/N in each: forked kernels are not each charged the
    zygote they share, as RSS would charge them. The server's own reader
    (``era_kernel.resources.read_pss_bytes``), uncached."""
    from era_kernel.resources import read_pss_bytes

    return (read_pss_bytes(pid) or 0) // 1024


def is_zygote(pid: int) -> bool:
    """The fork launcher's zygote: not a kernel; each of its children is one."""
    try:
        return b"era_kernel.provisioning.zygote" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
