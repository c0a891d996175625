"""A memory and pids cgroup per local kernel (and per setup step), so limits hold for the
whole session, not per process.

``prlimit`` caps each process: four children of one kernel could each use the whole
``ERA_KERNEL_MEMORY``. A cgroup caps their sum. Each kernel gets
``<server's own cgroup>/era/<owner pid>.<owner start>.<owner pid namespace>.<kernel dir>`` with
``memory`` = its memory limit (swap included where the kernel accounts swap) and
``pids`` = its process limit. Nesting under the server's own cgroup keeps the server's
own limits above its kernels' and needs no rights beyond the ones it has there.

Both layouts are supported, detected once per process (``support()``):
- cgroup v1, the ``memory`` and ``pids`` controllers mounted separately (e.g.
  ``/sys/fs/cgroup/memory``): one directory in each, ``memory.limit_in_bytes``,
  ``memory.memsw.limit_in_bytes`` when present, ``pids.max``; OOM kills counted by
  ``memory.oom_control``'s ``oom_kill`` line (kernels since 4.13);
- cgroup v2 (unified): one directory, ``memory.max``, ``memory.swap.max`` = 0,
  ``pids.max``; OOM kills from ``memory.events``. The controllers are enabled in the
  ``cgroup.subtree_control`` of the server's cgroup and of ``era/``; v2 refuses that
  while the server's own cgroup holds processes (itself) unless it is the root, so a
  server in an ordinary v2 cgroup has no kernel cgroups (``support()`` says why; run it
  in a delegated cgroup of its own, e.g. a systemd unit with ``Delegate=yes`` whose main
  process lives in a leaf).

Entering: ``wrap_argv`` prefixes the kernel's command line with a constant ``/bin/sh``
script, run as the server's uid before anything else of the kernel runs, that writes its
own pid into each directory's ``cgroup.procs`` and then ``exec``s the rest: the kernel
and all it forks are inside from their first instruction. (Popen's ``preexec_fn`` would
do the same without the extra exec, but it is documented unsafe in a threaded process,
which the server is, and it forces a plain fork; the script costs about a millisecond.)
The paths are ours; nothing from a request is ever part of the script.

Leaving: ``KernelCgroup.remove`` kills what is left (v2 ``cgroup.kill``; v1: SIGKILL
every pid listed until none) and removes the directories. ``reap_orphans`` does that for
groups whose owner is provably dead (``owner.owner_gone``), at server start.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from .owner import me, owner_gone, pid_namespace

log = logging.getLogger("era.provisioning.cgroups")

ENTER_SCRIPT = ('for g; do [ "$g" = -- ] && break; echo $$ > "$g/cgroup.procs" || exit 1; shift; done; '
                'shift; exec "$@"')
BASE_NAME = "era"
REMOVE_TIMEOUT = 5.0  # seconds for killed tasks to leave before rmdir gives up


@dataclass(frozen=True)
class Support:
    """What this machine offers: ``version`` 1 or 2 and the ``era`` base directories
    (v1: memory then pids; v2: one), or ``version`` 0 and the ``reason`` why not."""

    version: int
    bases: tuple[Path, ...] = ()
    reason: str = ""

    def __bool__(self) -> bool:
        return self.version != 0


def _mounts() -> list[tuple[str, Path, str, set[str]]]:
    """(fstype, mount point, root inside the hierarchy, super options) of cgroup mounts."""
    out = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            out.append((tail[0], Path(fields[4]), fields[3], set(tail[2].split(","))))
    return out


def _own_paths() -> dict[str, str]:
    """This process's cgroup per v1 controller name, and ``""`` for the v2 hierarchy."""
    out = {}
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                out[controller] = parts[2]
    return out


def _inside(mount_point: Path, mount_root: str, path: str) -> Path | None:
    relative = os.path.relpath(path, mount_root)
    if relative.startswith(".."):
        return None  # our cgroup is not visible in this mount
    return (mount_point / relative).resolve()


