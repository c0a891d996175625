"""Per-kernel IPC directories and connection files, shared by the ERA provisioners.

Kernels talk to the host over ZeroMQ IPC sockets in a per-kernel directory: no TCP port
is opened, so a kernel with no network (bubblewrap's ``--unshare-net``, Docker's
``--network none``) still reaches the host. The directory name is a short random hex
string, never the session id, so socket paths stay under libzmq's 107-byte limit.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any, NamedTuple

from .owner import me

from ..workspaces import fdtree

IPC_PATH_LIMIT = 107  # bytes, including the "-N" port suffix libzmq adds
PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
log = logging.getLogger("era.ipc")


def kernels_root(runtime_dir: str | os.PathLike) -> Path:
    root = Path(runtime_dir) / "k"
    root.mkdir(parents=True, exist_ok=True)
    # Search-only for others: a sandboxed kernel running as its own uid must traverse
    # to its own directory (bubblewrap copies this mode) but cannot list its siblings.
    os.chmod(root, 0o711)
    # The runtime directory too (a 0700 one from mkdtemp, say): an unsandboxed kernel
    # (ERA_SANDBOX=none) runs as its session's uid and reaches its directory through it.
    mode = os.stat(runtime_dir).st_mode
    if mode & 0o011 != 0o011 and os.geteuid() == os.stat(runtime_dir).st_uid:
        os.chmod(runtime_dir, (mode & 0o7777) | 0o011)
    return root


def make_kernel_dir(runtime_dir: str | os.PathLike) -> Path:
    """Create ``<runtime_dir>/k/<10 hex>`` (mode 0700) and check the socket path fits.

    Called by both provisioners' ``pre_launch``. The owner record (``0 <our pid> <our
    start time>``: no kernel process yet) is written before the directory is handed to
    anyone, so a reaper never sees a live directory without an owner.
    """
    root = kernels_root(runtime_dir)
    path = root / secrets.token_hex(5)
    longest = str(path / "kernel-5")
    if len(longest.encode()) > IPC_PATH_LIMIT:
        raise RuntimeError(f"IPC socket path {longest!r} exceeds {IPC_PATH_LIMIT} bytes; set a shorter ERA_RUNTIME_DIR")
    path.mkdir(mode=0o700)
    write_pid_record(path, 0)
    return path


def ipc_connection_info(kernel_dir: Path, *, ip_dir: Path | None = None) -> dict[str, Any]:
    """Connection info for IPC sockets named ``<ip_dir>/kernel-<port>``.

    ``ip_dir`` is the directory as the kernel sees it (inside a container it may be
    mounted elsewhere); it defaults to ``kernel_dir``.
    """
    return {
        "transport": "ipc",
        "ip": str((ip_dir or kernel_dir) / "kernel"),
        "shell_port": 1,
        "iopub_port": 2,
        "stdin_port": 3,
        "control_port": 4,
        "hb_port": 5,
        "key": secrets.token_hex(32),
        "signature_scheme": "hmac-sha256",
        "kernel_name": "",
    }


def write_connection_file(kernel_dir: Path, info: dict[str, Any], *, uid: int | None = None) -> Path:
    path = kernel_dir / "connection.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(info, fh)
    if uid is not None:
        os.chown(path, uid, uid)
        os.chown(kernel_dir, uid, uid)
    return path


def seal_kernel_dir(kernel_dir: Path | None) -> None:
    """Take the kernel's directory back once the kernel has bound its sockets.

    The kernel creates its socket files, so it owns the directory while it starts. Left
    so, its code could replace a socket with a symlink (our next reconnect would follow
    it: to the Docker socket, another kernel) or a FIFO, or flood the directory. Owned by
    root with mode 0711, the kernel still reaches its sockets and its home below, but can
    no longer add, remove or rename anything here. A restart's ``pre_launch`` hands the
    directory back (its chown), so the new kernel can bind again. Only root can take it:
    without root the kernel runs as our own uid, which the note in README's limits covers.
    """
    if kernel_dir is not None and os.getuid() == 0:
        os.chown(kernel_dir, 0, 0)
        os.chmod(kernel_dir, 0o711)


def host_connection_info(info: dict[str, Any], kernel_dir: Path) -> dict[str, Any]:
    """What the host's KernelManager should use: same key and ports, host-side socket path."""
    host = dict(info)
    host["ip"] = str(kernel_dir / "kernel")
    host["key"] = info["key"].encode() if isinstance(info["key"], str) else info["key"]
    return host


def format_argv(argv: list[str], *, connection_file: str, resource_dir: str = "", prefix: str = "") -> list[str]:
    """Substitute the kernelspec argv placeholders jupyter_client knows."""
    values = {"connection_file": connection_file, "resource_dir": resource_dir, "prefix": prefix}
    out = []
    for arg in argv:
        for key, value in values.items():
            arg = arg.replace("{" + key + "}", value)
        out.append(arg)
    return out


class PidRecord(NamedTuple):
    pid: int  # the kernel's process (bubblewrap's when sandboxed); 0: none (Docker, not launched yet)
    owner: int  # the server process that made the directory
    owner_start: int | None  # its start time (owner.start_time); None in records of older versions


def write_pid_record(kernel_dir: Path, pid: int) -> None:
    """Record ``<pid> <owner pid> <owner start time>`` beside (not inside) the kernel's directory.

    Called by ``make_kernel_dir`` (pid 0) and by the local provisioner once its process
    runs. The kernel can write to its own directory, so what the reaper trusts lives in
    the root-owned parent, where the kernel cannot plant a symlink or a forged pid.
    Written whole and renamed into place: a reaper never reads half a record.
    """
    owner, started = me()
    record = kernel_dir.parent / f"{kernel_dir.name}.pid"
    partial = kernel_dir.parent / f"{kernel_dir.name}.pid.{os.getpid()}"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{pid} {owner} {started}")
    os.replace(partial, record)


def read_pid_record(kernel_dir: Path) -> PidRecord | None:
    try:
        fields = [int(f) for f in (kernel_dir.parent / f"{kernel_dir.name}.pid").read_text().split()]
    except (OSError, ValueError):
        return None
    if len(fields) == 2:
        return PidRecord(fields[0], fields[1], None)
    if len(fields) == 3:
        return PidRecord(*fields)
    return None


def remove_kernel_dir(kernel_dir: Path | None) -> bool:
    """Remove a stopped kernel's directory (sockets, and the home the kernel could fill
    and nest as deep as it liked) and its records; False, logged, when some of it stays.

    Called by the provisioners' cleanup and the orphan reaper at start, off the loop
    (it blocks). The parent is ours, so the directory is removed through it with
    ``fdtree``: a bounded number of descriptors at any depth, no link followed. It does
    not raise: a stuck directory must neither fail a kernel's shutdown nor stop the
    server from starting, but it is reported rather than silently left.
    """
    if kernel_dir is None:
        return True
    removed = True
    try:
        fdtree.remove_tree(kernel_dir)
    except OSError as exc:
        log.error("kernel directory %s could not be removed completely: %s", kernel_dir, exc)
        removed = False
    for suffix in (".pid", ".log"):
        (kernel_dir.parent / f"{kernel_dir.name}{suffix}").unlink(missing_ok=True)
    return removed
