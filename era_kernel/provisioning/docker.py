"""``era-docker``: one Docker container per kernel, talking to the host over IPC sockets.

Any Jupyter application can launch it from a kernelspec whose
``metadata.kernel_provisioner.provisioner_name`` is ``era-docker``; the kernelspec's argv
is run inside the container (name the interpreter as the image sees it, e.g. ``python``,
and prefer ``"interrupt_mode": "message"``). The ERA engine adds per-session options
through the ``era`` keyword of ``KernelManager.start_kernel``: ``workspace``,
``runtime_dir``, ``allow_network``, ``memory``, ``pids``, ``cpus``, ``env``, ``uid``,
``image``, ``labels``, ``readonly``, ``isolation``. Without them, defaults come from this provisioner's traitlets
config (``metadata.kernel_provisioner.config`` in kernel.json), then from
``Settings.from_env()`` read at launch (``ERA_DOCKER_MEMORY``, ``ERA_DOCKER_CPUS``,
``ERA_DOCKER_PIDS``, ``ERA_DOCKER_EGRESS_NETWORK``, ``ERA_DOCKER_IMAGE_PREFIX``), then
from the built-in values below.

The container, exactly (nothing in it comes from a request except validated values):
- image ``<prefix>/<language>:latest`` unless given; names checked against Docker's
  reference grammar, so ``--privileged`` or ``-v /:/host`` are refused;
- network ``none``; with ``allow_network``, the Docker network named by
  ``egress_network`` when the operator created one (it should reach out but drop the
  host's addresses and 169.254.0.0/16, e.g. DOCKER-USER iptables rules). An engine
  with no bridge (as started by scripts/bootstrap-docker.sh) has no such network, and
  the fallback is host networking, which EXPOSES the host's loopback services (the ERA
  server itself included, and a Docker API if one listens on TCP), the cloud metadata
  address, and abstract unix sockets of the host's network namespace; the filesystem,
  users and process isolation stay. Set ``host_network_fallback=False`` to refuse instead;
- read-only root filesystem, ``/tmp`` (HOME and IPython's directory live there): the
  session's own directory (``tmp_dir``, which outlives the container), else a tmpfs;
  the workspace read-write at ``/workspace`` as the working directory, the kernel's IPC
  directory read-write at its host path, the ``readonly`` directories (a session's package
  environment) read-only at their host paths, and nothing else of the host;
- a non-root uid:gid (the session's ``uid``, who owns the workspace; else 1000 when the
  server runs as root, or the server's own uid; uid 0 is refused), ``cap_drop=ALL``,
  ``no-new-privileges``, Docker's default seccomp profile, an init process (so signals
  reach the kernel and zombies are reaped);
- memory (swap included) 512 MiB, 1 CPU, 256 processes unless configured;
- environment: the image's, plus only what we pass (never the server's own variables);
- ``isolation`` ``gvisor``: the same container under gVisor's runsc runtime (its own
  kernel in user space between the code and the host's), the runtime named by
  ``gvisor_runtimes`` for its network (see ``oci_runtime``). The IPC sockets still
  cross: runsc is registered with ``--host-uds=create``, so a socket the kernel binds in
  the bind-mounted IPC directory is a host socket the server connects to; and
  ``--oci-seccomp``, with our profile (``GVISOR_SECCOMP``) instead of Docker's default.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import threading
from pathlib import Path
from typing import Any, Iterable

import docker
import docker.errors
from docker.types import LogConfig, Mount
from traitlets import Bool, Float, Int, Unicode

from ..errors import BadRequest, KernelFailed
from ..validation import env_problem
from ..images.reference import validate_image_ref, validate_language
from .base import EraProvisioner, LaunchOptions
from .gvisor import oci_runtime, process_limits, runtime_error, security_options
from .ipc import (format_argv, host_connection_info, ipc_connection_info, make_kernel_dir, remove_kernel_dir,
                  seal_kernel_dir, write_connection_file)
from .owner import me

log = logging.getLogger("era.provisioning.docker")

LABEL_MANAGED = "era.managed"
LABEL_KERNEL = "era.kernel"
LABEL_KERNEL_ID = "era.kernel_id"
LABEL_OWNER = "era.owner"  # pid of the process that launched it: reapers leave live owners alone
LABEL_OWNER_START = "era.owner_start"  # and its start time, so a reused pid is not taken for it
CONTAINER_WORKSPACE = "/workspace"
# The venv of the era/<language> images; what {prefix} in a kernelspec argv means inside.
IMAGE_PREFIX = "/opt/era/venv"

MIN_MEMORY = 16 * 1024**2  # below this the engine refuses, or the kernel cannot even start
DEFAULT_UID = 1000

_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}", re.ASCII)
_HOST_FALLBACK_WARNED = False

_client_lock = threading.Lock()
_clients: dict[str, Any] = {}


def shared_docker_client() -> Any:
    """One Docker client per DOCKER_HOST for the whole process (read when first needed)."""
    key = os.environ.get("DOCKER_HOST", "")
    with _client_lock:
        if key not in _clients:
            _clients[key] = docker.from_env(timeout=60, max_pool_size=32)
        return _clients[key]


def _default_uid() -> int:
    return DEFAULT_UID if os.getuid() == 0 else os.getuid()


def _check_labels(labels: Any) -> dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise BadRequest("labels must be an object of strings", field="labels")
    out = {}
    for key, value in labels.items():
        reserved = key in (LABEL_MANAGED, LABEL_KERNEL, LABEL_KERNEL_ID, LABEL_OWNER, LABEL_OWNER_START)
        if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key) or reserved:
            raise BadRequest(f"invalid label {str(key)[:64]!r}", field="labels")
        if not isinstance(value, str) or len(value) > 1024 or any(ord(c) < 32 for c in value):
            raise BadRequest(f"label {key} must be a short printable string", field="labels")
        out[key] = value
    return out


def _check_readonly(paths: Any) -> list[str]:
    """``readonly``: existing host directories, bound read-only at the same path."""
    if paths is None:
        return []
    if not isinstance(paths, (list, tuple)):
        raise BadRequest("readonly must be a list of absolute directory paths", field="readonly")
    out = []
    for path in paths:
        if (not isinstance(path, str) or "\0" in path or not os.path.isabs(path) or os.path.normpath(path) != path
                or path in ("/", CONTAINER_WORKSPACE) or not os.path.isdir(path)):
            raise BadRequest(f"readonly path {str(path)[:80]!r} is not an absolute directory path", field="readonly")
        out.append(path)
    return out


class EraDockerProvisioner(EraProvisioner):
    """Runs the kernelspec's argv in a locked-down container; the host talks to it over IPC."""

    image = Unicode("", config=True, help="image to run; default <ERA_DOCKER_IMAGE_PREFIX>/<language>:latest")
    memory_limit = Int(0, config=True, help="memory limit in bytes (swap included); default 512 MiB")
    cpus = Float(0.0, config=True, help="CPU limit in cores; default 1")
    pids_limit = Int(0, config=True, help="process limit; default 256")
    allow_network = Bool(False, config=True, help="give the kernel outbound network access")
    egress_network = Unicode("", config=True, help="Docker network for allow_network; default era-egress")
    host_network_fallback = Bool(True, config=True,
                                 help="with allow_network and no egress network, use host networking (see module doc)")
    uid = Int(0, config=True, help="uid the kernel runs as when the session gives none; default 1000 when the "
                                   "server runs as root, else the server's own uid (it must own the IPC directory)")
    tmp_size = Unicode("256m", config=True, help="size of the /tmp tmpfs (counts against the memory limit)")
    runtime = Unicode("", config=True, help="OCI runtime, e.g. runsc for gVisor; default the engine's")
    isolation = Unicode("", config=True, help="runc or gvisor (a kernelspec's choice, as a session's isolation)")

    container_id: str | None = None
    kernel_dir: Path | None = None
    _exit_code: int | None = None
    _ipc_info: dict[str, Any] | None = None
    oom_killed: bool = False  # set by poll(): the engine says "out of memory" (docs/security.md case 8)
    _waited: bool = False
    _container_spec: dict[str, Any] | None = None
    _docker: Any = None

    @property
    def client(self) -> Any:
        return self._docker if self._docker is not None else shared_docker_client()

    @client.setter
    def client(self, client: Any) -> None:  # tests and embedders may bring their own client
        self._docker = client

    @property
    def has_process(self) -> bool:
        """Asserted by the KernelManager right after launch_kernel; False once wait() saw the exit."""
        return self.container_id is not None and not self._waited

    # ------------------------------------------------------------------ launch

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Called by the KernelManager before launch: resolve options, make the IPC dir.

        Does not call the base class: its environment handling starts from the host's
        ``os.environ``, and none of it may reach the container. The connection file is
        ours (IPC); ``launch_kernel`` returns its info and the manager adopts it.
        """
        incoming_env: dict[str, str] = kwargs.pop("env", None) or {}
        extra_arguments = kwargs.pop("extra_arguments", None) or []
        kwargs.pop("transport_encryption", None)
        options = LaunchOptions.given(kwargs.pop("era", None), "docker", Path(kwargs.pop("cwd", None) or os.getcwd()),
                                      config=self._configured())
        uid = options.uid if options.uid is not None else (self.uid or _default_uid())
        # As root we pick the group too; otherwise it must be one of ours to chown to it.
        gid = uid if os.getuid() == 0 else os.getgid()
        if options.memory < MIN_MEMORY:
            raise BadRequest(f"memory must be at least {MIN_MEMORY} bytes", field="memory")
        image = self._image(options)
        labels = _check_labels(options.labels)
        env = self._kernel_env(incoming_env, options.env)
        network = await self._network_mode(options)
        workspace, readonly, connection_file = await asyncio.to_thread(self._prepare, options, uid, gid)
        info = self._ipc_info
        argv = format_argv(list(self.kernel_spec.argv) + list(extra_arguments), connection_file=str(connection_file),
                           resource_dir="", prefix=IMAGE_PREFIX)
        self._container_spec = dict(
            image=image,
            entrypoint=argv[:1],
            command=argv[1:],
            name=f"era-{self.kernel_dir.name}",
            hostname="era",
            user=f"{uid}:{gid}",
            working_dir=CONTAINER_WORKSPACE,
            environment=env,
            labels={**labels, LABEL_MANAGED: "1", LABEL_KERNEL: self.kernel_dir.name,
                    LABEL_KERNEL_ID: str(self.kernel_id or ""), LABEL_OWNER: str(me()[0]),
                    LABEL_OWNER_START: str(me()[1])},
            mounts=[Mount(target=CONTAINER_WORKSPACE, source=str(workspace), type="bind", read_only=False),
                    Mount(target=str(self.kernel_dir), source=str(self.kernel_dir), type="bind", read_only=False),
                    *(Mount(target=path, source=path, type="bind", read_only=True) for path in readonly),
                    *([Mount(target="/tmp", source=str(options.tmp_dir), type="bind", read_only=False)]
                      if options.tmp_dir is not None else [])],
            # The session's /tmp when it has one (it outlives this container), else a tmpfs.
            tmpfs=None if options.tmp_dir is not None else {"/tmp": f"rw,nosuid,nodev,mode=1777,size={self.tmp_size}"},
            read_only=True,
            network_mode=network,
            cap_drop=["ALL"],
            security_opt=security_options(options),
            init=True,
            mem_limit=options.memory,
            memswap_limit=options.memory,  # no swap beyond the limit
            nano_cpus=int(options.cpus * 1e9),
            **process_limits(options),
            log_config=LogConfig(type="json-file", config={"max-size": "1m", "max-file": "1"}),
            detach=True,
        )
        runtime = self.runtime or oci_runtime(options, network)
        if runtime:
            self._container_spec["runtime"] = runtime
        self.connection_info = host_connection_info(info, self.kernel_dir)
        self._exit_code, self._waited, self.oom_killed = None, False, False
        return {"cmd": argv, **kwargs}

    def _configured(self) -> dict[str, Any]:
        """The kernelspec's provisioner config, as launch options (a plain Jupyter launch's)."""
        return {"image": self.image or None, "memory": self.memory_limit, "cpus": self.cpus, "pids": self.pids_limit,
                "allow_network": self.allow_network or None, "egress_network": self.egress_network,
                "isolation": self.isolation}

    def _prepare(self, options: LaunchOptions, uid: int, gid: int) -> tuple[Path, list[str], Path]:
        """Blocking (pre_launch runs it in a thread): check the directories to mount, make
        the IPC directory and connection file, and give them to the kernel's uid. A
        restart keeps the directory, socket paths and key, so clients connected to the
        old kernel reach the new one (as TCP kernels keep their ports)."""
        workspace = options.workspace.resolve()
        if not workspace.is_dir():
            raise BadRequest(f"workspace {workspace} is not a directory", field="workspace")
        readonly = _check_readonly(options.readonly)
        if self.kernel_dir is None or self._ipc_info is None or not self.kernel_dir.is_dir():
            self.kernel_dir = make_kernel_dir(options.runtime_dir)
            self._ipc_info = ipc_connection_info(self.kernel_dir)
            self._ipc_info["kernel_name"] = self.kernel_spec.language or ""
        connection_file = write_connection_file(self.kernel_dir, self._ipc_info)
        try:  # the kernel's uid must create its sockets here and read the connection file
            for path in (self.kernel_dir, connection_file):
                os.chown(path, uid, gid)
        except PermissionError:
            self._discard_kernel_dir()
            raise KernelFailed(f"cannot give the IPC directory to uid {uid}: run the server as root, "
                               f"or set the kernel uid to {os.getuid()}") from None
        return workspace, readonly, connection_file

    def _image(self, options: LaunchOptions) -> str:
        if options.image:
            return validate_image_ref(options.image)
        language = validate_language((self.kernel_spec.language or "").lower())
        return validate_image_ref(f"{options.image_prefix}/{language}:latest")

    def _kernel_env(self, incoming: dict[str, str], requested: dict[str, str]) -> dict[str, str]:
        # The kernelspec's env stanza is trusted config; JPY_* are Jupyter's session hints.
        # Nothing else of the server's environment crosses into the container.
        env = {k: str(v) for k, v in (self.kernel_spec.env or {}).items()}
        env.update({k: v for k, v in incoming.items() if k.startswith("JPY_")})
        env.update(requested)
        env.update({"HOME": "/tmp", "IPYTHONDIR": "/tmp/.ipython", "MPLCONFIGDIR": "/tmp/.mpl",
                    "PYTHONUNBUFFERED": "1"})
        for key, value in env.items():
            problem = env_problem(key, value)
            if problem:
                raise BadRequest(problem, field="env")
        return env

    async def _network_mode(self, options: LaunchOptions) -> str:
        if not options.allow_network:
            return "none"
        name = options.egress_network
        try:
            await asyncio.to_thread(self.client.networks.get, name)
            return name
        except docker.errors.NotFound:
            pass
        if not self.host_network_fallback:
            raise KernelFailed(f"network access requested but Docker network {name!r} does not exist")
        global _HOST_FALLBACK_WARNED
        if not _HOST_FALLBACK_WARNED:
            _HOST_FALLBACK_WARNED = True
            log.warning("Docker network %r not found: kernels with network access use HOST networking and can reach "
                        "the host's loopback services and link-local metadata; create %r to restrict them", name, name)
        return "host"

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> dict[str, Any]:
        """Called by the KernelManager after pre_launch: create and start the container.

        Returns the IPC connection info (host-side socket paths), which the manager adopts.
        """
        assert self._container_spec is not None, "pre_launch must run first"
        spec, self._container_spec = self._container_spec, None
        try:
            container = await asyncio.to_thread(self.client.containers.create, **spec)
        except docker.errors.ImageNotFound:
            self._discard_kernel_dir()
            raise KernelFailed(f"image {spec['image']} not found; build it with `era images build`") from None
        except docker.errors.APIError as exc:
            self._discard_kernel_dir()
            raise KernelFailed(runtime_error(spec.get("runtime"), exc)
                               or f"cannot create the kernel container: {exc.explanation or exc}") from None
        try:
            await asyncio.to_thread(container.start)
        except docker.errors.APIError as exc:
            await asyncio.to_thread(self._remove_container, container.id)
            self._discard_kernel_dir()
            raise KernelFailed(f"cannot start the kernel container: {exc.explanation or exc}") from None
        self.container_id = container.id
        (self.kernel_dir / "container").write_text(container.id)  # for humans and reapers
        return self.connection_info

    # ------------------------------------------------------------------ process-like control

    async def poll(self) -> int | None:
        """Called by KernelManager.is_alive (and the restarter, every few seconds).

        None while the container runs; its exit code once it stopped.
        """
        if self._exit_code is not None:
            return self._exit_code
        if self.container_id is None:
            return 0
        try:
            state = (await asyncio.to_thread(self.client.api.inspect_container, self.container_id))["State"]
        except docker.errors.NotFound:
            self._exit_code = -1  # removed behind our back
            return self._exit_code
        if state.get("Status") in ("created", "running", "restarting", "paused"):
            return None
        self._exit_code = int(state.get("ExitCode", -1))
        self.oom_killed = bool(state.get("OOMKilled"))
        if self.oom_killed:
            log.warning("kernel container %s was killed by the out-of-memory killer", self.container_id[:12])
        return self._exit_code

    async def wait(self) -> int | None:
        """Called by KernelManager.finish_shutdown / kill_kernel once the kernel should be gone."""
        while (code := await self.poll()) is None:
            await asyncio.sleep(0.1)
        self._waited = True
        return code

    async def send_signal(self, signum: int) -> None:
        """Called by KernelManager.signal_kernel (interrupts in "signal" mode send SIGINT).

        Delivered to the container's init, which forwards it to the kernel.
        """
        if signum == 0:
            await self.poll()
            return
        await self._kill(signum)

    async def kill(self, restart: bool = False) -> None:
        """Called by KernelManager.kill_kernel (shutdown with now=True, or after a timeout): SIGKILL."""
        await self._kill(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        """Called by KernelManager.finish_shutdown when the kernel ignored the shutdown request."""
        await self._kill(signal.SIGTERM)

    async def _kill(self, signum: int) -> None:
        if self.container_id is None or self._exit_code is not None:
            return
        try:
            await asyncio.to_thread(self.client.api.kill, self.container_id, int(signum))
        except docker.errors.NotFound:
            self._exit_code = -1
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # 409: not running any more, which is what we wanted
                raise

    async def cleanup(self, restart: bool = False) -> None:
        """Called by KernelManager.cleanup_resources after the kernel stopped (or failed to start).

        Removes the container (killing whatever is left in it, forked children included)
        and, unless this precedes a restart, the IPC directory. A restart launches a fresh
        container through pre_launch, reusing the directory and connection info.
        """
        if self.container_id is not None:
            await asyncio.to_thread(self._remove_container, self.container_id)
        self.container_id, self._waited = None, False
        if not restart:
            await asyncio.to_thread(self._discard_kernel_dir)

    def kernel_log(self, limit: int = 2000) -> str:
        """The tail of the container's own output (its json-file log, capped at 1 MiB by
        the log driver). Called by ERA's SessionKernel when a start fails."""
        if self.container_id is None:
            return ""
        tails = []
        # Each stream on its own: Docker interleaves them as its two pipes are read, and a
        # kernel's last stdout line can be logged before its last burst of stderr.
        for stream in ("stdout", "stderr"):
            try:
                raw = self.client.api.logs(self.container_id, stdout=stream == "stdout",
                                           stderr=stream == "stderr", tail=50)
            except Exception:
                continue
            tails.append(raw.decode(errors="replace")[-(limit // 2):])
        return "\n".join(t for t in tails if t.strip())

    def oom_kills(self) -> int | None:
        """Docker reports a kill of the kernel itself (``oom_killed``), not of its children."""
        return None

    async def seal_ipc(self) -> None:
        """Called by ERA's SessionKernel once the kernel answered, before any user code runs:
        the kernel may no longer change its socket directory (``ipc.seal_kernel_dir``)."""
        await asyncio.to_thread(seal_kernel_dir, self.kernel_dir)

    def _discard_kernel_dir(self) -> None:
        remove_kernel_dir(self.kernel_dir)
        self.kernel_dir, self._ipc_info = None, None

    def _remove_container(self, container_id: str) -> None:
        remove_container(self.client, container_id)

    # ------------------------------------------------------------------ persistence

    async def get_provisioner_info(self) -> dict[str, Any]:
        """Called by applications that persist kernels, to re-attach from another process."""
        info = await super().get_provisioner_info()
        info.update(container_id=self.container_id, kernel_dir=str(self.kernel_dir) if self.kernel_dir else None)
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        """The inverse of get_provisioner_info."""
        await super().load_provisioner_info(provisioner_info)
        self.container_id = provisioner_info.get("container_id")
        kernel_dir = provisioner_info.get("kernel_dir")
        self.kernel_dir = Path(kernel_dir) if kernel_dir else None


def remove_container(client: Any, container_id: str) -> None:
    """Blocking: force-remove a container (and its anonymous volumes); gone already is fine."""
    try:
        client.api.remove_container(container_id, force=True, v=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:
        if exc.status_code != 409:  # 409: removal already in progress
            raise


async def reap_orphan_containers(client: Any = None, keep: Iterable[str] = ()) -> int:
    """Remove containers labelled ``era.managed=1`` left by a server that died.

    Called by the engine at start, before it launches kernels. Running, exited and
    never-started (``created``) containers are all removed, except those whose id, name
    or ``era.kernel`` label is in ``keep``. Returns how many were removed.
    """
    keep_set = set(keep)

    def reap() -> int:
        docker_client = client or shared_docker_client()
        removed = 0
        for item in docker_client.api.containers(all=True, filters={"label": f"{LABEL_MANAGED}=1"}):
            names = {n.lstrip("/") for n in item.get("Names") or []}
            kernel = (item.get("Labels") or {}).get(LABEL_KERNEL)
            if item["Id"] in keep_set or kernel in keep_set or names & keep_set:
                continue
            try:
                docker_client.api.remove_container(item["Id"], force=True, v=True)
                removed += 1
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                log.warning("cannot remove orphan container %s: %s", item["Id"][:12], exc)
        return removed

    return await asyncio.to_thread(reap)
