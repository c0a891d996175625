"""A server's local kernels counted by their cgroups, from /proc: a kernel enters its
group at its first instruction and the group is named for the server that made it
(era_kernel/provisioning/cgroups.py), so a start in progress counts, and what a killed
server left is still told apart."""

from __future__ import annotations

import os
from pathlib import Path


def kernel_groups(server_pid: int) -> set[str]:
    """Names of the server's kernel cgroups that hold a live (non-zombie) process."""
    groups = set()
    prefix = f"/era/{server_pid}."
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cgroup = Path(f"/proc/{entry}/cgroup").read_text()
            if prefix not in cgroup:
                continue
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            for line in cgroup.splitlines():
                if prefix in line:
                    groups.add(line.split(prefix, 1)[1].split("/")[0])
    return groups


def cgroup_dirs(server_pid: int) -> list[Path]:
    """The server's kernel cgroup directories that still exist."""
    from era_kernel.provisioning import cgroups

    version, owns, _ = cgroups._locate()
    return [path for own in owns or () for path in (own / cgroups.BASE_NAME).glob(f"{server_pid}.*")] \
        if version else []
