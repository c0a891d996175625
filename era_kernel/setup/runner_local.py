"""Setup steps as local processes, in the same sandbox as a local kernel.

The command line is built by ``provisioning.local.bwrap_argv`` (one definition of the
sandbox: read-only host, masked data/runtime/home directories, private /tmp, new pid
namespace, the seccomp filter). Its network: none but the egress proxy's listener when
the manager gives an ``EgressHook`` (ERA_SETUP_NETWORK=proxy: the package registries
only), else the host's. One change to the kernel's sandbox: the
staging directory is bound read-write at the environment's final path, so whatever
records absolute paths records the path kernels will see. ``setpriv`` drops to the
session's uid. Limits as for kernels: each step runs in a memory and pids cgroup of its
own (``ERA_SETUP_MEMORY``, ``ERA_SETUP_PIDS``; as ``ERA_KERNEL_CGROUPS`` allows), its
``/tmp`` is a tmpfs bounded by ``ERA_SETUP_MEMORY`` (builds unpack there), and
``prlimit`` caps each process's address space and processes. Without bubblewrap
(``ERA_SANDBOX=none``) steps run unsandboxed, like kernels do then, and build at the
staging path.
"""

from __future__ import annotations

import asyncio
import os
import platform
import secrets
import shutil
import signal
import sys
from pathlib import Path
from typing import Callable

from ..config import Settings
from ..provisioning import cgroups
from ..provisioning.commands import EgressHook, after_proxy, attach_local  # one way into a sandbox behind the proxy
from ..provisioning.local import bwrap_argv, lost_mount_race, sandbox_mode
from ..provisioning.privileges import die_with_parent, drop_privileges
from ..provisioning.seccomp import filter_fd
from .logs import LineSplitter
from .steps import SetupFailed, Step, StepTimeout, Toolchain

DEFAULT_MEMORY = 4 * 1024**3  # address space: node reserves far more than it uses
DEFAULT_PIDS = 512
READ_CHUNK = 64 * 1024


def setting(settings: Settings, name: str, default):
    # The ERA_SETUP_* rows may not be in the settings table yet: fall back quietly.
    value = settings.values.get(name)
    return default if value in (None, "") else value


