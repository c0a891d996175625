"""EraProvisioner conformance: what every ERA kernel provisioner promises
(era_kernel/provisioning/base.py and the module docstrings of local.py and docker.py),
checked as a user relies on it, on every provisioner.

The provisioner is driven the way jupyter_client and ERA's ``SessionKernel`` drive it: an
``EraKernelManager`` on a kernelspec naming the provisioner's entry point, started with
``start_kernel(era=LaunchOptions.from_settings(...))``, then ``seal_ipc()`` once the kernel
answered (as ``SessionKernel.start`` does).

Every test takes ``backend`` and so runs once per entry of ``PROVISIONERS``: adding a
provisioner is adding one entry there (a ``Backend`` saying how its kernel names Python,
where it sees its workspace and how to find its processes from the host). Tests that do not
disturb a kernel share one per provisioner (``shared``); the others start their own.

Provisioner-specific details stay beside their provisioner: bubblewrap, seccomp and cgroup
files in tests/test_local_sandbox.py, Docker's container configuration, images, labels and
egress network in tests/test_docker_provisioner.py. docs/security.md cases checked here: 2,
3, 8, 9, 17-19, 21, 22, and the finding "Servers sharing a runtime directory".
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import os
import queue
import shutil
import signal
import socket
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import pytest_asyncio
from jupyter_client.kernelspec import KernelSpecManager

from era_kernel.config import Settings
from era_kernel.errors import BadRequest, KernelFailed
from era_kernel.kernel import SessionKernel
from era_kernel.kernel.wire import EraKernelManager
from era_kernel.provisioning.base import EraProvisioner, LaunchOptions
from era_kernel.provisioning.ipc import read_pid_record
from era_kernel.provisioning.owner import start_time

from ..conftest import kernel_processes, require_docker, short_tmpdir

pytestmark = pytest.mark.asyncio(loop_scope="module")  # the shared kernel lives on the module's loop

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
    name, entry_point = "local", "era-local"
    root_helpers = frozenset({"bwrap"})
    def require(self) -> None:
        if shutil.which("bwrap") is None:  # without it era-local runs unsandboxed: nothing here would hold
            message = "bubblewrap not installed (CI installs it and sets ERA_REQUIRE_SANDBOX=1)"
            pytest.fail(message) if os.environ.get("ERA_REQUIRE_SANDBOX") == "1" else pytest.skip(message)

    def python(self) -> str:
        return sys.executable

    def workspace_seen(self, workspace: Path) -> str:
        return str(workspace.resolve())

    def _own_cgroup(self, kernel: "Kernel") -> list[str]:
        mine = set(_cgroup_dirs(os.getpid()))
        pids = kernel_processes(str(kernel.kernel_dir))
        return [d for d in (_cgroup_dirs(pids[0]) if pids else []) if d not in mine]

    def processes(self, kernel: "Kernel") -> set[tuple[int, str]]:
        pids = set(kernel_processes(str(kernel.kernel_dir)))  # bubblewrap and the kernel: argv names the directory
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


# The provisioners: a new one is one more entry here (a Backend above).
PROVISIONERS = [
    pytest.param(Local(), id="era-local"),
    pytest.param(Docker(), id="era-docker"),
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
                    "metadata": {"kernel_provisioner": {"provisioner_name": self.backend.entry_point}}}
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
        **options)
    km = EraKernelManager(kernel_name="era-python", kernel_spec_manager=place.python_kernelspec())
    await km.start_kernel(era=era)
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


# ---------------------------------------------------------------------------- what it is


async def test_it_is_an_era_provisioner_found_by_its_entry_point(backend, shared):
    provisioner = shared.kernel.provisioner
    assert isinstance(provisioner, EraProvisioner)
    from jupyter_client.provisioning import KernelProvisionerFactory

    assert backend.entry_point in KernelProvisionerFactory.instance().get_provisioner_entries()
    assert provisioner.oom_kills() in (0, None) and provisioner.oom_killed is False  # nothing was killed


async def test_kernel_answers_over_ipc_and_opens_no_tcp_port(shared):
    k = shared.kernel
    info = k.km.get_connection_info()
    assert info["transport"] == "ipc" and Path(info["ip"]).parent == k.kernel_dir
    sockets = sorted(p.name for p in k.kernel_dir.iterdir() if p.is_socket())
    assert sockets == [f"kernel-{n}" for n in range(1, 6)], sockets
    probe = r"""
