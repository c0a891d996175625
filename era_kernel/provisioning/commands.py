"""One command in a session's sandbox, on either provisioner: ``run_command``.

What a kernel of the session gets, without the kernel: the same uid, the workspace as
the working directory (``/workspace`` in a container), the session's ``/tmp``
(``LaunchOptions.tmp_dir``; a private tmpfs without one), the read-only directories (a
package environment), the language's image or the local toolchain, the same
confinement (bubblewrap with the seccomp filter, a cgroup and ``prlimit`` locally; a
read-only, capability-less container with memory and process limits on Docker), and
network only when ``options.allow_network`` says so. Used for a session's setup
``commands`` and for commands run in a session (ERA's ``POST /api/vm/{id}/run``).

Its environment is ``options.env`` over a small base (``HOME=/tmp``, ``TMPDIR``,
``LANG``, a ``PATH`` of the toolchain locally, the image's own in a container): nothing
of the server's. stdout and stderr are captured apart, each up to ``max_output`` bytes
(the rest is counted, not kept: ``truncated``), and handed to ``on_output`` as they
come. Past ``timeout`` the whole command is killed (its pid namespace and cgroup
locally, its container on Docker) and the result says exit code 124, as ``timeout(1)``
does. A command killed by a signal reports 128 + the signal, as a shell does.
"""

from __future__ import annotations

import asyncio
import codecs
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from ..errors import BadRequest, KernelFailed
from . import cgroups
from .base import LaunchOptions
from .local import _NOBODY, bwrap_argv, lost_mount_race, prepare_tmp_mountpoints, sandbox_mode
from .privileges import die_with_parent, drop_privileges
from .seccomp import filter_fd

DEFAULT_MAX_OUTPUT = 1024 * 1024  # per stream
TIMEOUT_EXIT = 124
READ_CHUNK = 64 * 1024
OutputSink = Callable[[str, str], None]  # (stream name "stdout" | "stderr", text as it came)


@dataclass
class EgressHook:
    """A command whose only way out is the egress proxy (a setup command of a session with
    an egress policy): its sandbox gets no network; once the sandbox exists, ``attach`` is
    called with its network namespace (``/proc/<pid>/ns/net``) to open the proxy's
    listener there at ``127.0.0.1:port``, and the command itself starts only when that
    listener answers. ``detach`` closes the listener when the command is over. ``env``:
    the variables that point the command's clients at the listener."""
    port: int
    attach: Callable[[str], Awaitable[None]]
    detach: Callable[[], None]
    env: dict[str, str]


SANDBOX_WAIT_S = 10.0  # for the sandbox's process to appear, and for the listener inside it
SANDBOX_END_WAIT_S = 1.0  # for a sandbox whose namespace could not be entered to end (attach_local)


def after_proxy(port: int, argv: list[str]) -> list[str]:
    """``argv`` started once the proxy's listener answers inside the sandbox (bash's
    /dev/tcp; it is opened from outside the moment the sandbox exists), else a clear error."""
    script = ('for ((i = 0; i < 200; i++)); do (exec 3<>"/dev/tcp/127.0.0.1/$0") 2>/dev/null && exec "$@"; '
              'sleep 0.05; done; echo "era: the egress proxy did not open in this sandbox" >&2; exit 125')
    return ["bash", "-c", script, str(port), *argv]


def _process_in_other_netns(root: int, ours: int) -> int | None:
    """Blocking (/proc): a process under ``root`` in another network namespace than ``ours``
    (bubblewrap's sandboxed child), or None while there is none yet."""
    from ..ports.netns import namespace_id

    stack = [root]
    while stack:
        pid = stack.pop()
        try:
            if namespace_id(f"/proc/{pid}/ns/net") != ours:
                return pid
            with open(f"/proc/{pid}/task/{pid}/children") as fh:
                stack.extend(int(child) for child in fh.read().split())
        except (OSError, ValueError):
            continue
    return None


async def attach_local(proc: asyncio.subprocess.Process, egress: EgressHook) -> None:
    from ..ports.netns import namespace_id

    ours = await asyncio.to_thread(namespace_id, "/proc/self/ns/net")
    deadline = time.monotonic() + SANDBOX_WAIT_S
    while (pid := await asyncio.to_thread(_process_in_other_netns, proc.pid, ours)) is None:
        if proc.returncode is not None or time.monotonic() > deadline:
            raise KernelFailed("the command's sandbox did not start, so the egress proxy could not be opened in it")
        await asyncio.sleep(0.01)
    try:
        await egress.attach(f"/proc/{pid}/ns/net")
    except OSError:
        # The sandbox may be ending as we enter it: bubblewrap failing while it builds it
        # (its unmount race, provisioning/local.py) leaves a namespace being torn down,
        # where even 127.0.0.1 cannot be bound. Then its exit status and output say what
        # happened, and the caller's retry of that race takes it from there.
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), SANDBOX_END_WAIT_S)
        except asyncio.TimeoutError:
            pass
        else:
            return
        raise  # the sandbox runs on without the proxy: the caller stops it


