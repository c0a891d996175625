"""Where a setup may connect: the package registries, through the egress proxy.

A package build's sandbox (``runner_local.py``, ``runner_docker.py``) gets no network of
its own, only a listener of the egress proxy (``EgressGate.command_hook``, as a policy
session's commands), under the registries' policy: what the operator's own pip, npm
and Go configuration names, read once, when the first setup needs them
(``egress/registries.py``). Its tools are pointed at that listener and at those
registries. A session's setup commands get the registries too while setup runs
(``KernelLauncher.setup_command_egress``). ``ERA_SETUP_NETWORK=host``, or a server that
cannot open the proxy in a sandbox (not root; no sandbox locally), leaves both on the
host's network, logged once.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from ..config import Settings
    from ..egress.gate import EgressGate
    from ..egress.policy import EgressPolicy
    from ..egress.registries import Registries
    from ..provisioning.commands import EgressHook

log = logging.getLogger("era.setup")

BUILD_PREFIX = "setup-build-"  # the proxy's key of a build's listener: no session's id


class SetupNetwork:
    def __init__(self, settings: "Settings", sandboxed: Callable[[], bool]) -> None:
        self.settings = settings
        self.mode = str(settings.values.get("ERA_SETUP_NETWORK") or "proxy")
        self._sandboxed = sandboxed  # local steps run in bubblewrap
        self.egress: EgressGate | None = None  # the engine's gate; else one made on first use
        self._registries: asyncio.Future | None = None
        self._said: set[str] = set()

    def prepare(self) -> None:
        """Start reading the operator's registry configuration in a thread, once; whoever
        needs it waits for it. Not at server start: its three tool processes (``pip
        config``, ``npm config``, ``go env``) are about a second of CPU, which a server's
        first kernels and sessions would wait behind, for setups that may never come."""
        if self._registries is None and self.mode == "proxy":
            from ..egress.registries import derive

            self._registries = asyncio.ensure_future(asyncio.to_thread(derive, self.settings))

    async def registries(self) -> "Registries | None":
        """The registries (None with ERA_SETUP_NETWORK=host)."""
        if self.mode != "proxy":
            return None
        self.prepare()
        return await asyncio.shield(self._registries)

    def _cannot(self, provisioner: str) -> str | None:
        """Why this server cannot put a setup of ``provisioner`` behind the proxy."""
        if os.geteuid() != 0:
            return "the server does not run as root, so it cannot open the egress proxy in a sandbox"
        if provisioner == "local" and not self._sandboxed():
            return "local setups run without a sandbox (ERA_SANDBOX)"
        return None

    async def policy(self, provisioner: str) -> "EgressPolicy | None":
        """The registries' policy for setups of ``provisioner``; None when they use the
        host's network (ERA_SETUP_NETWORK=host, or a server that cannot: logged once)."""
        registries = await self.registries()
        if registries is None:
            return None
        why = self._cannot(provisioner)
        if why is not None:
            if provisioner not in self._said:
                self._said.add(provisioner)
                log.warning("package setups (%s) use the host's network: %s", provisioner, why)
            return None
        return registries.policy

    async def tools_env(self, provisioner: str) -> dict[str, str]:
        """pip's, npm's and Go's settings naming the registries (setup commands get them too)."""
        registries = await self.registries()
        return registries.env_for(provisioner) if registries is not None else {}

    async def describe(self, provisioner: str) -> str | None:
        """The build log's line saying where it may connect (None: the host's network)."""
        policy = await self.policy(provisioner)
        if policy is None:
            return None
        reach = [*policy.allow_names, *map(str, policy.allow_nets), *(f"{h}:{p}" for h, p in policy.registry_endpoints)]
        return f"network: the package registries only, through the egress proxy ({', '.join(reach) or 'none'})"

    def _gate(self) -> "EgressGate":
        if self.egress is None:  # no engine (era setup, tests): a proxy of our own
            from ..egress.gate import EgressGate

            self.egress = EgressGate(self.settings["ERA_EGRESS_PORT"], self.settings["ERA_EGRESS_RESOLVER"], None,
                                     self.settings["ERA_EGRESS_DENY"])
        return self.egress

    async def step(self, provisioner: str, key: str,
                   on_denied: Callable[[str], None]) -> "tuple[EgressHook | None, dict[str, str]]":
        """A build step's hook (None: the host's network; the caller detaches it) and the
        variables that send its tools to the registries through it. The proxy's
        refusals go to ``on_denied`` (the build's log)."""
        policy = await self.policy(provisioner)
        if policy is None:
            return None, {}
        hook = self._gate().command_hook(f"{BUILD_PREFIX}{key}", policy, on_denied=on_denied)
        # A build talks to nothing local: every request goes to the proxy (a registry on
        # the host's loopback too, which only the proxy can reach). pip and npm are also
        # told in their own settings, which beat their configuration files.
        env: dict[str, Any] = {name: value for name, value in hook.env.items() if name.lower() != "no_proxy"}
        env.update(PIP_PROXY=env["HTTPS_PROXY"], npm_config_proxy=env["HTTP_PROXY"],
                   npm_config_https_proxy=env["HTTPS_PROXY"], npm_config_noproxy="")
        return hook, {**await self.tools_env(provisioner), **env}