import json, os
inodes = set()
for fd in os.listdir('/proc/self/fd'):
    try:
        target = os.readlink(f'/proc/self/fd/{fd}')
    except OSError:
        continue
    if target.startswith('socket:['):
        inodes.add(target[8:-1])
tcp = []
for name in ('tcp', 'tcp6'):
    try:
        lines = open(f'/proc/net/{name}').read().splitlines()[1:]
    except OSError:
        continue
    tcp += [l.split() for l in lines if l.split()[9] in inodes]
unix = [l.split()[7] for l in open('/proc/net/unix').read().splitlines()[1:] if len(l.split()) > 7 and l.split()[6] in inodes]
print(json.dumps({'tcp': tcp, 'unix': unix}))
"""
    found = await k.json(probe)
    assert {f"{k.kernel_dir}/kernel-{n}" for n in range(1, 6)} <= set(found["unix"]), found["unix"]
    # ipykernel's own pipe for output of forked processes listens on the loopback of the
    # kernel's network namespace; nothing else of the kernel is TCP.
    local_addresses = {line[1].split(":")[0] for line in found["tcp"]}
    assert local_addresses <= {"0100007F"}, found["tcp"]


async def test_owner_record_beside_the_kernel_directory(backend, shared):
    """docs/security.md, finding "Servers sharing a runtime directory": the reaper of
    another server judges the directory by this record."""
    k = shared.kernel
    record = read_pid_record(k.kernel_dir)
    assert record is not None, "no owner record"
    assert (record.owner, record.owner_start) == (os.getpid(), start_time(os.getpid()))
    assert record.pid == 0 or record.pid in {pid for pid, _ in backend.processes(k)}, record


# ---------------------------------------------------------------------------- filesystem


async def test_workspace_is_the_writable_working_directory_the_rest_read_only(backend, shared):
    k = shared.kernel
    code = r"""
import json, os
out = {'cwd': os.getcwd()}
open('made-inside.txt', 'w').write('hi')
for path in ('/usr/era-probe', '/etc/era-probe', '/era-probe'):
    try:
        open(path, 'w'); out[path] = 'writable'
    except OSError as e:
        out[path] = e.errno
print(json.dumps(out))
"""
    found = await k.json(code)
    assert found.pop("cwd") == backend.workspace_seen(k.workspace)
    assert found == {p: errno.EROFS for p in found}, found
    made = k.workspace / "made-inside.txt"
    assert made.read_text() == "hi" and made.stat().st_uid == k.uid


async def test_readonly_directories_are_readable_not_writable(shared):
    code = f"""
import json, sys
sys.path.insert(0, {str(shared.readonly)!r})
import mod
try:
    open({str(shared.readonly / 'new.py')!r}, 'w'); wrote = 'writable'
except OSError as e:
    wrote = e.errno
print(json.dumps([mod.VALUE, wrote]))
"""
    assert await shared.kernel.json(code) == ["from the package directory", errno.EROFS]
    assert not (shared.readonly / "new.py").exists()


async def test_host_files_and_other_kernels_are_invisible(backend, shared):
    """docs/security.md case 21: another session's files and sockets, the server's data,
    the host's secrets: none of them exist for a kernel, except its own IPC directory."""
    p = shared.place
    secret = p.root / "outside" / "secret.txt"
    secret.parent.mkdir(exist_ok=True)
    secret.write_text("host secret")
    secret.chmod(0o644)
    async with kernel(p) as other:
        (other.workspace / "b-private.txt").write_text("b's data")
        paths = [str(secret), str(other.workspace / "b-private.txt"), str(other.kernel_dir / "connection.json"),
                 str(p.settings.data_dir / "era.db"), "/etc/shadow", "/root/.bashrc"]
        code = f"""
import json, os
seen = {{}}
for p in {paths!r}:
    try:
        seen[p] = open(p).read()[:40]
    except OSError as e:
        seen[p] = type(e).__name__
k = {str(p.runtime_dir / 'k')!r}
seen['k'] = sorted(os.listdir(k)) if os.path.isdir(k) else []
seen['uid'] = os.getuid()
print(json.dumps(seen))
"""
        seen = await shared.kernel.json(code)
    assert seen.pop("uid") not in (0, None)
    assert seen.pop("k") == [shared.kernel.kernel_dir.name], "only its own IPC directory"
    assert seen.pop("/etc/shadow") in ("PermissionError", "FileNotFoundError")
    assert seen.pop("/root/.bashrc") in ("PermissionError", "FileNotFoundError")
    assert seen == {path: "FileNotFoundError" for path in seen}, seen


