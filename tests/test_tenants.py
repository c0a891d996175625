"""Tenants (issue 21 item 3): API keys made with ``era keys``, each seeing and touching
only its own sessions, with limits; ``ERA_API_KEY`` stays the admin key.

One real server on loopback (local provisioner) for the module; the keys are made by
the real ``era keys`` command on the server's store, as an operator would, while the
server runs. Another tenant's session is always answered as a missing one: same status,
same body (the id aside), never a 403 that would confirm it exists.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from era_server.handlers.sockets import BoundedSocket
from era_server.routes import ROUTES
from tests.support.api_errors import assert_error_shape, sample_path
from tests.support.era_server import ServerProcess

ADMIN_KEY = "tenants-admin-key-7c2e"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def era_keys(server: ServerProcess, *args: str) -> subprocess.CompletedProcess:
    """``era keys ...`` on the server's store (its data directory), as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "era_kernel.cli", "keys", *args], env=server.env,
                          capture_output=True, text=True, timeout=60)


def make_key(server: ServerProcess, name: str, *limits: str) -> dict[str, str]:
    done = era_keys(server, "create", "--name", name, *limits)
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert key.startswith("era_k.") and "\n" not in key
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(env={"ERA_API_KEY": ADMIN_KEY, "ERA_PROVISIONER": "local"})
    srv.start()
    srv.keys = {name: make_key(srv, name) for name in ("alice", "bob")}
    # Tight limits, on a tenant of their own so the isolation tests are not held by them.
    srv.keys["carol"] = make_key(srv, "carol", "--sessions", "2", "--kernels", "1", "--runs-per-minute", "2",
                                 "--storage-bytes", "100")
    yield srv
    srv.cleanup()


@pytest.fixture(scope="module")
def alices(server):
    """Alice's session, with a kernel (a run done) and a file."""
    alice = server.keys["alice"]
    server.json("POST", "/api/sessions", {"id": "alice-s"}, alice, expect=201)
    run = server.json("POST", "/api/sessions/alice-s/run", {"code": "print('hi')"}, alice)
    assert run["stdout"] == "hi\n", run
    status, body = server.request("PUT", "/api/sessions/alice-s/files/secret.txt", b"alice only", alice)
    assert status in (200, 201), body
    return "alice-s"


def missing_like(server: ServerProcess, method: str, path: str, sid: str, headers: dict, body=None) -> None:
    """``path`` (on session ``sid``) answers exactly as the same route on a missing session."""
    status, got = server.request(method, path, body, headers)
    absent = path.replace(sid, "absent-tenant-s")
    status_missing, want = server.request(method, absent, body, headers)
    assert_error_shape(status, got, 404)
    assert status == status_missing == 404, (path, status_missing, want)
    assert json.loads(got.decode().replace(sid, "absent-tenant-s")) == json.loads(want)


SESSION_ROUTES = [
    ("GET", "/api/sessions/{sid}", None),
    ("PATCH", "/api/sessions/{sid}", {"metadata": {"x": 1}}),
    ("DELETE", "/api/sessions/{sid}", None),
    ("POST", "/api/sessions/{sid}/duplicate", {}),
    ("GET", "/api/sessions/{sid}/files", None),
    ("GET", "/api/sessions/{sid}/files/secret.txt", None),
    ("PUT", "/api/sessions/{sid}/files/planted.txt", "x"),
    ("POST", "/api/sessions/{sid}/run", {"code": "print(1)"}),
    ("POST", "/api/sessions/{sid}/run", {"code": 5, "timeout": "x"}),  # a bad body must not tell them apart
    ("PATCH", "/api/sessions/{sid}", {"metadata": "not an object"}),
    ("POST", "/api/sessions/{sid}/stream", {"code": "print(1)"}),
    ("GET", "/api/sessions/{sid}/runs", None),
    ("POST", "/api/sessions/{sid}/commands", {"command": "id"}),
    ("GET", "/api/sessions/{sid}/processes", None),
    ("GET", "/api/sessions/{sid}/events", None),
    ("POST", "/api/sessions/{sid}/restart", None),
    ("GET", "/api/sessions/{sid}/host?port=8000", None),
    ("GET", "/api/vm/{sid}", None),
    ("POST", "/api/vm/{sid}/run", {"command": "id"}),
    ("GET", "/api/kernels/{sid}", None),
    ("POST", "/api/kernels/{sid}/interrupt", None),
]


