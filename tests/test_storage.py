"""ERA's storage proxy end to end: a real server on loopback (and one whose workspace
store is moto's S3 server), ERA's routes and shapes, its limits, names that must never
reach SQL or a path, the era_storage SDKs (Python and Node, from the host and from inside
sessions), and session tokens."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest

from era_kernel import sdk
from tests.support.api_errors import assert_error_shape
from tests.support.era_server import ServerProcess
from tests.support.s3 import CREDENTIALS, moto_endpoint

KEY = "storage-test-key-0b7e"
AUTH = {"Authorization": f"Bearer {KEY}"}
SQL_TIMEOUT = 0.5
SQL_MAX_BYTES = 256 * 1024
LIMITS = {"ERA_STORAGE_SQL_TIMEOUT": str(SQL_TIMEOUT), "ERA_STORAGE_SQL_MAX_BYTES": str(SQL_MAX_BYTES),
          "ERA_STORAGE_MAX_VALUE": "4096", "ERA_STORAGE_MAX_OBJECT": "65536"}
BUCKET = "era-storage-tests"


@pytest.fixture(scope="module")
def server():
    # Sessions without network reach the storage routes through the listener the server
    # opens in their sandbox (ERA_STORAGE_PORT, default 80); see net_session for the others,
    # which ERA_EGRESS_LOCAL=host makes (by default internet access keeps a sandbox network
    # of its own, with its listener: tests/test_egress_local.py).
    srv = ServerProcess(env={"ERA_API_KEY": KEY, "ERA_EGRESS_LOCAL": "host", **LIMITS}).start()
    yield srv
    srv.cleanup()


@pytest.fixture(scope="module")
def s3_server():
    with moto_endpoint(BUCKET) as endpoint:
        options = {**CREDENTIALS, "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
        prefix = uuid.uuid4().hex[:12]
        srv = ServerProcess(env={"ERA_API_KEY": KEY, "ERA_WORKSPACE_URL": f"s3://{BUCKET}/{prefix}",
                                 "ERA_WORKSPACE_OPTIONS": json.dumps(options), **LIMITS}).start()
        srv.s3 = (endpoint, prefix)
        yield srv
        srv.cleanup()


def call(srv, method, path, body=None, expect=200, headers=AUTH):
    return srv.json(method, path, body, headers, expect=expect)


def error(srv, method, path, body=None, status=400, headers=AUTH):
    return assert_error_shape(*srv.request(method, path, body, headers), status)


# ---- KV --------------------------------------------------------------------------------------
def test_kv_round_trip_list_pages_and_delete(server):
    keys = ["user:1", "user:2", "user/3 with spaces", "user:ünï", "other"]
    for i, key in enumerate(keys):
        doc = call(server, "PUT", f"/api/storage/kv/app1/{quote(key, safe='')}",
                   {"value": f"v{i}", "metadata": {"i": i}})
        assert doc == {"success": True}
    assert call(server, "GET", "/api/storage/kv/app1/user%3A%C3%BCn%C3%AF") == {"value": "v3", "metadata": {"i": 3}}
    call(server, "PUT", "/api/storage/kv/app1/user:1", {"value": "new"})  # overwrite, metadata dropped
    assert call(server, "GET", "/api/storage/kv/app1/user:1") == {"value": "new", "metadata": None}

    listed = call(server, "GET", "/api/storage/kv/app1?prefix=user")
    assert [k["name"] for k in listed["keys"]] == sorted(k for k in keys if k.startswith("user"))
    assert listed["list_complete"] is True and "cursor" not in listed
    # Pages of two, following the cursor, give every key once, in order.
    names, cursor = [], None
    while True:
        page = call(server, "GET", "/api/storage/kv/app1?limit=2" + (f"&cursor={cursor}" if cursor else ""))
        names += [k["name"] for k in page["keys"]]
        if page["list_complete"]:
            break
        cursor = page["cursor"]
    assert names == sorted(keys)

    assert call(server, "DELETE", "/api/storage/kv/app1/other") == {"success": True}
    assert error(server, "GET", "/api/storage/kv/app1/other", status=404)["error"] == "Key not found"
    assert "other" not in [k["name"] for k in call(server, "GET", "/api/storage/kv/app1")["keys"]]
    assert call(server, "GET", "/api/storage/kv/app2")["keys"] == []  # namespaces are apart


def test_kv_value_rules(server):
    assert error(server, "PUT", "/api/storage/kv/app1/big", {"value": "x" * 5000}, 413)["field"] == "value"
    assert error(server, "PUT", "/api/storage/kv/app1/obj", {"value": {"a": 1}})["field"] == "value"
    assert error(server, "PUT", "/api/storage/kv/app1/nov", {"metadata": {}})["field"] == "value"


# ---- names -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path, field", [
    ("/api/storage/kv/a'b/k", "namespace"), ("/api/storage/kv/..%2F..%2Fetc/k", "namespace"),
    ("/api/storage/kv/x%3B%20DROP%20TABLE%20kv/k", "namespace"), ("/api/storage/kv/.hidden", "namespace"),
    ("/api/storage/kv/" + "n" * 64 + "/k", "namespace"), ("/api/storage/kv/ns/a%00b", "key"),
    ("/api/storage/r2/..", "bucket"), ("/api/storage/r2/b%20b/k", "bucket"), ("/api/storage/r2/b/%0a", "key"),
    ("/api/storage/d1/x'%3B%20ATTACH%20'y'%20AS%20z/query", "database"), ("/api/storage/d1/..%2Fera/exec", "database"),
])
def test_bad_names_are_400_naming_the_field(server, path, field):
    method = "POST" if "/d1/" in path else "GET"
    body = {"sql": "SELECT 1"} if method == "POST" else None
    assert error(server, method, path, body)["field"] == field


# ---- D1 --------------------------------------------------------------------------------------
def test_d1_exec_and_query_with_params(server):
    done = call(server, "POST", "/api/storage/d1/shop/exec",
                {"sql": "CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, name TEXT, age INT)"})
    assert done["success"] is True and "results" not in done
    hostile = "Bob'); DROP TABLE users; --"
    for name, age in (("Alice", 30), (hostile, 41)):
        done = call(server, "POST", "/api/storage/d1/shop/exec",
                    {"sql": "INSERT INTO users (name, age) VALUES (?, ?)", "params": [name, age]})
        assert done["meta"]["changes"] == 1 and done["meta"]["last_row_id"] >= 1
    doc = call(server, "POST", "/api/storage/d1/shop/query",
               {"sql": "SELECT name, age FROM users WHERE age > ? ORDER BY age", "params": [20]})
    assert doc["success"] is True and doc["results"] == [{"name": "Alice", "age": 30}, {"name": hostile, "age": 41}]
    assert doc["meta"]["rows_read"] == 2 and doc["meta"]["size_after"] > 0
    assert error(server, "POST", "/api/storage/d1/shop/exec", {"sql": "SELEC nope"})["field"] == "sql"
    assert "one statement" in error(server, "POST", "/api/storage/d1/shop/exec",
                                    {"sql": "SELECT 1; DROP TABLE users"})["error"]
    # Each database is its own file: another name sees none of these tables.
    missing = error(server, "POST", "/api/storage/d1/other/query", {"sql": "SELECT * FROM users"})
    assert "no such table" in missing["error"]


def test_d1_runaway_query_is_cancelled(server):
    runaway = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    t0 = time.monotonic()
    doc = error(server, "POST", "/api/storage/d1/slow/query", {"sql": runaway}, 422)
    assert time.monotonic() - t0 < SQL_TIMEOUT + 3 and "ERA_STORAGE_SQL_TIMEOUT" in doc["error"]
    assert call(server, "POST", "/api/storage/d1/slow/query", {"sql": "SELECT 1 AS one"})["results"] == [{"one": 1}]


@pytest.mark.parametrize("sql", [
    "ATTACH DATABASE '/tmp/era-storage-escape.db' AS x", "DETACH DATABASE main",
    "VACUUM INTO '/tmp/era-storage-escape.db'", "SELECT load_extension('/tmp/era-storage-escape.so')",
    "PRAGMA max_page_count = 2147483647", "PRAGMA writable_schema = 1", "PRAGMA journal_mode = DELETE",
    "PRAGMA page_size = 65536",
    "SELECT * FROM pragma_database_list",
])
def test_d1_refuses_what_leaves_the_database(server, sql):
    assert "not allowed" in error(server, "POST", "/api/storage/d1/guarded/exec", {"sql": sql})["error"]
    assert not os.path.exists("/tmp/era-storage-escape.db")


def test_d1_reads_its_own_schema(server):
    call(server, "POST", "/api/storage/d1/guarded/exec", {"sql": "CREATE TABLE IF NOT EXISTS t (a TEXT)"})
    rows = call(server, "POST", "/api/storage/d1/guarded/query", {"sql": "PRAGMA table_info(t)"})["results"]
    assert [r["name"] for r in rows] == ["a"]


def test_d1_calls_never_inherit_state_from_earlier_calls(server):
    """Connections are reused between calls: what one statement leaves on its connection
    (temp objects, a pragma set, an open transaction) must not reach the next call."""
    url = "/api/storage/d1/fresh/"
    call(server, "POST", url + "exec", {"sql": "CREATE TABLE IF NOT EXISTS t (a)"})
    for _ in range(3):  # whichever pooled connection answers
        call(server, "POST", url + "exec", {"sql": "CREATE TEMP TABLE scratch (x)"})
        call(server, "POST", url + "exec", {"sql": "PRAGMA foreign_keys = ON"})
        call(server, "POST", url + "exec", {"sql": "BEGIN IMMEDIATE"})
        assert call(server, "POST", url + "query", {"sql": "PRAGMA foreign_keys"})["results"] == [{"foreign_keys": 0}]
        # No transaction was left open holding the write lock: a write goes through at once.
        assert call(server, "POST", url + "exec", {"sql": "INSERT INTO t VALUES (1)"})["meta"]["changes"] == 1
    tables = call(server, "POST", url + "query", {"sql": "SELECT name FROM sqlite_temp_master"})["results"]
    assert tables == []


def test_d1_database_size_is_capped(server):
    call(server, "POST", "/api/storage/d1/full/exec", {"sql": "CREATE TABLE b (x BLOB)"})
    statuses = []
    for _ in range(2 * SQL_MAX_BYTES // 50_000):
        status, body = server.request("POST", "/api/storage/d1/full/exec",
                                      {"sql": "INSERT INTO b VALUES (randomblob(50000))"}, AUTH)
        statuses.append(status)
        if status != 200:
            assert_error_shape(status, body, 413)
            break
    assert statuses[-1] == 413 and statuses.count(200) >= 2
    size = call(server, "POST", "/api/storage/d1/full/query", {"sql": "SELECT 1"})["meta"]["size_after"]
    assert size <= SQL_MAX_BYTES


# ---- R2 --------------------------------------------------------------------------------------
def r2_round_trip(srv, bucket):
    blob = bytes(range(256)) * 10
    put = call(srv, "PUT", f"/api/storage/r2/{bucket}/dir/a.bin",
               {"content": base64.b64encode(blob).decode(), "metadata": {"kind": "bytes"}})
    assert put == {"success": True, "size": len(blob)}
    call(srv, "PUT", f"/api/storage/r2/{bucket}/dir", {"content": base64.b64encode(b"a key and a prefix").decode()})
    call(srv, "PUT", f"/api/storage/r2/{bucket}/z.txt", {"content": base64.b64encode(b"zz").decode()})
    got = call(srv, "GET", f"/api/storage/r2/{bucket}/dir/a.bin")
    assert base64.b64decode(got["content"]) == blob and got["size"] == len(blob)
    assert got["customMetadata"] == {"kind": "bytes"}
    listed = call(srv, "GET", f"/api/storage/r2/{bucket}?prefix=dir")
    assert [(o["key"], o["size"]) for o in listed["objects"]] == [("dir", 18), ("dir/a.bin", len(blob))]
    assert listed["truncated"] is False
    assert call(srv, "DELETE", f"/api/storage/r2/{bucket}/dir/a.bin") == {"success": True}
    assert error(srv, "GET", f"/api/storage/r2/{bucket}/dir/a.bin", status=404)["error"] == "Object not found"
    assert [o["key"] for o in call(srv, "GET", f"/api/storage/r2/{bucket}")["objects"]] == ["dir", "z.txt"]


def test_r2_round_trip_on_the_local_store(server):
    r2_round_trip(server, "files")
    stored = Path(server.env["ERA_DATA_DIR"]) / "workspaces" / ".storage" / "r2" / "default" / "files"
    names = sorted(p.name for p in stored.iterdir())
    assert len(names) == 2 and all(len(n) == 64 for n in names)  # digests, never the caller's key
    assert error(server, "PUT", "/api/storage/r2/files/big", {"content": base64.b64encode(b"x" * 70000).decode()},
                 413)["field"] == "content"
    assert error(server, "PUT", "/api/storage/r2/files/bad", {"content": "***"})["field"] == "content"


def test_r2_round_trip_on_s3(s3_server):
    import boto3

    r2_round_trip(s3_server, "files")
    endpoint, prefix = s3_server.s3
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/.storage/r2/")["Contents"]]
    assert len(keys) == 2 and all(k.startswith(f"{prefix}/.storage/r2/default/files/") for k in keys)


# ---- registry ---------------------------------------------------------------------------------
def test_resources_list_and_stats(server):
    call(server, "PUT", "/api/storage/kv/reg/one", {"value": "12345"})
    call(server, "PUT", "/api/storage/r2/regb/obj", {"content": base64.b64encode(b"abc").decode()})
    call(server, "POST", "/api/storage/d1/regdb/exec", {"sql": "CREATE TABLE IF NOT EXISTS things (a)"})
    listed = call(server, "GET", "/api/resources/list?limit=1000")
    found = {(r["type"], r["namespace"], r["key"]) for r in listed["resources"]}
    assert {("kv", "reg", "one"), ("r2", "regb", "obj"), ("d1", "regdb", "things")} <= found
    assert listed["total"] == len(listed["resources"]) and listed["has_more"] is False
    only = call(server, "GET", "/api/resources/list?type=kv&namespace=reg")
    assert [(r["key"], r["size"]) for r in only["resources"]] == [("one", 5)]
    page = call(server, "GET", "/api/resources/list?limit=1&offset=1")
    assert len(page["resources"]) == 1 and page["has_more"] is (page["total"] > 2)
    assert error(server, "GET", "/api/resources/list?type=disk")["field"] == "type"

    stats = call(server, "GET", "/api/resources/stats")
    assert "sessions" in stats and "live_kernels" in stats and "server" in stats  # today's fields stay
    assert stats["by_type"]["kv"] >= 1 and stats["by_type"]["r2"] >= 1 and stats["by_type"]["d1"] >= 1
    assert stats["total"] == sum(stats["by_type"].values()) and stats["by_namespace"]["reg"] == 1
    assert stats["total_size"] >= 8


# ---- SDKs from the host -------------------------------------------------------------------------
PY_PROGRAM = """
import json, era_storage as s
s.kv.set("sdk", "k1", "hello", {"m": 1})
out = {"kv": s.kv.get("sdk", "k1"), "missing": s.kv.get("sdk", "nope"), "keys": s.kv.list("sdk")}
s.d1.exec("sdkdb", "CREATE TABLE IF NOT EXISTS t (a TEXT, b INT)")
s.d1.exec("sdkdb", "INSERT INTO t VALUES (?, ?)", ["x", 2])
out["rows"] = s.d1.query("sdkdb", "SELECT a, b FROM t WHERE b = ?", [2])
s.r2.put("sdkb", "f/1.bin", b"\\x00\\x01binary")
out["obj"] = list(s.r2.get("sdkb", "f/1.bin"))
out["objects"] = [o["key"] for o in s.r2.list("sdkb")]
out["deleted"] = [s.kv.delete("sdk", "k1"), s.r2.delete("sdkb", "f/1.bin"), s.kv.get("sdk", "k1")]
try:
    s.d1.exec("sdkdb", "ATTACH 'x' AS y")