# ---------------------------------------------------------------------------- privileges

PROBE_PROCESSES = r"""
import json, os
procs = {}
for pid in os.listdir('/proc'):
    if pid.isdigit():
        try:
            status = dict(l.split(':', 1) for l in open(f'/proc/{pid}/status').read().splitlines() if ':' in l)
        except OSError:
            continue
        procs[pid] = {k: status[k].strip() for k in ('Name', 'Uid', 'Gid', 'NoNewPrivs', 'CapEff', 'CapPrm', 'CapBnd')}
import subprocess
tools = {t: subprocess.run(argv, capture_output=True).returncode for t, argv in
         {'mount': ['mount', '-t', 'tmpfs', 'x', '/mnt'], 'unshare': ['unshare', '--user', '--map-root-user', 'true'],
          'sudo_su': ['su', '-c', 'true']}.items()}
print(json.dumps({'procs': procs, 'uid': os.getuid(), 'gid': os.getgid(), 'euid': os.geteuid(),
                  'self': str(os.getpid()), 'tools': tools}))
"""


async def test_runs_as_the_given_uid_with_no_privileges(shared):
    """docs/security.md case 18: the session's uid, no capabilities, no_new_privs, for the
    kernel and everything it starts; set-uid tools and namespaces give nothing back."""
    k = shared.kernel
    await k.run("import subprocess; _bg = subprocess.Popen(['sleep', '30'])")  # a child process counts too
    try:
        probe = await k.json(PROBE_PROCESSES)
    finally:
        await k.run("_bg.kill(); _bg.wait()")
    assert probe["uid"] == probe["euid"] == k.uid and probe["uid"] != 0
    assert probe["gid"] == (k.uid if os.getuid() == 0 else os.getgid())
    assert all(code != 0 for code in probe["tools"].values()), probe["tools"]
    ours = {pid: s for pid, s in probe["procs"].items() if s["Uid"].split() == [str(k.uid)] * 4}
    assert probe["self"] in ours and "sleep" in {s["Name"] for s in ours.values()}, probe["procs"]
    for pid, status in probe["procs"].items():
        assert status["NoNewPrivs"] == "1", (pid, status)
        assert status["CapEff"] == "0000000000000000", (pid, status)
        assert status["CapPrm"] == "0000000000000000", (pid, status)
        if status["Name"] not in k.backend.root_helpers:
            assert all(u != "0" for u in status["Uid"].split()), (pid, status)


# ---------------------------------------------------------------------------- network


@pytest.fixture
def host_listener():
    """A TCP service on the host's loopback, as the ERA server or a database would be."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


NETWORK_PROBE = """
import json, socket
results = {{}}
for name, addr in {{'host_loopback': ('127.0.0.1', {port}), 'metadata': ('169.254.169.254', 80),
                    'public': ('1.1.1.1', 53)}}.items():
    s = socket.socket(); s.settimeout(3)
    try:
        s.connect(addr); results[name] = 'connected'
    except OSError as e:
        results[name] = type(e).__name__
    finally:
        s.close()
try:
    socket.getaddrinfo('example.com', 80); results['dns'] = 'resolved'
except OSError as e:
    results['dns'] = type(e).__name__
