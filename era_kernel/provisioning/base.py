"""What ERA's provisioners are given and what they promise, beyond jupyter_client's
``KernelProvisionerBase``.

``LaunchOptions`` is everything one kernel launch needs to know about its session and
the engine's settings, typed, built by whoever launches: the engine builds it from its
own ``Settings`` (``LaunchOptions.from_settings``) and passes it as the ``era`` keyword
of ``KernelManager.start_kernel``; a plain Jupyter application launching one of our
kernelspecs passes nothing, and the provisioner builds it from the process environment
(``LaunchOptions.from_env``), the only place a provisioner reads it. A provisioner
never reads settings of its own.

``EraProvisioner`` is the contract ERA's ``SessionKernel`` relies on, each method saying
who calls it and when (jupyter_client's base is the model). Provisioners raise engine
errors (``era_kernel.errors``), never HTTP ones.
"""

from __future__ import annotations

import abc
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jupyter_client.provisioning import KernelProvisionerBase

from ..errors import BadRequest
from ..validation import env_problem

if TYPE_CHECKING:
    from ..config import Settings

# A Docker kernel's wall: the engine's default OCI runtime, or gVisor's runsc (README, "gVisor").
ISOLATIONS = ("runc", "gvisor")


@dataclass(frozen=True)
class LaunchOptions:
    """One kernel launch. Fields a provisioner does not use are ignored by it."""

    workspace: Path  # the session's directory: the kernel's working directory (/workspace in a container)
    runtime_dir: Path  # where the kernel's IPC directory is made (short: socket paths <= 107 bytes)
    hidden: tuple[str, ...] = ()  # host directories the sandbox masks (the data and runtime directories)
    uid: int | None = None  # the session's uid; None: the provisioner's default (never root)
    allow_network: bool = False
    env: dict[str, str] = field(default_factory=dict)  # added to the kernel's environment
    labels: dict[str, str] = field(default_factory=dict)  # container labels (era.session, era.pool)
    readonly: tuple[str, ...] = ()  # host directories bound read-only at the same path (package environments)
    memory: int = 2 * 1024**3  # bytes: the session's cgroup (era-local) or the container's limit (era-docker)
    # era-local: each process's RLIMIT_AS when above ``memory``. A session's own smaller
    # limit is its cgroup's, not an address-space cap: a kernel maps far more than it uses.
    address_space: int = 0
    pids: int = 256
    cpus: float = 1.0  # era-docker
    sandbox: str = "auto"  # era-local: auto | bwrap | none
    launcher: str = "fork"  # era-local: fork (Python kernels forked from a zygote: launch_fork.py) | bwrap
    tmp_size: int = 256 * 1024**2  # era-local: the sandbox's private /tmp (a tmpfs), when tmp_dir is None
    # The session's own /tmp: a host directory bound at /tmp (read-write), which outlives
    # the kernel (restarts keep it); None: a private tmpfs per kernel (pooled kernels, a
    # plain Jupyter launch). Made and removed by whoever launches, never by a provisioner.
    tmp_dir: Path | None = None
    cgroups: str = "auto"  # era-local: auto | on | off
    image_prefix: str = "era"  # era-docker: images are <prefix>/<language>:latest unless `image` is given
    image: str | None = None
    egress_network: str = "era-egress"  # era-docker: the network of sessions with internet access
    # era-docker: "runc" (the engine's default runtime) or "gvisor" (the runtimes below:
    # the first without network, the second with the container's network passed through).
    isolation: str = "runc"
    gvisor_runtimes: tuple[str, str] = ("runsc", "runsc-net")

    def __post_init__(self) -> None:
        _check(self)

    @classmethod
    def from_settings(cls, settings: "Settings", provisioner: str, workspace: Path, **session: Any) -> "LaunchOptions":
        """Called by the engine for every kernel it launches: its settings for this
        provisioner, plus the session's own fields (``uid``, ``allow_network``, ``env``,
        ``labels``, ``readonly``, and its own ``memory`` / ``cpus`` below the settings')."""
        s = settings
        docker = provisioner == "docker"
        fields: dict[str, Any] = dict(
            workspace=Path(workspace), runtime_dir=Path(s.runtime_dir), hidden=(str(s.data_dir), str(s.runtime_dir)),
            memory=s["ERA_DOCKER_MEMORY"] if docker else s["ERA_KERNEL_MEMORY"],
            pids=s["ERA_DOCKER_PIDS"] if docker else s["ERA_KERNEL_PIDS"], cpus=s["ERA_DOCKER_CPUS"],
            sandbox=s["ERA_SANDBOX"], launcher=s["ERA_LOCAL_LAUNCHER"], tmp_size=s["ERA_KERNEL_TMP_SIZE"],
            cgroups=s["ERA_KERNEL_CGROUPS"], image_prefix=s["ERA_DOCKER_IMAGE_PREFIX"],
            egress_network=s["ERA_DOCKER_EGRESS_NETWORK"],
            gvisor_runtimes=(s["ERA_DOCKER_GVISOR_RUNTIME"], s["ERA_DOCKER_GVISOR_NET_RUNTIME"]))
        return cls(**{**fields, **session})

    @classmethod
    def given(cls, era: "LaunchOptions | Mapping[str, Any] | None", provisioner: str, workspace: Path,
              config: Mapping[str, Any] | None = None) -> "LaunchOptions":
        """Called by a provisioner's ``pre_launch`` with its ``era`` keyword: the engine's
        options as they are; else the process environment's settings (a plain Jupyter
        application launching our kernelspec, the only place the environment is read),
        overridden by the kernelspec's provisioner ``config`` and then by a mapping of
        field names (embedders and tests). Every value is checked: ``BadRequest`` names
        the field."""
        if isinstance(era, LaunchOptions):
            return era
        from ..config import Settings

        options = cls.from_settings(Settings.from_env(), provisioner, workspace)
        changes = {k: v for k, v in (config or {}).items() if v not in (None, "", 0)}
        changes.update(era or {})
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise BadRequest(f"unknown launch option {unknown[0]!r}", field=unknown[0])
        for name in ("workspace", "runtime_dir", "tmp_dir"):
            if changes.get(name) is not None:
                changes[name] = Path(changes[name])
        for name in ("readonly", "hidden", "gvisor_runtimes"):
            if isinstance(changes.get(name), list):
                changes[name] = tuple(changes[name])
        return dataclasses.replace(options, **changes)

    def replace(self, **changes: Any) -> "LaunchOptions":
        return dataclasses.replace(self, **changes)


