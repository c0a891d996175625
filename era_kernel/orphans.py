"""Reaping what a previous (crashed or SIGKILLed) process left behind.

Kernel directories live under ``<runtime_dir>/k/``. Each server has its own runtime
directory by default (``config``: derived from its data directory), but an operator may
point several at one ``ERA_RUNTIME_DIR``, so the reaper works from records, never from
what it does not recognise:

- Beside every kernel directory, local and Docker alike, a root-owned record
  ``<dir>.pid`` holds ``<kernel pid> <owner pid> <owner start time>`` (kernel pid 0 when
  there is no local process: a Docker kernel, or one not launched yet). It is written
  before the directory is handed to the kernel (``ipc.make_kernel_dir``).
- A directory is removed only when its owner is provably dead
  (``owner.owner_gone``): the owner pid does not exist, or it exists but started at
  another time (a reused pid). Its kernel process, if any, is killed first (after
  checking that the pid still runs a command naming that directory, so a reused pid is
  never hit). Records of older versions, without a start time, trust the pid alone.
- A directory with no readable record is left alone unless it is older than
  ``UNRECORDED_GRACE`` (an hour): it may be one being made right now, or belong to an
  older server version; an hour-old one without a record is debris.
- Records without their directory are removed.

Kernel cgroups are reaped by owner the same way (``provisioning.cgroups``). Containers
are reaped by label through the Docker provisioner when a Docker engine answers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time
from pathlib import Path

from .config import Settings
from .provisioning import cgroups
from .provisioning.ipc import read_pid_record, remove_kernel_dir
from .provisioning.owner import owner_gone, pid_alive

__all__ = ["pid_alive", "reap_kernel_dirs", "reap_orphans"]

log = logging.getLogger("era.orphans")

UNRECORDED_GRACE = 3600.0  # seconds
_KERNEL_FILE = re.compile(r"([0-9a-f]{10})\.(pid|log)(\.[0-9]+)?")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill_kernel(pid: int, kernel_dir: Path) -> bool:
    if pid <= 0 or not pid_alive(pid) or str(kernel_dir) not in _cmdline(pid):
        return False
    try:
        os.killpg(pid, signal.SIGKILL)  # the kernel leads its own session
    except OSError:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return True


def reap_kernel_dirs(runtime_dir: Path) -> int:
    """Called (off the loop) by ``reap_orphans`` at engine start: apply the module's rule to
    ``<runtime_dir>/k``. Returns how many kernel processes were killed."""
    root = runtime_dir / "k"
    if not root.is_dir():
        return 0
    reaped = 0
    for entry in root.iterdir():
        if entry.is_symlink() or not entry.is_dir():
            match = _KERNEL_FILE.fullmatch(entry.name)
            if match and not (root / match.group(1)).is_dir():
                entry.unlink(missing_ok=True)  # a record whose directory is gone
            continue
        record = read_pid_record(entry)
        if record is None:
            try:
                age = time.time() - entry.lstat().st_mtime
            except OSError:
                continue
            if age > UNRECORDED_GRACE:
                remove_kernel_dir(entry)
            continue
        # A record without a start time naming our own pid was not written by us (we
        # record start times): a previous life of a reused pid, as in a container.
        older_self = record.owner_start is None and record.owner == os.getpid()
        if not older_self and not owner_gone(record.owner, record.owner_start):
            continue  # a live server's kernel (ours included: two engines in one process)
        if _kill_kernel(record.pid, entry):
            reaped += 1
        remove_kernel_dir(entry)
    return reaped


def _containers_of_live_owners() -> list[str]:
    """ERA containers whose launching process is still alive (another engine, or a
    Jupyter server using our kernelspec): not orphans."""
    from .provisioning.docker import LABEL_KERNEL, LABEL_MANAGED, LABEL_OWNER, LABEL_OWNER_START, shared_docker_client

    keep = []
    for item in shared_docker_client().api.containers(all=True, filters={"label": f"{LABEL_MANAGED}=1"}):
        labels = item.get("Labels") or {}
        owner, started = labels.get(LABEL_OWNER, ""), labels.get(LABEL_OWNER_START, "")
        if owner.isdigit() and not owner_gone(int(owner), int(started) if started.isdigit() else None):
            keep.append(labels.get(LABEL_KERNEL) or item["Id"])
    return keep


async def reap_orphans(settings: Settings) -> int:
    """Called by the engine at start, before it launches kernels. Returns how many
    kernels (processes or containers) were reaped."""
    reaped = await asyncio.to_thread(reap_kernel_dirs, settings.runtime_dir)
    try:
        groups = await asyncio.to_thread(cgroups.reap_orphans)
    except Exception as exc:  # never stop a start over debris
        log.warning("cgroup reaping failed: %s", exc)
    else:
        if groups:
            log.info("removed %d cgroup(s) of kernels whose server is gone", groups)
    try:
        from .provisioning.docker import reap_orphan_containers
    except ImportError:
        return reaped
    try:
        keep = await asyncio.to_thread(_containers_of_live_owners)
        reaped += await reap_orphan_containers(keep=keep)
    except Exception as exc:  # no engine here: nothing of ours can be running in it
        log.debug("container reaping skipped: %s", exc)
    return reaped