@pytest.mark.parametrize("method, template, body", SESSION_ROUTES, ids=[f"{m} {t}" for m, t, _ in SESSION_ROUTES])
def test_another_tenants_session_is_a_404_like_a_missing_one(server, alices, method, template, body):
    missing_like(server, method, template.format(sid=alices), alices, server.keys["bob"], body)


# Every session route of the route table, every method: a new route cannot skip the door.
# (WebSockets have their own test; /proxy answers for a private session below.)
TABLE = [(r.template, m.upper(), r.handler) for r in ROUTES
         if "{id}" in r.template and not r.template.startswith("/proxy/") and not issubclass(r.handler, BoundedSocket)
         for m in r.handler.API]


@pytest.mark.parametrize("template, method, handler", TABLE, ids=[f"{m} {t}" for t, m, _ in TABLE])
def test_every_session_route_hides_another_tenants_session(server, alices, template, method, handler):
    status, body = server.request(method, sample_path(template, alices), b"{}", server.keys["bob"])
    assert json.loads(assert_error_shape(status, body, 404) and body) == {
        "error": handler.NOT_FOUND.format(id=alices), "status_code": 404}


def test_the_owner_and_the_admin_reach_the_session_and_nothing_was_touched(server, alices):
    for headers in (server.keys["alice"], ADMIN):
        doc = server.json("GET", f"/api/sessions/{alices}", headers=headers)
        assert doc["metadata"] == {}, doc  # bob's PATCH did nothing
        files = server.json("GET", f"/api/sessions/{alices}/files", headers=headers)
        assert "planted.txt" not in json.dumps(files), files  # nor his PUT
        status, content = server.request("GET", f"/api/sessions/{alices}/files/secret.txt", headers=headers)
        assert (status, content) == (200, b"alice only")


def test_listings_and_bulk_deletes_hold_only_the_callers_sessions(server, alices):
    bob = server.keys["bob"]
    server.json("POST", "/api/sessions", {"id": "bob-s"}, bob, expect=201)
    try:
        assert [s["id"] for s in server.json("GET", "/api/sessions", headers=bob)["sessions"]] == ["bob-s"]
        assert [vm["id"] for vm in server.json("GET", "/api/vms", headers=bob)["vms"]] == ["bob-s"]
        listed = {s["id"] for s in server.json("GET", "/api/sessions", headers=ADMIN)["sessions"]}
        assert {alices, "bob-s"} <= listed
        # Bob's bulk delete, by id and by prefix and of "everything", reaches only his own.
        assert server.json("DELETE", "/api/sessions", {"ids": [alices]}, bob)["deleted"] == []
        assert server.json("DELETE", "/api/sessions?prefix=alice", None, bob)["deleted"] == []
        assert server.json("DELETE", "/api/sessions", None, bob)["deleted"] == ["bob-s"]
        server.json("GET", f"/api/sessions/{alices}", headers=server.keys["alice"])
    finally:
        server.request("DELETE", "/api/sessions/bob-s", None, ADMIN)


