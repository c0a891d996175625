"""The provisioners the conformance suite runs on, and how it drives them: ``PROVISIONERS``
is the one list (adding a provisioner is adding one ``Backend`` there), ``backend`` the
fixture over it, ``kernel()`` starts one the way jupyter_client and ERA's ``SessionKernel``
do, ``shared`` is one undisturbed kernel per provisioner and test module. The suites are
tests/conformance/test_provisioner_*.py; conftest.py hands them these fixtures."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import os
import queue
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import pytest_asyncio
from jupyter_client.kernelspec import KernelSpecManager

from era_kernel.config import Settings
from era_kernel.kernel.wire import EraKernelManager
from era_kernel.provisioning.base import LaunchOptions

from ..conftest import kernel_processes, require_docker, require_gvisor, short_tmpdir


MiB = 1024**2
# Sandbox uids as root: one per kernel, out of the engine's ranges (records.py) and apart
# from other test processes on the machine (RLIMIT_NPROC counts a uid's processes host-wide).
_uids = itertools.count(600_000_000 + (os.getpid() % 1_000_000) * 100)


def _process_identity(pid: int | str) -> tuple[int, str] | None:
    """(pid, start time): a pid number alone may be reused by an unrelated process."""
    try:
        return int(pid), Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(identity: tuple[int, str]) -> bool:
    return _process_identity(identity[0]) == identity


# ---------------------------------------------------------------------------- the provisioners


class Backend:
    """One provisioner, as this suite observes it from the host."""

    name: str  # as the engine names it: LaunchOptions.from_settings(settings, name, ...)
    entry_point: str  # the kernelspec's metadata.kernel_provisioner.provisioner_name
    # Processes of the provisioner's own that the kernel sees running as root (uid 0),
    # without any capability: bubblewrap's pid 1, which reaps the sandbox's orphans.
    root_helpers: frozenset[str] = frozenset()
    # Promises this provisioner breaks today: {check: the bug}. The check is marked
    # xfail(strict=True), so fixing the bug fails the suite until the entry goes.
    bugs: dict[str, str] = {}
    # Launch options of every kernel on this backend, as a session's (a launch mode of
    # the provisioner); what a plain Jupyter launch gets instead: its kernelspec's
    # provisioner config and settings read from the environment.
    launch: dict[str, Any] = {}
    spec_config: dict[str, Any] = {}
    plain_env: dict[str, str] = {}
    # What writing outside the workspace (to /usr, /etc, /) fails with.
    read_only_errno: int = errno.EROFS
    # Host processes of the provisioner's own among a kernel's ``processes`` (they do not
    # count against the kernel's process limit).
    host_helpers: int = 0
    # At the memory limit the whole session is killed, not its biggest process.
    oom_kills_the_session: bool = False
    # Launch options of the fork bomb's kernel beyond its process limit.
    fork_bomb_options: dict[str, Any] = {}

    def require(self) -> None:
        """Skip (or fail, when the CI says it must run) where the provisioner cannot run."""

    def python(self) -> str:
        """The interpreter as a kernelspec's argv names it for this provisioner."""
        raise NotImplementedError

    def workspace_seen(self, workspace: Path) -> str:
        """The workspace as the kernel sees it (its working directory)."""
        raise NotImplementedError

    def processes(self, kernel: "Kernel") -> set[tuple[int, str]]:
        """Every process of the kernel's session, as host (pid, start time) identities."""
        raise NotImplementedError

    def footprint(self, kernel: "Kernel") -> dict[str, Any]:
        """What a stop must remove: processes, paths (the IPC directory and its owner
        record, and whatever else the provisioner made on the host)."""
        kernel_dir = kernel.kernel_dir
        return {"processes": self.processes(kernel),
                "paths": [kernel_dir, kernel_dir.parent / f"{kernel_dir.name}.pid"]}

    def remains(self, footprint: dict[str, Any]) -> list[str]:
        """What of ``footprint`` is still there."""
        left = [f"process {pid}" for pid, start in footprint["processes"] if _alive((pid, start))]
        return left + [f"path {p}" for p in footprint["paths"] if os.path.lexists(p)]

    def launched(self, place: "Place") -> list[str]:
        """Whatever kernels this process has launched in ``place`` left: kernel directories."""
        root = place.runtime_dir / "k"
        return sorted(p.name for p in root.iterdir()) if root.is_dir() else []

    def session_memory_unbounded(self) -> str | None:
        """Why the memory limit cannot bound the session as a whole here (None: it does)."""
        return None

    def check_launched(self, km: Any) -> None:
        """The kernel was launched the way this backend means (not by a fallback)."""


