"""Where a completion callback may go: the addresses its URL's host resolves to, each
checked against ``ERA_CALLBACK_ALLOW``.

A callback makes the server send a request to a URL a client chose. Unchecked, any
client could have it POST to the cloud metadata service (169.254.169.254), a database
on loopback, or anything on the private network beside it (server-side request
forgery). So every address the host resolves to must be allowed: at submission (a 400
naming ``callback_url``) and again at every delivery attempt, by the resolver of the
connection itself (``CheckedResolver``), so the request goes to exactly the addresses
just checked and a DNS answer that changed in between (rebinding) gains nothing.

``ERA_CALLBACK_ALLOW`` is a comma-separated list of:

- ``public``: any globally routable unicast address (the default); never private,
  loopback, link-local, shared (100.64/10), multicast, reserved or unspecified ones;
- a network in CIDR notation (``10.1.0.0/16``, ``127.0.0.0/8``, ``::1/128``) or one address;
- a host name (``hooks.internal``), trusted wherever it resolves: the operator's word;
- ``none`` alone: no callback is accepted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from tornado.netutil import Resolver

from ..errors import BadRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

RESOLVE_TIMEOUT = 5.0  # seconds a submission waits for DNS: a slow resolver must not hold a request long
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*", re.ASCII)
# IPv6 prefixes whose addresses carry an IPv4 one a gateway forwards to: that one is checked.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class TargetDenied(Exception):
    """The host resolves to an address the allow-list does not allow (or to none)."""


@dataclass(frozen=True)
class AllowList:
    public: bool = False
    networks: tuple[IPNetwork, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, text: str) -> "AllowList":
        """``ERA_CALLBACK_ALLOW``; ValueError names an entry that is none of the kinds."""
        public, networks, hosts = False, [], set()
        items = [item.strip().lower() for item in text.split(",") if item.strip()]
        if items == ["none"]:
            return cls()
        for item in items:
            if item == "public":
                public = True
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
                continue
            except ValueError:
                pass
            name = item.rstrip(".")
            if "/" in item or not _HOSTNAME_RE.fullmatch(name):
                raise ValueError(f"ERA_CALLBACK_ALLOW: {item!r} is not `public`, `none`, a CIDR network or a host name")
            hosts.add(name)
        return cls(public, tuple(networks), frozenset(hosts))

    def allows_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def allows_address(self, address: IPAddress) -> bool:
        address = _forwarded_to(address)
        if any(address in net for net in self.networks if net.version == address.version):
            return True
        return self.public and _is_public(address)


def _forwarded_to(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one stands for (mapped ``::ffff:a.b.c.d``, 6to4, NAT64),
    so ``::ffff:10.0.0.1`` is judged as 10.0.0.1; any other address as itself."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def _is_public(address: IPAddress) -> bool:
    # is_global already excludes private, loopback, link-local, shared, reserved and
    # unspecified ranges; multicast (and IPv6 site-local) count as "global" there.
    return address.is_global and not address.is_multicast and not getattr(address, "is_site_local", False)


async def resolve_allowed(allow: AllowList, host: str, port: int,
                          family: socket.AddressFamily = socket.AF_UNSPEC) -> list[tuple[int, Any]]:
    """``(family, sockaddr)`` of every address ``host`` resolves to, when each is allowed;
    TargetDenied otherwise (one denied address is enough: a name that also points inside
    is not a public endpoint). OSError (``socket.gaierror``) when it does not resolve."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
    if not infos:
        raise TargetDenied(f"{host} resolves to no address")
    if not allow.allows_host(host):
        for _, _, _, _, sockaddr in infos:
            address = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])  # without an IPv6 scope id
            if not allow.allows_address(address):
                raise TargetDenied(f"{host} resolves to {address}, which ERA_CALLBACK_ALLOW does not allow")
    return [(fam, sockaddr) for fam, _, _, _, sockaddr in infos]


def host_and_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


async def check_url(allow: AllowList, url: str) -> None:
    """At submission: BadRequest (field ``callback_url``) unless the URL's host resolves,
    within RESOLVE_TIMEOUT, to allowed addresses only. The URL's shape was checked by
    the request model (validation.callback_url_problem)."""
    host, port = host_and_port(url)
    try:
        await asyncio.wait_for(resolve_allowed(allow, host, port), RESOLVE_TIMEOUT)
    except TargetDenied as exc:
        raise BadRequest(f"invalid field 'callback_url': {exc}", field="callback_url") from None
    except asyncio.TimeoutError:
        raise BadRequest(f"invalid field 'callback_url': {host} did not resolve within {RESOLVE_TIMEOUT:g}s",
                         field="callback_url") from None
    except (OSError, UnicodeError) as exc:  # gaierror; an IDNA name that cannot be encoded
        raise BadRequest(f"invalid field 'callback_url': {host} does not resolve ({exc})",
                         field="callback_url") from None


class CheckedResolver(Resolver):
    """Tornado's resolver for callback connections: answers only allowed addresses, so a
    delivery connects to what was checked at that moment (DNS rebinding)."""

    def initialize(self, allow: AllowList) -> None:  # type: ignore[override]
        self.allow = allow

    async def resolve(self, host: str, port: int,  # type: ignore[override]
                      family: socket.AddressFamily = socket.AF_UNSPEC) -> list[tuple[int, Any]]:
        return await resolve_allowed(self.allow, host, port, family)
