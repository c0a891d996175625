"""``POST .../interrupt`` while a run waits for its kernel (a start on create, after a
stop, after a restart) or for package setup: the current run ends as an interrupted cell
does and its code never runs, the runs queued behind it run, and the kernel that was
starting comes up for them. With no run of ours, an interrupt leaves a starting kernel
alone and is a no-op on an idle one. Real server, real kernels (local; Docker once).

A kernel's start is held open by the session's ``startup`` code, which waits for a file
the test writes (the gate): no sleeping and hoping that a start is slow enough."""

from __future__ import annotations

import http.server
import json
import queue
import threading
import time

import pytest

from tests.support.era_server import ServerProcess

FINISHED = {"completed", "failed", "cancelled", "interrupted"}
# Startup code: note the start in starts.log, then wait for the file "go" in the workspace.
GATE = ("import os, time\nopen('starts.log', 'a').write('start\\n')\n"
        "while not os.path.exists('go'):\n    time.sleep(0.05)")


class CallbackReceiver:
    """Completion callbacks posted to 127.0.0.1, kept as JSON documents."""

    def __init__(self) -> None:
        self.bodies: queue.Queue = queue.Queue()
        bodies = self.bodies

        class Hook(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                bodies.put(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(env={"ERA_POOL_SIZE": "0", "ERA_CALLBACK_ALLOW": "127.0.0.0/8",
                             "ERA_CALLBACK_BACKOFF": "0.01"}).start()
    yield srv
    srv.cleanup()


@pytest.fixture(scope="module")
def receiver():
    r = CallbackReceiver()
    yield r
    r.close()


def wait_for(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def background(server, sid, code, **extra) -> str:
    run_id = server.json("POST", f"/api/sessions/{sid}/run", {"code": code, "background": True, **extra},
                         expect=202)["run_id"]
    wait_for(lambda: server.request("GET", f"/api/sessions/{sid}/runs/{run_id}")[0] == 200, "its record")
    return run_id


def finished(server, sid, run_id) -> dict:
    return wait_for(lambda: (r := server.json("GET", f"/api/sessions/{sid}/runs/{run_id}"))["status"] in FINISHED
                    and r, f"run {run_id} to end")


def state(server, sid) -> str:
    return server.json("GET", f"/api/sessions/{sid}")["kernel"]["state"]


def has_file(server, sid, name) -> bool:
    return server.request("GET", f"/api/sessions/{sid}/files/{name}")[0] == 200


def open_gate(server, sid) -> None:
    server.json("PUT", f"/api/sessions/{sid}/files/go", b"")


def assert_interrupted_before_start(result: dict) -> None:
    """What a cell interrupted while it runs gives (KeyboardInterrupt, exit code 1), with
    nothing printed: its code never ran."""
    assert result["exit_code"] == 1 and result["error"]["ename"] == "KeyboardInterrupt", result
    assert "did not run" in result["error"]["evalue"], result
    assert result["stdout"] == "" and result["stderr"].startswith("KeyboardInterrupt: "), result
    assert [o["output_type"] for o in result["outputs"]] == ["error"], result


def assert_interrupted_record(server, sid, run_id) -> dict:
    record = finished(server, sid, run_id)
    assert (record["status"], record["reason"]) == ("interrupted", "interrupted by request"), record
    assert_interrupted_before_start(record)
    events = server.json("GET", f"/api/sessions/{sid}/runs/{run_id}/events")["events"]
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["error", "done"], events
    assert events[0]["ename"] == "KeyboardInterrupt" and events[1]["exit_code"] == 1, events
    return record


def test_interrupt_ends_the_run_waiting_for_its_kernel_and_the_queued_ones_run(server, receiver):
    """On create (the background start): a background run waits for the kernel, a
    synchronous one and a background one queue behind it. The first interrupt ends the
    first run only (its callback says interrupted); the Jupyter gateway's interrupt ends
    the synchronous one, now current; the last runs once the kernel is up, on a kernel
    none of the interrupted code touched."""
    sid = server.json("POST", "/api/sessions", {"startup": GATE, "metadata": {"jupyter_kernel": True}},
                      expect=201)["id"]
    first = background(server, sid, "open('ran-first', 'w').write('x'); first = 1; print('first ran')",
                       callback_url=receiver.url)
    answer: dict = {}
    sync = threading.Thread(target=lambda: answer.update(server.json(
        "POST", f"/api/sessions/{sid}/run", {"code": "open('ran-sync', 'w').write('x'); sync = 1"})))
    sync.start()
    # The last run goes in once the synchronous one waits behind the first (position 2:
    # two runs before it); one that got in before the synchronous run is dropped and sent again.
    while True:
        last = background(server, sid, "print('last ran', 'first' in dir(), 'sync' in dir())")
        if server.json("GET", f"/api/sessions/{sid}/runs/{last}")["position"] == 2:
            break
        assert server.json("DELETE", f"/api/sessions/{sid}/runs/{last}")["status"] == "cancelled"
    assert state(server, sid) == "starting"

    assert server.json("POST", f"/api/sessions/{sid}/interrupt") == {"session_id": sid, "interrupted": True}
    assert_interrupted_record(server, sid, first)
    callback = receiver.bodies.get(timeout=30)
    assert (callback["run_id"], callback["status"]) == (first, "interrupted"), callback
    assert sync.is_alive(), "the interrupt ends the current run only"
    assert state(server, sid) == "starting", "the kernel's start goes on"

    # The first run's end let the synchronous run in: it is current, waiting for the kernel.
    assert server.request("POST", f"/api/kernels/{sid}/interrupt", {})[0] == 204
    sync.join(30)
    assert not sync.is_alive()
    assert_interrupted_before_start(answer)
    assert server.json("GET", f"/api/sessions/{sid}/runs/{last}")["status"] == "queued"

    open_gate(server, sid)
    record = finished(server, sid, last)
    assert (record["status"], record["stdout"]) == ("completed", "last ran False False\n"), record
    assert not has_file(server, sid, "ran-first") and not has_file(server, sid, "ran-sync")
    assert server.request("GET", f"/api/sessions/{sid}/files/starts.log")[1] == b"start\n", "one start"
    server.json("DELETE", f"/api/sessions/{sid}")


def test_interrupt_during_a_cold_start_and_with_no_run(server):
    """After a stop, the next run starts the kernel itself: interrupted meanwhile, it ends
    at once and the start goes on. An interrupt with no run leaves a starting kernel's
    startup code alone (one start, not a failed one and a retry), and on an idle kernel
    is a no-op with the usual answer."""
    sid = server.json("POST", "/api/sessions", {"startup": GATE}, expect=201)["id"]
    wait_for(lambda: has_file(server, sid, "starts.log"), "the startup code to run")
    # No run: the starting kernel is not interrupted.
    assert server.json("POST", f"/api/sessions/{sid}/interrupt") == {"session_id": sid, "interrupted": True}
    open_gate(server, sid)
    assert server.json("POST", f"/api/sessions/{sid}/run", {"code": "kept = 1"})["exit_code"] == 0
    # Idle: nothing happens, the kernel keeps its state.
    assert server.json("POST", f"/api/sessions/{sid}/interrupt") == {"session_id": sid, "interrupted": True}
    assert server.json("POST", f"/api/sessions/{sid}/run", {"code": "print(kept)"})["stdout"] == "1\n"
    assert server.request("GET", f"/api/sessions/{sid}/files/starts.log")[1] == b"start\n"

    # A cold start, held at its gate by the run that began it.
    server.json("POST", f"/api/vm/{sid}/stop")
    server.request("DELETE", f"/api/sessions/{sid}/files/go")
    cold = background(server, sid, "open('ran-cold', 'w').write('x'); print('cold ran')")
    wait_for(lambda: state(server, sid) == "starting", "the cold start")
    assert server.json("POST", f"/api/sessions/{sid}/interrupt") == {"session_id": sid, "interrupted": True}
    assert_interrupted_record(server, sid, cold)
    assert state(server, sid) == "starting", "the start the run began goes on without it"
    open_gate(server, sid)
    after = server.json("POST", f"/api/sessions/{sid}/run", {"code": "print('kept' in dir())"})
    assert after["stdout"] == "False\n", "a fresh kernel"
    assert not has_file(server, sid, "ran-cold")
    assert server.request("GET", f"/api/sessions/{sid}/files/starts.log")[1] == b"start\n" * 2
    # Nothing running, nothing starting: still a no-op.
    assert server.json("POST", f"/api/sessions/{sid}/interrupt") == {"session_id": sid, "interrupted": True}
    server.json("DELETE", f"/api/sessions/{sid}")


def test_interrupt_while_a_run_waits_for_package_setup(server):
    """Package setup runs before the kernel starts: a run waiting for it is interrupted the
    same way, and setup goes on to completion."""
    setup = {"commands": ["while [ ! -e setup-go ]; do sleep 0.05; done"]}
    sid = server.json("POST", "/api/sessions", {"setup": setup}, expect=201)["id"]
    waiting = background(server, sid, "open('ran-setup', 'w').write('x')")
    assert server.json("GET", f"/api/sessions/{sid}")["setup_status"] not in ("completed", "failed")
    server.json("POST", f"/api/sessions/{sid}/interrupt")
    assert_interrupted_record(server, sid, waiting)
    server.json("PUT", f"/api/sessions/{sid}/files/setup-go", b"")
    assert server.json("POST", f"/api/sessions/{sid}/run", {"code": "print('after setup')"})["stdout"] == \
        "after setup\n"
    assert server.json("GET", f"/api/sessions/{sid}")["setup_status"] == "completed"
    assert not has_file(server, sid, "ran-setup")
    server.json("DELETE", f"/api/sessions/{sid}")


def test_interrupt_during_a_restart_on_docker(server):
    """Docker, the restart path: a run waiting for the restarted kernel ends interrupted,
    and the restarted kernel comes up with nothing of the run in it."""
    from .conftest import require_docker

    require_docker()
    sid = server.json("POST", "/api/sessions", {"provisioner": "docker", "startup": GATE}, expect=201)["id"]
    open_gate(server, sid)
    assert server.json("POST", f"/api/sessions/{sid}/run", {"code": "before = 1"})["exit_code"] == 0
    server.request("DELETE", f"/api/sessions/{sid}/files/go")
    server.json("POST", f"/api/sessions/{sid}/restart")
    waiting = background(server, sid, "open('ran-docker', 'w').write('x'); print('ran')")
    assert server.json("POST", f"/api/sessions/{sid}/interrupt") == {"session_id": sid, "interrupted": True}
    assert_interrupted_record(server, sid, waiting)
    assert state(server, sid) == "starting"
    open_gate(server, sid)
    after = server.json("POST", f"/api/sessions/{sid}/run", {"code": "print('before' in dir())"})
    assert after["stdout"] == "False\n", after
    assert not has_file(server, sid, "ran-docker")
    server.json("DELETE", f"/api/sessions/{sid}")
