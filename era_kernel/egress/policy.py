"""An egress policy: which names and addresses a session's code may connect out to.

``allowInternetAccess`` is ``true``/``false`` or a policy object::

    {"allow": ["pypi.org", "*.example.org", "203.0.113.0/24"], "deny": ["bad.example.org"]}

An entry is a host pattern (``example.org``: that name only; ``*.example.org``: any name
below it, not ``example.org`` itself; ``*``: any name) or a CIDR (``203.0.113.0/24``,
``2001:db8::/32``, or one address). A connection is allowed when its name matches an
allowed pattern, or it names an address in an allowed CIDR; and refused when the name
matches a denied pattern or an address falls in a denied CIDR. Every address a name
resolves to is checked, and the proxy connects to that checked address itself, so a
name that resolves to a refused address (DNS rebinding) is refused.

Whatever the policy says, these are never reached (``ALWAYS_DENIED``): loopback, the
unspecified and "this network" ranges, the private ranges (RFC 1918, CGNAT, ULA),
link-local (the cloud metadata address 169.254.169.254 among them), multicast and
reserved ranges, and every address of the host's own interfaces (looked up at connect
time: they change). A policy that allows one of the fixed ranges is refused when it is
given (400), so nobody believes a rule that cannot hold.
"""

from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Union

from ..errors import BadRequest

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

MAX_ENTRIES = 256  # per list: a policy is a short list of what a task needs, not a block list of the internet

