"""Memory of kernels and of the server, for stats, /health and /metrics.

A local kernel (``era-local``) is a process tree: prlimit execs bubblewrap, which forks
its pid-namespace init and then the kernel, which may fork children of its own (or the
fork launcher's sandbox init and its kernel); its memory is the sum of the PSS of that
whole tree (``trees_memory_bytes``). A Docker kernel (``era-docker``) is a
container: its memory is what its cgroup is charged, less the inactive page cache
(as ``docker stats`` reports it), with its process tree's as the fallback.
Everything that reads /proc, /sys or talks to Docker runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import psutil

CGROUP_ROOT = Path("/sys/fs/cgroup")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PSS_TTL = 10.0  # seconds a process's PSS reading is reused at most (_pss_bytes)
PSS_RSS_DRIFT = 256 * 1024  # ... while its RSS moved no more than this

# (pid, start time) -> (when read, PSS bytes, RSS bytes then)
_pss_cache: dict[tuple[int, int], tuple[float, int, int]] = {}

# container id -> host pid of its init process; checked against the cgroup before use.
_container_pids: dict[str, int] = {}


def process_rss_bytes() -> int:
    """Resident memory of this process (the server and the engine)."""
    return psutil.Process().memory_info().rss


def tree_memory_bytes(pid: int) -> int | None:
    """Memory of ``pid`` and all its descendants (``trees_memory_bytes``); None when
    ``pid`` is gone."""
    return trees_memory_bytes([pid])[pid]


def trees_memory_bytes(roots: list[int]) -> dict[int, int | None]:
    """The summed PSS of each root's process tree, from one pass over /proc/*/stat (psutil
    would read two files and build an object per process; listing children per root
    would scan /proc once per kernel).

    PSS, not RSS: forked kernels share the zygote's pages, and RSS counted them whole in
    every kernel (12 pooled kernels of about 20 MiB each showed as 1 GiB); PSS splits a
    shared page among the processes that map it, so the kernels' figures add up to the
    memory they take. A process whose PSS cannot be read counts its RSS."""
    children: dict[int, list[int]] = {}
    stats: dict[int, tuple[int, int]] = {}  # pid -> (start time, RSS bytes)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(b")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
        pid, ppid = int(entry.name), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        stats[pid] = (int(fields[19]), int(fields[21]) * PAGE_SIZE)
    totals: dict[int, int | None] = {}
    now = time.monotonic()
    for root in roots:
        if root not in stats:
            totals[root] = None
            continue
        total, stack = 0, [root]
        while stack:
            pid = stack.pop()
            if pid in stats:
                total += _pss_bytes(pid, *stats[pid], now)
            stack.extend(children.get(pid, ()))
        totals[root] = total
    for key in [key for key, (at, *_) in _pss_cache.items() if now - at > PSS_TTL]:
        _pss_cache.pop(key, None)
    return totals


def _pss_bytes(pid: int, started: int, rss: int, now: float) -> int:
    """``/proc/<pid>/smaps_rollup``'s Pss: the kernel walks the process's page tables for
    it (about 0.8 ms for a kernel), and stats, /health and /metrics may ask often, so a
    reading is reused while the process's RSS (from its stat, cheap) stays within
    PSS_RSS_DRIFT of what it was, for up to PSS_TTL (its share of pages shared with
    processes that came or went moves without its RSS). Keyed by start time too, so a
    reused pid is not taken for the process it replaced."""
    cached = _pss_cache.get((pid, started))
    if cached is not None and now - cached[0] <= PSS_TTL and abs(rss - cached[2]) <= PSS_RSS_DRIFT:
        return cached[1]
    value = read_pss_bytes(pid)
    if value is None:
        return rss
    _pss_cache[(pid, started)] = (now, value, rss)
    return value


def read_pss_bytes(pid: int) -> int | None:
    """``/proc/<pid>/smaps_rollup``'s Pss, read now (the benchmarks use it too); None when
    the process exited, is not ours to read, or the kernel has no smaps_rollup (before 4.14)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            rollup = f.read()
        start = rollup.index(b"\nPss:") + 5
        return int(rollup[start:rollup.index(b"kB", start)]) * 1024
    except (OSError, ValueError):
        return None