except s.StorageError as exc:
    out["refused"] = exc.status
print(json.dumps(out))
"""

JS_PROGRAM = """
const s = require('era_storage');
(async () => {
  await s.kv.set('sdkjs', 'k1', 'hello', { m: 1 });
  const out = { kv: await s.kv.get('sdkjs', 'k1'), missing: await s.kv.get('sdkjs', 'nope'),
                keys: await s.kv.list('sdkjs') };
  await s.d1.exec('sdkjsdb', 'CREATE TABLE IF NOT EXISTS t (a TEXT, b INT)');
  await s.d1.exec('sdkjsdb', 'INSERT INTO t VALUES (?, ?)', ['x', 2]);
  out.rows = await s.d1.query('sdkjsdb', 'SELECT a, b FROM t WHERE b = ?', [2]);
  await s.r2.put('sdkjsb', 'f/1.bin', Buffer.from([0, 1, 98]));
  out.obj = Array.from(await s.r2.get('sdkjsb', 'f/1.bin'));
  out.objects = (await s.r2.list('sdkjsb')).map((o) => o.key);
  out.deleted = [await s.kv.delete('sdkjs', 'k1'), await s.r2.delete('sdkjsb', 'f/1.bin'),
                 await s.kv.get('sdkjs', 'k1')];
  try { await s.d1.exec('sdkjsdb', "ATTACH 'x' AS y"); } catch (e) { out.refused = e.status; }
  console.log(JSON.stringify(out));
})().catch((e) => { console.error(e); process.exit(1); });
"""


def sdk_env(server, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERA_")}
    return {**env, "ERA_STORAGE_URL": server.base, "PYTHONPATH": str(sdk.PYTHON_DIR), "NODE_PATH": str(sdk.NODE_DIR),
            **extra}


def test_python_sdk_round_trip_from_the_host(server):
    done = subprocess.run([sys.executable, "-c", PY_PROGRAM], env=sdk_env(server, ERA_API_KEY=KEY),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["kv"] == "hello" and out["missing"] is None and out["keys"] == [{"name": "k1", "metadata": {"m": 1}}]
    assert out["rows"] == [{"a": "x", "b": 2}] and out["obj"] == [0, 1, *b"binary"] and out["objects"] == ["f/1.bin"]
    assert out["deleted"] == [True, True, None] and out["refused"] == 400


def test_js_sdk_round_trip_from_the_host(server):
    done = subprocess.run(["node", "-e", JS_PROGRAM], env=sdk_env(server, ERA_API_KEY=KEY), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["kv"] == "hello" and out["missing"] is None and out["keys"] == [{"name": "k1", "metadata": {"m": 1}}]
    assert out["rows"] == [{"a": "x", "b": 2}] and out["obj"] == [0, 1, 98] and out["objects"] == ["f/1.bin"]
    assert out["deleted"] == [True, True, None] and out["refused"] == 400


def test_sdk_without_credentials_is_refused(server):
    done = subprocess.run([sys.executable, "-c", "import era_storage as s; s.kv.get('x', 'y')"], env=sdk_env(server),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "StorageError" in done.stderr and "API key" in done.stderr


# ---- from inside sessions: the SDK on the kernel's path, the session's token ------------------
def run(server, sid, code):
    doc = call(server, "POST", f"/api/sessions/{sid}/run", {"code": code, "timeout": 60})
    assert doc["exit_code"] == 0, doc
    return doc["stdout"]


@pytest.fixture(scope="module")
def net_session(server):
    """A Python session whose sandbox shares the host's network (internet access with
    ERA_EGRESS_LOCAL=host), so it has no listener of its own; it reaches the server's
    address, given as ERA_STORAGE_URL in its env, with its token."""
    call(server, "POST", "/api/sessions", {"id": "st-net", "language": "python", "allowInternetAccess": True,
                                           "env": {"ERA_STORAGE_URL": server.base}}, expect=201)
    return "st-net"


def test_python_session_round_trips_with_its_own_token(server, net_session):
    out = json.loads(run(server, net_session, """
