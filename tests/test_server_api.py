"""End to end over HTTP against a real server process with real kernels: every route of
API.md, SSE order and timing. Sessions are shared where the test allows (2-core box)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.support.api_errors import assert_error_shape
from tests.support.era_server import shared_server


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture(scope="module")
def sid(server):
    doc = server.json("POST", "/api/sessions", {"id": "api-main", "language": "python"}, expect=201)
    return doc["id"]


def run(server, sid, code, **extra):
    return server.json("POST", f"/api/sessions/{sid}/run", {"code": code, **extra})


# ---- sessions ---------------------------------------------------------------------------------


def test_health_is_open_and_ready(server):
    doc = server.json("GET", "/health")
    assert doc["status"] == "ok" and doc["ready"] is True and doc["state"] == "ready"


def test_create_accepts_id_or_session_id_and_refuses_a_taken_id(server):
    # `javascript` is `node`: created as node, or refused naming node where no node kernel is installed.
    status, body = server.request("POST", "/api/sessions", {"session_id": "alias-js", "language": "javascript"})
    if status == 201:
        assert json.loads(body)["language"] == "node"
        server.json("DELETE", "/api/sessions/alias-js")
    else:
        assert "'node'" in assert_error_shape(status, body, (400, 422))["error"]
    status, headers, body = server.request_full("POST", "/api/sessions", json.dumps({"session_id": "alias-1"}))
    assert status == 201, body
    doc = json.loads(body)
    assert doc["id"] == "alias-1" and doc["language"] == "python"
    assert headers["Location"] == "/api/sessions/alias-1"
    status, body = server.request("POST", "/api/sessions", {"id": "alias-1"})
    assert assert_error_shape(status, body, 409)["id"] == "alias-1", "ERA names the taken id"
    auto = server.json("POST", "/api/sessions", {}, expect=201)
    assert auto["id"].startswith("sess_")
    for name in ("alias-1", auto["id"]):
        gone = server.json("DELETE", f"/api/sessions/{name}")
        assert (gone["success"], gone["id"], gone["deleted"]) == (True, name, name), gone
    status, body = server.request("GET", "/api/sessions/alias-1")
    assert_error_shape(status, body, 404)


def test_list_get_patch(server, sid):
    listing = server.json("GET", "/api/sessions")
    assert listing["count"] == len(listing["sessions"]) and sid in [s["id"] for s in listing["sessions"]]
    doc = server.json("GET", f"/api/sessions/{sid}")
    for key in ("id", "created_at", "last_run_at", "language", "persistent", "file_count", "total_size_bytes",
                "metadata", "data", "default_timeout", "allowInternetAccess", "setup_status", "setup_result",
                "kernel"):
        assert key in doc, key
    assert doc["created_at"].endswith("Z")
    patched = server.json("PATCH", f"/api/sessions/{sid}", {"metadata": {"team": "a"}, "default_timeout": 20})
    assert patched["success"] is True and patched["id"] == sid and patched["updated_at"].endswith("Z")
    assert patched["metadata"]["metadata"] == {"team": "a"} and patched["metadata"]["default_timeout"] == 20
    for bad in (0, -1, "x"):
        status, body = server.request("PATCH", f"/api/sessions/{sid}", {"default_timeout": bad})
        assert assert_error_shape(status, body, 400)["field"] == "default_timeout"


def test_run_results(server, sid):
    assert run(server, sid, "x = 40")["exit_code"] == 0
    result = run(server, sid, "print(x + 2)")
    assert result["stdout"] == "42\n" and result["exit_code"] == 0 and result["session_id"] == sid
    for key in ("exit_code", "stdout", "stderr", "duration", "duration_ms", "session_id", "data", "outputs",
                "execution_count", "error", "timed_out", "truncated"):
        assert key in result, key
    failed = run(server, sid, "1/0")
    assert failed["exit_code"] == 1 and failed["error"]["ename"] == "ZeroDivisionError"
    assert run(server, sid, "import sys; sys.exit(3)")["exit_code"] == 3
    rich = run(server, sid, "from IPython.display import HTML, display; display(HTML('<b>x</b>'))")
    assert any(o["output_type"] == "display_data" and "text/html" in o["data"] for o in rich["outputs"])
    status, body = server.request("POST", f"/api/sessions/{sid}/run", {"code": 123})
    assert assert_error_shape(status, body, 400)["field"] == "code"


def test_stored_code_runs_when_run_has_no_code(server, sid):
    assert server.json("PUT", f"/api/sessions/{sid}/code", {"code": "print('stored')"})["code_length"] == 15
    stored = server.json("GET", f"/api/sessions/{sid}/code")
    assert (stored["session_id"], stored["code"], stored["code_length"]) == (sid, "print('stored')", 15)
    assert server.json("POST", f"/api/sessions/{sid}/run", {})["stdout"] == "stored\n"
    status, body = server.request("PUT", f"/api/sessions/{sid}/code", "print('plain')",
                                  {"Content-Type": "text/plain; charset=utf-8"})
    assert status == 200, body
    assert server.json("POST", f"/api/sessions/{sid}/run", None)["stdout"] == "plain\n"
    status, body = server.request("PUT", f"/api/sessions/{sid}/code", {"code": 5})
    assert assert_error_shape(status, body, 400)["field"] == "code"


def test_files_round_trip_as_attachments(server, sid):
    payload = bytes(range(256)) * 4
    written = server.json("PUT", f"/api/sessions/{sid}/files/dir/a%20b.bin", payload)
    assert written["path"] == "dir/a b.bin" and written["size"] == len(payload)
    status, headers, body = server.request_full("GET", f"/api/sessions/{sid}/files/dir/a%20b.bin")
    assert status == 200 and body == payload
    assert headers["Content-Disposition"].startswith("attachment;")
    assert headers["X-Content-Type-Options"] == "nosniff"
    server.request("PUT", f"/api/sessions/{sid}/files/page.html", b"<script>alert(1)</script>")
    status, headers, body = server.request_full("GET", f"/api/sessions/{sid}/files/page.html")
    assert headers["Content-Type"].startswith("text/html") and headers["Content-Disposition"].startswith("attachment")
    assert "sandbox" in headers["Content-Security-Policy"]
    listing = server.json("GET", f"/api/sessions/{sid}/files")
    assert {"dir/a b.bin", "page.html"} <= {f["path"] for f in listing["files"]}
    assert listing["count"] == len(listing["files"])
    assert run(server, sid, "print(open('dir/a b.bin','rb').read() == bytes(range(256))*4)")["stdout"] == "True\n"
    assert server.json("DELETE", f"/api/sessions/{sid}/files/page.html")["deleted"] == "page.html"
    status, body = server.request("GET", f"/api/sessions/{sid}/files/page.html")
    assert_error_shape(status, body, 404)


@pytest.mark.parametrize("path", ["../x", "%2e%2e/x", "%2E%2E%2Fx", "..%5cx", "a/../../x", "%00x", "/etc/passwd",
                                  "%2Fetc%2Fpasswd", "../api-mainevil/x", "%FF", "x" * 5000])
def test_file_paths_cannot_escape(server, sid, path):
    for method, body in (("GET", None), ("PUT", b"x"), ("DELETE", None)):
        status, data = server.request(method, f"/api/sessions/{sid}/files/{path}", body)
        assert_error_shape(status, data, (400, 404))


def test_duplicate_copies_files_not_history(server, sid):
    server.request("PUT", f"/api/sessions/{sid}/files/dup.txt", b"copied")
    dup = server.json("POST", f"/api/sessions/{sid}/duplicate", {"id": "api-dup"}, expect=201)
    assert dup["id"] == "api-dup" and dup["language"] == "python"
    assert server.request("GET", "/api/sessions/api-dup/files/dup.txt") == (200, b"copied")
    assert server.json("GET", "/api/sessions/api-dup/runs")["count"] == 0
    status, body = server.request("POST", f"/api/sessions/{sid}/duplicate", {"id": "api-dup"})
    assert_error_shape(status, body, 409)
    server.json("DELETE", "/api/sessions/api-dup")


def test_history_and_notebook_export(server, sid):
    nbformat = pytest.importorskip("nbformat")
    run(server, sid, "print('for the notebook')")
    runs = server.json("GET", f"/api/sessions/{sid}/runs")
    assert runs["count"] == len(runs["runs"]) >= 1
    assert any(r["code"] == "print('for the notebook')" for r in runs["runs"])
    assert server.json("GET", f"/api/sessions/{sid}/runs?limit=1")["count"] == 1
    status, body = server.request("GET", f"/api/sessions/{sid}/runs?limit=0")
    assert assert_error_shape(status, body, 400)["field"] == "limit"
    status, headers, body = server.request_full("GET", f"/api/sessions/{sid}/notebook")
    assert status == 200 and "attachment" in headers["Content-Disposition"]
    nb = nbformat.from_dict(json.loads(body))
    nbformat.validate(nb)
    assert any("for the notebook" in "".join(c["source"]) for c in nb.cells)


def test_schedules_fire_background_runs_into_the_history(server):
    sid = server.json("POST", "/api/sessions", {"id": "api-sched"}, expect=201)["id"]
    base = f"/api/sessions/{sid}/schedules"
    status, body = server.request("POST", base, {"cron": "* * * * *"})  # no code, no stored program
    assert assert_error_shape(status, body, 400)["field"] == "code"
    status, headers, body = server.request_full("POST", base, json.dumps(
        {"cron": "* * * * * *", "code": "print('from a schedule')"}))
    assert status == 201, body
    doc = json.loads(body)
    assert headers["Location"] == f"{base}/{doc['id']}" and doc["timezone"] == "UTC" and doc["next_run_at"]
    listing = server.json("GET", base)
    assert listing["count"] == 1 and [s["id"] for s in listing["schedules"]] == [doc["id"]]
    deadline = time.monotonic() + 30
    while not (fired := [r for r in server.json("GET", f"/api/sessions/{sid}/runs")["runs"]
                         if r.get("source") == "schedule"]):
        assert time.monotonic() < deadline, "no firing in the history after 30 s"
        time.sleep(0.2)
    assert fired[0]["schedule_id"] == doc["id"] and fired[0]["stdout"] == "from a schedule\n" and fired[0]["slot"]
    assert server.json("GET", f"{base}/{doc['id']}")["last_slot"] >= fired[0]["slot"]
    assert server.json("DELETE", f"{base}/{doc['id']}") == {"deleted": doc["id"]}
    for method in ("GET", "DELETE"):
        assert_error_shape(*server.request(method, f"{base}/{doc['id']}"), 404)
    assert server.json("GET", base) == {"session_id": sid, "schedules": [], "count": 0}
    server.json("DELETE", f"/api/sessions/{sid}")


@pytest.mark.parametrize("body, field", [({"cron": "*/5 * * *"}, "cron"), ({"cron": "0 25 * * *"}, "cron"),
                                         ({"cron": "0 9 * * *", "timezone": "Nowhere/City"}, "timezone")])
def test_invalid_schedule_is_400_naming_the_field(server, sid, body, field):
    status, data = server.request("POST", f"/api/sessions/{sid}/schedules", {"code": "1", **body})
    assert assert_error_shape(status, data, 400)["field"] == field
    assert server.json("GET", f"/api/sessions/{sid}/schedules")["count"] == 0


def test_schedules_of_an_unknown_session_or_id_are_404(server, sid):
    assert_error_shape(*server.request("POST", "/api/sessions/absent/schedules", {"cron": "* * * * *", "code": "1"}),
                       404)
    assert_error_shape(*server.request("GET", "/api/sessions/absent/schedules"), 404)
    assert_error_shape(*server.request("GET", f"/api/sessions/{sid}/schedules/sch_absent"), 404)
    assert_error_shape(*server.request("DELETE", f"/api/sessions/{sid}/schedules/sch_absent"), 404)


def test_interrupt_stops_a_running_cell(server):
    server.json("POST", "/api/sessions", {"id": "api-intr"}, expect=201)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(
        run(server, "api-intr", "import time\nprint('started', flush=True)\ntime.sleep(60)")))
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until the cell is running
        if server.json("GET", "/api/sessions/api-intr")["kernel"]["state"] == "busy":
            break
        time.sleep(0.05)
    time.sleep(0.2)
    assert server.json("POST", "/api/sessions/api-intr/interrupt") == {"session_id": "api-intr", "interrupted": True}
    thread.join(20)
    assert result["exit_code"] == 1 and result["error"]["ename"] == "KeyboardInterrupt", result
    assert run(server, "api-intr", "print('alive')")["stdout"] == "alive\n"
    # restart: variables are lost, the session stays
    run(server, "api-intr", "kept = 1")
    assert server.json("POST", "/api/sessions/api-intr/restart") == {"session_id": "api-intr", "restarted": True}
    assert run(server, "api-intr", "kept")["error"]["ename"] == "NameError"
    server.json("DELETE", "/api/sessions/api-intr")


def test_execute_is_one_shot(server):
    result = server.json("POST", "/api/execute", {"code": "print(6 * 7)", "language": "python"})
    assert result["stdout"] == "42\n" and result["exit_code"] == 0 and result["session_id"] is None
    status, body = server.request("POST", "/api/execute", {"language": "python"})
    assert assert_error_shape(status, body, 400)["field"] == "code"


def test_stats(server, sid):
    stats = server.json("GET", "/api/resources/stats")
    assert stats["sessions"] >= 1 and "live_kernels" in stats and "server" in stats


def test_bulk_delete_by_prefix_and_ids(server):
    for name in ("bulk-a1", "bulk-a2", "bulk-b1"):
        server.json("POST", "/api/sessions", {"id": name}, expect=201)
    assert sorted(server.json("DELETE", "/api/sessions?prefix=bulk-a")["deleted"]) == ["bulk-a1", "bulk-a2"]
    gone = server.json("DELETE", "/api/sessions", {"ids": ["bulk-b1"]})
    assert (gone["success"], gone["deleted_count"], gone["deleted_sessions"]) == (True, 1, ["bulk-b1"]), gone
    assert (gone["deleted"], gone["count"]) == (["bulk-b1"], 1) and gone["deleted_at"].endswith("Z")
    status, body = server.request("DELETE", "/api/sessions", {"ids": "bulk-b1"})
    assert assert_error_shape(status, body, 400)["field"] == "ids"


def test_oversized_metadata_is_413_and_writes_nothing(server, sid):
    big = {"blob": "m" * (64 * 1024)}  # over ERA_MAX_METADATA_BYTES, under the 1 MiB body limit
    status, body = server.request("POST", "/api/sessions", {"id": "meta-big", "metadata": big})
    assert assert_error_shape(status, body, 413)["field"] == "metadata"
    assert_error_shape(*server.request("GET", "/api/sessions/meta-big"), 404)
    before = server.json("GET", f"/api/sessions/{sid}")
    status, body = server.request("PATCH", f"/api/sessions/{sid}", {"metadata": big, "default_timeout": 9})
    assert assert_error_shape(status, body, 413)["field"] == "metadata"
    after = server.json("GET", f"/api/sessions/{sid}")
    assert (after["metadata"], after["default_timeout"]) == (before["metadata"], before["default_timeout"])


def test_list_without_paging_parameters_keeps_eras_shape(server, sid):
    listing = server.json("GET", "/api/sessions")
    assert set(listing) == {"sessions", "count"}, "an ERA client's answer is unchanged"
    assert listing["count"] == len(listing["sessions"]) and sid in [s["id"] for s in listing["sessions"]]


@pytest.fixture(scope="module")
def small_list_server():
    from tests.support.era_server import ServerProcess

    srv = ServerProcess(env={"ERA_LIST_MAX": "3", "ERA_POOL_SIZE": "0"}).start()
    for i in range(5):
        srv.json("POST", "/api/sessions", {"id": f"pg-{i}"}, expect=201)
    yield srv
    srv.cleanup()


def test_list_pages_with_cursors_through_deletes_and_inserts(small_list_server):
    srv = small_list_server
    first = srv.json("GET", "/api/sessions?limit=2")
    assert [s["id"] for s in first["sessions"]] == ["pg-0", "pg-1"] and first["count"] == 2
    assert isinstance(first["next_cursor"], str) and "truncated" not in first
    srv.json("DELETE", "/api/sessions/pg-1")  # the last one the client saw
    srv.json("DELETE", "/api/sessions/pg-3")  # one it has not seen yet
    srv.json("POST", "/api/sessions", {"id": "pg-5"}, expect=201)
    seen = [s["id"] for s in first["sessions"]] + walk(srv, first["next_cursor"])
    assert seen == ["pg-0", "pg-1", "pg-2", "pg-4", "pg-5"], "no duplicates, no gaps"
    srv.json("POST", "/api/sessions", {"id": "pg-1"}, expect=201)  # back again, as the newest
    assert walk(srv, first["next_cursor"]) == ["pg-2", "pg-4", "pg-5", "pg-1"]


def walk(srv, cursor, limit=2):
    """The ids of every page from ``cursor`` on."""
    ids = []
    while cursor is not None:
        page = srv.json("GET", f"/api/sessions?limit={limit}&cursor={cursor}")
        assert page["count"] == len(page["sessions"]) <= limit and "truncated" not in page
        ids += [s["id"] for s in page["sessions"]]
        cursor = page["next_cursor"]
    return ids


def test_list_past_the_cap_says_it_was_cut(small_list_server):
    srv = small_list_server
    cut = srv.json("GET", "/api/sessions")
    assert cut["count"] == 3 == len(cut["sessions"]) and cut["truncated"] is True
    ids = [s["id"] for s in cut["sessions"]] + walk(srv, cut["next_cursor"], limit=3)
    assert ids == ["pg-0", "pg-2", "pg-4", "pg-5", "pg-1"]


@pytest.mark.parametrize("query, field", [
    ("cursor=nonsense", "cursor"), ("cursor=", "cursor"), ("cursor=%00", "cursor"), ("cursor=" + "A" * 300, "cursor"),
    ("limit=0", "limit"), ("limit=-1", "limit"), ("limit=x", "limit"), ("limit=4", "limit"), ("limit=", "limit"),
])
def test_list_bad_cursor_or_limit_is_400(small_list_server, query, field):
    status, body = small_list_server.request("GET", f"/api/sessions?{query}")
    assert assert_error_shape(status, body, 400)["field"] == field


def test_openapi_is_served(server):
    doc = server.json("GET", "/api/openapi.json")
    assert doc["openapi"].startswith("3.") and "/api/sessions/{id}/stream" in doc["paths"]


# ---- SSE ------------------------------------------------------------------------------------


def read_sse(server, sid, body, timeout=60):
    """(arrival time, event name, data) for each event, read as it comes."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    conn.request("POST", f"/api/sessions/{sid}/stream", json.dumps(body))
    start = time.monotonic()
    response = conn.getresponse()
    assert response.status == 200, response.read()
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events, name = [], None
    while True:
        line = response.fp.readline()
        if not line:
            break
        line = line.decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((time.monotonic() - start, name, json.loads(line[6:])))
            if name == "done":
                break
    conn.close()
    return events


