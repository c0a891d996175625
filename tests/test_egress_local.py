"""SECURITY.md case 20 for local sessions: ``allowInternetAccess: true`` on the local
provisioner is the egress proxy with an allow-all policy, not the host's network.

Against a real server per local launcher (``fork``, the default, and ``bwrap``) and the
test "internet" of tests/support/egress_net.py (a network namespace this module makes,
203.0.113.x, names from a DNS server the test runs; never a real outside address): such
a session reaches any public name through the proxy, and nothing of the host, loopback,
private or link-local ranges, with or without the proxy. Its sandbox has a network of
its own, so its ports are proxied and its storage listener opens. ``ERA_EGRESS_LOCAL=host``
gives back the old, documented-unsafe host network.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.support.api_errors import assert_error_shape
from tests.support.era_server import ServerProcess
from tests.test_egress import denials, fetch, internet, resolver, run  # noqa: F401 (this module's own fixtures)

SID = "lt-true"


@pytest.fixture(scope="module", params=["fork", "bwrap"])
def server(request, resolver):  # noqa: F811
    srv = ServerProcess(env={"ERA_EGRESS_RESOLVER": resolver.address, "ERA_LOCAL_LAUNCHER": request.param,
                             "ERA_POOL_SIZE": "0"}).start()
    srv.launcher = request.param
    yield srv
    srv.cleanup()


@pytest.fixture(scope="module")
def session(server):
    server.json("POST", "/api/sessions", {"id": SID, "allowInternetAccess": True}, expect=201)
    # The launcher asked for is the one that ran it: pid 1 of its sandbox is the fork
    # launcher's init, or bubblewrap.
    init = run(server, SID, "print(open('/proc/1/comm').read().strip())")["stdout"].strip()
    assert init == {"fork": "era-fork-init", "bwrap": "bwrap"}[server.launcher]
    return SID


def test_a_local_session_with_internet_reaches_public_names_through_the_proxy(server, session):
    proxy = run(server, session, "import os\nprint(os.environ.get('HTTPS_PROXY'))")["stdout"]
    assert proxy == "http://127.0.0.1:3128\n"
    # Any public name: evil.example.org is only refused by the policy sessions' own list.
    for url in ("http://files.example.org/hello", "https://files.example.org/hello", "http://evil.example.org/hi"):
        result = run(server, session, fetch(url))
        assert result["exit_code"] == 0 and result["stdout"].startswith("hello from the test internet"), result
    # A command beside the kernel (its sandbox, its environment) goes the same way.
    ran = server.json("POST", f"/api/sessions/{session}/commands",
                      {"cmd": ["python3", "-c", fetch("http://files.example.org/hello")], "timeout": 30})
    assert ran["exit_code"] == 0 and ran["stdout"].startswith("hello from the test internet"), ran


def test_a_local_session_with_internet_reaches_nothing_of_the_host(server, session, internet):  # noqa: F811
    # Through the proxy: loopback (the server's own port too), private, link-local and the
    # host's own address are refused by policy, whatever the name resolves to.
    code = ("import os, urllib.request, urllib.error\n"
            "kept = os.environ['NO_PROXY']\n"
            "os.environ['no_proxy'] = os.environ['NO_PROXY'] = ''  # loopback through the proxy too (this run only)\n"
            f"for url in ['http://rebind.example.org/', 'http://private.example.org/', "
            f"'http://metadata.example.org/latest/meta-data/', 'http://{internet.host_address}:{server.port}/health', "
            f"'http://127.0.0.1:{server.port}/health', 'http://169.254.169.254/', 'http://10.1.2.3/']:\n"
            "    try:\n        urllib.request.urlopen(url, timeout=10); print('reached', url)\n"
            "    except urllib.error.HTTPError as e:\n        print(e.code, e.reason)\n"
            "os.environ['no_proxy'] = os.environ['NO_PROXY'] = kept\n")
    lines = run(server, session, code)["stdout"].splitlines()
    assert len(lines) == 7 and all(line.startswith("403 era: connection to ") and "refused by policy" in line
                                   for line in lines), lines
    reasons = {e["host"]: e["reason"] for e in denials(server, session)}
    assert reasons["127.0.0.1"] == "127.0.0.1 is loopback, always denied"
    assert "link-local" in reasons["169.254.169.254"] and "link-local" in reasons["metadata.example.org"]
    assert "private range" in reasons["10.1.2.3"] and "address of the server's host" in reasons[internet.host_address]
    # Around the proxy: no route, no resolver, and no Docker socket in its file view.
    docker = os.environ.get("DOCKER_HOST", "")
    sockets = ["/var/run/docker.sock", "/run/docker.sock"] + ([docker[7:]] if docker.startswith("unix://") else [])
    code = ("import os, socket\n"
            f"for addr in [('127.0.0.1', {server.port}), ('{internet.host_address}', {server.port}), "
            f"('{internet.address}', 80), ('169.254.169.254', 80), ('10.1.2.3', 80)]:\n"
            "    try:\n        socket.create_connection(addr, 2).close(); print('reached', addr)\n"
            "    except OSError:\n        print('no')\n"
            "try:\n    socket.getaddrinfo('files.example.org', 80); print('resolved')\n"
            "except OSError:\n    print('no dns')\n"
            f"print(any(os.path.exists(p) for p in {sockets!r}))\n")
    assert run(server, session, code)["stdout"] == "no\nno\nno\nno\nno\nno dns\nFalse\n"


def test_a_local_session_with_internet_gets_its_ports_proxied_and_its_storage_listener(server, session):
    # Its 127.0.0.1 is its own now, not the server's: /proxy opens it (it answered 422 while
    # such a session shared the host's network), and the storage listener is there.
    started = run(server, session, "import subprocess, sys, time\n"
                  "app = subprocess.Popen([sys.executable, '-m', 'http.server', '8765', '--bind', '127.0.0.1'],\n"
                  "                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
                  "import socket\nfor _ in range(100):\n"
                  "    try:\n        socket.create_connection(('127.0.0.1', 8765), 1).close(); break\n"
                  "    except OSError:\n        time.sleep(0.05)\nprint('up')\n")
    assert started["stdout"] == "up\n", started
    status, body = server.request("GET", f"/proxy/{session}/8765/")
    assert status == 200 and b"Directory listing" in body, (status, body[:300])
    out = run(server, session, "import os\ndel os.environ['ERA_STORAGE_TOKEN'], os.environ['ERA_STORAGE_URL']\n"
              "import era_storage as s\ns.kv.set('lt', 'k', 'through the listener')\nprint(s.kv.get('lt', 'k'))\n")
    assert out["stdout"] == "through the listener\n", out
    assert server.json("GET", "/api/storage/kv/lt/k")["value"] == "through the listener"


def test_a_one_shot_run_with_internet_goes_through_the_proxy(server):
    code = (fetch("http://files.example.org/hello") + "import urllib.request, urllib.error\n"
            "try:\n    urllib.request.urlopen('http://metadata.example.org/', timeout=5)\n"
            "except urllib.error.HTTPError as e:\n    print(e.code)\n")
    result = server.json("POST", "/api/execute", {"code": code, "allowInternetAccess": True, "timeout": 30})
    assert result["stdout"] == "hello from the test internet\nhost: files.example.org\n403\n", result


def test_era_egress_local_host_gives_the_host_network_back():
    """The old behaviour, documented as unsafe: the kernel shares the host's network, so
    the server's own loopback port answers it, no proxy is set, and /proxy refuses its
    ports (its 127.0.0.1 is the server's)."""
    srv = ServerProcess(env={"ERA_EGRESS_LOCAL": "host", "ERA_POOL_SIZE": "0"}).start()
    try:
        srv.json("POST", "/api/sessions", {"id": "lt-host", "allowInternetAccess": True}, expect=201)
        code = ("import os, urllib.request\nprint(os.environ.get('HTTP_PROXY'))\n"
                f"print(urllib.request.urlopen('http://127.0.0.1:{srv.port}/health', timeout=5).status)\n")
        assert run(srv, "lt-host", code)["stdout"] == "None\n200\n"
        status, body = srv.request("GET", f"/proxy/lt-host/{srv.port}/health")
        assert "server's network" in assert_error_shape(status, body, 422)["error"]
    finally:
        srv.cleanup()


def test_era_doctor_says_where_local_sessions_with_internet_go_out():
    from era_kernel.config import Settings
    from era_kernel.doctor import _egress

    settings = Settings.from_env({})
    can = os.geteuid() == 0 and shutil.which("bwrap")  # the proxy needs a sandbox to enter, and root
    assert _egress(settings)[:2] == ("egress", "OK" if can else "WARN")
    for changed, why in (({"ERA_EGRESS_LOCAL": "host"}, "ERA_EGRESS_LOCAL=host"),
                         ({"ERA_SANDBOX": "none"}, "no bubblewrap sandbox")):
        name, status, detail = _egress(settings.replace(**changed))
        assert status == "WARN" and "share the host's network" in detail and why in detail, detail
    with pytest.raises(ValueError):
        Settings.from_env({"ERA_EGRESS_LOCAL": "bridge"})