results['interfaces'] = sorted(n for _, n in socket.if_nameindex())
print(json.dumps(results))
"""


async def test_no_network_by_default(shared, host_listener):
    """docs/security.md case 19: nothing but loopback, no DNS, and the host's services
    unreachable."""
    results = await shared.kernel.json(NETWORK_PROBE.format(port=host_listener.getsockname()[1]))
    assert "connected" not in results.values() and results["dns"] != "resolved", results
    assert results["interfaces"] == ["lo"]
    with pytest.raises(BlockingIOError):
        host_listener.accept()  # nothing reached the host's service


async def test_allow_network_gives_a_network(place):
    """Only the interfaces are checked: where the traffic may go (an egress network that
    drops the host's addresses, or the host's own) is the provisioner's configuration."""
    async with kernel(place, allow_network=True) as k:
        interfaces = await k.json("import json, socket; print(json.dumps(sorted(n for _, n in socket.if_nameindex())))")
    assert set(interfaces) - {"lo"}, interfaces


# ---------------------------------------------------------------------------- environment


async def test_kernel_env_holds_only_what_we_pass(shared):
    """docs/security.md cases 21 and 17: the session's env reaches the kernel verbatim
    (nothing runs it through a shell); the server's own environment does not."""
    env = await shared.kernel.json("import os, json; print(json.dumps(dict(os.environ)))")
    assert not any(k.startswith(("AWS_", "ERA_")) for k in env), sorted(env)
    assert not set(FAKE_SECRETS.values()) & set(env.values())
    assert env["GREETING"] == "hello"
    for key, value in ODD_VALUES.items():
        assert env[key] == value
    exists = await shared.kernel.json("import os, json; print(json.dumps([os.path.exists('/tmp/pwned'), "
                                      "os.path.exists('/tmp/pwned2')]))")
    assert exists == [False, False] and not os.path.exists("/tmp/pwned")


async def test_plain_jupyter_launch(backend, place, monkeypatch):
    """No ``era`` options (a plain Jupyter application: a working directory and its own
    environment): settings from the process environment, the secrets in it kept out."""
    monkeypatch.setenv("ERA_RUNTIME_DIR", str(place.runtime_dir))
    uid = new_uid()
    workspace = place.workspace(uid)
    if os.getuid() == 0:
        os.chmod(workspace, 0o777)  # the provisioner's default uid, not ours, writes here
    with server_secrets():
        km = EraKernelManager(kernel_name="era-python", kernel_spec_manager=place.python_kernelspec())
        await km.start_kernel(cwd=str(workspace), env=dict(os.environ))
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        k = Kernel(backend, km, kc, workspace, uid)
        assert str(k.kernel_dir).startswith(str(place.runtime_dir) + "/")
        found = await k.json("import os, json; print(json.dumps([os.getuid(), os.getcwd(), dict(os.environ)]))")
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    kernel_uid, cwd, env = found
    assert kernel_uid != 0 and cwd == backend.workspace_seen(workspace)
    assert not any(k.startswith(("AWS_", "ERA_")) for k in env), sorted(env)


# ---------------------------------------------------------------------------- bad options


@pytest.mark.parametrize("bad, field_name", [
    ({"uid": 0}, "uid"), ({"uid": -5}, "uid"), ({"uid": "abc"}, "uid"), ({"uid": True}, "uid"),
    ({"pids": -1}, "pids"), ({"cpus": "lots"}, "cpus"), ({"memory": 0}, "memory"),
    ({"env": {"BAD NAME": "x"}}, "env"), ({"env": {"A=B": "x"}}, "env"), ({"env": {"NUL": "a\0b"}}, "env"),
    ({"env": ["A=1"]}, "env"), ({"readonly": ["relative/path"]}, "readonly"), ({"readonly": ["/"]}, "readonly"),
    ({"readonly": ["/usr/../etc"]}, "readonly"), ({"no_such_option": 1}, "no_such_option"),
], ids=lambda v: json.dumps(v) if isinstance(v, dict) else v)
async def test_bad_launch_options_are_refused_before_anything_starts(backend, place, bad, field_name):
    """Refused with BadRequest naming the field, whether the engine builds the options
    (LaunchOptions) or an embedder passes them as a mapping, and nothing is left behind."""
    workspace = place.workspace(new_uid())
    era = {"workspace": str(workspace), "runtime_dir": str(place.runtime_dir), "uid": new_uid(), **bad}
    before = backend.launched(place)
    km = EraKernelManager(kernel_name="era-python", kernel_spec_manager=place.python_kernelspec())
    with pytest.raises(BadRequest) as refused:
        await km.start_kernel(era=era)
    assert refused.value.field == field_name, refused.value
    assert not km.has_kernel
    assert backend.launched(place) == before
    if field_name != "no_such_option":
        with pytest.raises(BadRequest) as refused:
            LaunchOptions(workspace=workspace, runtime_dir=place.runtime_dir, **{"uid": new_uid(), **bad})
        assert refused.value.field == field_name


