"""A stand-in "internet" for egress tests and benchmarks, never a real outside address:

- ``Internet``: a network namespace the test creates, joined to the host by a veth pair
  with documentation addresses (a /30 of 203.0.113.0/24 picked at random, so two runs
  on one machine do not collide, never one holding an address this machine's package
  registries resolve to: some machines reach their mirror inside that range, and a
  test's route to it would take their traffic), and in it an HTTP server on port 80 and an HTTPS one
  (a throwaway self-signed certificate) on 443: ``/hello`` answers a fixed line,
  ``/blob/<bytes>`` that many bytes.
- ``Resolver``: a DNS server on the host's loopback (dnspython on a UDP socket, in a
  thread) answering A records from a table the test sets; every other name NXDOMAIN.

Both clean up in ``close()`` (call it from a fixture finalizer: it runs on failure too).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import random
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time

SERVER = r'''
import http.server, socketserver, ssl, sys, threading
HELLO = b"hello from the test internet\n"
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        if self.path.startswith("/blob/"):
            size = int(self.path.rsplit("/", 1)[1])
            self.send_response(200); self.send_header("Content-Length", str(size)); self.end_headers()
            chunk = b"x" * 65536
            while size > 0:
                self.wfile.write(chunk[:size]); size -= len(chunk)
            return
        body = HELLO + ("host: %s\n" % self.headers.get("Host")).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
address, cert, key = sys.argv[1:4]
plain = Server((address, 80), Handler)
tls = Server((address, 443), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); context.load_cert_chain(cert, key)
tls.socket = context.wrap_socket(tls.socket, server_side=True)
threading.Thread(target=tls.serve_forever, daemon=True).start()
print("ready", flush=True)
plain.serve_forever()
'''


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@functools.cache
def _blocks_in_use() -> frozenset[int]:
    """The /30s of 203.0.113.0/24 (by first address's last byte) holding an address the
    configured registries (pip, npm, Go: era_kernel/egress/registries.py) resolve to."""
    from era_kernel.egress.registries import derive

    documentation = ipaddress.ip_network("203.0.113.0/24")
    names = derive({"ERA_SETUP_EGRESS_ALLOW": ""}).policy.registry_names
    used = set()
    for name in names:
        try:
            infos = socket.getaddrinfo(name, None, socket.AF_INET)
        except OSError:
            continue
        for info in infos:
            address = ipaddress.ip_address(info[4][0])
            if address in documentation:
                used.add(int(address) - int(documentation.network_address) & ~3)
    return frozenset(used)


class Internet:
    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.ns = f"era-egr-{tag}"
        self.host_if, self.ns_if = f"ve{tag}h", f"ve{tag}n"
        block = random.choice([b * 4 for b in range(2, 62) if b * 4 not in _blocks_in_use()])  # .8 .. .247
        self.host_address, self.address = f"203.0.113.{block + 1}", f"203.0.113.{block + 2}"
        self.tmp = tempfile.TemporaryDirectory(prefix="era-egr-")
        self.proc: subprocess.Popen | None = None
        self._made: list[str] = []

    def start(self) -> "Internet":
        try:
            _ip("netns", "add", self.ns)
            self._made.append("ns")
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            self._made.append("link")
            _ip("link", "set", self.ns_if, "netns", self.ns)
            _ip("addr", "add", f"{self.host_address}/30", "dev", self.host_if)
            _ip("link", "set", self.host_if, "up")
            _ip("-n", self.ns, "addr", "add", f"{self.address}/30", "dev", self.ns_if)
            _ip("-n", self.ns, "link", "set", self.ns_if, "up")
            _ip("-n", self.ns, "link", "set", "lo", "up")
            cert, key = os.path.join(self.tmp.name, "cert.pem"), os.path.join(self.tmp.name, "key.pem")
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                            "/CN=files.example.org", "-keyout", key, "-out", cert], check=True, capture_output=True)
            self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, sys.executable, "-c", SERVER, self.address,
                                          cert, key], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            line = self.proc.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"the test internet's server did not start: {self.proc.stderr.read()}")
            deadline = time.monotonic() + 5
            while True:  # the veth pair takes a moment to carry traffic
                try:
                    socket.create_connection((self.address, 80), 0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if "link" in self._made:
            subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        if "ns" in self._made:
            subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        self._made.clear()
        self.tmp.cleanup()


class Resolver:
    """A DNS server on 127.0.0.1 answering ``names`` (name -> IPv4 address)."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = {k.lower().rstrip("."): v for k, v in names.items()}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import dns.message
        import dns.rcode
        import dns.rdataclass
        import dns.rdatatype
        import dns.rrset

        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except Exception:
                continue
            response = dns.message.make_response(query)
            question = query.question[0]
            name = question.name.to_text().lower().rstrip(".")
            address = self.names.get(name)
            if address is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
            elif question.rdtype == dns.rdatatype.A:
                response.answer.append(dns.rrset.from_text(question.name, 5, "IN", "A", address))
            self.sock.sendto(response.to_wire(), peer)

    def close(self) -> None:
        self.sock.close()
