"""JavaScript and TypeScript sessions behind the egress proxy: Node 20's own ``fetch`` and
``http``/``https`` ignore ``HTTP(S)_PROXY``, so the tslab launcher makes them use it
(era_kernel/kernels/node_proxy.js). Real node kernels, the real proxy, and the test
"internet" of tests/support/egress_net.py (a network namespace this module makes, names
from a DNS server the test runs; never a real outside address).

A node session with ``allowInternetAccess: true`` fetches a public name through the
proxy (fetch, http, https), is refused the metadata address with the proxy's answer,
and still reaches its own 127.0.0.1 directly (``NO_PROXY``); a TypeScript session
fetches too; a session without the proxy variables keeps Node's own agents (and its
fetch works under the local address-space cap); and a Docker node session with ``true``
on an engine without a bridge fetches through the proxy too.
"""

from __future__ import annotations

import json

import pytest

from tests.support.era_server import ServerProcess
from tests.test_egress import denials, internet, resolver, run  # noqa: F401 (this module's own fixtures)

from .conftest import require_docker

# A cell's helper: GET url with http/https, "STATUS BODY" or "error MESSAGE". (tslab takes
# a top-level await only in a statement of its own: "const x = await ...".)
GET = """
const get = (url, options = {}) => new Promise((resolve) => {
  (url.startsWith("https:") ? require("https") : require("http")).get(url, options, (res) => {
    let body = "";
    res.on("data", (chunk) => (body += chunk));
    res.on("end", () => resolve(`${res.statusCode} ${body}`));
  }).on("error", (e) => resolve(`error ${e.message}`));
});
"""
HELLO = "hello from the test internet\nhost: files.example.org\n"


@pytest.fixture(scope="module")
def server(resolver):  # noqa: F811
    srv = ServerProcess(env={"ERA_EGRESS_RESOLVER": resolver.address, "ERA_POOL_SIZE": "0"}).start()
    yield srv
    srv.cleanup()


@pytest.fixture(scope="module")
def node_session(server):
    return session(server, "nd-true", "node")


def session(server, sid, language, provisioner="local", internet_access=True):
    server.json("POST", "/api/sessions", {"id": sid, "language": language, "provisioner": provisioner,
                                          "allowInternetAccess": internet_access}, expect=201)
    return sid


def fetches(server, sid):
    """The session's fetch, http.get and https.get reach files.example.org through the proxy."""
    code = GET + ("const plain = await fetch('http://files.example.org/hello');\n"
                  "const plainText = await plain.text();\n"
                  "process.env.NODE_TLS_REJECT_UNAUTHORIZED = '0';  // the test internet's certificate is its own\n"
                  "const secure = await fetch('https://files.example.org/hello');\n"
                  "delete process.env.NODE_TLS_REJECT_UNAUTHORIZED;\n"
                  "const secureText = await secure.text();\n"
                  "const got = await get('http://files.example.org/hello');\n"
                  "const gotSecure = await get('https://files.example.org/hello', { rejectUnauthorized: false });\n"
                  "console.log([process.env.HTTPS_PROXY, plainText, secureText, got, gotSecure].join('|'));\n")
    result = run(server, sid, code)
    assert result["exit_code"] == 0, result
    assert result["stdout"] == f"http://127.0.0.1:3128|{HELLO}|{HELLO}|200 {HELLO}|200 {HELLO}\n", result
    assert "experimental" not in result["stderr"], result  # undici's warning is not the user's


def test_a_node_session_with_internet_fetches_through_the_proxy(server, node_session):
    fetches(server, node_session)