import json, os, era_storage as s
s.kv.set("fromsession", "k", "v1", {"by": "session"})
s.d1.exec("sessdb", "CREATE TABLE IF NOT EXISTS t (a)")
s.d1.exec("sessdb", "INSERT INTO t VALUES (?)", ["row"])
s.r2.put("sessb", "o", b"bytes")
print(json.dumps({"token": os.environ["ERA_STORAGE_TOKEN"], "has_key": "ERA_API_KEY" in os.environ,
                  "sees_secret": os.path.exists(%r),
                  "kv": s.kv.get("fromsession", "k"), "rows": s.d1.query("sessdb", "SELECT a FROM t"),
                  "obj": s.r2.get("sessb", "o").decode()}))
""" % str(Path(server.env["ERA_DATA_DIR"]) / "storage-secret")))
    assert (Path(server.env["ERA_DATA_DIR"]) / "storage-secret").is_file()
    assert out["has_key"] is False and out["sees_secret"] is False  # the data directory is masked
    assert out["token"].startswith(f"era_st.{net_session}.")
    assert out["kv"] == "v1" and out["rows"] == [{"a": "row"}] and out["obj"] == "bytes"
    # The session acted for its owner: what it wrote is the API key's storage too.
    assert call(server, "GET", "/api/storage/kv/fromsession/k")["value"] == "v1"
    token = {"Authorization": f"Bearer {out['token']}"}
    assert call(server, "GET", "/api/storage/kv/fromsession/k", headers=token)["metadata"] == {"by": "session"}
    forged = {"Authorization": f"Bearer {out['token'][:-2]}AA"}
    assert_error_shape(*server.request("GET", "/api/storage/kv/fromsession/k", None, forged), 401)
    other = {"Authorization": "Bearer " + out["token"].replace(f".{net_session}.", ".st-other.")}
    assert_error_shape(*server.request("GET", "/api/storage/kv/fromsession/k", None, other), 401)
    # A storage token opens the storage routes only, never the rest of the API.
    assert_error_shape(*server.request("GET", f"/api/sessions/{net_session}", None, token), 401)


def test_session_without_network_reaches_storage_through_its_listener(server):
    """No network, no token, ERA's default URL (http://localhost): the listener in the
    sandbox answers for this session's owner, and nothing else of the host is reachable."""
    call(server, "POST", "/api/sessions", {"id": "st-nonet", "language": "python"}, expect=201)
    out = json.loads(run(server, "st-nonet", f"""
import json, os, socket
del os.environ["ERA_STORAGE_TOKEN"], os.environ["ERA_STORAGE_URL"]  # as ERA's own SDK: no auth, localhost
import era_storage as s
s.kv.set("nonet", "k", "through the listener")
s.d1.exec("nonetdb", "CREATE TABLE IF NOT EXISTS t (a)")
try:
    socket.create_connection(("127.0.0.1", {server.port}), timeout=2)
    reached = True
except OSError:
    reached = False
print(json.dumps({{"kv": s.kv.get("nonet", "k"), "server_port_reached": reached,
                  "keys": [k["name"] for k in s.kv.list("nonet")]}}))
"""))
    assert out == {"kv": "through the listener", "server_port_reached": False, "keys": ["k"]}
    assert call(server, "GET", "/api/storage/kv/nonet/k")["value"] == "through the listener"  # the owner's
    # The listener serves the storage routes only.
    out = run(server, "st-nonet", """
import urllib.request, urllib.error
for path in ("/api/sessions", "/api/resources/stats", "/health"):
    try:
        urllib.request.urlopen("http://127.0.0.1" + path, timeout=5)
        print(path, 200)
    except urllib.error.HTTPError as exc:
        print(path, exc.code)
""")
    assert out.split() == ["/api/sessions", "404", "/api/resources/stats", "404", "/health", "404"]


