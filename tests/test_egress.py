"""The egress policy end to end, against one real server and a test "internet" that is a
network namespace this module creates (tests/support/egress_net.py: an HTTP and an
HTTPS server on a 203.0.113.x documentation address, names answered by a DNS server the
test runs). Nothing reaches a real outside address.

A session whose ``allowInternetAccess`` is a policy reaches allowed names through the
egress proxy (HTTP and HTTPS CONNECT, on both provisioners) and nothing else: a denied
name, a name that resolves to loopback, a private range or the metadata address (DNS
rebinding), the host's own address, and a TLS ClientHello naming another host are
refused, each logged as a session event, and a run's error says "refused by policy";
there is no route around the proxy. A Docker session with ``true`` on an engine without
an egress network goes through the same proxy instead of host networking, and so does a
local session with ``true`` (tests/test_egress_local.py).
"""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.support.era_server import ServerProcess
from tests.support.egress_net import Internet, Resolver

from .conftest import require_docker, require_gvisor

POLICY = {"allow": ["*.example.org", "203.0.113.0/24"], "deny": ["evil.example.org"]}
PROVISIONERS = ["local", "docker"]


@pytest.fixture(scope="module")
def internet():
    if os.geteuid() != 0:  # network namespaces, and the server entering its sandboxes' (setns)
        message = "the egress tests need root"
        if os.environ.get("ERA_REQUIRE_SANDBOX") == "1":
            pytest.fail(message)
        pytest.skip(message)
    net = Internet().start()
    yield net
    net.close()


@pytest.fixture(scope="module")
def resolver(internet):
    dns = Resolver({"files.example.org": internet.address, "evil.example.org": internet.address,
                    "rebind.example.org": "127.0.0.1", "private.example.org": "10.1.2.3",
                    "metadata.example.org": "169.254.169.254"})
    yield dns
    dns.close()


@pytest.fixture(scope="module")
def server(resolver):
    srv = ServerProcess(env={"ERA_EGRESS_RESOLVER": resolver.address}).start()
    yield srv
    srv.cleanup()


@pytest.fixture(scope="module")
def sessions(server):
    made = {}
    for provisioner in PROVISIONERS:
        sid = f"eg-{provisioner}"
        status, body = server.request("POST", "/api/sessions", {"id": sid, "provisioner": provisioner,
                                                                "allowInternetAccess": POLICY})
        made[provisioner] = (status, body)
    return made


@pytest.fixture(params=PROVISIONERS)
def sid(request, sessions):
    if request.param == "docker":
        require_docker()
    status, body = sessions[request.param]
    assert status == 201, body
    return json.loads(body)["id"]


def run(server, sid, code, timeout=40):
    return server.json("POST", f"/api/sessions/{sid}/run", {"code": code, "timeout": timeout})


def fetch(url: str) -> str:
    return (f"import ssl, urllib.request\nctx = ssl.create_default_context()\nctx.check_hostname = False\n"
            f"ctx.verify_mode = ssl.CERT_NONE\n"
            f"print(urllib.request.urlopen({url!r}, timeout=15, context=ctx).read().decode(), end='')\n")


def denials(server, sid):
    events = server.json("GET", f"/api/sessions/{sid}/events?limit=1000")["events"]
    return [e for e in events if e["type"] == "egress_denied"]


def test_an_allowed_name_is_reached_over_http_and_https(server, sid):
    doc = server.json("GET", f"/api/sessions/{sid}")
    assert doc["allowInternetAccess"] == POLICY
    for scheme in ("http", "https"):
        result = run(server, sid, fetch(f"{scheme}://files.example.org/hello"))
        assert result["exit_code"] == 0, result
        assert result["stdout"] == "hello from the test internet\nhost: files.example.org\n", result


def test_a_denied_name_is_refused_by_policy_and_logged(server, sid):
    result = run(server, sid, fetch("http://evil.example.org/hello"))
    assert result["exit_code"] != 0
    assert "connection to evil.example.org refused by policy" in json.dumps(result), result
    https = run(server, sid, fetch("https://evil.example.org/hello"))
    assert https["exit_code"] != 0 and "refused by policy" in json.dumps(https), https
    logged = [e for e in denials(server, sid) if e["host"] == "evil.example.org"]
    assert logged and "denied pattern evil.example.org" in logged[-1]["reason"], logged


