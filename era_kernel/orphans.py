"""Reaping what a previous (crashed or SIGKILLed) process left behind.

Beside each local kernel directory under ``<runtime_dir>/k/`` a root-owned record
holds the kernel's pid (bubblewrap's when sandboxed) and the engine process that
started it. A directory whose owner is gone belongs to nobody: its process is killed (after
checking that the pid still runs a command naming that directory, so a reused pid is
never hit) and the directory with its sockets is removed. Directories owned by another
live engine sharing the runtime directory are left alone. Containers are reaped by
label through the Docker provisioner when a Docker engine answers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

from .config import Settings
from .provisioning.ipc import read_pid_record, remove_kernel_dir

log = logging.getLogger("era.orphans")


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists (ours to signal or not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def reap_kernel_dirs(runtime_dir: Path) -> int:
    root = runtime_dir / "k"
    if not root.is_dir():
        return 0
    reaped = 0
    for kernel_dir in root.iterdir():
        if kernel_dir.is_symlink() or not kernel_dir.is_dir():
            continue
        pid, owner = read_pid_record(kernel_dir) or (None, None)
        if owner is not None and owner != os.getpid() and pid_alive(owner):
            continue  # another live engine's kernel
        if pid is not None and pid_alive(pid) and str(kernel_dir) in _cmdline(pid):
            try:
                os.killpg(pid, signal.SIGKILL)  # the kernel leads its own session
            except OSError:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            reaped += 1
        remove_kernel_dir(kernel_dir)
    return reaped


def _containers_of_live_owners() -> list[str]:
    """ERA containers whose launching process is still alive (another engine, or a
    Jupyter server using our kernelspec): not orphans."""
    from .provisioning.docker import LABEL_KERNEL, LABEL_MANAGED, LABEL_OWNER, shared_docker_client

    keep = []
    for item in shared_docker_client().api.containers(all=True, filters={"label": f"{LABEL_MANAGED}=1"}):
        labels = item.get("Labels") or {}
        owner = labels.get(LABEL_OWNER, "")
        if owner.isdigit() and pid_alive(int(owner)):
            keep.append(labels.get(LABEL_KERNEL) or item["Id"])
    return keep


async def reap_orphans(settings: Settings) -> int:
    reaped = await asyncio.to_thread(reap_kernel_dirs, settings.runtime_dir)
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