def test_stats_show_a_tenant_its_own_sessions_and_kernels_only(server, alices):
    """/api/resources/stats lists live kernels by session id: to a tenant key, only its
    own (another tenant's ids would confirm sessions that are a 404 to it everywhere else),
    no pooled kernels, and the cluster's totals without the replicas' addresses."""
    bob = server.keys["bob"]
    mine = server.json("GET", "/api/resources/stats", headers=bob)
    assert alices not in json.dumps(mine), mine
    assert (mine["sessions"], mine["live_kernels"], mine["kernels"]) == (0, 0, [])
    assert "replicas" not in mine["cluster"] and "live_kernels" in mine["cluster"]
    alice = server.json("GET", "/api/resources/stats", headers=server.keys["alice"])
    assert [k["session_id"] for k in alice["kernels"]] == [alices] and alice["sessions"] == 1
    admin = server.json("GET", "/api/resources/stats", headers=ADMIN)
    assert alices in {k["session_id"] for k in admin["kernels"]} and "replicas" in admin["cluster"]


async def test_websockets_and_the_terminal_of_another_tenant_are_404(server, alices):
    bob_key = server.keys["bob"]["Authorization"].split()[1]
    alice_key = server.keys["alice"]["Authorization"].split()[1]
    for path in (f"/api/sessions/{alices}/ws", f"/api/sessions/{alices}/terminal", f"/api/kernels/{alices}/channels"):
        for request in (HTTPRequest(f"{server.ws_base}{path}", headers=server.keys["bob"]),
                        HTTPRequest(f"{server.ws_base}{path}?token={bob_key}")):
            if path.endswith("/channels") and "token=" in request.url:
                continue  # the gateway channel takes the header only
            with pytest.raises(HTTPClientError) as info:
                await websocket_connect(request)
            assert info.value.code == 404, path
            body = json.loads(info.value.response.body)
            noun = "kernel" if path.endswith("/channels") else "session"
            assert body["error"] == f"{noun} {alices} not found"
    conn = await websocket_connect(f"{server.ws_base}/api/sessions/{alices}/ws?token={alice_key}")
    hello = json.loads(await conn.read_message())
    assert hello["session_id"] == alices
    conn.close()


def test_gateway_kernels_are_listed_and_reached_by_their_tenant_only(server):
    bob, alice = server.keys["bob"], server.keys["alice"]
    kernel = server.json("POST", "/api/kernels", {"name": "era-python-local"}, bob, expect=201)
    try:
        assert [k["id"] for k in server.json("GET", "/api/kernels", headers=bob)] == [kernel["id"]]
        assert kernel["id"] not in {k["id"] for k in server.json("GET", "/api/kernels", headers=alice)}
        assert kernel["id"] in {k["id"] for k in server.json("GET", "/api/kernels", headers=ADMIN)}
        missing_like(server, "GET", f"/api/kernels/{kernel['id']}", kernel["id"], alice)
        missing_like(server, "DELETE", f"/api/kernels/{kernel['id']}", kernel["id"], alice)
    finally:
        server.request("DELETE", f"/api/kernels/{kernel['id']}", None, bob)


def test_storage_namespaces_are_the_tenants_own_and_a_sessions_token_acts_for_its_owner(server, alices):
    alice, bob = server.keys["alice"], server.keys["bob"]
    server.json("PUT", "/api/storage/kv/shared/k", {"value": "alice's"}, alice)
    server.json("PUT", "/api/storage/kv/shared/k", {"value": "admin's"}, ADMIN)
    assert_error_shape(*server.request("GET", "/api/storage/kv/shared/k", None, bob), 404)
    assert server.json("GET", "/api/storage/kv/shared", headers=bob)["keys"] == []
    server.json("PUT", "/api/storage/kv/shared/k", {"value": "bob's"}, bob)
    assert server.json("GET", "/api/storage/kv/shared/k", headers=alice)["value"] == "alice's"
    assert server.json("GET", "/api/storage/kv/shared/k", headers=bob)["value"] == "bob's"
    assert server.json("GET", "/api/storage/kv/shared/k", headers=ADMIN)["value"] == "admin's"
    # Code in alice's session shows its token: it reaches alice's namespace.
    run = server.json("POST", f"/api/sessions/{alices}/run",
                      {"code": "import os; print(os.environ['ERA_STORAGE_TOKEN'])"}, alice)
    token = {"Authorization": f"Bearer {run['stdout'].strip()}"}
    assert server.json("GET", "/api/storage/kv/shared/k", headers=token)["value"] == "alice's"


