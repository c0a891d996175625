"""Package builds reach the package registries and nothing else: their sandbox has no
network of its own, only the egress proxy, under a policy derived from the operator's
own pip, npm and Go configuration (era_kernel/egress/registries.py).

The "internet" is a network namespace this module creates (tests/support/egress_net.py:
203.0.113.x over a veth pair), with a private address added on the same pair where a
tiny PEP 503 index (a mirror, as on the machines this runs on) serves one sdist. Names
come from a DNS server the test runs; the server's ``PIP_INDEX_URL`` names the mirror.
The sdist's build backend is install-time code: it tries the cloud metadata address,
the host's loopback, the test internet directly and through the proxy, and records
what happened in the module it installs. Nothing reaches a real outside address.
"""

from __future__ import annotations

import ipaddress
import io
import json
import os
import random
import select
import socket
import subprocess
import sys
import tarfile
import tempfile
import time

import pytest

from era_kernel.config import Settings
from era_kernel.egress.policy import EgressPolicy
from era_kernel.egress.registries import derive
from tests.support.egress_net import Internet, Resolver
from tests.support.era_server import ServerProcess

from .conftest import require_docker

MIRROR, MIRROR_PORT = "mirror.example.org", 8080

BACKEND = r'''
import base64, hashlib, json, os, socket, urllib.error, urllib.request, zipfile

HERE = os.path.dirname(os.path.abspath(__file__))


def _probe():
    with open(os.path.join(HERE, "targets.json")) as fh:
        targets = json.load(fh)
    out = {}
    for label, (host, port) in targets["direct"].items():
        try:
            socket.create_connection((host, port), 3).close()
            out[label] = "reached"
        except OSError as exc:
            out[label] = "no: " + type(exc).__name__
    try:
        socket.getaddrinfo(targets["name"], 80)
        out["dns"] = "resolved"
    except OSError:
        out["dns"] = "no"
    for label, url in targets["proxied"].items():
        try:
            out[label] = str(urllib.request.urlopen(url, timeout=10).status)
        except urllib.error.HTTPError as exc:
            out[label] = "%s %s" % (exc.code, exc.reason)
        except OSError as exc:
            out[label] = "no: %s" % exc
    return out


def _record(data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return "sha256=%s,%d" % (digest, len(data))


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    files = {
        "egress_probe.py": ("RESULTS = %r\n" % (_probe(),)).encode(),
        "egress_probe-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: egress-probe\nVersion: 1.0\n",
        "egress_probe-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: era-test\nRoot-Is-Purelib: true\n"
                                            b"Tag: py3-none-any\n",
    }
    record = "".join("%s,%s\n" % (name, _record(data)) for name, data in files.items())
    record += "egress_probe-1.0.dist-info/RECORD,,\n"
    files["egress_probe-1.0.dist-info/RECORD"] = record.encode()
    name = "egress_probe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as wheel:
        for path, data in files.items():
            wheel.writestr(path, data)
    return name
'''


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def make_sdist(path: str, targets: dict) -> None:
    """egress_probe-1.0.tar.gz: an in-tree build backend with no requirements (so the
    build needs nothing but the index), whose build is the probe."""
    members = {
        "pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n\n'
                          '[project]\nname = "egress-probe"\nversion = "1.0"\n',
        "PKG-INFO": "Metadata-Version: 2.1\nName: egress-probe\nVersion: 1.0\n",
        "backend.py": BACKEND, "targets.json": json.dumps(targets)}
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(f"egress_probe-1.0/{name}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def internet():
    if os.geteuid() != 0:
        if os.environ.get("ERA_REQUIRE_SANDBOX") == "1":
            pytest.fail("the setup egress tests need root")
        pytest.skip("the setup egress tests need root")
    net = Internet().start()
    yield net
    net.close()


@pytest.fixture(scope="module")
def mirror(internet):
    """The index, on a private address of the test namespace (10.x.y.2, its /30's other
    end on the host side), serving /simple/egress-probe/ and the sdist."""
    while True:  # a /30 no route of this machine covers yet
        block = ipaddress.ip_network(f"10.{random.randrange(64, 250)}.{random.randrange(256)}.{random.randrange(64) * 4}/30")
        routes = subprocess.run(["ip", "route", "show", "match", str(block[2])], capture_output=True, text=True).stdout
        if "default" in routes and len(routes.strip().splitlines()) == 1:
            break
    host_side, ns_side = str(block[1]), str(block[2])
    _ip("addr", "add", f"{host_side}/30", "dev", internet.host_if)
    _ip("-n", internet.ns, "addr", "add", f"{ns_side}/30", "dev", internet.ns_if)
    loopback = socket.socket()  # a service of the host's, on its loopback: nothing may reach it
    loopback.bind(("127.0.0.1", 0))
    loopback.listen(8)
    root = tempfile.TemporaryDirectory(prefix="era-mirror-")
    os.makedirs(f"{root.name}/simple/egress-probe")
    os.makedirs(f"{root.name}/files")
    with open(f"{root.name}/simple/egress-probe/index.html", "w") as fh:
        fh.write('<!DOCTYPE html><html><body><a href="/files/egress_probe-1.0.tar.gz">egress_probe-1.0.tar.gz</a>'
                 "</body></html>\n")
    port = loopback.getsockname()[1]
    make_sdist(f"{root.name}/files/egress_probe-1.0.tar.gz", {
        "name": "files.example.org",
        "direct": {"direct_metadata": ["169.254.169.254", 80], "direct_host_loopback": ["127.0.0.1", port],
                   "direct_internet": [internet.address, 80], "direct_mirror": [ns_side, MIRROR_PORT]},
        "proxied": {"registry": f"http://{MIRROR}:{MIRROR_PORT}/simple/egress-probe/",
                    "public": "http://files.example.org/hello", "private": "http://private.cdn.example.org:8080/",
                    "metadata": "http://169.254.169.254/latest/meta-data/",
                    "host_loopback": f"http://127.0.0.1:{port}/", "host_address": f"http://{internet.host_address}:{port}/"}})
    server = subprocess.Popen(["ip", "netns", "exec", internet.ns, sys.executable, "-m", "http.server",
                               str(MIRROR_PORT), "--bind", ns_side, "--directory", root.name],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((ns_side, MIRROR_PORT), 0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield {"address": ns_side, "loopback": loopback}
    finally:
        server.kill()
        server.wait()
        loopback.close()
        root.cleanup()
        subprocess.run(["ip", "addr", "del", f"{host_side}/30", "dev", internet.host_if], capture_output=True)


@pytest.fixture(scope="module")
def server(internet, mirror):
    dns = Resolver({"files.example.org": internet.address, MIRROR: mirror["address"],
                    "private.cdn.example.org": mirror["address"]})
    srv = ServerProcess(env={"ERA_EGRESS_RESOLVER": dns.address, "PIP_INDEX_URL": f"http://{MIRROR}:{MIRROR_PORT}/simple/",
                             "PIP_TRUSTED_HOST": MIRROR, "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "",
                             "ERA_SETUP_EGRESS_ALLOW": "*.cdn.example.org"}).start()
    yield srv
    srv.cleanup()
    dns.close()


def settled(server, sid: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        doc = server.json("GET", f"/api/sessions/{sid}")
        if doc["setup_status"] not in ("pending", "running") or time.monotonic() > deadline:
            return doc
        time.sleep(0.1)


def fetch(url: str) -> str:
    return (f"import urllib.request, urllib.error\ntry:\n    print(urllib.request.urlopen({url!r}, timeout=10).status)\n"
            "except urllib.error.HTTPError as e:\n    print(e.code, e.reason)\n")


@pytest.mark.parametrize("provisioner", ["local", "docker"])
def test_a_package_build_reaches_the_registry_through_the_proxy_and_nothing_else(server, mirror, provisioner):
    """A session without network gets its package from the (private) mirror the server's
    pip configuration names; the package's install-time code reaches nothing else:
    not the metadata address, not the host's loopback or addresses, not the test
    internet (directly or through the proxy), no DNS."""
    if provisioner == "docker":
        require_docker()
    sid = f"se-build-{provisioner}"
    server.json("POST", "/api/sessions", {"id": sid, "provisioner": provisioner, "allowInternetAccess": False,
                                          "setup": {"pip": ["egress-probe==1.0"]}}, expect=201)
    doc = settled(server, sid)
    result = doc["setup_result"]
    assert doc["setup_status"] == "completed", result
    assert "network: the package registries only, through the egress proxy (mirror.example.org" in result["logs"]
    # The proxy told the build's log what it refused (its install-time code's attempts).
    assert "era: connection to files.example.org:80 refused by policy: files.example.org is not in the allow " \
           "list" in result["logs"], result["logs"]
    ran = server.json("POST", f"/api/sessions/{sid}/run", {"code": "import egress_probe, json\n"
                                                                   "print(json.dumps(egress_probe.RESULTS))",
                                                           "timeout": 60})
    probe = json.loads(ran["stdout"])
    assert probe["registry"] == "200", probe  # the mirror, by name, through the proxy
    for label in ("direct_metadata", "direct_host_loopback", "direct_internet", "direct_mirror"):
        assert probe[label].startswith("no: "), (label, probe)  # no route of its own, not even to the mirror
    assert probe["dns"] == "no"
    refused = "403 era: connection to {} refused by policy: "
    assert probe["public"] == refused.format("files.example.org") + "files.example.org is not in the allow list"
    # The mirror's private address is allowed for the registry's name only, not for a
    # name ERA_SETUP_EGRESS_ALLOW allows by a pattern.
    assert probe["private"].startswith(refused.format("private.cdn.example.org")), probe
    assert "private range, always denied" in probe["private"]
    assert "link-local" in probe["metadata"] and probe["metadata"].startswith("403 "), probe
    assert probe["host_loopback"].startswith(refused.format("127.0.0.1")), probe
    assert probe["host_address"].startswith("403 ") and "address of the server's host" in probe["host_address"]
    assert not select.select([mirror["loopback"]], [], [], 0)[0], "something reached the host's loopback service"
    server.request("DELETE", f"/api/sessions/{sid}")


def test_setup_commands_get_the_registries_while_setup_runs(server):
    """A session's setup commands reach the registries too: with network off, the
    registries only; with a policy, its policy and the registries. Both through the proxy."""
    off, policy = "se-cmd-off", "se-cmd-policy"
    install = "pip install --quiet --no-cache-dir egress-probe==1.0"
    server.json("POST", "/api/sessions", {"id": off, "allowInternetAccess": False, "setup": {"commands": [
        install, f"python3 - > public.txt <<'EOF'\n{fetch('http://files.example.org/hello')}EOF"]}}, expect=201)
    server.json("POST", "/api/sessions", {"id": policy, "allowInternetAccess": {"allow": ["files.example.org"]},
                                          "setup": {"commands": [install, f"python3 - > public.txt <<'EOF'\n"
                                                                          f"{fetch('http://files.example.org/hello')}EOF"]}},
                expect=201)
    try:
        for sid, public in ((off, "403 era: connection to files.example.org refused by policy"), (policy, "200")):
            doc = settled(server, sid)
            assert doc["setup_status"] == "completed", doc["setup_result"]
            assert server.request("GET", f"/api/sessions/{sid}/files/public.txt")[1].decode().startswith(public)
            ran = server.json("POST", f"/api/sessions/{sid}/run", {"code": "import egress_probe\n"
                                                                           "print(egress_probe.RESULTS['registry'])",
                                                                   "timeout": 60})
            assert ran["stdout"] == "200\n", ran
        # Once setup is over, the session's own rule again: no registry for its code.
        ran = server.json("POST", f"/api/sessions/{policy}/run", {"code": fetch(f"http://{MIRROR}:{MIRROR_PORT}/"),
                                                                 "timeout": 30})
        assert "mirror.example.org is not in the allow list" in ran["stdout"], ran
    finally:
        for sid in (off, policy):
            server.request("DELETE", f"/api/sessions/{sid}")


def test_registries_come_from_the_operators_own_configuration():
    """pip's, npm's and Go's own answers (real tools), and ERA_SETUP_EGRESS_ALLOW:
    file:// indexes and Go's direct are no network; loopback and private URLs are exact
    endpoints; the tools' settings go to the builds."""
    environ = {**os.environ, "PIP_INDEX_URL": "https://mirror.example.org/pypi/simple/",
               "PIP_EXTRA_INDEX_URL": "file:///srv/wheels http://127.0.0.1:3141/simple https://10.20.30.40:8443/s",
               "PIP_FIND_LINKS": "", "npm_config_registry": "http://localhost:4873/",
               "GOPROXY": "https://goproxy.example.org|direct", "GOSUMDB": "off"}
    registries = derive(Settings.from_env({"ERA_SETUP_EGRESS_ALLOW": "vcs.example.org, *.cdn.example.org, "
                                                                     "198.51.100.0/24"}), environ)
    policy = registries.policy
    assert set(policy.registry_names) == {"mirror.example.org", "goproxy.example.org", "vcs.example.org"}
    assert set(policy.registry_endpoints) == {("127.0.0.1", 3141), ("10.20.30.40", 8443), ("localhost", 4873)}
    assert "*.cdn.example.org" in policy.allow_names and [str(n) for n in policy.allow_nets] == ["198.51.100.0/24"]
    assert not any("golang.org" in name or "pypi.org" in name for name in policy.allow_names)
    assert registries.env["PIP_INDEX_URL"] == environ["PIP_INDEX_URL"]
    assert registries.env["GOPROXY"] == "https://goproxy.example.org|direct"
    assert registries.env["npm_config_registry"] == "http://localhost:4873/"
    assert registries.env_for("docker")["PIP_EXTRA_INDEX_URL"] == "http://127.0.0.1:3141/simple https://10.20.30.40:8443/s"
    with pytest.raises(ValueError, match="ERA_SETUP_EGRESS_ALLOW.*'10.0.0.0/8' overlaps"):
        Settings.from_env({"ERA_SETUP_EGRESS_ALLOW": "pypi.example.org,10.0.0.0/8"})
    with pytest.raises(ValueError, match="'not a host!' is neither"):
        Settings.from_env({"ERA_SETUP_EGRESS_ALLOW": "not a host!"})


def test_only_a_registry_name_may_resolve_to_a_private_address():
    registries = EgressPolicy(allow_names=("mirror.example.org", "localhost"), registry_names=("mirror.example.org",),
                              registry_endpoints=(("127.0.0.1", 3141), ("localhost", 4873)))
    policy = EgressPolicy(allow_names=("other.example.org",)).with_registries(registries)
    own = [ipaddress.ip_address("192.0.2.2"), ipaddress.ip_address("127.0.0.1")]
    check = lambda address, name, port=443: policy.check_address(  # noqa: E731
        ipaddress.ip_address(address), name, own, (ipaddress.ip_network("10.99.0.0/16"),), port=port)
    assert check("10.1.2.3", "mirror.example.org") is None
    assert check("fd00::5", "mirror.example.org") is None
    assert "private range" in check("10.1.2.3", "other.example.org")
    assert "loopback" in check("127.0.0.1", "mirror.example.org")
    assert "link-local" in check("169.254.169.254", "mirror.example.org")
    assert "server's host" in check("192.0.2.2", "mirror.example.org")
    assert "ERA_EGRESS_DENY" in check("10.99.1.1", "mirror.example.org")
    assert check("127.0.0.1", None, 3141) is None and "loopback" in check("127.0.0.1", None, 3142)
    assert check("127.0.0.1", "localhost", 4873) is None and "loopback" in check("127.0.0.1", "localhost", 3141)
    assert "link-local" in check("169.254.169.254", None, 3141)