def _cgroup_dirs(pid: int) -> list[str]:
    """The process's memory and pids cgroup directories, read from /proc (not from our code)."""
    out = []
    with open(f"/proc/{pid}/cgroup") as fh:
        for line in fh:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in ("memory", "pids"):
                if controller in controllers.split(","):
                    out.append(f"/sys/fs/cgroup/{controller}{path}")
            if controllers == "" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):  # unified (v2)
                out.append(f"/sys/fs/cgroup{path}")
    return out


class Local(Backend):
    """era-local with ERA_LOCAL_LAUNCHER=bwrap: each kernel a new interpreter in bubblewrap
    (what other languages' kernels, and Python kernels where fork does not apply, get)."""

    name, entry_point = "local", "era-local"
    root_helpers = frozenset({"bwrap"})
    launch = {"launcher": "bwrap"}
    plain_env = {"ERA_LOCAL_LAUNCHER": "bwrap"}

    def check_launched(self, km: Any) -> None:
        from era_kernel.provisioning.zygote import ForkedProcess

        assert not isinstance(km.provisioner.process, ForkedProcess), "forked, though the launcher is bwrap"
    def require(self) -> None:
        if shutil.which("bwrap") is None:  # without it era-local runs unsandboxed: nothing here would hold
            message = "bubblewrap not installed (CI installs it and sets ERA_REQUIRE_SANDBOX=1)"
            pytest.fail(message) if os.environ.get("ERA_REQUIRE_SANDBOX") == "1" else pytest.skip(message)

    def python(self) -> str:
        return sys.executable

    def workspace_seen(self, workspace: Path) -> str:
        return str(workspace.resolve())

    def _pids(self, kernel: "Kernel") -> list[int]:
        return kernel_processes(str(kernel.kernel_dir))  # bubblewrap and the kernel: argv names the directory

    def _own_cgroup(self, kernel: "Kernel") -> list[str]:
        mine = set(_cgroup_dirs(os.getpid()))
        pids = self._pids(kernel)
        return [d for d in (_cgroup_dirs(pids[0]) if pids else []) if d not in mine]

    def processes(self, kernel: "Kernel") -> set[tuple[int, str]]:
        pids = set(self._pids(kernel))
        for group in self._own_cgroup(kernel):  # and what they started, found in their cgroup
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in Path(group, "cgroup.procs").read_text().split())
        return {i for i in map(_process_identity, pids) if i}

    def footprint(self, kernel: "Kernel") -> dict[str, Any]:
        found = super().footprint(kernel)
        found["paths"] += self._own_cgroup(kernel)
        return found

    def session_memory_unbounded(self) -> str | None:
        from era_kernel.provisioning import cgroups

        found = cgroups.support()  # without a cgroup, limits hold per process only (local.py)
        return None if found else f"no kernel cgroups here: {found.reason}"


class LocalFork(Local):
    """era-local with ERA_LOCAL_LAUNCHER=fork: Python kernels forked from a zygote, the
    sandbox built in process (era_kernel/provisioning/forked.py); its init runs as the
    session's uid, so no root helper."""

    root_helpers = frozenset()
    launch = {"launcher": "fork"}
    plain_env = {"ERA_LOCAL_LAUNCHER": "fork"}

    def require(self) -> None:
        if os.getuid() != 0:
            pytest.skip("the fork launcher needs root (it builds the sandbox itself)")

    def _pids(self, kernel: "Kernel") -> list[int]:
        """The sandbox's init and its descendants (their command line is the zygote's:
        the kernel directory is not in it)."""
        process = kernel.provisioner.process
        if process is None:
            return []
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                    children.setdefault(ppid, []).append(int(entry))
        found, stack = [], [process.pid]
        while stack:
            pid = stack.pop()
            found.append(pid)
            stack.extend(children.get(pid, ()))
        return found

    def check_launched(self, km: Any) -> None:
        from era_kernel.provisioning.zygote import ForkedProcess

        assert isinstance(km.provisioner.process, ForkedProcess), "not forked: the launch fell back to bubblewrap"


