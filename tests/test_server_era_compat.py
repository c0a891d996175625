"""ERA's documented requests, sent as ERA's own docs and curl scripts send them, against a
real server process; each test reads the fields a client of ERA reads (what a `jq` in
ERA's docs would pick). ERA's source (cloudflare/src/index.ts, session.ts and the
agent's HTTP_API.md) is the reference for every shape here."""

from __future__ import annotations

import pytest

from tests.support.api_errors import assert_error_shape
from tests.support.era_server import shared_server

ERA_SESSION_FIELDS = ("id", "created_at", "last_run_at", "language", "persistent", "file_count", "total_size_bytes",
                      "metadata", "data", "setup", "setup_status", "allowInternetAccess", "allowPublicAccess",
                      "default_timeout")


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture
def sid(server, request):
    name = "era-" + request.node.name.replace("_", "-")[:60]
    server.json("POST", "/api/sessions", {"session_id": name, "language": "python"}, expect=201)
    yield name
    server.request("DELETE", f"/api/sessions/{name}")


def test_session_document_has_every_era_field_and_run_results_name_the_session(server, sid):
    doc = server.json("GET", f"/api/sessions/{sid}")
    for key in ERA_SESSION_FIELDS:
        assert key in doc, key
    # Our defaults, on purpose (README: ERA defaults): no network, no keyless proxy.
    assert doc["allowInternetAccess"] is False and doc["allowPublicAccess"] is False
    result = server.json("POST", f"/api/sessions/{sid}/run", {"code": "print(6*7)"})
    assert result["session_id"] == sid and result["stdout"] == "42\n" and result["exit_code"] == 0
    assert isinstance(result["duration"], str) and "data" in result


def test_create_with_era_flags_keeps_them(server):
    body = {"session_id": "era-flags", "language": "python", "allowInternetAccess": False, "allowPublicAccess": True,
            "persistent": False, "default_timeout": 12, "metadata": {"owner": "me"}, "data": {"n": 1}}
    doc = server.json("POST", "/api/sessions", body, expect=201)
    try:
        assert (doc["allowPublicAccess"], doc["default_timeout"], doc["metadata"], doc["data"]) == \
            (True, 12, {"owner": "me"}, {"n": 1})
        assert server.json("GET", "/api/sessions/era-flags")["allowPublicAccess"] is True
    finally:
        server.request("DELETE", "/api/sessions/era-flags")


def test_patch_answers_success_id_metadata_updated_at(server, sid):
    # curl -X PATCH .../api/sessions/$ID -d '{"metadata": {...}, "data": {...}}' | jq .metadata.data
    answer = server.json("PATCH", f"/api/sessions/{sid}", {"metadata": {"stage": "two"}, "data": {"k": "v"},
                                                           "allowPublicAccess": True})
    assert answer["success"] is True and answer["id"] == sid and answer["updated_at"].endswith("Z")
    doc = answer["metadata"]  # ERA's name for the whole session document
    assert doc["id"] == sid and doc["metadata"] == {"stage": "two"} and doc["data"] == {"k": "v"}
    assert doc["allowPublicAccess"] is True
    assert server.json("GET", f"/api/sessions/{sid}")["data"] == {"k": "v"}


def test_stored_code_lives_in_data_and_runs_and_survives_duplicate(server, sid):
    status, body = server.request("GET", f"/api/sessions/{sid}/code")
    missing = assert_error_shape(status, body, 404)
    assert missing["error"] == "no code stored" and "PUT" in missing["hint"]
    status, body = server.request("POST", f"/api/sessions/{sid}/run", {})
    refused = assert_error_shape(status, body, 400)
    assert refused["field"] == "code" and "/code" in refused["hint"]

    program = "import json\nprint('handled', json.load(open('.session_data.json'))['code_description'])"
    stored = server.json("PUT", f"/api/sessions/{sid}/code", {"code": program, "description": "answers requests"})
    assert stored["success"] is True and stored["code_length"] == len(program) and stored["updated_at"].endswith("Z")
    got = server.json("GET", f"/api/sessions/{sid}/code")
    assert (got["code"], got["description"], got["updated_at"], got["code_length"]) == \
        (program, "answers requests", stored["updated_at"], len(program))
    data = server.json("GET", f"/api/sessions/{sid}")["data"]
    assert (data["code"], data["code_description"], data["code_updated_at"]) == \
        (program, "answers requests", stored["updated_at"])
    # ERA runs the stored program when `code` is absent, and when it is empty.
    assert server.json("POST", f"/api/sessions/{sid}/run", {})["stdout"] == "handled answers requests\n"
    assert server.json("POST", f"/api/sessions/{sid}/run", {"code": ""})["stdout"] == "handled answers requests\n"
    # A new program keeps the description unless it brings one.
    server.json("PUT", f"/api/sessions/{sid}/code", {"code": "print('v2')"})
    assert server.json("GET", f"/api/sessions/{sid}/code")["description"] == "answers requests"

    copy = server.json("POST", f"/api/sessions/{sid}/duplicate", {"id": f"{sid}-copy"}, expect=201)
    try:
        assert copy["data"]["code"] == "print('v2')"
        assert server.json("POST", f"/api/sessions/{sid}-copy/run", {})["stdout"] == "v2\n"
    finally:
        server.request("DELETE", f"/api/sessions/{sid}-copy")

    status, body = server.request("PUT", f"/api/sessions/{sid}/code", {"code": ""})
    assert assert_error_shape(status, body, 400)["error"] == "code field required"


