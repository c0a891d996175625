"""``"isolation": "gvisor"``: a Docker session whose container runs under gVisor's runsc,
through the real server, the real engine and runsc registered with the Docker engine by
scripts/bootstrap-docker.sh. The provisioner's own promises on gVisor are the conformance
suite's (tests/conformance, backend ``era-docker-gvisor``); here: the session option, what
the kernel sees (gVisor's kernel, not the host's), its commands, the gVisor kernelspec, and
the refusals. Never skipped in CI (ERA_REQUIRE_GVISOR=1)."""

from __future__ import annotations

import os

import pytest

from era_kernel.provisioning.docker import shared_docker_client
from tests.support.api_errors import assert_error_shape
from tests.support.era_server import shared_server

from .conftest import require_gvisor

SID = "gvisor-main"
# What the kernel reports about the kernel under it: gVisor writes its own boot lines
# into its dmesg ("Starting gVisor...") and reports its own release.
PROBE = ("import os, json, subprocess\n"
         "dmesg = subprocess.run(['dmesg'], capture_output=True, text=True).stdout\n"
         "print(json.dumps({'release': os.uname().release, 'version': open('/proc/version').read(), "
         "'dmesg': dmesg[:400], 'cwd': os.getcwd()}))")


@pytest.fixture(scope="module")
def server():
    require_gvisor()
    srv = shared_server()
    status, _ = srv.request("GET", f"/api/sessions/{SID}")
    if status == 404:
        doc = srv.json("POST", "/api/sessions", {"id": SID, "provisioner": "docker", "isolation": "gvisor"},
                       expect=201)
        assert doc["isolation"] == "gvisor" and doc["provisioner"] == "docker"
    return srv


def run_json(server, sid: str, code: str) -> dict:
    import json

    result = server.json("POST", f"/api/sessions/{sid}/run", {"code": code, "timeout": 120}, timeout=180)
    assert result.get("exit_code", 0) == 0 and not result.get("error"), result
    return json.loads(result["stdout"].strip().splitlines()[-1])


def runtime_of(sid: str) -> str:
    """The Docker runtime of the session's kernel container, as the engine reports it."""
    containers = shared_docker_client().api.containers(filters={"label": [f"era.session={sid}"]})
    assert containers, f"no container for {sid}"
    return shared_docker_client().api.inspect_container(containers[0]["Id"])["HostConfig"]["Runtime"]


def test_the_kernel_sees_gvisors_kernel_not_the_hosts(server):
    seen = run_json(server, SID, PROBE)
    assert "gVisor" in seen["dmesg"], seen
    assert seen["release"] != os.uname().release and seen["version"] != open("/proc/version").read()
    assert seen["cwd"] == "/workspace"
    assert runtime_of(SID) == "runsc"
    assert server.json("GET", f"/api/sessions/{SID}")["isolation"] == "gvisor"


def test_a_runc_session_beside_it_sees_the_hosts_kernel(server):
    """The contrast that makes the test above mean something: the same image under runc."""
    sid = "gvisor-runc-twin"
    server.json("POST", "/api/sessions", {"id": sid, "provisioner": "docker"}, expect=201)
    try:
        seen = run_json(server, sid, PROBE)
        assert seen["release"] == os.uname().release and "gVisor" not in seen["dmesg"]
        assert runtime_of(sid) == "runc"
        assert server.json("GET", f"/api/sessions/{sid}")["isolation"] == "runc"
    finally:
        server.request("DELETE", f"/api/sessions/{sid}")


def test_the_sessions_commands_run_under_gvisor_too(server):
    """A command beside the kernel (its own container) gets the session's wall."""
    result = server.json("POST", f"/api/sessions/{SID}/commands", {"cmd": ["sh", "-c", "dmesg | head -n 1; pwd"]},
                         timeout=120)
    assert result["exit_code"] == 0, result
    assert "gVisor" in result["stdout"] and result["stdout"].rstrip().endswith("/workspace"), result


def test_files_written_by_the_api_reach_the_gvisor_kernel_and_back(server):
    """The workspace is a bind mount through gVisor's gofer: both sides see each other's writes."""
    status, _ = server.request("PUT", f"/api/sessions/{SID}/files/from-host.txt", b"written by the host")
    assert status in (200, 201, 204), status
    seen = run_json(server, SID, "import json; open('from-kernel.txt', 'w').write('written in gVisor'); "
                                 "print(json.dumps(open('from-host.txt').read()))")
    assert seen == "written by the host"
    status, body = server.request("GET", f"/api/sessions/{SID}/files/from-kernel.txt")
    assert status == 200 and body == b"written in gVisor"


@pytest.mark.parametrize("body, message", [
    ({"provisioner": "local", "isolation": "gvisor"}, "docker provisioner"),
    ({"provisioner": "local", "isolation": "runc"}, "docker provisioner"),
    ({"provisioner": "docker", "isolation": "kata"}, "isolation"),
    ({"provisioner": "docker", "isolation": 1}, "isolation"),
])
def test_isolation_is_refused_where_it_cannot_hold(server, body, message):
    status, data = server.request("POST", "/api/sessions", body)
    error = assert_error_shape(status, data, 400)
    assert error.get("field") == "isolation" and message in error["error"], error
    status, data = server.request("POST", "/api/execute", {"code": "1", **body})
    error = assert_error_shape(status, data, 400)
    assert error.get("field") == "isolation", error


def test_one_shot_run_under_gvisor(server):
    result = server.json("POST", "/api/execute", {"code": "import subprocess; print(subprocess.run(['dmesg'], "
                                                          "capture_output=True, text=True).stdout.splitlines()[0])",
                                                  "provisioner": "docker", "isolation": "gvisor", "timeout": 120},
                         timeout=180)
    assert "gVisor" in result["stdout"], result


def test_gvisor_kernelspec_through_the_gateway(server):
    specs = server.json("GET", "/api/kernelspecs")["kernelspecs"]
    config = specs["era-python-gvisor"]["spec"]["metadata"]["kernel_provisioner"]["config"]
    assert config == {"isolation": "gvisor"}
    kid = server.json("POST", "/api/kernels", {"name": "era-python-gvisor"}, expect=201, timeout=180)["id"]
    try:
        assert server.json("GET", f"/api/kernels/{kid}")["name"] == "era-python-gvisor"
        doc = server.json("GET", f"/api/sessions/{kid}")
        assert doc["isolation"] == "gvisor" and doc["provisioner"] == "docker"
        assert runtime_of(kid) == "runsc"
    finally:
        server.request("DELETE", f"/api/kernels/{kid}")