# ---------------------------------------------------------------------------- control


async def interrupts(k: Kernel, interrupt) -> None:
    """A busy kernel is interrupted, raises KeyboardInterrupt, and goes on with its state."""
    await k.run("kept = 41")
    msg_id = k.kc.execute("import time; time.sleep(60)")
    await k.kc.get_iopub_msg(timeout=10)  # busy
    started = time.monotonic()
    await asyncio.sleep(0.5)
    await interrupt()
    reply = None
    for _ in range(10):
        with contextlib.suppress(TimeoutError):
            reply = await k.reply(msg_id, timeout=1)
            break
        assert await k.km.is_alive(), f"the kernel died: exit status {await k.provisioner.poll()}"
    assert reply is not None, "no reply within 10 s"
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
    assert time.monotonic() - started < 5
    assert (await k.run("print(kept + 1)"))[1] == "42\n"


async def test_interrupt(shared):
    """The kernelspec's interrupt (ours: "message" mode), as SessionKernel interrupts a run."""
    await interrupts(shared.kernel, shared.kernel.km.interrupt_kernel)


async def test_interrupt_by_signal(backend, place, request):
    """SIGINT through the provisioner, as KernelManager.interrupt_kernel sends it for a
    kernelspec in "signal" mode (era-node-local, era-typescript-local)."""
    known_bug(request, backend, "signal-interrupt")
    async with kernel(place) as k:
        await interrupts(k, lambda: k.km.signal_kernel(signal.SIGINT))


def known_bug(request, backend: Backend, check: str) -> None:
    if check in backend.bugs:
        request.applymarker(pytest.mark.xfail(strict=True, reason=backend.bugs[check]))


async def test_restart_keeps_the_connection_info_and_starts_fresh(backend, place):
    """jupyter_client's restart: a new kernel process (the old one's processes gone) on the
    same sockets and key, so connected clients reach it; sealed again afterwards."""
    async with kernel(place) as k:
        info = k.km.get_connection_info()
        old = {**backend.footprint(k), "paths": []}  # the directory stays, the rest goes
        await k.run("x = 1")
        await k.km.restart_kernel(now=True)
        await k.kc.wait_for_ready(timeout=60)
        await k.provisioner.seal_ipc()
        assert k.km.get_connection_info() == info
        status, _, content = await k.run("x")
        assert status == "error" and content["ename"] == "NameError"
        deadline = time.monotonic() + 10
        while backend.remains(old) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert backend.remains(old) == [], "the old kernel survived the restart"
        if os.getuid() == 0:
            assert os.stat(k.kernel_dir).st_uid == 0  # sealed again after the restart


async def test_stop_removes_processes_and_everything_it_made(backend, place):
    """docs/security.md case 9: after a graceful shutdown nothing of the kernel is left:
    its processes (children included), its IPC directory and owner record, its container
    or cgroup."""
    async with kernel(place) as k:
        await k.run("import subprocess; bg = subprocess.Popen(['sleep', '60'])")
        found = backend.footprint(k)
        assert len(found["processes"]) >= 2 and all(os.path.lexists(p) for p in found["paths"]), found
        await k.km.shutdown_kernel()  # the graceful path: shutdown request, wait, cleanup
    deadline = time.monotonic() + 10
    while backend.remains(found) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert backend.remains(found) == []
    assert not list((place.runtime_dir / "k").iterdir()), "nothing left beside the kernel's directory"


# ---------------------------------------------------------------------------- IPC seal (case 22)