def test_token_of_a_deleted_session_stops_working(server):
    call(server, "POST", "/api/sessions", {"id": "st-gone", "language": "python"}, expect=201)
    token = run(server, "st-gone", "import os; print(os.environ['ERA_STORAGE_TOKEN'])").strip()
    headers = {"Authorization": f"Bearer {token}"}
    assert call(server, "GET", "/api/storage/kv/any", headers=headers)["keys"] is not None
    call(server, "DELETE", "/api/sessions/st-gone")
    assert_error_shape(*server.request("GET", "/api/storage/kv/any", None, headers), 401)


def test_node_session_imports_era_storage(server):
    call(server, "POST", "/api/sessions", {"id": "st-node", "language": "node"}, expect=201)  # no network
    out = run(server, "st-node", """
const s = require('era_storage');
await s.kv.set('fromnode', 'k', 'v2');
await s.d1.exec('nodedb', 'CREATE TABLE IF NOT EXISTS t (a)');
await s.d1.exec('nodedb', 'INSERT INTO t VALUES (?)', [7]);
const rows = await s.d1.query('nodedb', 'SELECT a FROM t');
await s.r2.put('nodeb', 'o', 'text');
const obj = (await s.r2.get('nodeb', 'o')).toString();
console.log(JSON.stringify({ kv: await s.kv.get('fromnode', 'k'), rows, obj }));
""")
    doc = json.loads(out)
    assert doc == {"kv": "v2", "rows": [{"a": 7}], "obj": "text"}


