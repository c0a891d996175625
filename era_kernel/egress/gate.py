"""Where a session's sandbox meets the egress proxy: a listener the engine opens inside
the sandbox's network namespace (``ports/netns.py``), at ``127.0.0.1:ERA_EGRESS_PORT``,
before the kernel is handed to any run. The sandbox keeps no network of its own
(bubblewrap's ``--unshare-net``, Docker's network ``none``): that listener is its only
way out, and the kernel's ``HTTP_PROXY``/``HTTPS_PROXY`` point at it (``proxy_env``).

One listener per live kernel: a new kernel is a new sandbox, so ``attach`` replaces the
old one, and ``detach`` (the kernel stopped, died, was culled, the session deleted)
closes it. Denials become the session's events (``egress_denied``, with the name and
the reason: ``GET /api/sessions/{id}/events``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import TYPE_CHECKING, Any, Callable

from ..ports import netns
from .policy import EgressPolicy, operator_denied
from .proxy import EgressProxy, dns_resolver, system_resolve

if TYPE_CHECKING:
    from ..provisioning.commands import EgressHook

log = logging.getLogger("era.egress")

ONESHOT_PREFIX = "oneshot-"  # listeners of one-shot runs (/api/execute) are keyed by this, not a session id


def proxy_env(port: int) -> dict[str, str]:
    """The kernel's variables that send HTTP(S) clients (pip, npm, curl, requests, urllib,
    Node's undici with them, Go's net/http) through the proxy; localhost stays direct, for
    the storage listener and the session's own servers."""
    url = f"http://127.0.0.1:{port}"
    no_proxy = "localhost,127.0.0.1,::1"
    return {"HTTP_PROXY": url, "HTTPS_PROXY": url, "http_proxy": url, "https_proxy": url,
            "ALL_PROXY": url, "all_proxy": url, "NO_PROXY": no_proxy, "no_proxy": no_proxy,
            "NODE_USE_ENV_PROXY": "1",  # Node 24+: its fetch and http then use them too (older: npm only)
            "ERA_EGRESS_PROXY": url}


class EgressGate:
    def __init__(self, port: int, resolver: str | None = None,
                 record_event: Callable[[str, dict[str, Any]], None] | None = None, denied: str = "") -> None:
        self.port = port
        self.proxy = EgressProxy(dns_resolver(resolver) if resolver else system_resolve, self._denied,
                                 operator_denied(denied))
        self._record_event = record_event
        self._denial_sinks: dict[str, Callable[[str], None]] = {}  # sid -> where its denials go instead
        self.servers: dict[str, tuple[asyncio.AbstractServer, Any]] = {}  # sid -> (listener, its kernel)

    def _denied(self, sid: str, name: str, port: int, reason: str) -> None:
        sink = self._denial_sinks.get(sid)
        if sink is not None:  # a shared package build: its log, which every waiting session sees
            sink(f"era: connection to {name}:{port} refused by policy: {reason}")
            return
        if self._record_event is not None and not sid.startswith(ONESHOT_PREFIX):  # a one-shot run has no log
            self._record_event(sid, {"type": "egress_denied", "reason": reason, "host": name, "port": port,
                                     "message": f"connection to {name} refused by policy: {reason}"})

    async def attach(self, sid: str, ns_path: str, policy: EgressPolicy, kernel: Any = None,
                     key: str | None = None) -> None:
        """Open the session's proxy listener inside the namespace ``ns_path`` (of ``kernel``'s
        sandbox; ``key``, when it is another sandbox of the session's: a setup command's)."""
        key = key or sid
        self.detach(key)
        sock = await netns.listen(ns_path, self.port)
        server = await asyncio.start_server(self.proxy.serve(sid, policy), sock=sock, limit=64 * 1024)
        self.servers[key] = (server, kernel)

    def detach(self, sid: str, keep: Any = None) -> None:
        """Close the session's listener (or the one ``attach`` keyed ``sid``), unless it is
        the one of ``keep`` (the kernel live now: an event about the old kernel may come
        after a new one attached)."""
        entry = self.servers.get(sid)
        if entry is None or (keep is not None and entry[1] is keep):
            return
        del self.servers[sid]
        entry[0].close()  # the listener; tunnels under way end with their peers

    def command_hook(self, sid: str, policy: EgressPolicy,
                     on_denied: Callable[[str], None] | None = None) -> "EgressHook":
        """What ``run_command`` needs to put one command of the session (a setup command)
        behind this proxy under ``policy``: a listener of its own, closed after it.
        ``on_denied``: where its denials go instead of ``sid``'s events (a package build,
        whose ``sid`` is no session's)."""
        from ..provisioning.commands import EgressHook

        key = f"command-{sid}-{secrets.token_hex(4)}"
        if on_denied is not None:
            self._denial_sinks[sid] = on_denied

        def detach() -> None:
            self.detach(key)
            if on_denied is not None and self._denial_sinks.get(sid) is on_denied:
                del self._denial_sinks[sid]

        return EgressHook(self.port, lambda ns_path: self.attach(sid, ns_path, policy, key=key), detach,
                          proxy_env(self.port))

    def close_all(self) -> None:
        for sid in list(self.servers):
            self.detach(sid)