class Docker(Backend):
    name, entry_point = "docker", "era-docker"

    def require(self) -> None:
        require_docker()

    def python(self) -> str:
        return "python"  # the image's

    def workspace_seen(self, workspace: Path) -> str:
        return "/workspace"

    @staticmethod
    def client():
        from era_kernel.provisioning.docker import shared_docker_client

        return shared_docker_client()

    def processes(self, kernel: "Kernel") -> set[tuple[int, str]]:
        top = self.client().api.top(kernel.provisioner.container_id, ps_args="-eLf")
        column = top["Titles"].index("PID")
        return {i for i in (_process_identity(row[column]) for row in top["Processes"]) if i}

    def footprint(self, kernel: "Kernel") -> dict[str, Any]:
        return {**super().footprint(kernel), "container": kernel.provisioner.container_id}

    def launched(self, place: "Place") -> list[str]:
        # Only ours: other ERA servers may be starting and stopping theirs on the same engine.
        ours = {"label": ["era.managed=1", f"era.owner={os.getpid()}"]}
        return super().launched(place) + sorted(c["Id"] for c in self.client().api.containers(all=True, filters=ours))

    def remains(self, footprint: dict[str, Any]) -> list[str]:
        import docker.errors

        left = super().remains(footprint)
        try:
            self.client().api.inspect_container(footprint["container"])
            left.append(f"container {footprint['container'][:12]}")
        except docker.errors.NotFound:
            pass
        return left


class GVisor(Docker):
    """era-docker with ``isolation: gvisor``: the container under runsc. The host sees
    gVisor's sandbox and gofer, not the kernel's processes (they live in gVisor's own
    kernel), so a kernel's processes are found as the container's processes on the host:
    its cgroup's."""
    launch = {"isolation": "gvisor"}
    spec_config = {"isolation": "gvisor"}
    # gVisor checks the directory's permissions before the mount's read-only flag (the
    # tests then read /proc/mounts: the mount says "ro").
    read_only_errno = errno.EACCES
    # The sentry and the gofer (and docker-init's stub): each of the kernel's processes
    # has one host process (its address space's stub) on the ptrace platform.
    host_helpers = 3
    # The sentry holds all of the session's memory: the host's OOM killer picks it.
    oom_kills_the_session = True
    # Each forked copy of the kernel costs ~30 MiB in gVisor (measured: 52 forks, 1.6 GiB),
    # so at the default 512 MiB the memory limit, not the process limit, stops the bomb
    # (the session is killed: contained too, but not what this test checks).
    fork_bomb_options = {"memory": 2 * 1024**3}

    def require(self) -> None:
        require_gvisor()

    def processes(self, kernel: "Kernel") -> set[tuple[int, str]]:
        state = self.client().api.inspect_container(kernel.provisioner.container_id)["State"]
        pids = {state["Pid"]} if state.get("Pid") else set()
        for group in _cgroup_dirs(state["Pid"]) if pids else []:
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in Path(group, "cgroup.procs").read_text().split())
        return {i for i in map(_process_identity, pids) if i}


# The provisioners: a new one is one more entry here (a Backend above).
PROVISIONERS = [
    pytest.param(Local(), id="era-local"),
    pytest.param(LocalFork(), id="era-local-fork"),
    pytest.param(Docker(), id="era-docker"),
    pytest.param(GVisor(), id="era-docker-gvisor"),
]


@pytest.fixture(scope="module", params=PROVISIONERS)
def backend(request) -> Backend:
    request.param.require()
    return request.param


# ---------------------------------------------------------------------------- kernels