def _locate() -> tuple[int, tuple[Path, ...], str]:
    """Read-only: (version, the server's own cgroup directories, "") or (0, (), reason)."""
    mounts, own = _mounts(), _own_paths()
    v1: dict[str, Path | None] = {}
    for fstype, point, root, options in mounts:
        for controller in ("memory", "pids"):
            if fstype == "cgroup" and controller in options and controller in own:
                v1[controller] = _inside(point, root, own[controller])
    if v1.get("memory") and v1.get("pids"):
        return 1, (v1["memory"], v1["pids"]), ""
    for fstype, point, root, _ in mounts:
        candidate = _inside(point, root, own.get("", "/")) if fstype == "cgroup2" else None
        if candidate is not None and {"memory", "pids"} <= set(_read(candidate / "cgroup.controllers").split()):
            return 2, (candidate,), ""
    return 0, (), "no cgroup hierarchy with the memory and pids controllers is mounted"


def _make_base(own: Path, version: int) -> Path:
    base = own / BASE_NAME
    base.mkdir(exist_ok=True)
    if version == 2:
        for level in (own, base):  # children of each level get the controllers
            enabled = set((level / "cgroup.subtree_control").read_text().split())
            missing = {"memory", "pids"} - enabled
            if missing:
                (level / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in sorted(missing)))
    return base


def _probe(support: Support) -> None:
    """Make, limit and remove a group, as a kernel start would: fails now, not at a start."""
    group = KernelCgroup(support, group_name(f"probe-{secrets.token_hex(3)}"))
    try:
        group.create(64 * 1024**2, 16)
    finally:
        group.remove()


def _detect() -> Support:
    version, owns, reason = _locate()
    if not version:
        return Support(0, reason=reason)
    try:
        found = Support(version, tuple(_make_base(own, version) for own in owns))
        _probe(found)
        return found
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return Support(0, reason="cgroup v2 will not enable memory and pids below the server's own cgroup while "
                                     "it holds processes; run the server in a delegated cgroup of its own")
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            why = "the server is not root" if os.getuid() != 0 else "the cgroup filesystem is read-only here"
            return Support(0, reason=f"cannot create cgroups ({why}: {exc.strerror})")
        return Support(0, reason=f"cannot create cgroups: {exc}")


@functools.lru_cache(maxsize=1)
def support() -> Support:
    """Detected once per process, when the first kernel needs it (makes ``era/`` under the
    server's cgroup and probes it: a failure is known before any kernel depends on it)."""
    return _detect()


class CgroupsUnavailable(RuntimeError):
    """``ERA_KERNEL_CGROUPS=on`` on a machine where the server cannot make cgroups."""


_UNAVAILABLE_LOGGED = False


def resolve(mode: str) -> Support | None:
    """Blocking (the first call detects). ``auto|on|off`` to the support a launch uses:
    None for ``off``, and for ``auto`` without support (logged once, with the reason).
    Raises ``CgroupsUnavailable`` for ``on`` without support. Called by the local
    provisioner and the local setup runner before each launch."""
    global _UNAVAILABLE_LOGGED
    if mode == "off":
        return None
    found = support()
    if found:
        return found
    if mode == "on":
        raise CgroupsUnavailable(f"ERA_KERNEL_CGROUPS=on, but {found.reason}")
    if not _UNAVAILABLE_LOGGED:
        _UNAVAILABLE_LOGGED = True
        log.warning("local kernels get NO memory/pids cgroup (%s): their memory and process limits hold per "
                    "process only (RLIMIT_AS, RLIMIT_NPROC), and several processes of one session can exceed "
                    "them together; ERA_KERNEL_CGROUPS=on makes this an error", found.reason)
    return None