class LocalRunner:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.memory = int(setting(settings, "ERA_SETUP_MEMORY", DEFAULT_MEMORY))
        self.pids = int(setting(settings, "ERA_SETUP_PIDS", DEFAULT_PIDS))

    @property
    def sandboxed(self) -> bool:
        return sandbox_mode(self.settings["ERA_SANDBOX"]) == "bwrap"

    @staticmethod
    def identity() -> str:
        # What installed packages depend on: the kernel's interpreter ABI and the machine.
        return f"local:{sys.implementation.cache_tag}:{platform.machine()}"

    @staticmethod
    def toolchain() -> Toolchain:
        # The kernel's own interpreter (python_kernel_argv uses it), so wheels match it;
        # its directory first on PATH, so `python` in a command is that one too (as the
        # image's PATH makes it in a container).
        host_path = os.environ.get("PATH") or "/usr/local/bin:/usr/bin:/bin"
        return Toolchain(python=sys.executable, base_path=f"{os.path.dirname(sys.executable)}:{host_path}")

    def build_path(self, final: Path, staging: Path) -> Path:
        """Where a step sees the environment: its final path when sandboxed."""
        return final if self.sandboxed else staging

    def command(self, step: Step, *, final: Path, staging: Path, home: Path, uid: int,
                seccomp_fd: int | None, egress: EgressHook | None = None) -> list[str]:
        argv = list(step.argv)
        if egress is not None:  # it starts once the proxy's listener answers in its sandbox
            argv = after_proxy(egress.port, argv)
        if os.getuid() == 0 and uid != 0:
            argv = drop_privileges(uid, uid) + argv
        if self.sandboxed:
            hidden = [self.settings["ERA_DATA_DIR"], str(self.settings.runtime_dir)]
            full = bwrap_argv(argv, workspace=staging, kernel_dir=home, hidden=hidden, allow_network=egress is None,
                              readonly=sorted({sys.prefix, sys.base_prefix}), seccomp_fd=seccomp_fd,
                              tmp_size=self.memory)
            split = len(full) - len(argv) - 1  # bwrap's options end at the "--" before argv
            assert full[split] == "--", "bwrap_argv must end with -- and the command"
            chdir = full.index("--chdir", 0, split)
            full[chdir + 1] = str(final)  # mounts come first, then the working directory
            full[split:split] = ["--bind", str(staging), str(final)]
        else:
            full = die_with_parent() + argv
        return ["prlimit", f"--as={self.memory}", f"--nproc={self.pids}", "--core=0", "--", *full]

    async def run(self, step: Step, *, final: Path, staging: Path, home: Path, uid: int, env: dict[str, str],
                  timeout: float, on_line: Callable[[str], None], egress: EgressHook | None = None) -> int:
        """Run one step; its output goes to ``on_line`` as it comes. Returns the exit status
        (negative: killed by that signal). Raises ``StepTimeout`` past ``timeout``. With
        ``egress``, the sandbox has no network but the egress proxy's listener (the
        machinery of ``provisioning/commands.py``; the caller detaches it)."""
        if egress is not None and not self.sandboxed:
            raise SetupFailed("this build's network is the egress proxy, which needs a sandbox (ERA_SANDBOX)")
        # The sandbox sees the host's root read-only, so the host's PATH lookup holds there.
        if shutil.which(step.argv[0], path=env.get("PATH")) is None:
            raise SetupFailed(f"{step.argv[0]} is not installed on this server; {step.kind} setup needs it")
        group = await self._cgroup()
        first: list[str] = []

        def watch(line: str) -> None:
            if len(first) < 2:
                first.append(line)
            on_line(line)

        try:
            code = await self._run(step, group, final=final, staging=staging, home=home, uid=uid, env=env,
                                   timeout=timeout, on_line=watch, egress=egress)
            if code == 1 and lost_mount_race("\n".join(first)):
                # bubblewrap raced another sandbox's unmount while binding the host's
                # mounts (as a kernel start can: session_kernel.py); nothing of the step ran.
                on_line("era: bubblewrap raced an unmount while making the sandbox; starting the step again")
                code = await self._run(step, group, final=final, staging=staging, home=home, uid=uid, env=env,
                                       timeout=timeout, on_line=on_line, egress=egress)
            return code
        finally:
            if group is not None:
                kills = group.oom_kills()
                if kills:
                    on_line(f"era: {kills} process{'es' if kills > 1 else ''} of this step "
                            f"{'were' if kills > 1 else 'was'} killed for exceeding its memory limit (ERA_SETUP_MEMORY)")
                await asyncio.to_thread(group.remove)  # and with it whatever the step left running

    async def _cgroup(self) -> cgroups.KernelCgroup | None:
        try:
            found = await asyncio.to_thread(cgroups.resolve, self.settings["ERA_KERNEL_CGROUPS"])
        except cgroups.CgroupsUnavailable as exc:
            raise SetupFailed(str(exc)) from None
        if found is None:
            return None
        group = cgroups.KernelCgroup.for_kernel(f"setup-{secrets.token_hex(5)}", found)
        try:
            await cgroups.make(group, self.memory, self.pids)
        except OSError as exc:
            raise SetupFailed(f"cannot make the setup step's cgroup: {exc}") from None
        return group

    async def _run(self, step: Step, group: cgroups.KernelCgroup | None, *, final: Path, staging: Path, home: Path,
                   uid: int, env: dict[str, str], timeout: float, on_line: Callable[[str], None],
                   egress: EgressHook | None) -> int:
        seccomp_fd = filter_fd() if self.sandboxed else None
        try:
            argv = self.command(step, final=final, staging=staging, home=home, uid=uid, seccomp_fd=seccomp_fd,
                                egress=egress)
            if group is not None:
                argv = cgroups.wrap_argv(group, argv)  # inside before anything of the step runs
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env=env, cwd=str(staging),
                pass_fds=(seccomp_fd,) if seccomp_fd is not None else (), start_new_session=True)
        finally:
            if seccomp_fd is not None:
                os.close(seccomp_fd)  # the child has its copy
        splitter = LineSplitter()
        try:
            if egress is not None:
                await attach_local(proc, egress)
        except BaseException:
            await _kill(proc)
            raise

        async def pump() -> int:
            assert proc.stdout is not None
            while chunk := await proc.stdout.read(READ_CHUNK):
                for line in splitter.feed(chunk):
                    on_line(line)
            for line in splitter.flush():
                on_line(line)
            return await proc.wait()

        try:
            return await asyncio.wait_for(pump(), timeout)
        except asyncio.TimeoutError:
            raise StepTimeout(f"{step.title} timed out after {timeout:g}s") from None
        finally:
            await _kill(proc)


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        # bwrap leads its own process group; killing it kills the sandbox's pid
        # namespace (--die-with-parent), so nothing of the step survives.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        await proc.wait()