def test_taken_ids_answer_409_with_the_id(server, sid):
    status, body = server.request("POST", "/api/sessions", {"session_id": sid, "language": "python"})
    assert assert_error_shape(status, body, 409)["id"] == sid
    other = server.json("POST", "/api/sessions", {"session_id": f"{sid}-b"}, expect=201)["id"]
    try:
        status, body = server.request("POST", f"/api/sessions/{sid}/duplicate", {"id": other})
        assert assert_error_shape(status, body, 409)["id"] == other
    finally:
        server.request("DELETE", f"/api/sessions/{other}")


def test_delete_and_bulk_delete_answer_eras_shapes(server):
    for name in ("era-bulk-1", "era-bulk-2", "era-single"):
        server.json("POST", "/api/sessions", {"session_id": name}, expect=201)
    one = server.json("DELETE", "/api/sessions/era-single")
    assert (one["success"], one["id"]) == (True, "era-single") and one["deleted_at"].endswith("Z")
    bulk = server.json("DELETE", "/api/sessions?prefix=era-bulk-")
    assert bulk["success"] is True and bulk["deleted_count"] == 2
    assert sorted(bulk["deleted_sessions"]) == ["era-bulk-1", "era-bulk-2"] and bulk["deleted_at"].endswith("Z")
    assert server.request("GET", "/api/sessions/era-bulk-1")[0] == 404


def test_typecheck_reaches_the_kernel_at_start(server):
    doc = server.json("POST", "/api/sessions", {"session_id": "era-typecheck", "typecheck": True}, expect=201)
    try:
        assert doc["typecheck"] is True
        code = "import os; print(os.environ.get('ERA_TYPECHECK'))"
        assert server.json("POST", "/api/sessions/era-typecheck/run", {"code": code})["stdout"] == "1\n"
        server.json("PATCH", "/api/sessions/era-typecheck", {"typecheck": False})  # the kernel restarts without it
        assert server.json("POST", "/api/sessions/era-typecheck/run", {"code": code})["stdout"] == "None\n"
    finally:
        server.request("DELETE", "/api/sessions/era-typecheck")


# ---- ERA's local agent: /api/vm ----------------------------------------------------------------


@pytest.mark.parametrize("provisioner", ["local", "docker"])
def test_vm_create_get_list_stop_delete(server, provisioner):
    # curl -X POST .../api/vm -d '{"language":"python","cpu_count":1,"memory_mib":256,"network_mode":"none"}'
    vm = server.json("POST", "/api/vm", {"language": "python", "cpu_count": 1, "memory_mib": 256,
                                         "network_mode": "none", "provisioner": provisioner}, expect=201)
    vid = vm["id"]
    try:
        assert vid.startswith("python-") and vm["language"] == "python" and vm["status"] == "running"
        assert (vm["cpu_count"], vm["memory_mib"], vm["network_mode"], vm["persist"]) == (1, 256, "none", False)
        # CI runs as root with cgroups: the local sandbox holds memory (its cgroup), not CPUs.
        assert vm["limits_enforced"] == {"memory_mib": True, "cpu_count": provisioner == "docker"}
        assert server.json("GET", f"/api/vm/{vid}")["id"] == vid
        listed = server.json("GET", "/api/vms")
        assert listed["count"] == len(listed["vms"]) and vid in [v["id"] for v in listed["vms"]]
        # The VM is a session: the session routes see it, with its limits.
        session = server.json("GET", f"/api/sessions/{vid}")
        assert session["limits"] == {"memory_mib": 256, "cpu_count": 1.0}
        # Its memory limit holds: a run asking for more than 256 MiB fails, one below passes.
        small = server.json("POST", f"/api/sessions/{vid}/run", {"code": "b = bytearray(64 * 2**20); print(len(b))"})
        assert small["exit_code"] == 0, small
        big = server.json("POST", f"/api/sessions/{vid}/run",
                          {"code": "b = bytearray(600 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('fit')"})
        assert big["exit_code"] != 0 and "fit" not in big["stdout"], big
        stopped = server.json("POST", f"/api/vm/{vid}/stop")
        assert stopped == {"status": "stopped", "vm_id": vid, "message": "VM stopped successfully"}
        assert server.json("GET", f"/api/vm/{vid}")["status"] == "stopped"
        assert server.json("POST", f"/api/sessions/{vid}/run", {"code": "print('again')"})["stdout"] == "again\n"
    finally:
        gone = server.json("DELETE", f"/api/vm/{vid}")
    assert gone == {"status": "deleted", "vm_id": vid, "message": "VM cleaned successfully"}
    assert server.request("GET", f"/api/vm/{vid}")[0] == 404