def test_names_resolving_to_forbidden_addresses_are_refused(server, sid, internet):
    # Each name is allowed by *.example.org; what it resolves to is not (DNS rebinding).
    code = ("import os, urllib.request, urllib.error\n"
            "os.environ['no_proxy'] = os.environ['NO_PROXY'] = ''  # loopback through the proxy too\n"
            f"for url in ['http://rebind.example.org/', 'http://private.example.org/', "
            f"'http://metadata.example.org/latest/meta-data/', 'http://{internet.host_address}/', "
            f"'http://127.0.0.1:{server.port}/health', 'http://169.254.169.254/']:\n"
            "    try:\n        urllib.request.urlopen(url, timeout=10); print('reached', url)\n"
            "    except urllib.error.HTTPError as e:\n        print(e.code, e.reason)\n")
    result = run(server, sid, code)
    lines = result["stdout"].splitlines()
    assert len(lines) == 6 and all(line.startswith("403 era: connection to ") and "refused by policy" in line
                                   for line in lines), result
    reasons = {e["host"]: e["reason"] for e in denials(server, sid)}
    assert "127.0.0.1 is loopback, always denied" == reasons["rebind.example.org"]
    assert "10.1.2.3 is a private range, always denied" == reasons["private.example.org"]
    assert "link-local" in reasons["metadata.example.org"] and "link-local" in reasons["169.254.169.254"]
    assert "address of the server's host" in reasons[internet.host_address]


def test_a_tls_hello_naming_another_host_is_refused(server, sid):
    code = """
import socket, ssl
def tunnel(sni):
    s = socket.create_connection(("127.0.0.1", 3128), 5)
    s.sendall(b"CONNECT files.example.org:443 HTTP/1.1\\r\\nHost: files.example.org:443\\r\\n\\r\\n")
    head = b""
    while not head.endswith(b"\\r\\n\\r\\n"):
        head += s.recv(1)
    ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
    try:
        ctx.wrap_socket(s, server_hostname=sni).close(); return "handshake"
    except (ssl.SSLError, OSError) as e:
        return "cut"
print(tunnel("files.example.org"), tunnel("evil.example.org"))
"""
    result = run(server, sid, code)
    assert result["stdout"] == "handshake cut\n", result
    assert any("TLS server name 'evil.example.org'" in e["reason"] for e in denials(server, sid))


def test_there_is_no_way_out_but_the_proxy(server, sid, internet):
    code = ("import socket\n"
            f"for addr in [('{internet.address}', 80), ('{internet.address}', 443), ('169.254.169.254', 80), "
            f"('127.0.0.1', {server.port})]:\n"
            "    try:\n        socket.create_connection(addr, 2).close(); print('reached', addr)\n"
            "    except OSError:\n        print('no')\n"
            "try:\n    socket.getaddrinfo('files.example.org', 80); print('resolved')\n"
            "except OSError:\n    print('no dns')\n")
    result = run(server, sid, code)
    assert result["stdout"] == "no\nno\nno\nno\nno dns\n", result


@pytest.mark.parametrize("policy, says", [
    ({"allow": ["files.example.org", "not a host!"]}, "'not a host!' is neither a host pattern"),
    ({"allow": ["*.example.org"], "deny": ["203.0.113.0/99"]}, "'203.0.113.0/99' is neither"),
    ({"allow": ["10.0.0.0/8"]}, "always denied"),
    ({"allow": ["0.0.0.0/0"]}, "always denied"),
    ({"allow": ["x.example.org"], "proxy": "on"}, "unknown key"),
])
def test_bad_policies_are_refused_naming_the_entry(server, policy, says):
    for path, body in (("/api/sessions", {"allowInternetAccess": policy}),
                       ("/api/execute", {"code": "1", "allowInternetAccess": policy})):
        status, answer = server.request("POST", path, body)
        assert status == 400 and says in answer.decode(), (path, status, answer)
    status, answer = server.request("PATCH", "/api/sessions/eg-local", {"allowInternetAccess": policy})
    assert status == 400 and says in answer.decode()


