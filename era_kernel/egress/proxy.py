"""The egress proxy: the one way out of a session whose ``allowInternetAccess`` is a
policy (or ``true`` where Docker has no network to give it).

An HTTP proxy on asyncio, served on a listener inside the session's network namespace
(gate.py), so each connection it accepts is known to come from that session. It speaks:

- ``CONNECT host:port`` (HTTPS, and any TLS): the name is checked against the policy,
  resolved, EVERY address checked (always-denied ranges, the host's own addresses, the
  policy's), and the proxy connects to a checked address itself: nothing re-resolves
  the name later, so DNS rebinding cannot reach a refused address. When the client's
  first bytes in the tunnel are a TLS ClientHello, its SNI must name the CONNECT host
  (no domain fronting to another name on an allowed address).
- plain HTTP in absolute form (``GET http://host/path``), checked the same way, sent on
  in origin form with ``Connection: close``.

A refusal answers ``403`` whose reason phrase (what urllib, requests, pip and curl show
in their error) and body say
``era: connection to NAME refused by policy: REASON``, and is reported with the name and reason (``on_denied``: the
session's events). What it cannot see, it cannot allow: raw TCP or UDP to an address
(the sandbox has no route), DNS lookups from the sandbox (the proxy resolves).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Awaitable, Callable
from urllib.parse import urlsplit

from .policy import EgressPolicy, Network, cached_host_addresses, host_addresses, host_pattern

log = logging.getLogger("era.egress")

MAX_CONNECTIONS = 256  # open at once per session: past it 503, so no session exhausts the server's descriptors
CHUNK = 256 * 1024
HEAD_TIMEOUT = 30.0
HELLO_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
PROXY_HEADERS = frozenset({"proxy-connection", "proxy-authorization", "connection", "keep-alive"})

Resolve = Callable[[str, int], Awaitable[list[str]]]
OnDenied = Callable[[str, str, int, str], None]  # (session id, name, port, reason)


class Refused(Exception):
    def __init__(self, status: int, name: str, reason: str, port: int = 0) -> None:
        super().__init__(reason)
        self.status, self.name, self.reason, self.port = status, name, reason, port


async def system_resolve(name: str, port: int) -> list[str]:
    """The host's resolver (getaddrinfo), every address of the name."""
    infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def dns_resolver(server: str) -> Resolve:
    """A resolver asking the DNS server ``host:port`` (ERA_EGRESS_RESOLVER) for A and AAAA."""
    import dns.asyncresolver
    import dns.exception
    import dns.resolver

    host, _, port = server.rpartition(":") if server.count(":") == 1 or server.startswith("[") else (server, "", "")
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [host.strip("[]") or server]
    resolver.port = int(port or 53)
    resolver.lifetime = 5.0

    async def resolve(name: str, port: int) -> list[str]:
        found: list[str] = []
        for kind in ("A", "AAAA"):
            try:
                answer = await resolver.resolve(name, kind, search=False)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException as exc:
                raise OSError(f"DNS lookup failed: {exc}") from None
            found += [r.address for r in answer]
        if not found:
            raise OSError(f"{name} has no address")
        return found

    return resolve


@dataclass
class Target:
    name: str  # lower case; an address literal as text
    port: int
    literal: bool  # the client gave an address, not a name


def parse_authority(text: str, default_port: int) -> Target:
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    port = int(port_text) if port_text.isdigit() else default_port if not port_text else -1
    if not 1 <= port <= 65535:
        raise Refused(400, text, "bad port")
    try:
        return Target(str(ipaddress.ip_address(host)), port, True)
    except ValueError:
        pass
    name = host_pattern(host)
    if name is None or "*" in name:
        raise Refused(400, text[:100], "not a host name or address")
    return Target(name, port, False)


