"""docs/security.md cases 11, 12 and 21 end to end, on one real server: kernel code fills
its own workspace (ENOSPC inside the session, everyone else unaffected, the session
recovers once the file is gone); a session whose workspace is ``abc`` cannot reach its
sibling ``abcd`` through any file route (``../abcd``, encoded forms, links its code
made); and one session's code cannot signal another's processes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import quote

import pytest

from era_kernel.workspaces import loopfs
from tests.support.api_errors import assert_error_shape
from tests.support.era_server import ServerProcess

QUOTA_MIB = 32
CAN_MOUNT = os.getuid() == 0 and os.path.exists("/dev/loop-control") and loopfs.mkfs_tool() is not None
SECRET = b"the sibling's secret"


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(env={"ERA_POOL_SIZE": "0", "ERA_WORKSPACE_MAX_BYTES": f"{QUOTA_MIB}M",
                             "ERA_WORKSPACE_VOLUMES": "on" if CAN_MOUNT else "off"}).start()
    yield srv
    srv.cleanup()


def run(server: ServerProcess, sid: str, code: str) -> dict:
    return server.json("POST", f"/api/sessions/{sid}/run", {"code": code}, timeout=120)


# ---- case 11: the workspace fills its disk -----------------------------------------------
FILL = """
import os
with open('big', 'wb') as f:
    chunk = os.urandom(1 << 20)
    while True:
        f.write(chunk)
        f.flush()