def test_a_private_sessions_port_is_a_404_for_another_tenant(server, alices):
    missing_like(server, "GET", f"/proxy/{alices}/8000/", alices, server.keys["bob"])
    assert_error_shape(*server.request("GET", f"/proxy/{alices}/8000/"), 403)  # no key: ERA's 403, as before
    status, body = server.request("GET", f"/proxy/{alices}/8000/", None, server.keys["alice"])
    assert status not in (401, 403, 404), body  # past the door (nothing listens there: 502)


def test_limits_answer_429_with_retry_after_and_the_limits_name(server):
    carol = server.keys["carol"]

    def refused(method, path, body, limit):
        status, headers, data = server.request_full(method, path, body, carol)
        error = assert_error_shape(status, data, 429)
        assert error["details"]["limit"] == limit and limit in error["error"], error
        assert int(headers["Retry-After"]) >= 1
        return error

    server.json("POST", "/api/sessions", {"id": "carol-1"}, carol, expect=201)
    # A second session would start a second kernel: kernels (1) holds before sessions (2).
    for _ in range(50):
        if server.json("GET", "/api/sessions/carol-1", headers=carol)["kernel"]["state"] != "none":
            break
        time.sleep(0.1)
    refused("POST", "/api/sessions", {"id": "carol-2"}, "kernels")
    server.json("POST", "/api/sessions/carol-1/run", {"code": "1"}, carol)
    server.json("POST", "/api/sessions/carol-1/run", {"code": "2"}, carol)
    error = refused("POST", "/api/sessions/carol-1/run", {"code": "3"}, "runs_per_minute")
    assert error["details"]["max"] == 2
    # Storage: a write is refused once what the tenant keeps reaches its bytes.
    server.json("PUT", "/api/storage/kv/ns/big", {"value": "x" * 150}, carol)
    refused("PUT", "/api/storage/kv/ns/more", {"value": "y"}, "storage_bytes")
    # Other tenants are not held by carol's limits.
    server.json("PUT", "/api/storage/kv/ns/more", {"value": "y"}, server.keys["bob"])


def test_sessions_limit(server):
    dave = make_key(server, "dave", "--sessions", "1")
    server.json("POST", "/api/sessions", {"id": "dave-1"}, dave, expect=201)
    status, headers, data = server.request_full("POST", "/api/sessions", {"id": "dave-2"}, dave)
    assert assert_error_shape(status, data, 429)["details"]["limit"] == "sessions" and headers["Retry-After"]
    server.json("DELETE", "/api/sessions/dave-1", headers=dave)


def test_a_revoked_key_answers_401_within_a_second(server):
    temp = make_key(server, "temp")
    server.json("GET", "/api/sessions", headers=temp)
    done = era_keys(server, "revoke", "temp")
    assert done.returncode == 0 and "revoked key 'temp'" in done.stdout
    revoked_at = time.monotonic()
    while server.request("GET", "/api/sessions", None, temp)[0] != 401:
        assert time.monotonic() - revoked_at < 1.5, "the revoked key still works"
        time.sleep(0.05)
    assert_error_shape(*server.request("GET", "/api/sessions", None, temp), 401)


def test_forged_keys_are_401(server):
    alice = server.keys["alice"]["Authorization"]
    for forged in (alice[:-2] + "xx", alice.replace("era_k.", "era_k.0"), "Bearer era_k.000000000000.nope"):
        assert_error_shape(*server.request("GET", "/api/sessions", None, {"Authorization": forged}), 401)


