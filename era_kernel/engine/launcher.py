"""Starting kernels: for sessions (in the background on create, inline on a cold run),
for the warm pool, and for one-shot runs.

A kernel is a ``SessionKernel`` on one of our kernelspecs, launched with typed
``LaunchOptions`` built from the engine's settings and the request (never from the
process environment), and given its startup cells: working directory, ``ERA_*`` and
the session's env, its ``startup`` code, and the package environment's cell when the
session has a ``setup``. Every start enters the kernel table with the slot it was given
and leaves it through the table, so a failed start gives its slot back exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .. import sdk
from ..config import Settings
from ..egress.gate import EgressGate, proxy_env
from ..egress.policy import EgressPolicy, session_policy
from ..errors import KernelFailed
from ..kernel import SessionKernel
from ..kernelspecs import EraKernelSpecManager
from ..languages import get_language
from ..provisioning.base import LaunchOptions
from ..provisioning.commands import DEFAULT_MAX_OUTPUT, CommandResult, EgressHook, OutputSink, run_command
from ..provisioning.local import sandbox_mode
from ..setup.session import CommandSandbox
from .events import EngineEvents, KernelReplaced
from .kernels import KernelTable, Lease
from .pool import PoolKey, WarmKernel, reserve_uids
from .records import POOL_UID_BASE, KernelRequest, SessionRecord, session_uid

if TYPE_CHECKING:
    from ..setup import SetupManager
    from .files import SessionFiles

log = logging.getLogger("era.launcher")

CONTAINER_WORKSPACE = "/workspace"  # where era-docker mounts the workspace
POOL_UID_FILE = "pool-uids"
POOL_UID_BLOCK = 1000


SDK_DIRS = (str(sdk.PYTHON_DIR), str(sdk.NODE_DIR))  # era_storage: bound read-only into every sandbox


def sdk_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the SDK directories last on PYTHONPATH and NODE_PATH (a package the
    session installed under the same name wins), so ``import era_storage`` /
    ``require('era_storage')`` work in every kernel."""
    out = dict(env)
    for name, directory in (("PYTHONPATH", SDK_DIRS[0]), ("NODE_PATH", SDK_DIRS[1])):
        out[name] = ":".join(p for p in (env.get(name), directory) if p)
    return out


def pools_fork(settings: Settings, keys: list[PoolKey]) -> bool:
    """Are all these pools' kernels forked from the zygote (a root server, the fork
    launcher, a sandbox, Python on the local provisioner: ``launch_fork.why_not``)?
    Their starts are half waiting, so the pools run more of them at once
    (``pool.default_starts``), and they are cheap to keep (``pool.auto_pool_size``)."""
    return (bool(keys) and os.getuid() == 0 and settings["ERA_LOCAL_LAUNCHER"] == "fork"
            and settings["ERA_SANDBOX"] != "none" and all(key == ("python", "local") for key in keys))


def local_egress_refusal(settings: Settings) -> str | None:
    """None when a local session with ``allowInternetAccess: true`` goes out through the
    egress proxy (ERA_EGRESS_LOCAL=proxy, and the server can open a listener in its
    sandbox: bubblewrap's namespaces, and root to enter them); else why it shares the
    host's network instead, as it did before there was a proxy (README: Known limits)."""
    if settings["ERA_EGRESS_LOCAL"] != "proxy":
        return "ERA_EGRESS_LOCAL=host"
    try:
        mode = sandbox_mode(settings["ERA_SANDBOX"])
    except RuntimeError as exc:  # bwrap required and missing: every local kernel's start says so too
        return str(exc)
    if mode != "bwrap":
        return "no bubblewrap sandbox (ERA_SANDBOX=none, or bwrap not installed)"
    if os.geteuid() != 0:
        return "the server is not root, and the egress proxy's listener needs root to enter a sandbox"
    return None


