"""``era-local``: a kernel as a local process, inside bubblewrap when it is installed.

Any Jupyter application can launch it from a kernelspec whose
``metadata.kernel_provisioner.provisioner_name`` is ``era-local``. The ERA engine adds
per-session options through the ``era`` keyword of ``KernelManager.start_kernel``
(working directory, network, limits, uid); a plain Jupyter app gets the defaults.

Isolation, in layers:
- the kernel runs as an unprivileged uid (the session's own uid when the server is
  root, so sessions cannot read each other's files; the caller's uid otherwise);
- bubblewrap: host root read-only, private ``/tmp``, ``/root``, ``/home``, the ERA data
  and runtime directories masked, the workspace and the kernel's IPC directory
  read-write, new pid/ipc/uts/net namespaces (``--share-net`` only when the session
  allows internet access), and ``--die-with-parent``;
- a seccomp filter (``seccomp.py``) denies namespaces, mounts, ptrace, keyrings, eBPF
  and the like, as Docker's default profile does for containers;
- a memory and pids cgroup of its own (``cgroups.py``, as ``ERA_KERNEL_CGROUPS`` says)
  bounds the whole session: every process of it, its ``/tmp`` (a tmpfs of
  ``ERA_KERNEL_TMP_SIZE``, charged to the group) included; the kernel is inside before it
  runs anything, and the group is removed at clean-up;
- ``prlimit`` sets RLIMIT_AS (memory) and RLIMIT_NPROC (processes) per process as a
  second layer; the pid namespace means killing the sandbox kills every descendant;
- the kernel gets no descriptor on a host file: its stdout/stderr are a pipe the server
  drains, keeping a bounded tail (``output_tail.py``).
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from jupyter_client.provisioning import KernelProvisionerBase, LocalProvisioner
from traitlets import Bool, Int, Unicode

from ..errors import KernelFailed
from . import cgroups, launch_fork
from .base import EraProvisioner, LaunchOptions
from .privileges import die_with_parent, drop_privileges
from .output_tail import OutputTail
from .seccomp import filter_fd
from .zygote import ForkedProcess, Zygote, ZygoteFailed
from .ipc import (format_argv, host_connection_info, ipc_connection_info, make_kernel_dir, remove_kernel_dir,
                  seal_kernel_dir, write_connection_file, write_pid_record)

log = logging.getLogger("era.provisioning.local")

# Variables a kernel may inherit from the host; everything else (API keys, cloud
# credentials, the server's own settings) stays out of the sandbox.
_INHERITED_ENV = ("PATH", "LANG", "LANGUAGE", "TZ", "TERM", "PYTHONIOENCODING", "SSL_CERT_FILE")
_UNSANDBOXED_WARNED = False
_NOBODY = 65534


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def sandbox_mode(requested: str) -> str:
    """Resolve ``auto|bwrap|none`` to what will actually be used."""
    if requested == "none":
        return "none"
    if bwrap_path():
        return "bwrap"
    if requested == "bwrap":
        raise RuntimeError("ERA_SANDBOX=bwrap but bubblewrap (bwrap) is not installed")
    return "none"


def kernel_env(base: dict[str, str] | None, extra: dict[str, str], home: Path) -> dict[str, str]:
    source = base if base is not None else os.environ
    env = {k: v for k, v in source.items() if k in _INHERITED_ENV or k.startswith(("LC_", "JPY_"))}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(extra)
    env.update({"HOME": str(home), "IPYTHONDIR": str(home / ".ipython"), "MPLCONFIGDIR": str(home / ".mpl"),
                "PYTHONUNBUFFERED": "1",
                # glibc reserves 64 MiB of address space per thread arena; under an
                # RLIMIT_AS cap that reservation, not real use, would run out first.
                "MALLOC_ARENA_MAX": "2"})
    return env


PLACEHOLDER_SIZE = 1024**2  # masked directories hold only mount points

# What bubblewrap says when a mount it was binding went away under it: ``--ro-bind / /``
# takes the host's mounts recursively, then remounts each read-only, and another
# sandbox's volume unmounted in between fails that walk (bubblewrap issue #650). Nothing
# of the sandboxed command ran by then, so starting it again is safe.
MOUNT_RACE = re.compile(r"bwrap: Can't (bind mount|remount)")


def lost_mount_race(stderr: str) -> bool:
    """``stderr`` (all a sandboxed command wrote there) is that failure and nothing else."""
    lines = stderr.strip().splitlines()
    return len(lines) == 1 and bool(MOUNT_RACE.search(lines[0]))


def bwrap_argv(argv: list[str], *, workspace: Path, kernel_dir: Path | None, hidden: list[str], allow_network: bool,
               readonly: list[str], seccomp_fd: int | None = None, tmp_size: int | None = None,
               tmp_dir: Path | None = None) -> list[str]:
    """The bubblewrap command line around ``argv`` (which already drops privileges).

    ``tmp_size`` bounds the private ``/tmp`` (a tmpfs lives in memory: unbounded, it
    would let the kernel fill the host's RAM); None leaves tmpfs's default (half of RAM).
    ``tmp_dir``: the session's own /tmp instead, a host directory bound read-write. Its
    own path is ours (root-owned parents under the data directory); what lies in it is
    the session's, so mount points below /tmp (the kernel's IPC directory lives under
    /tmp by default) must be made safe first: ``prepare_tmp_mountpoints``.
    """
    cmd = [bwrap_path() or "bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    masked = [p for p in ["/tmp", "/root", "/home", "/run", *hidden] if os.path.isdir(p)]
    for path in masked:
        # /tmp must be writable by the kernel's uid (sticky, like the real one); the
        # others are empty placeholders, kept small in case the kernel's uid owns them
        # (without root, bubblewrap makes them as ours).
        if path == "/tmp" and tmp_dir is not None:
            cmd += ["--bind", str(tmp_dir), "/tmp"]  # first: binds below /tmp land on top of it
            continue
        if path == "/tmp":
            cmd += ["--perms", "1777"] + (["--size", str(tmp_size)] if tmp_size else [])
        else:
            cmd += ["--perms", "0755", "--size", str(PLACEHOLDER_SIZE)]
        cmd += ["--tmpfs", path]
    made: set[str] = set()

    def parents(path: str) -> list[str]:
        # bubblewrap creates missing mount points mode 0700 (root-owned): make the
        # ancestors inside a masked directory traversable for the kernel's uid.
        out = []
        for parent in reversed(Path(path).parents):
            p = str(parent)
            if p not in made and any(p.startswith(m.rstrip("/") + "/") for m in masked):
                made.add(p)
                out += ["--perms", "0755", "--dir", p]
        return out

    for path in readonly:  # Python prefixes may live under a masked directory
        if os.path.isdir(path):
            cmd += parents(path) + ["--ro-bind", path, path]
    for path in [str(p) for p in (kernel_dir, workspace) if p is not None]:
        cmd += parents(path) + ["--bind", path, path]
    if os.getuid() == 0:
        # As root, bubblewrap sets up the mounts with root's view (so a Python under
        # /root can be bound) and setpriv then drops to the kernel's uid; a user
        # namespace would leave the process owning root's files.
        cmd += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        if not allow_network:
            cmd += ["--unshare-net"]
    else:
        cmd += ["--unshare-all"]
        if allow_network:
            cmd += ["--share-net"]
    cmd += ["--die-with-parent", "--new-session", "--chdir", str(workspace)]
    if seccomp_fd is not None:
        cmd += ["--seccomp", str(seccomp_fd)]
    return cmd + ["--", *argv]


def prepare_tmp_mountpoints(tmp_dir: Path, destinations: list[str]) -> None:
    """Blocking: make the mount points of ``destinations`` that lie under /tmp, inside the
    session's /tmp directory ``tmp_dir``, real directories the session cannot touch.

    bubblewrap, as root, makes missing mount points itself, following whatever it finds;
    in a directory the session writes between launches, a planted link (``era-0 ->
    ../../oldroot/etc``) would have it make directories, or bind, outside the sandbox.
    So each level is made (or taken over) here: a directory owned by root, 0755, found
    again by name as the very directory we hold. ``tmp_dir`` is root's and sticky (1777),
    so from then on the session can neither rename nor remove them. Without root the
    sandbox runs as our own uid: nothing to gain from a link, nothing is done.
    """
    if os.getuid() != 0:
        return
    import stat as _stat

    from ..workspaces import fdtree

    for dest in destinations:
        rel = os.path.relpath(dest, "/tmp")
        if rel.startswith("..") or rel == ".":
            continue
        fd = os.open(tmp_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for part in Path(rel).parts:
                for _ in range(20):  # the session may race us; it cannot win twice on a root-owned entry
                    try:
                        st = os.lstat(part, dir_fd=fd)
                    except FileNotFoundError:
                        try:
                            os.mkdir(part, 0o755, dir_fd=fd)
                        except FileExistsError:
                            pass
                        continue
                    if not _stat.S_ISDIR(st.st_mode):
                        fdtree.remove_entry(fd, part)  # a link, a file, a fifo: never followed
                        continue
                    child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                    os.fchown(child, 0, 0)
                    os.fchmod(child, 0o755)
                    held, now = os.fstat(child), os.lstat(part, dir_fd=fd)
                    if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                        os.close(fd)
                        fd = child
                        break
                    os.close(child)  # swapped meanwhile: look again
                else:
                    raise KernelFailed(f"cannot make the mount point {dest} in the session's /tmp")
        finally:
            os.close(fd)


class EraLocalProvisioner(EraProvisioner, LocalProvisioner):
    """Launches the kernelspec's argv as a sandboxed local process talking over IPC."""

    sandbox = Unicode("", config=True, help="auto, bwrap or none; default ERA_SANDBOX")
    memory_limit = Int(0, config=True, help="memory of the session in bytes; default ERA_KERNEL_MEMORY")
    pids_limit = Int(0, config=True, help="processes of the session; default ERA_KERNEL_PIDS")
    address_space_limit = Int(0, config=True, help="per-process address-space cap (RLIMIT_AS) in bytes; default the "
                              "memory limit. For runtimes that reserve far more than they use (Deno reserves 32 GiB "
                              "at start); the session's cgroup still bounds what is really used")
    tmp_size = Int(0, config=True, help="size of the private /tmp in bytes; default ERA_KERNEL_TMP_SIZE")
    cgroup_mode = Unicode("", config=True,
                          help="auto, on or off: a memory and pids cgroup per kernel; default ERA_KERNEL_CGROUPS")
    allow_network = Bool(False, config=True, help="let the kernel use the host's network")
    kernel_uid = Int(-1, config=True, help="uid the kernel runs as when Jupyter runs as root; default nobody")

    kernel_dir: Path | None = None
    sandboxed: bool = False
    _output: OutputTail | None = None
    _cgroup: cgroups.KernelCgroup | None = None
    _info: dict[str, Any] = {}
    _seccomp_fd: int | None = None
    _fork_request: dict[str, Any] | None = None

    def kernel_log(self, limit: int = 2000) -> str:
        """The tail of the kernel process's own stdout/stderr. Called by ERA's SessionKernel
        when a start fails, to put the kernel's last words into the error."""
        return self._output.text(limit) if self._output is not None else ""

    def oom_kills(self) -> int | None:
        """Processes of this kernel's session the OOM killer has killed since launch; None
        without a cgroup or where the kernel does not count. Called by ERA's SessionKernel
        before and after each run (a cheap in-memory read), to say when a run lost a process."""
        return self._cgroup.oom_kills() if self._cgroup is not None else None

    @property
    def oom_killed(self) -> bool:
        """Read by ERA's SessionKernel when the kernel died (as for era-docker): did its
        session run out of memory since launch?"""
        group = self._cgroup
        if group is None:
            return False
        kills = group.oom_kills()
        return kills > 0 if kills is not None else group.hit_limit()

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Called by the KernelManager before launch: build the sandboxed command line.

        Deliberately does not call ``LocalProvisioner.pre_launch``: that one writes a TCP
        connection file through the manager. We choose IPC here and hand the connection
        info back from ``launch_kernel``; the manager adopts it.
        """
        extra_arguments = kwargs.pop("extra_arguments", [])
        kwargs.pop("transport_encryption", None)
        options = LaunchOptions.given(kwargs.pop("era", None), "local", Path(kwargs.get("cwd") or os.getcwd()),
                                      config=self._configured())
        workspace = options.workspace.resolve()
        try:
            cgroup_support = await asyncio.to_thread(cgroups.resolve, options.cgroups)
        except cgroups.CgroupsUnavailable as exc:
            raise KernelFailed(str(exc)) from None
        mode = sandbox_mode(options.sandbox)
        if options.uid is not None:
            uid = options.uid
        elif os.getuid() == 0:
            uid = self.kernel_uid if self.kernel_uid >= 0 else _NOBODY
        else:
            uid = os.getuid()
        gid = uid if os.getuid() == 0 else os.getgid()
        connection_file, home = await asyncio.to_thread(self._prepare_kernel_dir, options.runtime_dir, uid, gid)
        info = self._info

        argv = format_argv(self.kernel_spec.argv + list(extra_arguments), connection_file=str(connection_file),
                           resource_dir=self.kernel_spec.resource_dir or "", prefix=sys.prefix)
        self._fork_request = None
        fork_refused = launch_fork.why_not(options, argv)
        if fork_refused is None:
            return await self._pre_fork(options, argv, kwargs, uid, gid, home, workspace, cgroup_support)
        if options.launcher == "fork":
            log.debug("fork launcher not used for %s: %s", self.kernel_spec.display_name, fork_refused)
        if os.getuid() == 0 and uid != 0:
            argv = drop_privileges(uid, gid) + argv
        if mode == "bwrap":
            hidden = sorted({*options.hidden, str(options.runtime_dir)})
            # The kernels of other languages run modules of this package (era_kernel.kernels),
            # which an editable install imports from the source tree: that may be masked too.
            package_dir = str(Path(__file__).resolve().parents[1])
            readonly = sorted({sys.prefix, sys.base_prefix, package_dir, *options.readonly})
            if options.tmp_dir is not None:  # the masks' mount points too: a data directory may lie under /tmp
                await asyncio.to_thread(prepare_tmp_mountpoints, options.tmp_dir,
                                        [str(self.kernel_dir), str(workspace), *readonly, *hidden])
            self._seccomp_fd = filter_fd()
            argv = bwrap_argv(argv, workspace=workspace, kernel_dir=self.kernel_dir, hidden=hidden,
                              allow_network=options.allow_network, readonly=readonly, seccomp_fd=self._seccomp_fd,
                              tmp_size=options.tmp_size, tmp_dir=options.tmp_dir)
            self.sandboxed = True
        else:
            _warn_unsandboxed()
            if uid != os.getuid():
                # The interpreter too: its library and standard library live under base_prefix.
                await asyncio.to_thread(_check_reachable, uid, [workspace, self.kernel_dir, Path(sys.base_prefix),
                                                                Path(sys.prefix)])
            # Without bubblewrap, at least die with the server.
            argv = die_with_parent() + argv
        # bubblewrap sets no resource limits: prlimit does, before anything else runs.
        address_space = max(options.memory, options.address_space, self.address_space_limit)
        argv = ["prlimit", f"--as={address_space}", f"--nproc={options.pids}", "--core=0", "--", *argv]
        if cgroup_support is not None:
            # A fresh group per launch (a restart's too: the previous one went at cleanup),
            # entered before prlimit runs, so nothing of the kernel ever runs outside it.
            group = await self._make_cgroup(options, cgroup_support)
            argv = cgroups.wrap_argv(group, argv)

        env = kernel_env(kwargs.pop("env", None), options.env, home)
        kwargs.update(env=env, cwd=str(workspace))
        # The kernel's own stdout/stderr (banners, crashes) go into a pipe we drain,
        # keeping a bounded tail for kernel_log(): never a host file it could fill.
        if self._output is not None:
            self._output.close()  # a restart: the previous process's pipe
        self._output = OutputTail()
        kwargs.update(stdout=self._output.write_fd, stderr=self._output.write_fd)
        if self._seccomp_fd is not None:
            kwargs["pass_fds"] = (self._seccomp_fd,)
        if self.sandboxed:
            # In its own pid namespace the kernel cannot see our pid, and ipykernel's
            # parent poller would shut it down; --die-with-parent does that job.
            kwargs["independent"] = True
        self.connection_info = host_connection_info(info, self.kernel_dir)
        return await KernelProvisionerBase.pre_launch(self, cmd=argv, **kwargs)

    async def _make_cgroup(self, options: LaunchOptions, support: cgroups.Support) -> cgroups.KernelCgroup:
        """A fresh cgroup for this launch (either launcher), kept for cleanup."""
        group = cgroups.KernelCgroup.for_kernel(self.kernel_dir.name, support)
        try:
            await cgroups.make(group, options.memory, options.pids)
        except OSError as exc:
            raise KernelFailed(f"cannot make the kernel's cgroup {group.memory_dir}: {exc}") from None
        self._cgroup = group
        return group

    async def _pre_fork(self, options: LaunchOptions, argv: list[str], kwargs: dict[str, Any], uid: int, gid: int,
                        home: Path, workspace: Path, cgroup_support: cgroups.Support | None) -> dict[str, Any]:
        """pre_launch of the fork launcher (launch_fork.py): the same IPC directory, cgroup,
        environment and output tail as a bubblewrap launch, and the zygote's request
        instead of a command line."""
        hidden = sorted({*options.hidden, str(options.runtime_dir)})
        package_dir = str(Path(__file__).resolve().parents[1])
        readonly = sorted({sys.prefix, sys.base_prefix, package_dir, *options.readonly})
        if options.tmp_dir is not None:  # the masks' mount points too: a data directory may lie under /tmp
            await asyncio.to_thread(prepare_tmp_mountpoints, options.tmp_dir,
                                    [str(self.kernel_dir), str(workspace), *readonly, *hidden])
        cgroup_dirs: list[str] = []
        if cgroup_support is not None:
            group = await self._make_cgroup(options, cgroup_support)
            cgroup_dirs = [str(d) for d in group.dirs]
        env = kernel_env(kwargs.pop("env", None), options.env, home)
        address_space = max(options.memory, options.address_space, self.address_space_limit)
        self._fork_request = launch_fork.request(
            options, argv, env=env, uid=uid, gid=gid, workspace=workspace, kernel_dir=self.kernel_dir, hidden=hidden,
            readonly=readonly, cgroup_dirs=cgroup_dirs, address_space=address_space)
        if self._output is not None:
            self._output.close()
        self._output = OutputTail()
        self.sandboxed = True
        self.connection_info = host_connection_info(self._info, self.kernel_dir)
        kwargs.update(env=env, cwd=str(workspace))
        return await KernelProvisionerBase.pre_launch(self, cmd=argv, **kwargs)

    async def _launch_forked(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        request, self._fork_request = self._fork_request, None
        assert self._output is not None

        zygote = Zygote.shared()  # here, on the loop's thread (its death signal is per thread)

        def fork() -> ForkedProcess:
            pid, pidfd = zygote.fork(request, self._output.write_fd)
            return ForkedProcess(zygote, pid, pidfd)

        try:
            self.process = await asyncio.to_thread(fork)
        except ZygoteFailed as exc:
            raise KernelFailed(str(exc)) from None
        self.pid, self.pgid = self.process.pid, None
        self.cwd = kwargs.get("cwd")
        return self.connection_info

    def _configured(self) -> dict[str, Any]:
        """The kernelspec's provisioner config, as launch options (a plain Jupyter launch's)."""
        return {"sandbox": self.sandbox, "memory": self.memory_limit, "pids": self.pids_limit,
                "tmp_size": self.tmp_size, "cgroups": self.cgroup_mode, "allow_network": self.allow_network or None}

    def _prepare_kernel_dir(self, runtime_dir: Path, uid: int, gid: int) -> tuple[Path, Path]:
        """Blocking (pre_launch runs it in a thread): the IPC directory, the kernel's home
        and its connection file, given to the kernel's uid. A restart keeps the directory
        (cleanup(restart=True)): same sockets and key, so connected clients reach the new
        kernel."""
        if self.kernel_dir is None or not self.kernel_dir.is_dir():
            self.kernel_dir = make_kernel_dir(runtime_dir)
            self._info = ipc_connection_info(self.kernel_dir)
            self._info["kernel_name"] = self.kernel_spec.language or ""
        home = self.kernel_dir / "home"
        home.mkdir(mode=0o700, exist_ok=True)
        connection_file = write_connection_file(self.kernel_dir, self._info)
        if os.getuid() == 0 and uid != 0:
            for path in (self.kernel_dir, home, connection_file):
                os.chown(path, uid, gid)
        return connection_file, home

    async def launch_kernel(self, cmd: list[str], **kwargs: Any):
        """Called by the KernelManager to start the process; returns IPC connection info."""
        try:
            if self._fork_request is not None:
                info = await self._launch_forked(kwargs)
            else:
                info = await super().launch_kernel(cmd, **kwargs)
        except BaseException:
            await self._remove_cgroup()  # a Jupyter app may not call cleanup after a failed launch
            raise
        finally:  # the child has its copies
            if self._output is not None:
                self._output.close_writer()
            if self._seccomp_fd is not None:
                os.close(self._seccomp_fd)
            self._seccomp_fd = None
        if self.kernel_dir is not None and self.pid:
            write_pid_record(self.kernel_dir, self.pid)
        return info

    async def send_signal(self, signum: int) -> None:
        """Called by KernelManager.signal_kernel (an interrupt of a kernelspec in "signal"
        mode sends SIGINT: era-node-local, era-typescript-local). In bubblewrap the kernel
        is not in the launched process group (bwrap's --new-session), and the outer bwrap
        process has no handler: the signal would kill the sandbox. So a signal meant for
        the kernel goes to the kernel's own process; SIGKILL and SIGTERM end the whole
        sandbox, as jupyter_client means them to."""
        if self.sandboxed and self.process is not None and signum not in (0, signal.SIGKILL, signal.SIGTERM):
            if isinstance(self.process, ForkedProcess):
                pid = await asyncio.to_thread(self.process.kernel_pid)
            else:
                pid = await asyncio.to_thread(self._kernel_pid)
            if pid is not None:
                try:
                    os.kill(pid, signum)
                    return
                except ProcessLookupError:
                    pass
        await super().send_signal(signum)

    def _kernel_pid(self) -> int | None:
        """Blocking (/proc): the deepest process under the launched one whose command line
        names this kernel's connection file: the kernel (bwrap's own processes name it too,
        higher up). A forked kernel is pid 2 of its sandbox, found directly. The walk goes
        down from the launched process through ``/proc/<pid>/task/<tid>/children``, not
        over every process on the host: every new session asks (its storage listener joins
        the sandbox's network), and a scan of all /proc per session was a tenth of the
        server's work in a burst of 30."""
        if self.process is None or self.kernel_dir is None:
            return None
        if isinstance(self.process, ForkedProcess):
            return self.process.kernel_pid()
        marker = str(self.kernel_dir / "connection.json").encode()
        best, stack = None, [(self.process.pid, 0)]
        while stack:
            pid, depth = stack.pop()
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    if marker in fh.read() and (best is None or depth > best[1]):
                        best = (pid, depth)
            except OSError:
                continue
            stack.extend((child, depth + 1) for child in _children(pid))
        return best[0] if best is not None else None

    async def cleanup(self, restart: bool = False) -> None:
        """Called by the KernelManager after the kernel stopped: stop reading its output,
        remove sockets and home, unless this is a restart, which reuses them."""
        await super().cleanup(restart=restart)
        if isinstance(self.process, ForkedProcess):
            self.process.close()
        if self._output is not None:
            self._output.close()  # its tail stays readable for kernel_log()
        await self._remove_cgroup()  # kills what is left of the session (children outside the sandbox)
        if not restart:
            kernel_dir, self.kernel_dir = self.kernel_dir, None
            await asyncio.to_thread(remove_kernel_dir, kernel_dir)

    async def _remove_cgroup(self) -> None:
        group, self._cgroup = self._cgroup, None
        if group is not None:
            await asyncio.to_thread(group.remove)

    async def seal_ipc(self) -> None:
        """Called by ERA's SessionKernel once the kernel answered, before any user code runs:
        the kernel may no longer change its socket directory (``ipc.seal_kernel_dir``)."""
        await asyncio.to_thread(seal_kernel_dir, self.kernel_dir)

    def _finalize_env(self, env: dict[str, str]) -> None:
        # The base class would set PYTHONEXECUTABLE-style hints from the host; our env
        # is built explicitly in pre_launch.
        pass


def _check_reachable(uid: int, paths: list[Path]) -> None:
    """Unsandboxed, a kernel of its own uid sees the host's paths as they are: every
    directory above its workspace, its kernel directory and the interpreter's installation
    must let others through (search permission), or it dies at start with a bare EACCES
    (or a loader's error). Say which one instead. (bubblewrap binds each at its path, so a
    sandboxed kernel needs none of this.)"""
    for path in paths:
        for parent in [*reversed(path.parents)]:
            st = os.stat(parent)
            if st.st_uid != uid and not st.st_mode & 0o001:
                what = ("the Python the kernels run (install one where others may traverse, e.g. under /usr or "
                        "/opt, and make .venv with it: ERA_PYTHON=... scripts/setup.sh)"
                        if str(path) in (sys.base_prefix, sys.prefix) else
                        "ERA_DATA_DIR and ERA_RUNTIME_DIR (put them under directories others may traverse, e.g. "
                        "/var/lib/era)")
                raise KernelFailed(f"ERA_SANDBOX=none: kernels run as their session's own uid ({uid}), which cannot "
                                   f"pass through {parent} (mode {st.st_mode & 0o777:o}) to reach {path}: "
                                   f"{what}; or install bubblewrap, which shows a kernel only what it needs")


def _warn_unsandboxed() -> None:
    global _UNSANDBOXED_WARNED
    if not _UNSANDBOXED_WARNED:
        _UNSANDBOXED_WARNED = True
        who = "each session's own uid" if os.geteuid() == 0 else f"user {getpass.getuser()}"
        log.warning("bubblewrap (bwrap) not found or ERA_SANDBOX=none: local kernels run UNSANDBOXED (as %s, "
                    "with the host's filesystem view and network); install bubblewrap for isolation", who)


def _children(pid: int) -> list[int]:
    """The children of every thread of ``pid`` (a process's children hang off the thread
    that forked them)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as fh:
                found.extend(int(c) for c in fh.read().split())
        except (OSError, ValueError):
            continue
    return found