ATTACK = r"""
import json, os
from ipykernel.connect import get_connection_file
d = os.path.dirname(get_connection_file())
sock = os.path.join(d, "kernel-1")
result = {}
def attempt(name, action):
    try:
        action()
        result[name] = "done"
    except OSError as exc:
        result[name] = type(exc).__name__
attempt("unlink", lambda: os.unlink(sock))
attempt("rename", lambda: os.rename(sock, os.path.join(d, "moved")))
attempt("symlink", lambda: os.symlink("/run", os.path.join(d, "kernel-9")))
attempt("fifo", lambda: os.mkfifo(os.path.join(d, "fifo")))
attempt("file", lambda: open(os.path.join(d, "flood-0"), "w").close())
attempt("chmod", lambda: os.chmod(d, 0o777))
attempt("home", lambda: open(os.path.join(os.path.expanduser("~"), "mine"), "w").close())
print(json.dumps(result))
"""


def socket_files(kernel_dir: Path) -> dict[str, str]:
    kinds = {}
    for name in sorted(os.listdir(kernel_dir)):
        mode = os.lstat(kernel_dir / name).st_mode
        kinds[name] = "socket" if stat.S_ISSOCK(mode) else "link" if stat.S_ISLNK(mode) else "other"
    return {k: v for k, v in kinds.items() if k.startswith("kernel")}


async def test_sealed_kernel_cannot_replace_or_add_to_its_socket_directory(place):
    """docs/security.md case 22: after seal_ipc the kernel cannot swap its sockets for links
    or FIFOs nor flood their directory; it is still the same kernel, still answering."""
    if os.getuid() != 0:
        pytest.skip("only root can take the directory back (README limits)")
    async with kernel(place) as k:
        before = socket_files(k.kernel_dir)
        assert set(before.values()) == {"socket"} and len(before) == 5, before
        attempts = await k.json(ATTACK)
        refused = {key: v for key, v in attempts.items() if key != "home"}
        assert refused == {key: "PermissionError" for key in refused}, attempts
        assert attempts["home"] == "done"  # the kernel keeps its own writable home
        assert socket_files(k.kernel_dir) == before
        assert not os.path.lexists(k.kernel_dir / "fifo")
        assert (await k.run("print(41 + 1)"))[1] == "42\n"


# ---------------------------------------------------------------------------- failed start


async def test_kernel_log_holds_the_kernels_own_output_after_a_failed_start(backend, place):
    """What SessionKernel puts into a failed start's error. More than a pipe holds comes
    first: the provisioner must drain while the kernel writes. (The pause: Docker reads
    stdout and stderr through two pipes, so output written to both at once is logged in
    the order it read them, which may not be the order written.)"""
    argv = [backend.python(), "-c", "import sys, time; sys.stderr.write('x' * 200000 + '\\n'); sys.stderr.flush(); "
                                    "time.sleep(0.5); print('era-marker: broken kernel', flush=True); sys.exit(3)"]
    uid = new_uid()
    era = LaunchOptions.from_settings(place.settings, backend.name, place.workspace(uid), uid=uid)
    km = EraKernelManager(kernel_name="broken", kernel_spec_manager=place.kernelspec("broken", argv))
    await km.start_kernel(era=era)
    try:
        deadline = time.monotonic() + 30
        while await km.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not await km.is_alive()
        provisioner = km.provisioner
        log = await asyncio.to_thread(provisioner.kernel_log)
        assert "era-marker: broken kernel" in log, log[-300:]
        assert len(log) <= 2000, "only a short tail (the default limit)"
    finally:
        await km.shutdown_kernel(now=True)
    assert not list((place.runtime_dir / "k").iterdir()), "nothing left beside the kernel's directory"

    # What SessionKernel makes of it: the kernel's last words in the error, briefly.
    session_kernel = SessionKernel(place.kernelspec("broken", argv), "broken", era, [], start_timeout=20)
    with pytest.raises(KernelFailed) as failure:
        await session_kernel.start()
    assert "era-marker: broken kernel" in str(failure.value)
    assert len(str(failure.value)) < 10_000, "only a short tail goes into the message"
    assert not list((place.runtime_dir / "k").iterdir()), "nothing left beside the kernel's directory"


# ---------------------------------------------------------------------------- limits (cases 8, 9)

