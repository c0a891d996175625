"""A session's process supervisor (``supervisor.py``), started inside its kernel's sandbox,
and the JSON-lines channel the server speaks with it.

Why inside the kernel's sandbox rather than a sandbox of its own (as ``run_command``
makes for setup steps): a background server started by one command must answer a
second command, and the kernel's own code, on ``localhost``; processes must count
against the session's one memory and pids limit; files must land in the same
workspace and ``/tmp``. So:

- ``era-local``: as root, ``nsenter`` joins the kernel's mount, network, pid, ipc and uts
  namespaces (its bubblewrap sandbox), after the kernel's cgroup was entered (the same
  ``cgroups.wrap_argv`` script the kernel ran through), then ``setpriv`` drops to the
  session's uid with no capabilities and ``no_new_privs``, and the supervisor installs
  the same seccomp program bubblewrap gave the kernel before anything of the session's
  runs. Without bubblewrap (``ERA_SANDBOX=none``) there is no namespace to join.
- ``era-docker``: ``docker exec`` into the kernel's container: its user, working
  directory, environment, network, read-only root, dropped capabilities and limits.

The supervisor lives as long as the kernel: a kernel that stops (delete, stop, restart,
cull, the server going) takes every process of the session with it (its pid namespace
locally, its container on Docker), and the channel reports that as ``lost``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
import sys
from pathlib import Path
from typing import Any, Callable

from ..errors import KernelFailed
from ..provisioning.seccomp import build_filter

log = logging.getLogger("era.commands")

SOURCE = (Path(__file__).parent / "supervisor.py").read_text()
READ_LIMIT = 4 * 1024**2  # one event line: base64 of a 64 KiB chunk is far below it
EventSink = Callable[[dict[str, Any]], None]
# The whole environment of the steps that start the supervisor as root (see _enter_local).
ROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
MAX_ARG = 128 * 1024 - 1  # Linux's limit on one argument (MAX_ARG_STRLEN), terminator included


class _LocalPipe:
    """The supervisor as a child process of the server: its stdin and stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def recv(self) -> bytes:
        assert self.proc.stdout is not None
        return await self.proc.stdout.read(256 * 1024)

    async def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        await self.proc.stdin.drain()

    async def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()  # the supervisor kills its children and exits
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()


class _ExecSocket:
    """The supervisor as a ``docker exec``: the attach socket, stdin raw one way,
    stdout/stderr multiplexed the other (8-byte frame headers, as Docker frames a
    non-tty stream). Read and written on the event loop, non-blocking."""

    def __init__(self, sock: socket.socket, response: Any) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self._response = response  # keeps the HTTP connection (and so the socket) alive
        self._raw = bytearray()
        self.stderr = bytearray()  # the supervisor's own complaints, kept short for errors

    async def recv(self) -> bytes:
        loop = asyncio.get_running_loop()
        while True:
            while len(self._raw) >= 8:
                kind, size = self._raw[0], struct.unpack(">I", self._raw[4:8])[0]
                if len(self._raw) < 8 + size:
                    break
                payload = bytes(self._raw[8:8 + size])
                del self._raw[:8 + size]
                if kind == 1:
                    return payload
                self.stderr = (self.stderr + payload)[-4096:]
            try:
                chunk = await loop.sock_recv(self.sock, 256 * 1024)
            except OSError:
                chunk = b""
            if not chunk:
                return b""
            self._raw += chunk

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)  # EOF on its stdin: it kills its children and exits
        except OSError:
            pass
        self.sock.close()


class SupervisorChannel:
    """Requests to one supervisor; its events dispatched to ``on_event`` per process id.
    ``closed`` is set when the supervisor is gone (the kernel stopped, or ``close``)."""

    def __init__(self, pipe: Any, kernel: Any) -> None:
        self.pipe = pipe
        self.kernel = kernel  # the SessionKernel this supervisor lives in
        self.handlers: dict[int, EventSink] = {}
        self.closed = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._task = asyncio.create_task(self._read(), name="era-supervisor")

    async def request(self, message: dict[str, Any]) -> None:
        if self.closed.is_set():
            raise KernelFailed("the session's kernel stopped; its processes went with it")
        data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
        async with self._send_lock:  # lines never interleave
            try:
                await self.pipe.send(data)
            except (OSError, ConnectionError) as exc:
                raise KernelFailed(f"the session's process supervisor is gone ({exc})") from None

    async def _read(self) -> None:
        buf = b""
        try:
            while chunk := await self.pipe.recv():
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line:
                        self._dispatch(json.loads(line))
                if len(buf) > READ_LIMIT:
                    raise ValueError("an event line over the limit")
        except Exception as exc:  # a broken supervisor ends its channel, not the server
            log.warning("process supervisor channel failed: %s", exc)
        finally:
            self.closed.set()
            for handler in list(self.handlers.values()):
                handler({"ev": "lost"})
            self.handlers.clear()

    def _dispatch(self, event: dict[str, Any]) -> None:
        handler = self.handlers.get(event.get("id"))
        if handler is None:
            return
        if event.get("ev") in ("exit", "failed"):
            del self.handlers[event["id"]]
        handler(event)

    async def close(self) -> None:
        await self.pipe.close()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), 5)
        except asyncio.TimeoutError:
            self._task.cancel()