def test_docker_with_internet_and_no_bridge_goes_through_the_proxy(server, internet):
    require_docker()
    from era_kernel.provisioning.docker import shared_docker_client

    if any(n.name == "era-egress" for n in shared_docker_client().networks.list()):
        pytest.skip("this Docker engine has the era-egress network: internet sessions use it, not the proxy")
    server.json("POST", "/api/sessions", {"id": "eg-docker-true", "provisioner": "docker",
                                          "allowInternetAccess": True}, expect=201)
    result = run(server, "eg-docker-true", fetch("http://files.example.org/hello"))
    assert result["stdout"].startswith("hello from the test internet"), result
    code = ("import os, socket, urllib.request, urllib.error\n"
            "os.environ['no_proxy'] = os.environ['NO_PROXY'] = ''\n"
            f"try:\n    urllib.request.urlopen('http://127.0.0.1:{server.port}/health', timeout=5); print('reached')\n"
            "except urllib.error.HTTPError as e:\n    print(e.code)\n"
            f"try:\n    socket.create_connection(('127.0.0.1', {server.port}), 2); print('reached')\n"
            "except OSError:\n    print('no')\n")
    result = run(server, "eg-docker-true", code)
    assert result["stdout"] == "403\nno\n", result


def test_a_gvisor_session_reaches_allowed_names_through_the_proxy_only(server, internet):
    require_gvisor()
    server.json("POST", "/api/sessions", {"id": "eg-gvisor", "provisioner": "docker", "isolation": "gvisor",
                                          "allowInternetAccess": POLICY}, expect=201)
    result = run(server, "eg-gvisor", fetch("http://files.example.org/hello"), timeout=90)
    assert result["stdout"].startswith("hello from the test internet"), result
    code = ("import socket, urllib.request, urllib.error\n"
            "try:\n    urllib.request.urlopen('http://evil.example.org/', timeout=5); print('reached')\n"
            "except urllib.error.HTTPError as e:\n    print(e.code)\n"
            f"try:\n    socket.create_connection(('{internet.address}', 80), 2); print('reached')\n"
            "except OSError:\n    print('no')\n")
    result = run(server, "eg-gvisor", code)
    assert result["stdout"] == "403\nno\n", result


def test_commands_beside_the_kernel_go_through_the_proxy_too(server, sid):
    # The commands' supervisor runs in the kernel's sandbox with its environment: the
    # proxy's variables and its listener are there.
    allowed = server.json("POST", f"/api/sessions/{sid}/commands",
                          {"cmd": ["python3", "-c", fetch("http://files.example.org/hello")], "timeout": 30})
    assert allowed["exit_code"] == 0 and allowed["stdout"].startswith("hello from the test internet"), allowed
    denied = server.json("POST", f"/api/sessions/{sid}/commands",
                         {"cmd": ["python3", "-c", fetch("http://evil.example.org/hello")], "timeout": 30})
    assert denied["exit_code"] != 0 and "refused by policy" in denied["stderr"], denied


def test_a_restarted_kernel_gets_the_proxy_and_a_patched_policy_applies(server):
    sid = "eg-patch"
    server.json("POST", "/api/sessions", {"id": sid, "allowInternetAccess": POLICY}, expect=201)
    assert run(server, sid, fetch("http://files.example.org/hello"))["exit_code"] == 0
    server.request("POST", f"/api/sessions/{sid}/restart")
    result = run(server, sid, fetch("http://files.example.org/hello"))
    assert result["stdout"].startswith("hello from the test internet"), result
    # A new policy takes effect from the next kernel (the patch stops the current one).
    server.json("PATCH", f"/api/sessions/{sid}", {"allowInternetAccess": {"allow": ["other.example.org"]}})
    doc = server.json("GET", f"/api/sessions/{sid}")
    assert doc["allowInternetAccess"] == {"allow": ["other.example.org"], "deny": []}
    result = run(server, sid, fetch("http://files.example.org/hello"))
    assert "files.example.org is not in the allow list" in json.dumps(result), result
    # And false: no proxy at all, nothing reached.
    server.json("PATCH", f"/api/sessions/{sid}", {"allowInternetAccess": False})
    result = run(server, sid, "import os\nprint(os.environ.get('HTTP_PROXY'))\n" + fetch("http://files.example.org/x"))
    assert result["stdout"].startswith("None\n") and result["exit_code"] != 0, result


