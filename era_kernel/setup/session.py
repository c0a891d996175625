"""The per-session part of a setup: its files and ``commands``, in the session's sandbox.

Packages are built once per key into a shared environment (``manager.py``); what a
session's commands do is the session's own. So the commands do not run in the build:
they run after it, one after another, each in the session's sandbox
(``provisioning/commands.py``): the session's uid, its workspace as the working
directory, its ``/tmp``, its language's image or the local toolchain, with network (the
package registries at least, while setup runs: ``network.py``), ``envs`` in their environment, ``ERA_SETUP_COMMAND_TIMEOUT`` each,
stopping at the first failure.

What a command can change, and what it cannot:
- it can write the workspace and ``/tmp`` (``HOME`` is ``/tmp``): the next command and
  the session's runs find what it left there (ERA's ``mkdir -p /tmp/data`` then
  ``echo 'a,b' > /tmp/data/test.csv``, then a run reads the file);
- ``pip install x`` lands in the session's own package directory (``PIP_TARGET`` is
  ``SESSION_SITE`` under its ``/tmp``), which its Python kernels import from ahead of the
  shared environment; ``npm install x`` lands in ``node_modules`` of the workspace, where
  node finds it from the working directory;
- the shared package environment (``ERA_SETUP_DIR``) is read-only to it, as to kernels:
  other sessions share it, so no session's command may change it;
- environment variables it exports end with it (each command is its own ``bash -c``);
  ``envs`` reach every command, and nothing else (not package installs, not runs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from ..provisioning.base import LaunchOptions
from ..provisioning.commands import CommandResult, EgressHook, OutputSink, run_command

if TYPE_CHECKING:
    from ..config import Settings

# Where a session's commands install Python packages (PIP_TARGET), as every sandbox of
# the session sees it: in its /tmp, so it lives as long as the session and counts with it.
SESSION_SITE = "/tmp/.era-packages/python"


class CommandSandbox:
    """One session's sandbox, as setup commands need it. The engine makes one per session
    (``KernelLauncher.command_sandbox``); tests and tools make one for a directory."""

    def __init__(self, settings: "Settings", provisioner: str, language: str, workspace: Path, tmp_dir: Path | None,
                 uid: int, *, write_file: Callable[[str, bytes], Awaitable[Any]] | None = None,
                 finished: Callable[[], Awaitable[Any]] | None = None, isolation: str | None = None):
        self.settings = settings
        self.provisioner = provisioner
        self.language = language
        self.workspace = Path(workspace)
        self.tmp_dir = tmp_dir
        self.uid = uid
        self._write_file = write_file
        self._finished = finished
        self.isolation = isolation or "runc"  # a gVisor session's setup steps run under gVisor too
        # When the session's network is the egress proxy: a hook per command for run_command
        # (EgressGate.command_hook), so commands "with network" get the proxy, under the
        # session's policy, and nothing else. None: network means the provisioner's own.
        self.egress: Callable[[], Awaitable[EgressHook | None]] | None = None

    async def run(self, argv: list[str], *, timeout: float, allow_network: bool, env: dict[str, str],
                  readonly: list[str] = (), on_output: OutputSink | None = None,
                  max_output: int = 1024 * 1024) -> CommandResult:
        """``argv`` in the session's sandbox with setup limits (``ERA_SETUP_MEMORY``, ``ERA_SETUP_PIDS``)."""
        from .runner_local import DEFAULT_MEMORY, DEFAULT_PIDS, setting

        options = LaunchOptions.from_settings(
            self.settings, self.provisioner, self.workspace, uid=self.uid, allow_network=allow_network, env=env,
            readonly=tuple(readonly), tmp_dir=self.tmp_dir, isolation=self.isolation).replace(
            memory=int(setting(self.settings, "ERA_SETUP_MEMORY", DEFAULT_MEMORY)),
            pids=int(setting(self.settings, "ERA_SETUP_PIDS", DEFAULT_PIDS)))
        hook = await self.egress() if allow_network and self.egress is not None else None
        return await run_command(self.provisioner, options, argv, language=self.language, timeout=timeout,
                                 on_output=on_output, max_output=max_output, egress=hook)

    async def write_file(self, name: str, data: bytes) -> None:
        """Write ``name`` at the top of the workspace as the session's uid (through the
        files API's own path checks when the engine gave one: never through a link)."""
        if self._write_file is not None:
            await self._write_file(name, data)
            return
        from ..workspaces import Workspace

        await Workspace(self.workspace).write(name, data, uid=self.uid if os.getuid() == 0 else None)

    async def finished(self) -> None:
        """The setup is over: persist what it wrote (a persistent session's store)."""
        if self._finished is not None:
            await self._finished()