"""


@pytest.mark.skipif(not CAN_MOUNT, reason="workspace volumes need root, loop devices and mkfs.ext4")
def test_code_filling_its_workspace_gets_enospc_and_nobody_else_notices(server):
    for sid in ("full", "bystander"):
        server.json("POST", "/api/sessions", {"id": sid}, expect=201)
    result = run(server, "full", FILL)
    # The run fails with the kernel's own ENOSPC: a clear error naming the cause.
    assert result["exit_code"] == 1 and result["error"]["ename"] == "OSError", result
    assert "No space left on device" in result["error"]["evalue"], result["error"]
    size = run(server, "full", "import os; print(os.path.getsize('big'))")
    # The volume is sized to leave the session at least the quota; ext4's granularity
    # gives it a little more, never much more.
    assert QUOTA_MIB * 2**20 <= int(size["stdout"]) <= 1.1 * QUOTA_MIB * 2**20, size
    # And the server says why, in words, naming the setting.
    said = result["stderr"] + size["stderr"]
    assert "the workspace is full" in said and "ERA_WORKSPACE_MAX_BYTES" in said, said
    # The host's disk holds at most the volume's image for it, not what the code tried to write.
    images = list((Path(server.env["ERA_DATA_DIR"]) / "volumes").rglob("full.img"))
    assert len(images) == 1, images
    held = images[0].stat().st_blocks * 512
    assert held <= 1.5 * QUOTA_MIB * 2**20, f"the host holds {held / 2**20:.0f} MiB for it"

    # The server, its store and its logs work: another session runs, its history and the
    # full session's (the failed run included) are written, /health answers.
    lines = len(server.lines)
    assert run(server, "bystander", "open('note', 'w').write('ok'); print('fine')")["stdout"] == "fine\n"
    assert server.json("GET", "/health")["status"] == "ok"
    codes = [r["code"] for r in server.json("GET", "/api/sessions/full/runs")["runs"]]
    assert FILL in codes, "the failed run is in the history"
    assert server.json("GET", "/api/sessions/bystander/runs")["count"] == 1
    assert len(server.lines) > lines, "the server still logs"
    assert not any("Traceback" in line for line in server.lines)
    # Writing through the API into the full workspace is a clear refusal, not a 500.
    status, body = server.request("PUT", "/api/sessions/full/files/more.bin", b"x" * 2**20)
    assert_error_shape(status, body, 413)
    listed = {f["path"] for f in server.json("GET", "/api/sessions/full/files")["files"]}
    assert "big" in listed

    # Deleting the file gives the space back to the same session, with the same kernel.
    server.json("DELETE", "/api/sessions/full/files/big")
    again = run(server, "full", "open('small', 'wb').write(b'y' * (4 << 20)); print('written')")
    assert again["stdout"] == "written\n", again
    server.request("PUT", "/api/sessions/full/files/more.bin", b"x" * 2**20)
    assert server.request("GET", "/api/sessions/full/files/more.bin") == (200, b"x" * 2**20)
    for sid in ("full", "bystander"):
        server.json("DELETE", f"/api/sessions/{sid}")


# ---- case 12: the sibling prefix ---------------------------------------------------------
LINK_NAMES = ("secretlink", "mountlink", "abslink")


def sibling_paths(workspace_of_abcd: str) -> list[str]:
    """Every way we know to name ``abcd/secret.txt`` from ``abc``'s file routes, as
    sent on the wire (tornado percent-decodes the path once)."""
    absolute = workspace_of_abcd.lstrip("/")
    return ["../abcd/secret.txt", "%2e%2e/abcd/secret.txt", "%2E%2E%2Fabcd%2Fsecret.txt", "..%2fabcd%2fsecret.txt",
            ".%2e/abcd/secret.txt", "..%5cabcd%5csecret.txt", "..\\abcd\\secret.txt", "x/../../abcd/secret.txt",
            "x/%2e%2e/%2e%2e/abcd/secret.txt", "./../abcd/secret.txt", "../abcd/secret.txt%00",
            f"%2F{absolute}/secret.txt", f"%2F%2F{absolute}/secret.txt",
            # links the session's code made (below), to the sibling and into it
            "../../abcd/ws/secret.txt", "%2e%2e/%2e%2e/abcd/ws/secret.txt",
            "uplink/abcd/secret.txt", "sibling/secret.txt", "secretlink", "mountlink", "abslink"]


def test_a_session_cannot_reach_the_workspace_whose_name_extends_its_own(server):
    server.json("POST", "/api/sessions", {"id": "abc"}, expect=201)
    server.json("POST", "/api/sessions", {"id": "abcd"}, expect=201)
    try:
        server.request("PUT", "/api/sessions/abcd/files/secret.txt", SECRET)
        # Where abcd's files are on the host: its workspace directory, and with volumes
        # also the volume's own mount, whose parent holds abc's too.
        data = Path(server.env["ERA_DATA_DIR"])
        found = sorted(p for p in data.rglob("secret.txt") if p.read_bytes() == SECRET)
        assert found and data / "sessions" / "abcd" / "secret.txt" in found, found
        abcd_dir = data / "sessions" / "abcd"
        assert (data / "sessions" / "abc").is_dir(), "the two workspaces are siblings: the case this tests"
        # abc's code plants links: relative ones through the shared parent, and absolute ones.
        made = run(server, "abc", f"""