def test_a_host_header_naming_another_host_is_not_passed_on(server, sid):
    # The upstream sees the checked name, never a virtual host the policy did not see.
    code = """
import socket
s = socket.create_connection(("127.0.0.1", 3128), 5)
s.sendall(b"GET http://files.example.org/hello HTTP/1.1\\r\\nHost: evil.example.org\\r\\n\\r\\n")
answer = b""
while chunk := s.recv(65536):
    answer += chunk
print(answer.split(b"\\r\\n\\r\\n", 1)[1].decode(), end="")
"""
    assert run(server, sid, code)["stdout"] == "hello from the test internet\nhost: files.example.org\n"


def test_a_one_shot_run_with_a_policy_goes_through_the_proxy(server):
    for url, ok in (("http://files.example.org/hello", True), ("http://evil.example.org/hello", False)):
        result = server.json("POST", "/api/execute", {"code": fetch(url), "allowInternetAccess": POLICY,
                                                      "timeout": 30})
        if ok:
            assert result["stdout"].startswith("hello from the test internet"), result
        else:
            assert result["exit_code"] != 0 and "refused by policy" in json.dumps(result), result


@pytest.mark.parametrize("provisioner, allow", [("local", "policy"), ("docker", "policy"), ("local", "true")])
def test_setup_commands_and_vm_commands_of_a_policy_session_go_through_the_proxy(server, internet, provisioner,
                                                                                 allow):
    """Setup commands "have network" (ERA's rule), and a policy session's network is the
    proxy: they reach allowed names through it and nothing else, as its kernel does; so
    does a command run beside the kernel (ERA's /api/vm/{id}/run). A local session with
    ``true`` too: its network is the proxy under an allow-all policy (ERA_EGRESS_LOCAL)."""
    if provisioner == "docker":
        require_docker()
    sid = f"eg-setup-{provisioner}-{allow}"
    direct = f"python3 -c \"import socket; socket.create_connection(('{internet.address}', 80), 3)\""
    commands = [f"python3 - > got.txt <<'EOF'\n{fetch('http://files.example.org/hello')}EOF",
                f"python3 - > denied.txt 2>&1 <<'EOF'\n{fetch('http://metadata.example.org/latest')}EOF\ntrue",
                f"{direct} > direct.txt 2>&1; true"]
    server.json("POST", "/api/sessions", {"id": sid, "provisioner": provisioner,
                                          "allowInternetAccess": POLICY if allow == "policy" else True,
                                          "setup": {"commands": commands}}, expect=201)
    try:
        for _ in range(600):
            doc = server.json("GET", f"/api/sessions/{sid}")
            if doc["setup_status"] not in ("pending", "running"):
                break
            time.sleep(0.1)
        assert doc["setup_status"] == "completed", doc
        read = lambda name: server.request("GET", f"/api/sessions/{sid}/files/{name}")[1].decode()  # noqa: E731
        assert read("got.txt").startswith("hello from the test internet")
        assert "refused by policy" in read("denied.txt"), read("denied.txt")
        assert "Traceback" in read("direct.txt"), read("direct.txt")  # no route but the proxy
        assert any(e["host"] == "metadata.example.org" for e in denials(server, sid))
        ran = server.json("POST", f"/api/vm/{sid}/run", {"command": f"python3 - <<'EOF'\n{fetch('http://files.example.org/hello')}EOF",
                                                        "timeout": 30})
        assert ran["exit_code"] == 0 and ran["stdout"].startswith("hello from the test internet"), ran
        ran = server.json("POST", f"/api/vm/{sid}/run", {"command": f"python3 - <<'EOF'\n{fetch('http://metadata.example.org/x')}EOF",
                                                        "timeout": 30})
        assert ran["exit_code"] != 0 and "refused by policy" in ran["stderr"], ran
    finally:
        server.request("DELETE", f"/api/sessions/{sid}")
