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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jupyter_client.provisioning import KernelProvisionerBase

if TYPE_CHECKING:
    from ..config import Settings


@dataclass(frozen=True)
class LaunchOptions:
    """One kernel launch. Fields a provisioner does not use are ignored by it."""

    workspace: Path  # the session's directory: the kernel's working directory (/workspace in a container)
    runtime_dir: Path  # where the kernel's IPC directory is made (short: socket paths <= 107 bytes)
    hidden: tuple[str, ...] = ()  # host directories the sandbox masks (the data and runtime directories)
    uid: int | None = None  # the session's uid; None: the provisioner's default
    allow_network: bool = False
    env: dict[str, str] = field(default_factory=dict)  # added to the kernel's environment
    labels: dict[str, str] = field(default_factory=dict)  # container labels (era.session, era.pool)
    readonly: tuple[str, ...] = ()  # host directories bound read-only at the same path (package environments)
    # era-local
    sandbox: str = "auto"  # auto | bwrap | none
    memory: int = 2 * 1024**3  # the session's memory (its cgroup; RLIMIT_AS per process too)
    pids: int = 256
    tmp_size: int = 256 * 1024**2  # the sandbox's private /tmp
    cgroups: str = "auto"  # auto | on | off
    # era-docker
    image_prefix: str = "era"  # images are <prefix>/<language>:latest unless `image` is given
    image: str | None = None
    container_memory: int = 512 * 1024**2
    container_cpus: float = 1.0
    container_pids: int = 256
    egress_network: str = "era-egress"

    @classmethod
    def from_settings(cls, settings: "Settings", workspace: Path, **session: Any) -> "LaunchOptions":
        """Called by the engine for every kernel it launches: its settings, plus the
        session's own fields (``uid``, ``allow_network``, ``env``, ``labels``, ``readonly``)."""
        s = settings
        return cls(workspace=Path(workspace), runtime_dir=s.runtime_dir,
                   hidden=(str(s.data_dir), str(s.runtime_dir)),
                   sandbox=s["ERA_SANDBOX"], memory=s["ERA_KERNEL_MEMORY"], pids=s["ERA_KERNEL_PIDS"],
                   tmp_size=s["ERA_KERNEL_TMP_SIZE"], cgroups=s["ERA_KERNEL_CGROUPS"],
                   image_prefix=s["ERA_DOCKER_IMAGE_PREFIX"], container_memory=s["ERA_DOCKER_MEMORY"],
                   container_cpus=s["ERA_DOCKER_CPUS"], container_pids=s["ERA_DOCKER_PIDS"],
                   egress_network=s["ERA_DOCKER_EGRESS_NETWORK"], **session)

    @classmethod
    def from_env(cls, workspace: Path) -> "LaunchOptions":
        """Called by a provisioner launched by a plain Jupyter application (no ``era``
        keyword): the environment's settings, the working directory as the workspace."""
        from ..config import Settings

        return cls.from_settings(Settings.from_env(), workspace)

    def replace(self, **changes: Any) -> "LaunchOptions":
        return dataclasses.replace(self, **changes)


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