class KernelCgroup:
    """One kernel's (or setup step's) group: its directories in each hierarchy."""

    def __init__(self, support: Support, name: str):
        self.version = support.version
        self.dirs = tuple(base / name for base in support.bases)

    @classmethod
    def for_kernel(cls, tag: str, found: Support | None = None) -> KernelCgroup:
        """A group named for this server process and ``tag`` (a kernel directory name):
        the reaper tells its owner from the name."""
        return cls(found or support(), group_name(tag))

    @property
    def memory_dir(self) -> Path:
        return self.dirs[0]

    @property
    def pids_dir(self) -> Path:
        return self.dirs[-1]

    # ---- blocking: callers run these off the event loop ------------------------------------
    def create(self, memory: int, pids: int) -> None:
        """Make the directories and set the limits; called by a provisioner before launch.
        All or nothing: a failure removes what was made."""
        try:
            for path in self.dirs:
                path.mkdir()
            if self.version == 1:
                _write(self.memory_dir / "memory.limit_in_bytes", memory)
                if (self.memory_dir / "memory.memsw.limit_in_bytes").exists():
                    _write(self.memory_dir / "memory.memsw.limit_in_bytes", memory)  # swap is no way out
            else:
                _write(self.memory_dir / "memory.max", memory)
                if (self.memory_dir / "memory.swap.max").exists():
                    _write(self.memory_dir / "memory.swap.max", 0)
            _write(self.pids_dir / "pids.max", pids)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Kill whatever is left in the group and remove it; called at kernel clean-up and by
        the reaper. Gone already is fine."""
        deadline = time.monotonic() + REMOVE_TIMEOUT
        for path in self.dirs:
            while True:
                try:
                    path.rmdir()  # usually at once: the kernel's processes are gone already
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        log.warning("cannot remove cgroup %s: %s", path, exc)
                        break
                self._kill_all(path)
                time.sleep(0.01)

    def _kill_all(self, path: Path) -> None:
        """SIGKILL every task of the group (v1 lists them; a fork may race a listing, which
        is why ``remove`` calls this until the group is empty)."""
        if self.version == 2 and (path / "cgroup.kill").exists():
            try:
                (path / "cgroup.kill").write_text("1")
                return
            except OSError:
                pass
        for pid in _read(path / "cgroup.procs").split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass

    def pids(self) -> list[int]:
        return [int(p) for p in _read(self.pids_dir / "cgroup.procs").split()]

    # ---- cheap reads: a cgroup file is generated in memory, like /proc ----------------------
    def oom_kills(self) -> int | None:
        """Processes of the group the OOM killer has killed, or None where the kernel does not
        count them (v1 before 4.13)."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        for line in _read(self.memory_dir / name).splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return None

    def hit_limit(self) -> bool:
        """v1 before 4.13, which counts no OOM kills: the group reached its memory limit at
        least once (reclaim may have sufficed, so only a dead kernel is judged by it)."""
        return self.version == 1 and _read(self.memory_dir / "memory.failcnt").strip() not in ("", "0")


def _write(path: Path, value: int) -> None:
    path.write_text(str(value))


def _read(path: Path) -> str:
    # Plain os calls: read before and after every run, and half the cost of read_text().
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return ""
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError:
        return ""
    finally:
        os.close(fd)
    return b"".join(chunks).decode()


async def make(group: KernelCgroup, memory: int, pids: int) -> None:
    """Create ``group`` off the event loop. Cancelled meanwhile (a pool kernel's start given
    up), the thread cannot be stopped half-way and would leave a group nobody records: let
    it finish, remove the group, then let the cancellation through."""
    job = asyncio.ensure_future(asyncio.to_thread(group.create, memory, pids))
    try:
        await asyncio.shield(job)
    except asyncio.CancelledError:
        try:
            await job
        finally:
            await asyncio.to_thread(group.remove)
        raise


def group_name(tag: str, owner: tuple[int, int] | None = None) -> str:
    """``<owner pid>.<owner start time>.<pid namespace>.<tag>``: this process by default.
    The namespace is there because the hierarchy may be shared with servers in other pid
    namespaces (containers), whose pids mean nothing in ours."""
    pid, started = owner or me()
    return f"{pid}.{started}.{pid_namespace()}.{tag}"


def wrap_argv(group: KernelCgroup, argv: list[str]) -> list[str]:
    """``argv`` run inside ``group`` from its first instruction (see the module docstring)."""
    return ["/bin/sh", "-c", ENTER_SCRIPT, "sh", *(str(d) for d in group.dirs), "--", *argv]


def reap_orphans() -> int:
    """Called (off the loop) at engine start: remove the groups of dead owners under our
    ``era/`` bases. Creates nothing (with no kernel ever started here, there is no base).
    Returns how many groups were removed."""
    version, owns, _ = _locate()
    if not version:
        return 0
    found = Support(version, tuple(own / BASE_NAME for own in owns))
    names: set[str] = set()
    for base in found.bases:
        try:
            names.update(entry.name for entry in base.iterdir() if entry.is_dir())
        except OSError:
            continue
    removed = 0
    namespace = str(pid_namespace())
    for name in names:
        fields = name.split(".", 3)
        if len(fields) != 4 or not (fields[0].isdigit() and fields[1].isdigit()) or fields[2] != namespace:
            continue  # not named by us, or by a server in another pid namespace: not ours to judge
        if owner_gone(int(fields[0]), int(fields[1])):
            KernelCgroup(found, name).remove()
            removed += 1
    return removed