@pytest.mark.parametrize("language, code", [
    ("python", "import era_storage as s; s.kv.set('docker', 'py', 'ok'); print(s.kv.get('docker', 'py'))"),
    ("node", "const s = require('era_storage'); await s.kv.set('docker', 'js', 'ok'); "
             "console.log(await s.kv.get('docker', 'js'))"),
])
def test_docker_sessions_round_trip_through_their_listener(server, language, code):
    """The SDK directory is bound read-only into containers too, and the listener is opened
    in the container's network namespace (network none)."""
    from tests.conftest import require_docker

    require_docker()
    sid = f"st-docker-{language}"
    call(server, "POST", "/api/sessions", {"id": sid, "language": language, "provisioner": "docker"}, expect=201)
    try:
        assert run(server, sid, code).strip() == "ok"
    finally:
        call(server, "DELETE", f"/api/sessions/{sid}")


def test_commands_in_a_session_get_the_sdk_and_the_token(server, net_session):
    call(server, "PUT", "/api/storage/kv/fromapi/k", {"value": "by the key"})
    doc = call(server, "POST", f"/api/sessions/{net_session}/commands",
               {"cmd": ["python3", "-c", "import era_storage as s; print(s.kv.get('fromapi', 'k'))"]})
    assert (doc["exit_code"], doc["stdout"].strip()) == (0, "by the key"), doc