class EgressProxy:
    def __init__(self, resolve: Resolve = system_resolve, on_denied: OnDenied | None = None,
                 denied: tuple[Network, ...] = ()) -> None:
        self.resolve = resolve
        self.on_denied = on_denied
        self.denied_nets = denied  # ERA_EGRESS_DENY
        self.open_connections: dict[str, int] = {}

    def serve(self, session_id: str, policy: EgressPolicy) -> Callable:
        """An ``asyncio.start_server`` client handler for one session's listener."""
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            count = self.open_connections.get(session_id, 0)
            if count >= MAX_CONNECTIONS:
                await _answer(writer, 503, f"era: this session has {count} connections open through the egress "
                                           "proxy already; close some")
                writer.close()
                return
            self.open_connections[session_id] = count + 1
            try:
                await self.handle(session_id, policy, reader, writer)
            except Exception as exc:  # a client that went away mid-way: nothing to tell anyone
                log.debug("egress: session %s: %s", session_id, exc)
            finally:
                writer.close()
                left = self.open_connections.pop(session_id, 1) - 1
                if left:
                    self.open_connections[session_id] = left
        return handle

    async def handle(self, sid: str, policy: EgressPolicy, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError):
            return
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return await _answer(writer, 400, "era: not an HTTP proxy request")
        method, target_text, version = parts
        await self._forward(sid, policy, method, target_text, version, lines, reader, writer)

    async def _forward(self, sid: str, policy: EgressPolicy, method: str, target_text: str, version: str,
                       lines: list[str], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            if method == "CONNECT":
                target = parse_authority(target_text, 443)
                upstream = await self.open(sid, policy, target)
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()
                first = await self._client_hello(sid, target, reader)
                if first is None:
                    return
                upstream[1].write(first)
            else:
                url = urlsplit(target_text)
                if url.scheme != "http" or not url.netloc:
                    raise Refused(400, target_text[:100], "a proxy request needs an absolute http:// URL (https "
                                                          "goes through CONNECT)")
                target = parse_authority(url.netloc.rpartition("@")[2], 80)
                upstream = await self.open(sid, policy, target)
                path = url.path or "/"
                if url.query:
                    path += "?" + url.query
                # Host is the checked name's: another one would reach a virtual host the
                # policy never saw on the allowed address (as a foreign SNI would).
                kept = [line for line in lines[1:] if line and line.split(":", 1)[0].strip().lower()
                        not in PROXY_HEADERS | {"host"}]
                host = url.netloc.rpartition("@")[2]
                request = "\r\n".join([f"{method} {path} {version}", f"Host: {host}", *kept, "Connection: close",
                                        "", ""])
                upstream[1].write(request.encode("latin-1"))
            await _pipe(reader, writer, *upstream)
        except Refused as refused:
            if refused.status == 403:
                self.denied(sid, refused.name, refused.reason, refused.port)
                said = f"era: connection to {refused.name} refused by policy: {refused.reason}"
                return await _answer(writer, 403, said, phrase=said[:400])  # the phrase is what errors show
            return await _answer(writer, refused.status, f"era: {refused.name}: {refused.reason}")
        finally:
            if upstream is not None:  # also when the client went away before the relay began
                upstream[1].close()

    def denied(self, sid: str, name: str, reason: str, port: int) -> None:
        log.info("egress: session %s: connection to %s:%s refused by policy: %s", sid, name, port, reason,
                 extra={"event": "egress_denied", "session_id": sid})
        if self.on_denied is not None:
            self.on_denied(sid, name, port, reason)

    async def open(self, sid: str, policy: EgressPolicy,
                   target: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to ``target`` after every check; Refused(403) by policy, (502) when
        it cannot be resolved or reached."""
        if not target.literal:
            why = policy.check_name(target.name)
            if why:
                raise Refused(403, target.name, why, target.port)
            try:
                addresses = await self.resolve(target.name, target.port)
            except OSError as exc:
                raise Refused(502, target.name, f"cannot resolve: {exc}") from None
        else:
            addresses = [target.name]
        own = cached_host_addresses()
        if own is None:
            own = await asyncio.to_thread(host_addresses)
        checked = []
        for text in addresses:
            address = ipaddress.ip_address(text.split("%", 1)[0])
            why = policy.check_address(address, None if target.literal else target.name, own, self.denied_nets,
                                       port=target.port)
            if why:  # one refused address refuses the name: which one a connection gets is not ours to pick
                raise Refused(403, target.name, why, target.port)
            checked.append(str(address))
        last: Exception | None = None
        for address in checked:  # the checked address itself: never the name again
            try:
                return await asyncio.wait_for(asyncio.open_connection(address, target.port, limit=CHUNK),
                                              CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as exc:
                last = exc
        raise Refused(502, target.name, f"cannot connect: {last or 'no address'}")

    async def _client_hello(self, sid: str, target: Target, reader: asyncio.StreamReader) -> bytes | None:
        """The tunnel's first bytes, to send on; None when its TLS SNI names another host."""
        try:
            first = await asyncio.wait_for(reader.read(1), HELLO_TIMEOUT)
        except asyncio.TimeoutError:
            return b""  # a protocol where the server speaks first
        if first != b"\x16":  # not TLS: the name and address were checked, pass it on
            return first
        try:
            header = await asyncio.wait_for(reader.readexactly(4), HELLO_TIMEOUT)
            body = await asyncio.wait_for(reader.readexactly(int.from_bytes(header[2:4], "big")), HELLO_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError):
            return None
        sni = client_hello_sni(body)
        # A literal address was allowed by its range, whatever name a TLS client gives it.
        if sni is not None and not target.literal and sni.lower().rstrip(".") != target.name:
            self.denied(sid, target.name, f"the TLS server name {sni!r} is not the CONNECT host {target.name}",
                        target.port)
            return None
        return first + header + body


def client_hello_sni(record: bytes) -> str | None:
    """The server name of a TLS ClientHello record body (None when it has none or is not one)."""
    try:
        if record[0] != 1:  # handshake type client_hello
            return None
        i = 4 + 2 + 32  # handshake header, version, random
        i += 1 + record[i]  # session id
        i += 2 + int.from_bytes(record[i:i + 2], "big")  # cipher suites
        i += 1 + record[i]  # compression methods
        end = i + 2 + int.from_bytes(record[i:i + 2], "big")
        i += 2
        while i + 4 <= end:
            kind, size = int.from_bytes(record[i:i + 2], "big"), int.from_bytes(record[i + 2:i + 4], "big")
            i += 4
            if kind == 0:  # server_name: list length, then (type 0, length, name)
                if record[i + 2] == 0:
                    size_name = int.from_bytes(record[i + 3:i + 5], "big")
                    return record[i + 5:i + 5 + size_name].decode("ascii", "replace")
                return None
            i += size
    except IndexError:
        return None
    return None


async def _answer(writer: asyncio.StreamWriter, status: int, body: str, phrase: str | None = None) -> None:
    phrase = (phrase or {400: "Bad Request", 403: "Forbidden", 502: "Bad Gateway",
                         503: "Service Unavailable"}.get(status, "Error"))
    phrase = phrase.replace("\r", " ").replace("\n", " ")
    data = (body + "\n").encode()
    writer.write(f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                 f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
    try:
        await writer.drain()
    except OSError:
        pass


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up_reader: asyncio.StreamReader,
                up_writer: asyncio.StreamWriter) -> None:
    async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(CHUNK):
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()
        except OSError:
            pass

    try:
        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))
    finally:
        up_writer.close()