FORK_BOMB = r"""
import json, os, time
children, failure = [], None
for _ in range(2000):
    try:
        pid = os.fork()
    except OSError as e:
        failure = e.errno
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    children.append(pid)
print(json.dumps({'forked': len(children), 'errno': failure}))
"""


async def test_fork_bomb_is_contained(backend, place):
    async with kernel(place, pids=64) as k:
        result = await k.json(FORK_BOMB, timeout=60)
        assert result["errno"] == errno.EAGAIN and result["forked"] < 64, result
        identities = backend.processes(k)
        assert result["forked"] <= len(identities) <= 64
        # The kernel still answers (it may itself fail to start a thread while the table
        # is full), and recovers once the children are gone.
        assert (await k.run("1"))[0] in ("ok", "error")
        answer = await k.run("import signal\nfor p in children[:5]: os.kill(p, signal.SIGKILL)\n"
                             "for p in children[:5]: os.waitpid(p, 0)\nprint(1 + 1)")
        assert answer[1].strip() == "2", answer
    # Shutdown removed every process the bomb made (docs/security.md case 9).
    deadline = time.monotonic() + 10
    while any(_alive(i) for i in identities) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert not [pid for pid, start in identities if _alive((pid, start))]


async def test_memory_bomb_is_contained(backend, place):
    """The kernel gets a MemoryError or is killed (and the provisioner says it was for
    memory); the host keeps working; after a MemoryError the kernel goes on."""
    async with kernel(place, memory=256 * MiB) as k:
        msg_id = k.kc.execute("hog = []\nwhile True:\n    hog.append(b'x' * (16 * 1024**2))")
        outcome = None
        deadline = time.monotonic() + 60
        while outcome is None and time.monotonic() < deadline:
            try:
                outcome = (await k.reply(msg_id, timeout=1))["content"].get("ename")
            except TimeoutError:
                if not await k.km.is_alive():
                    outcome = "killed"
        assert outcome in ("MemoryError", "killed"), outcome
        if outcome == "killed":
            assert k.provisioner.oom_killed
        else:
            assert (await k.run("del hog\nprint('recovered')"))[1] == "recovered\n"
        assert sum(range(10**6)) == 499999500000  # this process is fine


OOM_CHILD = r"""
import json, subprocess, sys, time
hog = "import time\ntry:\n    open('/proc/self/oom_score_adj', 'w').write('{child}')\nexcept OSError:\n    pass\n" \
      "b = b'x' * (48 << 20)\ntime.sleep(60)"
open('/proc/self/oom_score_adj', 'w').write('{kernel}')
kids, killed = [], None
for _ in range(40):
    kids.append(subprocess.Popen([sys.executable, '-S', '-c', hog]))
    time.sleep(0.3)
    codes = [k.poll() for k in kids]
    if -9 in codes:
        killed = codes.index(-9)
        break
for k in kids:
    k.kill(); k.wait()
print(json.dumps({{'kids': len(kids), 'killed': killed}}))
"""


async def test_memory_limit_kills_are_reported(backend, place):
    """docs/security.md case 8: the memory limit bounds the session as a whole (processes
    each under it, together over it, are killed), ``oom_kills`` counts those kills (or says
    it cannot: None), and when the kernel itself is killed ``oom_killed`` says so."""
    if reason := backend.session_memory_unbounded():
        pytest.skip(reason)
    async with kernel(place, memory=256 * MiB) as k:
        before = k.provisioner.oom_kills()
        assert before in (0, None)
        # Children holding 48 MiB each, the first choice of the OOM killer, until one is killed.
        result = await k.json(OOM_CHILD.format(child=1000, kernel=0), timeout=60)
        assert result["killed"] is not None, f"no child was killed: the session used more than its limit {result}"
        after = k.provisioner.oom_kills()
        assert before is None and after is None or after > before, (before, after)
        assert await k.km.is_alive()
        # Now the kernel is the first choice: it is killed, and the provisioner says why.
        k.kc.execute(OOM_CHILD.format(child=0, kernel=1000))
        deadline = time.monotonic() + 60
        while await k.km.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert not await k.km.is_alive(), "the kernel outlived the session's memory limit"
        assert k.provisioner.oom_killed is True
        last = k.provisioner.oom_kills()
        assert after is None and last is None or last > after, (after, last)