def _positive(options: LaunchOptions, name: str, kind: type) -> None:
    value = getattr(options, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise BadRequest(f"{name} must be a number", field=name)
    if value <= 0 or value > 2**62:
        raise BadRequest(f"{name} must be positive", field=name)


def _check(options: LaunchOptions) -> None:
    """Every value a launch may carry into a command line or a container's configuration."""
    if options.uid is not None:
        _positive(options, "uid", int)  # never root
    for name, kind in (("memory", int), ("pids", int), ("cpus", float), ("tmp_size", int)):
        _positive(options, name, kind)
    if not isinstance(options.env, Mapping):
        raise BadRequest("env must be an object of strings", field="env")
    for key, value in options.env.items():
        problem = env_problem(key, value)
        if problem:
            raise BadRequest(problem, field="env")
    if not isinstance(options.labels, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in options.labels.items()):
        raise BadRequest("labels must be an object of strings", field="labels")
    if not isinstance(options.readonly, tuple):
        raise BadRequest("readonly must be a list of absolute directory paths", field="readonly")
    for path in options.readonly:
        if not isinstance(path, str) or "\0" in path or not os.path.isabs(path) or os.path.normpath(path) != path \
                or path == "/":
            raise BadRequest(f"readonly path {str(path)[:80]!r} is not an absolute directory path", field="readonly")
    if options.tmp_dir is not None and (not isinstance(options.tmp_dir, Path) or not options.tmp_dir.is_absolute()):
        raise BadRequest("tmp_dir must be an absolute directory path", field="tmp_dir")
    if options.sandbox not in ("auto", "bwrap", "none"):
        raise BadRequest("sandbox must be auto, bwrap or none", field="sandbox")
    if options.launcher not in ("bwrap", "fork"):
        raise BadRequest("launcher must be bwrap or fork", field="launcher")
    if options.cgroups not in ("auto", "on", "off"):
        raise BadRequest("cgroups must be auto, on or off", field="cgroups")
    if options.isolation not in ISOLATIONS:
        raise BadRequest(f"isolation must be one of {', '.join(ISOLATIONS)}", field="isolation")



class EraProvisioner(KernelProvisionerBase):
    """The parts of a provisioner ERA's ``SessionKernel`` calls, besides jupyter_client's."""

    @abc.abstractmethod
    async def seal_ipc(self) -> None:
        """Called by ``SessionKernel.start`` once the kernel has answered ``kernel_info``,
        before any user code runs: the kernel may no longer change its socket directory."""

    @abc.abstractmethod
    def kernel_log(self, limit: int = 2000) -> str:
        """Called by ``SessionKernel`` when a start fails: the tail of the kernel process's
        own output, to put its last words into the error."""

    @abc.abstractmethod
    def oom_kills(self) -> int | None:
        """Called by ``SessionKernel`` before and after each run: how many processes of the
        kernel's session the out-of-memory killer has killed since launch (None when the
        provisioner cannot count). A cheap read, no I/O that can block."""

    @property
    @abc.abstractmethod
    def oom_killed(self) -> bool:
        """Read by ``SessionKernel`` after the kernel died: was it for lack of memory?"""