@dataclass
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool = False
    truncated: bool = False
    duration_ms: float = 0.0
    out_of_memory: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"stdout": self.stdout, "stderr": self.stderr, "exit_code": self.exit_code,
                "timed_out": self.timed_out, "truncated": self.truncated, "duration_ms": self.duration_ms}


class _Capture:
    """One stream: decoded as it comes (a UTF-8 sequence split across chunks stays whole),
    the first ``limit`` bytes kept, every chunk passed on."""

    def __init__(self, name: str, limit: int, sink: OutputSink | None):
        self.name, self.limit, self.sink = name, limit, sink
        self.kept = 0
        self.parts: list[str] = []
        self.truncated = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, chunk: bytes, final: bool = False) -> None:
        text = self._decoder.decode(chunk, final)
        room = self.limit - self.kept  # in characters: bytes of ASCII, close enough otherwise
        if len(text) > room:
            self.truncated = True
        if room > 0 and text:
            keep = text[:room]
            self.parts.append(keep)
            self.kept += len(keep)
        if self.sink is not None and text:
            try:
                self.sink(self.name, text)
            except Exception:  # a listener's failure must not stop the command's output
                pass

    def text(self) -> str:
        self.feed(b"", final=True)
        return "".join(self.parts)


def _base_env(options: LaunchOptions, path: str) -> dict[str, str]:
    env = {"HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "PATH": path,
           # glibc reserves 64 MiB of address space per thread arena; under RLIMIT_AS that
           # reservation, not real use, would run out first (as for local kernels).
           "MALLOC_ARENA_MAX": "2", "PYTHONUNBUFFERED": "1"}
    env.update(options.env)
    return env


async def run_command(provisioner: str, options: LaunchOptions, argv: list[str], *, language: str, timeout: float,
                      max_output: int = DEFAULT_MAX_OUTPUT, on_output: OutputSink | None = None,
                      docker_client: Any = None, egress: EgressHook | None = None) -> CommandResult:
    """Run ``argv`` in the sandbox ``options`` describe (``provisioner``: ``local`` or
    ``docker``; ``language`` picks the image on Docker) and return its outcome. Raises
    ``BadRequest`` for an argv that cannot be run, ``KernelFailed`` when the sandbox
    itself cannot be made (no image, no Docker engine). With ``egress``, the sandbox has no
    network but the egress proxy's listener (see ``EgressHook``)."""
    if not argv or not all(isinstance(a, str) and a and "\0" not in a for a in argv):
        raise BadRequest("the command must be a non-empty list of strings without NUL", field="command")
    if not timeout or timeout <= 0:
        raise BadRequest("timeout must be positive", field="timeout")
    started = time.perf_counter()
    out = _Capture("stdout", max_output, on_output)
    err = _Capture("stderr", max_output, on_output)
    if egress is not None:
        networked = options.gvisor_runtimes[1]  # gVisor's own netstack would not see the listener
        options = options.replace(allow_network=False, env={**options.env, **egress.env},
                                  gvisor_runtimes=(networked, networked))
        argv = after_proxy(egress.port, argv)
    try:
        if provisioner == "docker":
            from .commands_docker import run_in_container

            code, timed_out, oom = await run_in_container(options, argv, language=language, timeout=timeout,
                                                          out=out, err=err, client=docker_client, egress=egress)
        elif provisioner == "local":
            code, timed_out, oom = await _run_local(options, argv, timeout=timeout, out=out, err=err, egress=egress)
            if code == 1 and not out.parts and lost_mount_race("".join(err.parts)):
                # bubblewrap raced another sandbox's unmount while binding the host's mounts
                # (as a kernel start can: session_kernel.py); nothing of the command ran.
                out, err = _Capture("stdout", max_output, on_output), _Capture("stderr", max_output, on_output)
                code, timed_out, oom = await _run_local(options, argv, timeout=timeout, out=out, err=err,
                                                        egress=egress)
        else:
            raise BadRequest(f"unknown provisioner {provisioner!r}", field="provisioner")
    finally:
        if egress is not None:
            egress.detach()
    return CommandResult(exit_code=code, stdout=out.text(), stderr=err.text(), timed_out=timed_out,
                         truncated=out.truncated or err.truncated, out_of_memory=oom,
                         duration_ms=round((time.perf_counter() - started) * 1000, 1))