@dataclass
class Place:
    """Throwaway data and runtime directories (engine settings on them) and kernelspecs."""

    root: Path
    backend: Backend
    settings: Settings = field(init=False)

    def __post_init__(self) -> None:
        data = self.root / "data"
        data.mkdir()
        (data / "era.db").write_text("the server's own records")  # hidden from every kernel
        # Short paths: IPC socket paths must stay under 107 bytes.
        self.settings = Settings.from_env({}, data_dir=str(data), runtime_dir=str(self.root / "rt"))

    @property
    def runtime_dir(self) -> Path:
        return Path(self.settings.runtime_dir)

    def kernelspec(self, name: str, argv: list[str]) -> KernelSpecManager:
        spec_dir = self.root / "specs" / name
        if not spec_dir.exists():
            spec_dir.mkdir(parents=True)
            spec = {"argv": argv, "display_name": name, "language": "python", "interrupt_mode": "message",
                    "metadata": {"kernel_provisioner": {"provisioner_name": self.backend.entry_point,
                                                        "config": dict(self.backend.spec_config)}}}
            (spec_dir / "kernel.json").write_text(json.dumps(spec))
        return KernelSpecManager(kernel_dirs=[str(self.root / "specs")])

    def python_kernelspec(self) -> KernelSpecManager:
        argv = [self.backend.python(), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        return self.kernelspec("era-python", argv)

    def workspace(self, uid: int) -> Path:
        path = self.root / f"ws{uid}"
        path.mkdir(mode=0o700)
        if os.getuid() == 0:
            os.chown(path, uid, uid)  # as the engine's Workspace.create does
        return path


@contextlib.contextmanager
def place_for(backend: Backend):
    root = short_tmpdir("erc")
    try:
        yield Place(root, backend)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def place(backend):
    with place_for(backend) as p:
        yield p


def new_uid() -> int:
    return next(_uids) if os.getuid() == 0 else os.getuid()


@dataclass
class Kernel:
    backend: Backend
    km: EraKernelManager
    kc: Any
    workspace: Path
    uid: int

    @property
    def provisioner(self) -> Any:
        return self.km.provisioner

    @property
    def kernel_dir(self) -> Path:
        """The kernel's IPC directory, as its connection info names it."""
        return Path(self.km.get_connection_info()["ip"]).parent

    async def run(self, code: str, timeout: float = 30) -> tuple[str, str, dict]:
        """Execute code; return (status, stdout, reply content)."""
        out: list[str] = []

        def hook(msg):
            if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
                out.append(msg["content"]["text"])

        reply = await self.kc.execute_interactive(code, output_hook=hook, timeout=timeout)
        return reply["content"]["status"], "".join(out), reply["content"]

    async def json(self, code: str, timeout: float = 30) -> Any:
        status, out, content = await self.run(code, timeout)
        assert status == "ok", content
        return json.loads(out.strip().splitlines()[-1])

    async def reply(self, msg_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            try:
                reply = await self.kc.get_shell_msg(timeout=remaining)
            except (queue.Empty, asyncio.TimeoutError):
                raise TimeoutError from None
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply


SESSION_FIELDS = ("allow_network", "env", "labels", "readonly")  # LaunchOptions.from_settings's **session


@contextlib.asynccontextmanager
async def kernel(place: Place, **options: Any) -> AsyncIterator[Kernel]:
    """A kernel started as the engine starts one (``options``: the session's launch
    options, limits included), sealed once it answered."""
    uid = new_uid()
    workspace = place.workspace(uid)
    session = {k: options.pop(k) for k in SESSION_FIELDS if k in options}
    # The engine's settings give the limits; a test sets its own on top.
    era = LaunchOptions.from_settings(place.settings, place.backend.name, workspace, uid=uid, **session).replace(
        **{**place.backend.launch, **options})
    km = EraKernelManager(kernel_name="era-python", kernel_spec_manager=place.python_kernelspec())
    await km.start_kernel(era=era)
    place.backend.check_launched(km)
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        await km.provisioner.seal_ipc()
        yield Kernel(place.backend, km, kc, workspace, uid)
    finally:
        kc.stop_channels()
        if km.has_kernel:
            await km.shutdown_kernel(now=True)


FAKE_SECRETS = {"ERA_API_KEY": "era-server-token", "AWS_SECRET_ACCESS_KEY": "aws-secret-key",
                "AWS_ACCESS_KEY_ID": "aws-key-id"}
# Values that would run commands if anything put them through a shell on the way.
ODD_VALUES = {"INJECT": "$(touch /tmp/pwned)", "TICKS": "`touch /tmp/pwned2`", "MULTI": "line1\nline2; rm -rf /"}


@contextlib.contextmanager
def server_secrets():
    """The server process holds secrets in its environment, as a deployed one does."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in FAKE_SECRETS.items():
            patch.setenv(key, value)
        yield


@dataclass
class Shared:
    kernel: Kernel
    place: Place
    readonly: Path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(backend) -> AsyncIterator[Shared]:
    """One kernel per provisioner for the checks that leave it as it was: launched as the
    engine launches a session's (no network, the session's env and a read-only package
    directory), by a server holding secrets in its environment."""
    with place_for(backend) as p:
        readonly = p.root / "pkgs"
        readonly.mkdir(mode=0o755)
        (readonly / "mod.py").write_text("VALUE = 'from the package directory'\n")
        with server_secrets():
            async with kernel(p, env={"GREETING": "hello", **ODD_VALUES}, readonly=(str(readonly),)) as k:
                yield Shared(k, p, readonly)