async def open_channel(kernel: Any) -> SupervisorChannel:
    """A supervisor inside ``kernel``'s sandbox (a live ``SessionKernel`` on one of our
    provisioners). Raises ``KernelFailed`` when it cannot be started."""
    provisioner = kernel.km.provisioner if kernel.km is not None else None
    name = type(provisioner).__name__
    if name == "EraDockerProvisioner":
        pipe = await _exec_in_container(provisioner)
    elif name == "EraLocalProvisioner":
        pipe = await _enter_local(provisioner, kernel.launch)
    else:
        raise KernelFailed(f"commands need an ERA provisioner; this kernel runs on {name}")
    return SupervisorChannel(pipe, kernel)


async def _enter_local(provisioner: Any, launch: Any) -> _LocalPipe:
    from ..provisioning import cgroups
    from ..provisioning.local import _NOBODY, die_with_parent
    from ..provisioning.privileges import drop_privileges

    root = os.getuid() == 0
    uid = launch.uid if launch.uid is not None else (_NOBODY if root else os.getuid())
    program = build_filter() if provisioner.sandboxed else None
    if provisioner.sandboxed:
        if not root:
            raise KernelFailed("commands in a sandboxed local session need the server to run as root "
                               "(to join the kernel's namespaces)")
        pid = await asyncio.to_thread(provisioner._kernel_pid)
        if pid is None:
            raise KernelFailed("the session's kernel process is gone")
        kernel_environ = await asyncio.to_thread(_environ, pid)
    else:
        from ..provisioning.local import kernel_env

        home = provisioner.kernel_dir / "home" if provisioner.kernel_dir is not None else Path("/tmp")
        kernel_environ = kernel_env(None, dict(launch.env), home)
    # The kernel's environment is the session's to change (its code can rewrite what
    # /proc/<pid>/environ shows), so it must never reach a step that runs as root:
    # LD_PRELOAD or PATH there would run the session's files as root. nsenter and setpriv
    # run with the fixed ROOT_ENV; the supervisor, already the session's uid, gets the
    # kernel's environment as an argument and hands it to what it starts.
    environ_hex = json.dumps(kernel_environ).encode().hex()
    if len(environ_hex) > MAX_ARG:
        raise KernelFailed(f"the kernel's environment is too large to hand to its commands "
                           f"({len(environ_hex) // 2} bytes of JSON; at most {MAX_ARG // 2})")
    argv = [sys.executable, "-c", SOURCE, program.hex() if program else "", environ_hex]
    if root and uid != 0:
        argv = drop_privileges(uid, uid) + argv
    if provisioner.sandboxed:
        argv = ["nsenter", f"--target={pid}", "--mount", "--net", "--pid", "--ipc", "--uts", "--", *argv]
    else:
        argv = die_with_parent() + argv
    group = getattr(provisioner, "_cgroup", None)
    if group is not None:
        argv = cgroups.wrap_argv(group, argv)  # the kernel's group: one memory and pids budget for both
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, env=dict(ROOT_ENV), cwd="/", limit=READ_LIMIT)
    except OSError as exc:
        raise KernelFailed(f"cannot start the session's process supervisor: {exc}") from None
    return _LocalPipe(proc)


def _environ(pid: int) -> dict[str, str]:
    """Blocking: the kernel process's environment as it was launched (its PATH, HOME,
    package variables): what its own ``!cmd`` and ``subprocess`` children start from."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError as exc:
        raise KernelFailed(f"cannot read the kernel's environment: {exc}") from None
    out = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key:
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


async def _exec_in_container(provisioner: Any) -> _ExecSocket:
    import docker.errors

    client, container = provisioner.client, provisioner.container_id
    if container is None:
        raise KernelFailed("the session's kernel container is gone")

    def start() -> _ExecSocket:
        # The container's own user, working directory and environment: docker exec's defaults.
        exec_id = client.api.exec_create(container, ["python3", "-c", SOURCE, ""], stdin=True, stdout=True,
                                         stderr=True, tty=False)["Id"]
        raw = client.api.exec_start(exec_id, socket=True)
        sock = getattr(raw, "_sock", raw)
        return _ExecSocket(sock, raw)

    try:
        return await asyncio.to_thread(start)
    except docker.errors.APIError as exc:
        raise KernelFailed(f"cannot start the session's process supervisor: {exc.explanation or exc}") from None
