"""Memory of kernels and of the server, for stats, /health and /metrics.

A local kernel (``era-local``) is a process tree: prlimit execs bubblewrap, which forks
its pid-namespace init and then the kernel, which may fork children of its own; its
memory is the sum of the RSS of that whole tree. A Docker kernel (``era-docker``) is a
container: its memory is what its cgroup is charged, less the inactive page cache
(as ``docker stats`` reports it), with the RSS of its process tree as the fallback.
Everything that reads /proc, /sys or talks to Docker runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import psutil

CGROUP_ROOT = Path("/sys/fs/cgroup")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# container id -> host pid of its init process; checked against the cgroup before use.
_container_pids: dict[str, int] = {}


def process_rss_bytes() -> int:
    """Resident memory of this process (the server and the engine)."""
    return psutil.Process().memory_info().rss


def tree_rss_bytes(pid: int) -> int | None:
    """Summed RSS of ``pid`` and all its descendants; None when ``pid`` is gone."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    total, seen = 0, False
    for proc in procs:
        try:
            total += proc.memory_info().rss
            seen = True
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # exited between listing and reading
    return total if seen else None


def trees_rss_bytes(roots: list[int]) -> dict[int, int | None]:
    """``tree_rss_bytes`` for many roots from one pass over /proc/*/stat (psutil would
    read two files and build an object per process; listing children per root would
    scan /proc once per kernel)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
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
        rss[pid] = int(fields[21]) * PAGE_SIZE
    totals: dict[int, int | None] = {}
    for root in roots:
        if root not in rss:
            totals[root] = None
            continue
        total, stack = 0, [root]
        while stack:
            pid = stack.pop()
            total += rss.get(pid, 0)
            stack.extend(children.get(pid, ()))
        totals[root] = total
    return totals


async def kernels_memory_bytes(kms: list[Any]) -> list[int | None]:
    """``kernel_memory_bytes`` of many kernels at once, for stats: local kernels from one
    pass over the process table, containers from their cgroups."""
    local = {i: _local_pid(km) for i, km in enumerate(kms) if not _container_id(km)}
    totals = await asyncio.to_thread(trees_rss_bytes, [pid for pid in local.values() if pid]) if local else {}
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
    return await asyncio.to_thread(tree_rss_bytes, process.pid)


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
    return usage if usage is not None else tree_rss_bytes(pid)


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