def test_the_proxy_refuses_the_metadata_address_to_fetch_and_http(server, node_session):
    sid = node_session
    result = run(server, sid, "const answer = await fetch('http://169.254.169.254/latest/meta-data/');\n")
    assert result["exit_code"] != 0, result
    # undici's words: its error's cause, which the kernel's traceback shows
    assert result["error"]["evalue"] == "fetch failed", result
    assert "Caused by AbortError: Proxy response (403) !== 200 when HTTP Tunneling" in \
        result["error"]["traceback"], result
    result = run(server, sid, GET + "const got = await get('http://169.254.169.254/latest/meta-data/');\n"
                 "console.log(got);\n")
    assert result["stdout"].startswith("error the proxy refused CONNECT 169.254.169.254:80: 403 era: connection to "
                                       "169.254.169.254 refused by policy: "), result
    reasons = [e["reason"] for e in denials(server, sid) if e["host"] == "169.254.169.254"]
    assert len(reasons) == 2 and all("link-local" in reason for reason in reasons), reasons


def test_a_node_session_with_internet_reaches_its_own_loopback_directly(server, node_session):
    # NO_PROXY keeps 127.0.0.1 direct (the session's own servers, its storage listener):
    # the proxy would refuse loopback, as it does 169.254.169.254 above.
    code = ("const http = require('http');\n"
            "const app = http.createServer((req, res) => res.end('own server ' + req.url));\n"
            "await new Promise((resolve) => app.listen(0, '127.0.0.1', resolve));\n"
            "const port = app.address().port;\n"
            "const direct = await fetch(`http://127.0.0.1:${port}/fetched`);\n"
            "const byName = await fetch(`http://localhost:${port}/by-name`);\n"
            + GET + "const got = await get(`http://127.0.0.1:${port}/got`);\n"
            "app.close();\n"
            "const storage = require('era_storage');  // its listener, 127.0.0.1:80, over http\n"
            "await storage.kv.set('nd', 'k', 'through the listener');\n"
            "const stored = await storage.kv.get('nd', 'k');\n"
            "console.log([await direct.text(), await byName.text(), got, stored].join('|'));\n")
    result = run(server, node_session, code)
    assert result["stdout"] == "own server /fetched|own server /by-name|200 own server /got|through the listener\n", \
        result
    assert server.json("GET", "/api/storage/kv/nd/k")["value"] == "through the listener"
    assert not [e for e in denials(server, node_session) if e["host"] in ("127.0.0.1", "localhost")]


def test_a_typescript_session_with_internet_fetches_through_the_proxy(server):
    sid = session(server, "ts-true", "typescript")
    code = ("const answer: Response = await fetch('http://files.example.org/hello');\n"
            "const text: string = await answer.text();\nconsole.log(text);\n")
    result = run(server, sid, code)
    assert result["stdout"] == HELLO + "\n", result


def test_a_node_session_without_the_proxy_keeps_nodes_own_agents_and_fetches(server):
    # No proxy variables (no internet access): nothing is patched, nothing of undici loaded;
    # and Node's own fetch works under the kernel's address-space cap (its WebAssembly
    # HTTP parser did not fit before --disable-wasm-trap-handler).
    sid = session(server, "nd-none", "node", internet_access=False)
    code = ("const mine = [process.env.HTTP_PROXY, require('http').Agent.prototype.createConnection === "
            "require('net').createConnection, globalThis[Symbol.for('undici.globalDispatcher.1')]];\n"
            "const app = require('http').createServer((req, res) => res.end('own server'));\n"
            "await new Promise((resolve) => app.listen(0, '127.0.0.1', resolve));\n"
            "const answer = await fetch(`http://127.0.0.1:${app.address().port}/`);\n"
            "const text = await answer.text();\napp.close();\n"
            "console.log(...mine, text);\n")
    assert run(server, sid, code)["stdout"] == "undefined true undefined own server\n"


def test_a_docker_node_session_with_internet_and_no_bridge_fetches_through_the_proxy(server):
    require_docker()
    from era_kernel.provisioning.docker import shared_docker_client

    if any(n.name == "era-egress" for n in shared_docker_client().networks.list()):
        pytest.skip("this Docker engine has the era-egress network: internet sessions use it, not the proxy")
    fetches(server, session(server, "nd-docker", "node", provisioner="docker"))