def test_cli_create_list_revoke_round_trip_and_bad_input(server):
    made = era_keys(server, "create", "--name", "round-trip", "--sessions", "5", "--runs-per-minute", "30")
    key = made.stdout.strip()
    listed = json.loads(era_keys(server, "list", "--json").stdout)
    mine = next(k for k in listed if k["name"] == "round-trip")
    assert mine["limits"] == {"sessions": 5, "runs_per_minute": 30} and mine["revoked_at"] is None
    assert key.split(".")[1] == mine["id"] and "hash" not in mine
    table = era_keys(server, "list").stdout
    assert "round-trip" in table and key.split(".")[2] not in table and "sessions=5" in table
    # The name is taken while the key lives.
    again = era_keys(server, "create", "--name", "round-trip")
    assert again.returncode == 2 and "exists" in again.stderr and "(name)" in again.stderr
    assert era_keys(server, "revoke", mine["id"]).returncode == 0  # by id
    assert next(k for k in json.loads(era_keys(server, "list", "--json").stdout)
                if k["id"] == mine["id"])["revoked_at"]
    gone = era_keys(server, "revoke", "round-trip")
    assert gone.returncode == 2 and "no key" in gone.stderr
    for bad in (["--name", "bad name!"], ["--name", ""], ["--name", "x" * 65]):
        out = era_keys(server, "create", *bad)
        assert out.returncode == 2 and "(name)" in out.stderr, out.stderr
    for bad in (["--sessions", "-1"], ["--kernels", "lots"], ["--storage-bytes", "1.5"]):
        out = era_keys(server, "create", "--name", "n", *bad)
        assert out.returncode == 2 and bad[0] in out.stderr, out.stderr
    assert os.path.isdir(server.env["ERA_DATA_DIR"])


def test_server_wide_routes_need_an_admin_key(server):
    for path in ("/metrics", "/api/replicas"):
        assert_error_shape(*server.request("GET", path, None, server.keys["alice"]), 403)
        assert server.request("GET", path, None, ADMIN)[0] == 200


def test_no_tenant_key_reaches_the_logs(server, alices):
    secrets = [h["Authorization"].split(".")[2] for h in server.keys.values()]
    server.request("GET", f"/api/sessions/{alices}/ws?token={server.keys['bob']['Authorization'].split()[1]}")
    time.sleep(0.2)  # the access line of that request
    logged = "\n".join(server.lines)
    assert not [s for s in secrets if s in logged]


@pytest.mark.parametrize("limits, field", [({"sessions": -1}, "sessions"), ({"kernels": True}, "kernels"),
                                           ({"storage_bytes": 1.5}, "storage_bytes"), ({"runs": 3}, "runs"),
                                           ({"runs_per_minute": 10**16}, "runs_per_minute"), ([1], "limits")])
def test_key_names_and_limits_are_checked_naming_the_field(limits, field):
    from era_kernel.errors import BadRequest
    from era_kernel.tenants import check_limits, check_name

    with pytest.raises(BadRequest) as info:
        check_limits(limits)
    assert info.value.field == field
    for name in ("", "a b", "-x", "x" * 65, "é", "0123456789ab", 7, None):
        with pytest.raises(BadRequest) as info:
            check_name(name)
        assert info.value.field == "name"
    assert check_limits({"sessions": 0, "kernels": None}) == {"sessions": 0}
    assert check_name("alice.team-1_x") == "alice.team-1_x"


async def test_websocket_runs_count_against_runs_per_minute(server):
    erin = make_key(server, "erin", "--runs-per-minute", "1")
    server.json("POST", "/api/sessions", {"id": "erin-s"}, erin, expect=201)
    try:
        conn = await websocket_connect(HTTPRequest(f"{server.ws_base}/api/sessions/erin-s/ws", headers=erin))
        json.loads(await conn.read_message())  # hello
        conn.write_message(json.dumps({"type": "run", "id": "r1", "code": "print(1)"}))
        conn.write_message(json.dumps({"type": "run", "id": "r2", "code": "print(2)"}))
        refused = None
        while refused is None:
            msg = json.loads(await conn.read_message())
            if msg["type"] == "error":
                refused = msg
        assert refused["id"] == "r2" and refused["status_code"] == 429
        assert refused["details"]["limit"] == "runs_per_minute"
        conn.close()
    finally:
        server.request("DELETE", "/api/sessions/erin-s", None, erin)