def test_vm_limits_above_the_servers_are_refused(server):
    status, body = server.request("POST", "/api/vm", {"language": "python", "memory_mib": 10**7})
    assert assert_error_shape(status, body, 422)["field"] == "limits.memory_mib"
    status, body = server.request("POST", "/api/vm", {"language": "python", "network_mode": "bridge"})
    assert assert_error_shape(status, body, 400)["field"] == "network_mode"


@pytest.mark.parametrize("provisioner", ["local", "docker"])
def test_vm_run_is_a_shell_command_in_the_sessions_sandbox(server, provisioner):
    # ERA's HTTP_API.md workflow: create, run a command, check, delete.
    vm = server.json("POST", "/api/vm", {"language": "python", "cpu_count": 1, "memory_mib": 256,
                                         "network_mode": "none", "provisioner": provisioner}, expect=201)
    vid = vm["id"]
    try:
        ran = server.json("POST", f"/api/vm/{vid}/run",
                          {"command": "python3 -c \"import sys; print(sys.version_info[0])\"", "timeout": 30})
        assert (ran["exit_code"], ran["stdout"], ran["stderr"]) == (0, "3\n", "") and ran["duration"].endswith("s")
        # The session's sandbox: its workspace (the files API and the kernel see what the
        # command wrote), its /tmp, no network, not root, and the caller's envs.
        ran = server.json("POST", f"/api/vm/{vid}/run", {
            "command": "echo made > out.txt && echo kept > /tmp/note && id -u && echo $GREETING >&2 && exit 3",
            "envs": {"GREETING": "hi"}})
        assert ran["exit_code"] == 3 and ran["stderr"] == "hi\n" and ran["stdout"].strip() != "0", ran
        assert server.request("GET", f"/api/sessions/{vid}/files/out.txt")[1] == b"made\n"
        kernel = server.json("POST", f"/api/sessions/{vid}/run", {"code": "print(open('/tmp/note').read().strip())"})
        assert kernel["stdout"] == "kept\n", kernel
        port = int(server.base.rsplit(":", 1)[1])  # the server listens on the host's loopback
        net = server.json("POST", f"/api/vm/{vid}/run", {
            "command": f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 2)\""})
        assert net["exit_code"] != 0 and "Traceback" in net["stderr"], net
        slow = server.json("POST", f"/api/vm/{vid}/run", {"command": "echo start; sleep 30", "timeout": 1})
        assert slow["exit_code"] == 124 and slow["timed_out"] is True and slow["stdout"] == "start\n", slow
        assert slow["duration_ms"] < 10_000
    finally:
        server.json("DELETE", f"/api/vm/{vid}")
    status, body = server.request("POST", f"/api/vm/{vid}/run", {"command": "true"})
    assert_error_shape(status, body, 404)


@pytest.mark.parametrize("language, code, expected", [
    ("python", "1/0", "ZeroDivisionError: division by zero"),
    ("node", "null.x", "TypeError"),
    ("python", "import sys; sys.exit(3)", None),
])
def test_a_failed_run_says_why_in_stderr_as_eras_interpreters_do(server, language, code, expected):
    name = f"era-stderr-{language}"
    server.json("POST", "/api/sessions", {"session_id": name, "language": language}, expect=201)
    try:
        result = server.json("POST", f"/api/sessions/{name}/run", {"code": code})
        assert result["exit_code"] != 0
        if expected is None:  # an exit is not a failure to print
            assert result["stderr"] == "", result
        else:
            assert expected in result["stderr"] and "\x1b[" not in result["stderr"], result
            assert result["error"]["ename"] in result["stderr"]
    finally:
        server.request("DELETE", f"/api/sessions/{name}")
