"""Who owns a kernel's leftovers, and whether that owner is provably gone.

A server records itself as the owner of every kernel directory and cgroup it makes:
its pid plus the pid's start time (``/proc/<pid>/stat`` field 22, clock ticks since
boot). A pid alone is not an identity: pids are reused, and in a container the server
may be pid 1 in every life. The pair is. Reapers (``orphans.py``, ``cgroups.py``) call
``owner_gone`` and remove only what it says is gone.
"""

from __future__ import annotations

import functools
import os


def start_time(pid: int) -> int | None:
    """The pid's start time in clock ticks since boot, or None when no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    # Field 2 (the command) is in parentheses and may hold spaces or ")": split after the last ")".
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        return int(fields[19])  # field 22 overall: 2 fields before the ")" and 20th after it
    except (IndexError, ValueError):
        return None


@functools.lru_cache(maxsize=1)
def _identity(pid: int) -> tuple[int, int]:
    return pid, start_time(pid) or 0


def me() -> tuple[int, int]:
    """This process as an owner: ``(pid, start time)`` (recomputed after a fork)."""
    return _identity(os.getpid())


@functools.lru_cache(maxsize=1)
def pid_namespace() -> int:
    """Our pid namespace's inode: owner pids mean something only within it."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists (ours to signal or not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_gone(pid: int, started: int | None) -> bool:
    """True when the owner ``pid`` (started at ``started``) no longer runs.

    ``started=None`` (a record written before start times were recorded) trusts the pid
    alone, as before. A live pid with another start time is another process: gone.
    """
    if not pid_alive(pid):
        return True
    if started is None:
        return False
    now = start_time(pid)
    return now is not None and now != started