def test_sse_streams_each_event_as_the_kernel_emits_it(server, sid):
    code = "import time\nfor i in range(5):\n    print(i, flush=True)\n    time.sleep(0.5)\nraise ValueError('late')"
    events = read_sse(server, sid, {"code": code})
    names = [e[1] for e in events]
    assert names == ["stdout"] * 5 + ["error", "done"], names
    assert [e[2]["content"] for e in events[:5]] == [f"{i}\n" for i in range(5)]
    assert all(e[2]["type"] == e[1] for e in events)
    arrivals = [e[0] for e in events[:5]]
    assert arrivals[0] < 1.5  # not held back until the end
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert all(0.25 < g < 1.0 for g in gaps), gaps
    assert events[-2][2]["ename"] == "ValueError"
    done = events[-1][2]
    assert done["exit_code"] == 1 and done["duration"].endswith("s")


def test_sse_display_event_and_errors_before_start_are_json(server, sid):
    events = read_sse(server, sid, {"code": "from IPython.display import display, Markdown\ndisplay(Markdown('*m*'))"})
    assert [e[1] for e in events] == ["display", "done"]
    assert "text/markdown" in events[0][2]["data"]
    status, body = server.request("POST", f"/api/sessions/{sid}/stream", {"code": 1})
    assert assert_error_shape(status, body, 400)["field"] == "code"
    status, body = server.request("POST", "/api/sessions/absent/stream", {"code": "1"})
    assert_error_shape(status, body, 404)


def test_sse_client_leaving_does_not_stop_the_run(server, sid):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", f"/api/sessions/{sid}/stream",
                 json.dumps({"code": "import time\nprint('a', flush=True)\ntime.sleep(0.5)\nleft_behind = 'done'"}))
    response = conn.getresponse()
    response.fp.readline()
    conn.close()  # gone mid-run
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        result = run(server, sid, "print(left_behind)")
        if result["exit_code"] == 0:
            assert result["stdout"] == "done\n"
            return
        time.sleep(0.1)
    raise AssertionError("the run did not finish after its client left")