async def kernels_memory_bytes(kms: list[Any]) -> list[int | None]:
    """``kernel_memory_bytes`` of many kernels at once, for stats: local kernels from one
    pass over the process table, containers from their cgroups."""
    local = {i: _local_pid(km) for i, km in enumerate(kms) if not _container_id(km)}
    totals = await asyncio.to_thread(trees_memory_bytes, [pid for pid in local.values() if pid]) if local else {}
    out: list[int | None] = []
    for i, km in enumerate(kms):
        if i in local:
            out.append(totals.get(local[i]) if local[i] else None)
        else:
            out.append(await kernel_memory_bytes(km))
    return out


def _container_id(km: Any) -> str | None:
    return getattr(getattr(km, "provisioner", None), "container_id", None)


def _local_pid(km: Any) -> int | None:
    process = getattr(getattr(km, "provisioner", None), "process", None)
    return process.pid if process is not None and process.poll() is None else None


async def kernel_memory_bytes(km: Any) -> int | None:
    """Memory used by the kernel of a jupyter_client ``AsyncKernelManager``, or None when
    it is not running or its provisioner is of a kind we cannot measure."""
    provisioner = getattr(km, "provisioner", None)
    if provisioner is None:
        return None
    container_id = getattr(provisioner, "container_id", None)
    if container_id:
        client = getattr(provisioner, "client", None)
        return await asyncio.to_thread(_container_memory, client, container_id)
    # era-local (a jupyter_client LocalProvisioner): the Popen of prlimit, which execs
    # bubblewrap; None once the kernel was waited for (its pid may be reused by then).
    process = getattr(provisioner, "process", None)
    if process is None or process.poll() is not None:
        return None
    return await asyncio.to_thread(tree_memory_bytes, process.pid)


def _container_memory(client: Any, container_id: str) -> int | None:
    pid = _container_pids.get(container_id)
    cgroup = _memory_cgroup(pid, container_id) if pid else None
    if cgroup is None and client is not None:
        try:
            state = client.api.inspect_container(container_id)["State"]
        except Exception:  # removed, engine unreachable
            _container_pids.pop(container_id, None)
            return None
        pid = int(state.get("Pid") or 0)
        if not state.get("Running") or not pid:
            _container_pids.pop(container_id, None)
            return None
        cgroup = _memory_cgroup(pid, container_id)
        if cgroup is None:
            return None  # the engine's pid is not one of ours (a remote engine, another pid namespace)
        if len(_container_pids) > 4096:
            _container_pids.clear()
        _container_pids[container_id] = pid
    if cgroup is None:
        return None
    usage = _cgroup_usage(cgroup)
    return usage if usage is not None else tree_memory_bytes(pid)


def _memory_cgroup(pid: int, container_id: str) -> Path | None:
    """The container's memory cgroup directory (v1 or v2), if ``pid`` is in it."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    v1 = v2 = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if container_id not in path:
            continue
        if "memory" in controllers.split(","):
            v1 = CGROUP_ROOT / "memory" / path.lstrip("/")
        elif controllers == "":
            v2 = CGROUP_ROOT / path.lstrip("/")
    if v1 is None and v2 is None:
        return None
    return v1 if v1 is not None else v2


def _cgroup_usage(cgroup: Path) -> int | None:
    """Charged memory less inactive page cache, as ``docker stats`` computes it."""
    try:
        if (cgroup / "memory.usage_in_bytes").exists():  # cgroup v1
            usage, inactive_key = int((cgroup / "memory.usage_in_bytes").read_text()), "total_inactive_file"
        else:  # cgroup v2
            usage, inactive_key = int((cgroup / "memory.current").read_text()), "inactive_file"
        stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines() if " " in line)
    except (OSError, ValueError):
        return None
    inactive = int(stat.get(inactive_key, 0))
    return usage - inactive if inactive < usage else usage