# ---- owners (one today; tenants later): nothing crosses from one to another -------------------
async def test_owners_never_see_each_others_storage(tmp_path):
    from era_kernel.config import Settings
    from era_kernel.errors import NotFound
    from era_kernel.storage import Storage
    from era_kernel.workspaces.store import WorkspaceStore

    settings = Settings.from_env({"ERA_DATA_DIR": str(tmp_path / "data")})
    objects = WorkspaceStore.from_url(f"file://{tmp_path}/store", durable=False).objects

    async def no_session(_sid):
        return None

    storage = Storage(settings, lambda: objects, no_session)
    await storage.start()
    try:
        await storage.kv.put("alice", "ns", "k", "secret")
        await storage.r2.put("alice", "b", "o", b"bytes")
        await storage.d1.execute("alice", "db", "CREATE TABLE t (a)", [], rows=False)
        with pytest.raises(NotFound):
            await storage.kv.get("bob", "ns", "k")
        with pytest.raises(NotFound):
            await storage.r2.get("bob", "b", "o")
        assert (await storage.kv.list("bob", "ns"))["keys"] == []
        assert (await storage.r2.list("bob", "b"))["objects"] == []
        with pytest.raises(Exception, match="no such table"):
            await storage.d1.execute("bob", "db", "SELECT * FROM t", [], rows=True)
        assert (await storage.registry.list("bob"))["total"] == 0
        assert (await storage.registry.stats("bob"))["total"] == 0
        assert (await storage.registry.stats("alice"))["by_type"] == {"kv": 1, "d1": 1, "r2": 1, "do": 0}
        assert await storage.owner_for_token(storage.tokens.token("some-session")) is None  # no such session
    finally:
        await storage.close()