def local_path() -> str:
    """PATH of a local command: the kernels' interpreter first (``python`` is the one
    whose packages match), then the host's."""
    host_path = os.environ.get("PATH") or "/usr/local/bin:/usr/bin:/bin"
    return f"{os.path.dirname(sys.executable)}:{host_path}"


def _readonly(options: LaunchOptions) -> list[str]:
    package_dir = str(Path(__file__).resolve().parents[1])
    return sorted({sys.prefix, sys.base_prefix, package_dir, *options.readonly})


def _local_argv(options: LaunchOptions, argv: list[str], uid: int, seccomp_fd: int | None) -> list[str]:
    workspace = options.workspace.resolve()
    if os.getuid() == 0 and uid != 0:
        argv = drop_privileges(uid, uid) + argv
    if seccomp_fd is not None:
        hidden = sorted({*options.hidden, str(options.runtime_dir)})
        readonly = _readonly(options)
        argv = bwrap_argv(argv, workspace=workspace, kernel_dir=None, hidden=hidden,
                          allow_network=options.allow_network, readonly=readonly, seccomp_fd=seccomp_fd,
                          tmp_size=options.tmp_size, tmp_dir=options.tmp_dir)
    else:
        argv = die_with_parent() + argv
    address_space = max(options.memory, options.address_space)
    return ["prlimit", f"--as={address_space}", f"--nproc={options.pids}", "--core=0", "--", *argv]


async def _run_local(options: LaunchOptions, argv: list[str], *, timeout: float, out: _Capture,
                     err: _Capture, egress: EgressHook | None = None) -> tuple[int, bool, bool]:
    if options.uid is not None:
        uid = options.uid
    else:
        uid = _NOBODY if os.getuid() == 0 else os.getuid()
    sandboxed = sandbox_mode(options.sandbox) == "bwrap"
    if egress is not None and not sandboxed:
        raise KernelFailed("this command's network is the egress proxy, which needs the sandbox's own network "
                           "namespace: without bubblewrap (ERA_SANDBOX) it cannot be enforced")
    try:
        found = await asyncio.to_thread(cgroups.resolve, options.cgroups)
    except cgroups.CgroupsUnavailable as exc:
        raise KernelFailed(str(exc)) from None
    group = None
    if found is not None:
        group = cgroups.KernelCgroup.for_kernel(f"cmd-{secrets.token_hex(5)}", found)
        try:
            await cgroups.make(group, options.memory, options.pids)
        except OSError as exc:
            raise KernelFailed(f"cannot make the command's cgroup: {exc}") from None
    env = _base_env(options, local_path())
    proc = None
    try:
        if sandboxed and options.tmp_dir is not None:
            await asyncio.to_thread(prepare_tmp_mountpoints, options.tmp_dir,
                                    [str(options.workspace.resolve()), *_readonly(options)])
        seccomp_fd = filter_fd() if sandboxed else None
        try:
            full = _local_argv(options, argv, uid, seccomp_fd)
            if group is not None:
                full = cgroups.wrap_argv(group, full)  # inside before anything of the command runs
            proc = await asyncio.create_subprocess_exec(
                *full, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env, cwd=str(options.workspace.resolve()),
                pass_fds=(seccomp_fd,) if seccomp_fd is not None else (), start_new_session=True)
        finally:
            if seccomp_fd is not None:
                os.close(seccomp_fd)  # the child has its copy
        if egress is not None:
            await attach_local(proc, egress)

        async def pump(stream: asyncio.StreamReader, capture: _Capture) -> None:
            while chunk := await stream.read(READ_CHUNK):
                capture.feed(chunk)

        async def finish() -> int:
            assert proc.stdout is not None and proc.stderr is not None
            await asyncio.gather(pump(proc.stdout, out), pump(proc.stderr, err))
            return await proc.wait()

        try:
            code = await asyncio.wait_for(finish(), timeout)
        except asyncio.TimeoutError:
            return TIMEOUT_EXIT, True, False
        oom = bool(group is not None and group.oom_kills())
        return (128 - code if code < 0 else code), False, oom
    finally:
        if proc is not None and proc.returncode is None:
            # bwrap leads its own process group and pid namespace (--die-with-parent):
            # killing it ends every process of the command.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await proc.wait()
        if group is not None:
            await asyncio.to_thread(group.remove)  # and with it whatever escaped the group's leader