class KernelLauncher:
    def __init__(self, settings: Settings, setups: "SetupManager", files: "SessionFiles", table: KernelTable,
                 events: EngineEvents) -> None:
        self.settings = settings
        self.setups = setups
        self.files = files
        self.table = table
        self.events = events
        self.spec_manager = EraKernelSpecManager()
        self._pool_uids: list[int] = []
        self._pool_uid_lock = asyncio.Lock()
        # Variables a session's kernel gets for its id (its storage token: set by the manager).
        self.session_env: Callable[[str], dict[str, str]] = lambda session_id: {}
        # The egress proxy's listeners in sandboxes (egress/gate.py; set by the manager).
        self.egress: EgressGate | None = None
        self._docker_networks: dict[str, tuple[float, bool]] = {}
        self._warned_local_egress = False

    # ---- network -----------------------------------------------------------------------------
    async def egress_policy(self, request: KernelRequest | SessionRecord) -> EgressPolicy | None:
        """The policy the egress proxy enforces for this kernel; None when its network is
        none at all or the provisioner's own. ``allowInternetAccess: true`` is the proxy
        with an allow-all policy (every public address; the host, loopback, private and
        link-local ranges stay refused) on a local sandbox (unless ERA_EGRESS_LOCAL says
        ``host``) and on a Docker engine without the egress network (no bridge, as in CI;
        unless ERA_EGRESS_DOCKER_FALLBACK says ``host``); on a Docker engine with that
        network, it is that network."""
        if isinstance(request.allow_internet, dict):
            return session_policy(request.allow_internet)
        if request.allow_internet is not True:
            return None
        if request.provisioner == "local":
            return EgressPolicy.allow_all() if self._local_egress_is_proxy() else None
        if (request.provisioner == "docker" and self.settings["ERA_EGRESS_DOCKER_FALLBACK"] == "proxy"
                and not await self._docker_network_exists(self.settings["ERA_DOCKER_EGRESS_NETWORK"])):
            return EgressPolicy.allow_all()
        return None

    def _local_egress_is_proxy(self) -> bool:
        why = local_egress_refusal(self.settings)
        if why is not None and not self._warned_local_egress:
            self._warned_local_egress = True
            log.warning("local sessions with allowInternetAccess: true share the host's network: %s", why)
        return why is None

    def _gvisor_egress(self, policy: EgressPolicy | None) -> dict[str, Any]:
        """gVisor with the proxy: network ``none`` still, but the runtime that passes
        sockets through to the container's namespace, where the proxy's listener is (the
        bare one's own network stack has a loopback of its own that no listener reaches)."""
        if policy is None:
            return {}
        networked = self.settings["ERA_DOCKER_GVISOR_NET_RUNTIME"]
        return {"gvisor_runtimes": (networked, networked)}

    async def _docker_network_exists(self, name: str) -> bool:
        at, found = self._docker_networks.get(name, (0.0, False))
        if time.monotonic() - at < 30.0:
            return found
        if not name:
            return False

        def look() -> bool:
            import docker

            from ..provisioning.docker import shared_docker_client

            try:
                shared_docker_client().networks.get(name)
                return True
            except docker.errors.NotFound:
                return False

        try:
            found = await asyncio.to_thread(look)
        except Exception as exc:  # the engine unreachable: the kernel's start reports that itself
            log.info("cannot look up Docker network %r: %s", name, exc)
            return False
        self._docker_networks[name] = (time.monotonic(), found)
        return found

    async def attach_egress(self, sid: str, kernel: SessionKernel) -> None:
        """Open the proxy's listener in the started kernel's sandbox, before any run can use it."""
        policy = getattr(kernel, "egress_policy", None)
        if policy is None:
            return
        if self.egress is None:
            raise KernelFailed("this session's network goes through the egress proxy, which this engine lacks")
        from ..ports import netns
        from ..ports.service import _sandbox_pid

        path = f"/proc/{await _sandbox_pid(kernel)}/ns/net"
        try:
            if await asyncio.to_thread(netns.same_namespace_as_ours, path):
                raise KernelFailed("the kernel's sandbox shares the server's network: the egress policy cannot "
                                   "be enforced")
            await self.egress.attach(sid, path, policy, kernel)
        except OSError as exc:
            raise KernelFailed(f"cannot open the egress proxy in the session's sandbox: {exc}") from None

    # ---- building --------------------------------------------------------------------------
    def startup_cells(self, request: KernelRequest, workspace: Path) -> list[str]:
        language = get_language(request.language)
        env = {"ERA_SESSION": "true", "ERA_SESSION_ID": request.session_id or "", "ERA_LANGUAGE": request.language,
               **(self.session_env(request.session_id) if request.session_id else {}), **request.env}
        # The working directory as the kernel sees it: containers mount it at /workspace.
        cwd = CONTAINER_WORKSPACE if request.provisioner == "docker" else str(workspace)
        return language.startup_cells(cwd, env, request.startup)

    def own_limits(self, limits: dict[str, Any] | None) -> dict[str, Any]:
        """A session's own ``limits`` as launch options: its memory is its cgroup's (or
        container's), while each process's address-space cap stays the server's (a
        kernel maps far more than it uses)."""
        limits = limits or {}
        own: dict[str, Any] = {}
        if "memory_mib" in limits:
            own.update(memory=limits["memory_mib"] * 1024**2, address_space=self.settings["ERA_KERNEL_MEMORY"])
        if "cpu_count" in limits:
            own["cpus"] = limits["cpu_count"]
        return own

    async def new_kernel(self, request: KernelRequest, workspace: Path, uid: int, *, cells: bool = True,
                         labels: dict[str, str] | None = None) -> SessionKernel:
        """A kernel for this request, not started; ``cells=False`` for a pooled one (its
        user's startup cells run when it is claimed)."""
        language = get_language(request.language)
        extras = await self.setups.launch_extras(request.language, request.provisioner, request.setup)
        if labels is None:
            labels = {"era.session": request.session_id} if request.session_id else {}
        policy = await self.egress_policy(request)
        # In the process environment, not a startup cell: the kernel reads it when it starts.
        env = {**sdk_env(extras["env"]), **({"ERA_TYPECHECK": "1"} if request.typecheck else {}),
               **(proxy_env(self.settings["ERA_EGRESS_PORT"]) if policy is not None else {})}
        launch = LaunchOptions.from_settings(
            self.settings, request.provisioner, workspace, uid=uid,
            allow_network=request.allow_internet is True and policy is None, env=env,
            labels=labels, readonly=(*extras["readonly"], *SDK_DIRS), **self.own_limits(request.limits),
            isolation=request.isolation or "runc", **self._gvisor_egress(policy),
            tmp_dir=self.files.tmp_path(workspace))  # the directory's /tmp, which outlives the kernel
        startup = extras["startup"] + self.startup_cells(request, workspace) if cells else []
        kernel = SessionKernel(self.spec_manager, language.kernelspec_name(request.provisioner), launch, startup,
                               start_timeout=self.settings["ERA_KERNEL_START_TIMEOUT"],
                               max_message=max(self.settings["ERA_KERNEL_MESSAGE_LIMIT"],
                                               2 * self.settings["ERA_OUTPUT_LIMIT"]))
        kernel.egress_policy = policy  # attach_egress opens its listener once the sandbox exists
        return kernel

    # ---- commands in a session's sandbox ---------------------------------------------------
    async def run_command(self, record: SessionRecord, argv: list[str], *, timeout: float,
                          allow_network: bool | None = None, env: dict[str, str] | None = None,
                          max_output: int = DEFAULT_MAX_OUTPUT, on_output: OutputSink | None = None) -> CommandResult:
        """Run ``argv`` in the session's sandbox, beside its kernel (not through it): its
        uid, its workspace as the working directory, its /tmp, its language's image or
        the local toolchain, its package environment read-only with the kernel's
        variables, the session's ``env`` then ``env``; network as ``allow_network`` says
        (default: the session's ``allowInternetAccess``). Kernel limits
        (``ERA_KERNEL_MEMORY``/``ERA_DOCKER_MEMORY``, pids). Past ``timeout`` seconds
        everything it started is killed and ``exit_code`` is 124. stdout and stderr
        come back apart, each up to ``max_output`` characters (``truncated``).
        See ``provisioning/commands.py``."""
        uid = session_uid(record)
        workspace = self.files.path(record)
        await self.files.ensure_ready(record, uid)  # mounted, restored, its /tmp made
        extras = await self.setups.launch_extras(record.language, record.provisioner, record.setup)
        # Network as the session's: a policy (or Docker without a bridge) is the egress
        # proxy, under the session's policy, as for its kernel and setup commands.
        hook = await self.command_egress(record) if allow_network is None or allow_network else None
        options = LaunchOptions.from_settings(
            self.settings, record.provisioner, workspace, uid=uid,
            allow_network=record.allow_internet is True if allow_network is None else allow_network,
            env={"ERA_SESSION": "true", "ERA_SESSION_ID": record.id, "ERA_LANGUAGE": record.language,
                 **sdk_env(extras["env"]), **self.session_env(record.id), **record.env, **(env or {})},
            labels={"era.session": record.id}, readonly=(*extras["readonly"], *SDK_DIRS),
            **self.own_limits(record.limits),
            isolation=record.isolation or "runc", tmp_dir=self.files.tmp_path(workspace))
        return await run_command(record.provisioner, options, argv, language=record.language, timeout=timeout,
                                 max_output=max_output, on_output=on_output, egress=hook)

    async def command_egress(self, record: SessionRecord) -> EgressHook | None:
        """For a command beside the kernel (setup, ``/api/vm/{id}/run``) that may use the
        network: the egress proxy's hook when the session's network is the proxy (a policy,
        or Docker without a bridge), else None (the provisioner's own network)."""
        policy = await self.egress_policy(record)
        if policy is None:
            return None
        if self.egress is None:
            raise KernelFailed("this session's network goes through the egress proxy, which this engine lacks")
        return self.egress.command_hook(record.id, policy)

    def command_sandbox(self, record: SessionRecord) -> CommandSandbox:
        """Where the session's setup writes its files and runs its commands."""
        uid = session_uid(record)
        workspace = self.files.path(record)

        async def write_file(name: str, data: bytes) -> None:
            await self.files.write(record, uid, name, data)

        async def finished() -> None:
            note = await self.files.sync(record)  # a persistent session keeps what its commands wrote
            if note:
                log.warning("session %s: %s", record.id, note)

        sandbox = _ReadySandbox(self.files, record, self.settings, record.provisioner, record.language, workspace,
                                self.files.tmp_path(workspace), uid, write_file=write_file, finished=finished,
                                isolation=record.isolation)

        sandbox.egress = lambda: self.setup_command_egress(record)
        return sandbox

    async def setup_command_egress(self, record: SessionRecord) -> EgressHook | None:
        """A setup command's network: the session's rule (``command_egress``) with the
        package registries added while setup runs: a policy session's commands reach its
        policy and the registries, a session without network the registries only, both
        through the egress proxy; ``true`` keeps the provisioner's own network. With
        ERA_SETUP_NETWORK=host (or a server that cannot use the proxy), the session's rule
        alone, as before (network off: the host's)."""
        registries = await self.setups.network.policy(record.provisioner)
        if registries is None:
            return await self.command_egress(record)
        policy = await self.egress_policy(record)
        if policy is None and record.allow_internet is True:
            return None
        if self.egress is None:
            raise KernelFailed("this session's setup goes through the egress proxy, which this engine lacks")
        return self.egress.command_hook(record.id, registries if policy is None else policy.with_registries(registries))

    # ---- sessions ------------------------------------------------------------------------
    def start_in_background(self, record: SessionRecord, lease: Lease, warm: WarmKernel | None = None) -> None:
        """Start (or claim) the session's kernel without waiting; the table holds the
        slot meanwhile. A failure is logged, and the next run tries again and reports it."""
        if not self.table.reserve(record.id, lease):  # a cold run started one meanwhile: keep that
            if warm is not None:
                asyncio.ensure_future(self._discard_claimed(warm))
            else:
                lease.release()
            return
        self._start_task(record, lease, warm)

    def _start_task(self, record: SessionRecord, lease: Lease, warm: WarmKernel | None = None) -> asyncio.Task:
        """The start (or claim) of the session's kernel, its slot reserved, as a task the
        table knows: whoever waits for it may stop waiting (a run interrupted or cancelled
        meanwhile) without stopping it; a restart or a delete cancels it."""
        start = self._claim(record, warm) if warm is not None else self._start(record, lease)
        task = asyncio.create_task(start, name=f"era-start-{record.id}")
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: no "never retrieved"
        self.table.mark_starting(record.id, task)
        return task

    def ready(self, session_id: str) -> SessionKernel | None:
        """The session's kernel if it is up (neither starting nor dead): no wait for it."""
        kernel = self.table.kernel(session_id)
        if kernel is not None and kernel.state != "dead" and self.table.starting(session_id) is None:
            return kernel
        return None

    async def ensure(self, record: SessionRecord) -> SessionKernel:
        """The session's live kernel, started now if it has none or its kernel died.
        Called under the session's run lock. A start it begins runs in a task of its own,
        like a background start: a run that stops waiting for it (``POST .../interrupt``)
        leaves the kernel coming up for the runs after it."""
        sid = record.id
        for _ in range(3):  # once, plus a race or two with a restart
            task = self.table.starting(sid)
            if task is not None:
                try:
                    await asyncio.shield(task)
                except asyncio.CancelledError:
                    if not task.cancelled() or _cancelling():
                        raise  # this run itself is being cancelled
                except Exception:
                    pass  # the background start failed: try once more below, reporting that error
            kernel = self.table.kernel(sid)
            if self.ready(sid) is not None:
                return kernel
            if kernel is not None:
                await self.table.stop(sid, kernel=kernel)  # dead: its slot goes back before a new one is taken
            lease = await self.table.admit()
            if not self.table.reserve(sid, lease):
                lease.release()  # a restart started one meanwhile: wait for that one
                continue
            own = self._start_task(record, lease)
            try:
                return await asyncio.shield(own)  # its failure is this run's error
            except asyncio.CancelledError:
                if not own.cancelled() or _cancelling():
                    raise  # this run itself is being cancelled (or interrupted): the start goes on
                # A restart (or a delete) cancelled it: look again for the kernel that replaced it.
        raise KernelFailed(f"the kernel of session {sid} kept being replaced while this run waited for it; retry")

    async def _discard_claimed(self, warm: WarmKernel) -> None:
        try:
            await self.discard_warm(warm)
        finally:
            warm.lease.release()

    async def _start(self, record: SessionRecord, lease: Lease) -> SessionKernel:
        """Start the session's kernel, its slot (``lease``) already in the table."""
        sid = record.id
        try:
            if record.setup:  # the environment must exist before a kernel is launched with it bound
                await self.setups.wait(sid)
                await self.setups.ensure(record.language, record.provisioner, record.setup)
            uid = session_uid(record)
            # Mounted before the sandbox binds it; and before the kernel's options are
            # built, since where its /tmp lives depends on its volume.
            await self.files.ensure_ready(record, uid)
            kernel = await self.new_kernel(record.kernel_request(), self.files.path(record), uid)
            self.table.attach(sid, kernel, lease)
            self.events.emit(sid, {"type": "status", "state": "starting"})
            began = time.monotonic()
            await kernel.start()
            await self.attach_egress(sid, kernel)
        except BaseException as exc:
            await self.table.start_failed(sid, lease)
            if isinstance(exc, KernelFailed):
                log.warning("session %s: %s", sid, exc.message)
            raise
        self.table.started(sid, lease)
        self.events.publish(KernelReplaced(sid, _started(record, False, round((time.monotonic() - began) * 1000, 1))))
        self.events.emit(sid, {"type": "status", "state": "idle"})
        return kernel

    async def _claim(self, record: SessionRecord, warm: WarmKernel) -> SessionKernel:
        """Make a pooled kernel the session's: its startup cells run now."""
        sid = record.id
        self.table.attach(sid, warm.kernel, warm.lease)
        try:
            await warm.kernel.claim(self.startup_cells(record.kernel_request(), warm.workdir))
        except BaseException:
            await self.table.start_failed(sid, warm.lease)
            raise
        self.table.started(sid, warm.lease)
        self.events.publish(KernelReplaced(sid, _started(record, True)))
        return warm.kernel

    # ---- the warm pool -------------------------------------------------------------------
    def pools_fork(self, keys: list[PoolKey]) -> bool:
        return pools_fork(self.settings, keys)

    async def spawn_warm(self, key: PoolKey, lease: Lease) -> WarmKernel:
        """Start a kernel for the pool (``lease`` is its slot): its own directory and uid,
        no network, its first cell already paid for."""
        language, provisioner = key
        uid = await self._pool_uid()
        workdir = self.files.pool_path(secrets.token_hex(8))
        request = KernelRequest(language, provisioner)
        ws = await self.files.make_dir(workdir, uid)  # with its volume: the session that claims it keeps it
        kernel = None
        try:
            kernel = await self.new_kernel(request, workdir, uid, cells=False,
                                           labels={"era.pool": f"{language}-{provisioner}"})
            await kernel.start()
            # A kernel's first cell pays for lazy imports and caches; pay it here, not in the
            # claiming user's first request (silent: the user's execution count starts at 1).
            cells = self.startup_cells(request, ws.root)
            for cell in cells:
                await kernel.execute(cell, timeout=self.settings["ERA_KERNEL_START_TIMEOUT"], silent=True)
        except BaseException:
            if kernel is not None:
                await kernel.stop(now=True)
            await self.files.remove_dir(ws.root)
            raise
        return WarmKernel(kernel, key, ws.root, uid, cells, lease)

    async def discard_warm(self, warm: WarmKernel) -> None:
        """Stop a pooled kernel nobody claimed and remove its directory (not its slot: the
        pool gives that back, or hands it to admission)."""
        await warm.kernel.stop(now=True)
        await self.files.remove_dir(warm.workdir)

    async def _pool_uid(self) -> int:
        if os.getuid() != 0:
            return os.getuid()
        async with self._pool_uid_lock:  # the pool starts several at once: one reservation at a time
            if not self._pool_uids:
                self._pool_uids = await asyncio.to_thread(reserve_uids, self.settings.data_dir / POOL_UID_FILE,
                                                          POOL_UID_BASE, POOL_UID_BLOCK)
            return self._pool_uids.pop()


class _ReadySandbox(CommandSandbox):
    """A session's sandbox whose directories are made ready (volume mounted, /tmp made)
    before each command, as they are before each kernel start."""

    def __init__(self, files: "SessionFiles", record: SessionRecord, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._files, self._record = files, record

    async def run(self, argv, **kwargs) -> CommandResult:
        await self._files.ensure_ready(self._record, self.uid)
        self.tmp_dir = self._files.tmp_path(self.workspace)  # known once the volume is mounted
        return await super().run(argv, **kwargs)


def _cancelling() -> bool:
    """This task is being cancelled itself (not only what it waited for)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _started(record: SessionRecord, pooled: bool, start_ms: float | None = None) -> dict[str, object]:
    """``KernelReplaced.details``: what kind of kernel started, and how (the session log keeps it)."""
    return {"language": record.language, "provisioner": record.provisioner, "pooled": pooled, "start_ms": start_ms}