ALWAYS_DENIED: tuple[tuple[Network, str], ...] = tuple((ipaddress.ip_network(net), why) for net, why in (
    ("0.0.0.0/8", "'this network' addresses"),
    ("127.0.0.0/8", "loopback"),
    ("10.0.0.0/8", "a private range"),
    ("172.16.0.0/12", "a private range"),
    ("192.168.0.0/16", "a private range"),
    ("100.64.0.0/10", "a shared (carrier-grade NAT) range"),
    ("169.254.0.0/16", "link-local (cloud metadata)"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("198.18.0.0/15", "a benchmarking range"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "a reserved range"),
    ("::/128", "the unspecified address"),
    ("::1/128", "loopback"),
    ("fe80::/10", "link-local"),
    ("fc00::/7", "a private (unique local) range"),
    ("ff00::/8", "multicast"),
    ("64:ff9b::/96", "NAT64, which reaches IPv4 addresses behind it"),
    ("2002::/16", "6to4, which reaches IPv4 addresses behind it"),
))

# The private ranges a package registry named by the operator's own configuration may
# resolve to (a mirror on the operator's network): ``EgressPolicy.registry_names``.
PRIVATE_RANGES: frozenset[Network] = frozenset(ipaddress.ip_network(net) for net in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"))

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
HOST_OWN_TTL = 30.0  # seconds the host's interface addresses are cached


def host_pattern(entry: str) -> str | None:
    """``entry`` as a normalized host pattern (lower case, no trailing dot), or None when
    it is not one: ``*``, ``name.tld`` or ``*.name.tld`` of ASCII labels (IDNA names in
    their ``xn--`` form)."""
    text = entry.strip().lower().rstrip(".")
    if text == "*":
        return text
    rest = text[2:] if text.startswith("*.") else text
    labels = rest.split(".")
    if not rest or len(rest) > 253 or not all(_LABEL.match(label) for label in labels):
        return None
    if labels[-1].isdigit():  # 1.2.3 or 300.1.1.1: a mistyped address, never a name
        return None
    return text


def unmapped(address: Address) -> Address:
    """An IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) as the IPv4 address it reaches."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def name_matches(name: str, pattern: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])
    return name == pattern


_host_own: tuple[float, frozenset[Address]] = (0.0, frozenset())


def cached_host_addresses() -> frozenset[Address] | None:
    """``host_addresses()`` when its cache is fresh (no system call: fine on the loop)."""
    at, cached = _host_own
    return cached if time.monotonic() - at < HOST_OWN_TTL else None


def host_addresses() -> frozenset[Address]:
    """Blocking (cheap): the addresses of the host's own interfaces, cached a few seconds.
    A service of the host listening on its public address is still the host's."""
    global _host_own
    at, cached = _host_own
    if time.monotonic() - at < HOST_OWN_TTL:
        return cached
    import psutil
    import socket

    found: set[Address] = set()
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    found.add(unmapped(ipaddress.ip_address(addr.address.split("%", 1)[0])))
                except ValueError:
                    pass
    _host_own = (time.monotonic(), frozenset(found))
    return _host_own[1]


def operator_denied(text: str) -> tuple[Network, ...]:
    """``ERA_EGRESS_DENY``: comma-separated CIDRs (ValueError naming a bad one)."""
    nets = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"ERA_EGRESS_DENY: {entry!r} is not a CIDR") from None
    return tuple(nets)


def always_denied(address: Address, own: Iterable[Address] = (), extra: Iterable[Network] = (),
                  private_ok: bool = False) -> str | None:
    """Why ``address`` is never reached (None: it may be, if the policy allows it):
    the built-in ranges, the host's own addresses (``own``), the operator's (``extra``).
    ``private_ok``: the private ranges are not refused (a registry's mirror); loopback,
    link-local and the rest still are."""
    address = unmapped(address)
    for net, why in ALWAYS_DENIED:
        if private_ok and net in PRIVATE_RANGES:
            continue
        if address.version == net.version and address in net:
            return f"{address} is {why}, always denied"
    if address in own:
        return f"{address} is an address of the server's host, always denied"
    for net in extra:
        if address.version == net.version and address in net:
            return f"{address} is in {net}, denied by the server (ERA_EGRESS_DENY)"
    return None


@dataclass(frozen=True)
class EgressPolicy:
    allow_names: tuple[str, ...] = ()
    allow_nets: tuple[Network, ...] = ()
    deny_names: tuple[str, ...] = ()
    deny_nets: tuple[Network, ...] = ()
    source: dict[str, Any] = field(default_factory=dict, compare=False)  # as given: what the API shows back
    # Package registries the operator's own configuration names (egress/registries.py),
    # for setup builds: a registry name may resolve to a private address (a mirror), and
    # only for that name are the private ranges not refused; an endpoint (name or address,
    # port) is a registry URL naming a loopback or private address, or localhost, reached
    # at exactly that port. Link-local and ERA_EGRESS_DENY stay refused for both.
    registry_names: tuple[str, ...] = ()
    registry_endpoints: tuple[tuple[str, int], ...] = ()

    @classmethod
    def allow_all(cls) -> "EgressPolicy":
        """``allowInternetAccess: true`` through the proxy: any public name or address."""
        return cls(allow_names=("*",), allow_nets=(ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")))

    def check_name(self, name: str) -> str | None:
        """Before resolving: why ``name`` (a host name, lower case) is refused, or None
        when it may go on to its addresses."""
        for pattern in self.deny_names:
            if name_matches(name, pattern):
                return f"{name} matches the denied pattern {pattern}"
        if any(name_matches(name, p) for p in self.allow_names) or self.allow_nets:
            return None  # an allowed name, or one whose addresses may be in an allowed range
        return f"{name} is not in the allow list"

    def with_registries(self, registries: "EgressPolicy") -> "EgressPolicy":
        """This policy (a session's) and the registries' together: what a session's setup
        commands may reach while its setup runs. The session's own ``deny`` still wins."""
        return replace(self, allow_names=self.allow_names + registries.allow_names,
                       allow_nets=self.allow_nets + registries.allow_nets,
                       deny_names=self.deny_names + registries.deny_names,
                       deny_nets=self.deny_nets + registries.deny_nets,
                       registry_names=self.registry_names + registries.registry_names,
                       registry_endpoints=self.registry_endpoints + registries.registry_endpoints)

    def _registry_endpoint(self, address: Address, name: str | None, port: int | None,
                           extra: Iterable[Network]) -> bool:
        """``address`` at ``port`` is a registry endpoint the operator named (a loopback or
        private address, or localhost), and nothing refuses it even so."""
        if port is None or ((name if name is not None else str(address)), port) not in self.registry_endpoints:
            return False
        if address.is_link_local or any(address.version == net.version and address in net for net in extra):
            return False
        return address.is_loopback or any(address.version == net.version and address in net
                                          for net in PRIVATE_RANGES)

    def check_address(self, address: Address, name: str | None, own: Iterable[Address] = (),
                      extra: Iterable[Network] = (), port: int | None = None) -> str | None:
        """Why connecting to ``address`` (which ``name`` resolved to; None: the address was
        given literally) at ``port`` is refused, or None when it is allowed."""
        address = unmapped(address)
        if self.registry_endpoints and self._registry_endpoint(address, name, port, extra):
            return None
        why = always_denied(address, own, extra, private_ok=name is not None and name in self.registry_names)
        if why:
            return why
        for net in self.deny_nets:
            if address.version == net.version and address in net:
                return f"{address} is in the denied range {net}"
        if name is not None and any(name_matches(name, p) for p in self.allow_names):
            return None
        for net in self.allow_nets:
            if address.version == net.version and address in net:
                return None
        return (f"{name} resolved to {address}, which is not in an allowed range" if name is not None
                else f"{address} is not in the allow list")


def _entries(doc: dict[str, Any], key: str) -> list[str]:
    value = doc.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"allowInternetAccess.{key} must be a list of host patterns and CIDRs",
                         field=f"allowInternetAccess.{key}")
    if len(value) > MAX_ENTRIES:
        raise BadRequest(f"allowInternetAccess.{key} has {len(value)} entries; at most {MAX_ENTRIES}",
                         field=f"allowInternetAccess.{key}")
    return value


def _parse_entry(entry: str, key: str) -> tuple[str | None, Network | None]:
    pattern = host_pattern(entry)
    if pattern is not None:
        return pattern, None
    try:
        net = ipaddress.ip_network(entry.strip(), strict=False)
    except ValueError:
        raise BadRequest(f"allowInternetAccess.{key}: {entry!r} is neither a host pattern (example.org, "
                         "*.example.org) nor a CIDR (203.0.113.0/24)", field=f"allowInternetAccess.{key}") from None
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None:
        raise BadRequest(f"allowInternetAccess.{key}: {entry!r} is an IPv4-mapped range; give the IPv4 CIDR",
                         field=f"allowInternetAccess.{key}")
    return None, net


def parse_policy(doc: Any) -> EgressPolicy:
    """A policy object as given to the API, checked (BadRequest naming the entry)."""
    if not isinstance(doc, dict):
        raise BadRequest("allowInternetAccess must be true, false or {\"allow\": [...], \"deny\": [...]}",
                         field="allowInternetAccess")
    unknown = set(doc) - {"allow", "deny"}
    if unknown:
        raise BadRequest(f"allowInternetAccess: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                         "a policy has allow and deny", field="allowInternetAccess")
    lists: dict[str, tuple[list[str], list[Network]]] = {}
    for key in ("allow", "deny"):
        names: list[str] = []
        nets: list[Network] = []
        for entry in _entries(doc, key):
            name, net = _parse_entry(entry, key)
            if name is not None:
                names.append(name)
            else:
                nets.append(net)
        lists[key] = (names, nets)
    for net in lists["allow"][1]:
        for denied, why in ALWAYS_DENIED:
            if net.version == denied.version and net.overlaps(denied):
                raise BadRequest(f"allowInternetAccess.allow: {net} overlaps {denied} ({why}), which is always "
                                 "denied whatever the policy says", field="allowInternetAccess.allow")
    if not lists["allow"][0] and not lists["allow"][1]:
        raise BadRequest("allowInternetAccess.allow is empty: nothing would be reachable (use false for no "
                         "network)", field="allowInternetAccess.allow")
    return EgressPolicy(tuple(lists["allow"][0]), tuple(lists["allow"][1]), tuple(lists["deny"][0]),
                        tuple(lists["deny"][1]), source={"allow": list(doc.get("allow", [])),
                                                         "deny": list(doc.get("deny", []))})


def session_policy(allow_internet: Any) -> EgressPolicy | None:
    """The policy of a stored ``allowInternetAccess`` (None: a boolean)."""
    if isinstance(allow_internet, dict):
        return parse_policy(allow_internet)
    return None