import os
os.symlink('..', 'uplink')
os.symlink('../abcd', 'sibling')
os.symlink('../abcd/secret.txt', 'secretlink')
os.symlink('../../abcd/ws/secret.txt', 'mountlink')
os.symlink({str(found[0])!r}, 'abslink')
# From inside the sandbox the sibling is not there at all.
print(os.path.exists('../abcd'), os.path.exists({str(abcd_dir)!r}), os.path.exists('sibling/secret.txt'))
""")
        assert made["exit_code"] == 0 and made["stdout"] == "False False False\n", made

        paths = [p for where in found for p in sibling_paths(str(where.parent))]
        answers = {}
        for path in paths:
            for method, body in (("GET", None), ("PUT", b"overwritten"), ("DELETE", None)):
                status, data_ = server.request(method, f"/api/sessions/abc/files/{path}", body)
                if path in LINK_NAMES and method != "GET" and status == 200:
                    # A write or delete of the link's own name replaces or removes the
                    # link in abc: never the file it names (checked below).
                    continue
                assert status in (400, 404), (method, path, status, data_[:300])
                assert_error_shape(status, data_, (400, 404))
                assert SECRET not in data_, (method, path)
                answers[method, path] = (status, data_)
        # Encoded twice, the dots are a name: a file inside abc's own workspace.
        written = server.json("PUT", "/api/sessions/abc/files/%252e%252e/abcd/secret.txt", b"mine")
        assert written["path"] == "%2e%2e/abcd/secret.txt"
        assert server.request("GET", "/api/sessions/abc/files/%252e%252e/abcd/secret.txt") == (200, b"mine")
        # The answer does not tell whether the target exists: the same as for a missing one.
        for method in ("GET", "DELETE"):
            for name in ("../abcd/secret.txt", "sibling/secret.txt"):
                status, body = server.request(method, f"/api/sessions/abc/files/{name.replace('secret', 'nothing')}")
                assert answers[method, name] == (status, body.replace(b"nothing", b"secret")), (method, name)
        # Nothing of abcd was read, changed, added or removed, and abc's listing shows its
        # links as what they are, never the sibling's files.
        assert all(p.read_bytes() == SECRET for p in found)
        assert sorted(p.name for p in abcd_dir.iterdir() if not p.name.startswith(".")) == ["secret.txt"], \
            list(abcd_dir.iterdir())
        listing = server.json("GET", "/api/sessions/abcd/files")["files"]
        assert [f["path"] for f in listing] == ["secret.txt"]
        mine = server.json("GET", "/api/sessions/abc/files")["files"]
        assert not any(f["path"].startswith(("uplink/", "sibling/")) for f in mine), mine
        for f in mine:  # nothing listed in abc holds the sibling's bytes
            assert server.request("GET", f"/api/sessions/abc/files/{quote(f['path'])}")[1] != SECRET, f
        assert server.request("GET", "/api/sessions/abcd/files/secret.txt") == (200, SECRET)
    finally:
        for sid in ("abc", "abcd"):
            server.request("DELETE", f"/api/sessions/{sid}")


# ---- case 21: another session's processes cannot be signalled -----------------------------
def test_a_session_cannot_signal_another_sessions_processes(server):
    """Session A's code tries SIGKILL on every process of B's kernel, by the host pids
    (found by B's kernel cgroup) and by the small pids a sandbox sees: each one fails,
    and B keeps its state."""
    if os.getuid() != 0:
        pytest.skip("finding a kernel's processes from the host uses its cgroup (root)")
    from tests.support.kernel_cgroups import kernel_groups

    try:
        server.json("POST", "/api/sessions", {"id": "sig-a"}, expect=201)
        assert run(server, "sig-a", "1")["exit_code"] == 0
        before = kernel_groups(server.proc.pid)
        server.json("POST", "/api/sessions", {"id": "sig-b"}, expect=201)
        assert run(server, "sig-b", "kept = 7")["exit_code"] == 0
        (group,) = kernel_groups(server.proc.pid) - before
        marker = f"/era/{server.proc.pid}.{group}"
        b_pids = [int(e) for e in os.listdir("/proc") if e.isdigit() and _in_cgroup(e, marker)]
        assert b_pids
        attempt = run(server, "sig-a", f"""
import errno, json, os, signal
results = {{}}
for pid in {b_pids!r} + list(range(1, 64)):
    if os.path.exists(f'/proc/{{pid}}'):
        continue  # a process or thread of A's own sandbox (its pid namespace): not B's
    try:
        os.kill(pid, signal.SIGKILL)
        results[pid] = 'killed'
    except OSError as exc:
        results[pid] = errno.errorcode[exc.errno]
print(json.dumps(results))
""")
        assert attempt["exit_code"] == 0, attempt
        outcomes = json.loads(attempt["stdout"])
        assert outcomes and set(outcomes.values()) <= {"ESRCH", "EPERM"}, outcomes  # never "killed"
        assert all(str(pid) in outcomes for pid in b_pids), outcomes  # B's host pids were all tried
        assert run(server, "sig-b", "print(kept)")["stdout"] == "7\n"
        assert all(_alive(pid) for pid in b_pids)
    finally:
        for sid in ("sig-a", "sig-b"):
            server.request("DELETE", f"/api/sessions/{sid}")


def _in_cgroup(pid: str, marker: str) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