def test_concurrent_creates_cannot_pass_the_sessions_limit(server):
    from concurrent.futures import ThreadPoolExecutor

    frank = make_key(server, "frank", "--sessions", "3")
    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(lambda i: server.request("POST", "/api/sessions", {"id": f"frank-{i}"}, frank)[0],
                                 range(20)))
    try:
        assert sorted(statuses) == [201] * 3 + [429] * 17, statuses
        assert server.json("GET", "/api/sessions", headers=frank)["count"] == 3
    finally:
        server.json("DELETE", "/api/sessions", None, frank)


def test_an_admin_key_sees_every_tenants_sessions(server, alices):
    root = make_key(server, "root", "--admin")
    assert server.json("GET", f"/api/sessions/{alices}", headers=root)["id"] == alices
    assert alices in {s["id"] for s in server.json("GET", "/api/sessions", headers=root)["sessions"]}
    assert server.request("GET", "/metrics", None, root)[0] == 200


async def test_keys_on_a_server_without_era_api_key(tmp_path):
    """Open until the first key exists; then a key is needed. A revoke holds within the
    cache's second, whichever process revoked."""
    from era_kernel.errors import Unauthorized
    from era_kernel.store.base import store_for_url
    from era_kernel.tenants import ADMIN as OPEN, CACHE_SECONDS, Keys

    url = f"sqlite:///{tmp_path / 'era.db'}"
    store, other = store_for_url(url), store_for_url(url)
    await store.open()
    await other.open()
    try:
        keys = Keys(store)
        assert await keys.authenticate(None) is OPEN
        _, key = await Keys(other).create("gina", {"kernels": 2})
        await asyncio.sleep(CACHE_SECONDS + 0.1)  # the "no keys yet" answer may be a second old
        with pytest.raises(Unauthorized):
            await keys.authenticate(None)
        tenant = await keys.authenticate(None, key)
        assert (tenant.name, tenant.limits, tenant.admin) == ("gina", {"kernels": 2}, False)
        await Keys(other).revoke("gina")
        await asyncio.sleep(CACHE_SECONDS + 0.1)
        with pytest.raises(Unauthorized):
            await keys.authenticate(key)
    finally:
        await store.close()
        await other.close()


def test_keys_on_a_postgresql_store(postgres_cluster):
    """The same door on the store several replicas share: ``era keys`` writes there, the
    server reads there, a revoke holds within a second."""
    schema, url = postgres_cluster.new_schema()
    srv = ServerProcess(env={"ERA_API_KEY": ADMIN_KEY, "ERA_STORE_URL": url, "ERA_POOL_SIZE": "0"}).start()
    try:
        hana, ivan = make_key(srv, "hana"), make_key(srv, "ivan")
        srv.json("POST", "/api/sessions", {"id": "hana-s"}, hana, expect=201)
        missing_like(srv, "GET", "/api/sessions/hana-s", "hana-s", ivan)
        assert srv.json("GET", "/api/sessions", headers=ivan)["sessions"] == []
        assert [s["id"] for s in srv.json("GET", "/api/sessions", headers=ADMIN)["sessions"]] == ["hana-s"]
        assert era_keys(srv, "revoke", "hana").returncode == 0
        revoked_at = time.monotonic()
        while srv.request("GET", "/api/sessions", None, hana)[0] != 401:
            assert time.monotonic() - revoked_at < 1.5, "the revoked key still works"
            time.sleep(0.05)
    finally:
        srv.cleanup()
        postgres_cluster.drop_schema(schema)
