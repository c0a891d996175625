"""Why a kernel went away is visible: every kernel start and end, and every package setup's
outcome, is a session event (``GET /api/sessions/{id}/events``) with its reason, the
session document's ``kernel.last_exit`` says how the last kernel ended, both survive a
server restart, and a Jupyter gateway client whose kernel was culled is told why instead
of silently finding its variables gone (or waiting for a reply that never comes)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest
from tornado.websocket import websocket_connect

from era_kernel.sessions import SessionManager
from tests.support.api_errors import assert_error_shape
from tests.support.era_server import ServerProcess
from tests.test_jupyter_gateway import run_over_channels

IGNORES_SIGINT = ("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                  "while True:\n    try:\n        time.sleep(0.1)\n    except BaseException:\n        pass")


def types(events: list[dict]) -> list[str]:
    return [e["type"] for e in events]


def events_of(server: ServerProcess, sid: str, query: str = "") -> dict:
    return server.json("GET", f"/api/sessions/{sid}/events{query}")


def last_exit(server: ServerProcess, sid: str) -> dict | None:
    return server.json("GET", f"/api/sessions/{sid}")["kernel"]["last_exit"]


def wait_until(check, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def same_event(exit_: dict, event: dict) -> bool:
    """``last_exit`` is the event as stored (without the id the log gives it)."""
    return exit_ == {k: v for k, v in event.items() if k != "id"}


# ---- what each lifecycle event reads as -------------------------------------------------------
def test_every_lifecycle_event_reads_as_a_session_event():
    from era_kernel.engine.events import (KernelCulled, KernelDied, KernelReplaced, KernelStopped, SessionDeleted,
                                          SetupFinished)
    from era_kernel.engine.session_log import EXIT_TYPES, session_event

    cases = [
        (KernelReplaced("s", {"language": "python", "provisioner": "docker", "pooled": True, "start_ms": None}),
         "kernel_started", "warm pool", "claimed from the warm pool"),
        (KernelCulled("s", "idle", {"idle_s": 61.2, "idle_timeout_s": 60.0}),
         "kernel_culled", "idle", "after 61.2 s without a run (ERA_KERNEL_IDLE_TIMEOUT is 60 s)"),
        (KernelCulled("s", "kernel limit", {"max_kernels": 4, "kernel_state": "idle", "idle_s": 1.0}),
         "kernel_evicted", "kernel limit", "(ERA_MAX_KERNELS is 4)"),
        (KernelCulled("s", "dead", {"exit_status": None, "cut": "a message over the limit"}),
         "kernel_died", "message too large", "connection was cut between runs: a message over the limit"),
        (KernelCulled("s", "dead", {"exit_status": 139}),
         "kernel_died", "exit status 139", "between runs with exit status 139"),
        (KernelCulled("s", "dead"), "kernel_died", "died", "the kernel died between runs"),
        (KernelDied("s", "out of memory", {"exit_status": 137, "out_of_memory": True}),
         "kernel_died", "out of memory", "ran out of memory during a run"),
        (KernelDied("s", "timeout: the interrupt did not take", {"timeout_s": 2.5}),
         "kernel_restarted", "timeout", "exceeded its 2.5 s timeout"),
        (KernelStopped("s", "restart"), "kernel_restarted", "request", "restarted on request"),
        (KernelStopped("s", "settings changed", {"fields": ["env"]}), "kernel_stopped", "settings changed", "env"),
        (KernelStopped("s", "server shutdown"), "kernel_stopped", "server shutdown", "the server shut down"),
        (SetupFinished("s", "completed", {"error": None, "source": "cache"}), "setup_completed", "completed", "cache"),
        (SetupFinished("s", "failed", {"error": "pip said no"}), "setup_failed", "pip said no", "pip said no"),
    ]
    for event, kind, reason, words in cases:
        entry = session_event(event)
        assert (entry["type"], entry["reason"]) == (kind, reason), event
        assert words in entry["message"], (words, entry["message"])
        assert entry["at"].endswith("Z") and None not in entry.values(), "unknown details are left out"
        assert (kind in EXIT_TYPES) == isinstance(event, (KernelCulled, KernelDied, KernelStopped))
    assert session_event(SessionDeleted("s", "request")) is None, "a deleted session's log goes with it"


# ---- over HTTP, across a restart ----------------------------------------------------------------
def test_deaths_timeouts_and_setups_are_session_events_that_survive_a_restart():
    first = ServerProcess(env={"ERA_POOL_SIZE": "0", "ERA_INTERRUPT_GRACE": "1"}).start()
    second = None
    try:
        sessions = "/api/sessions"
        # A kernel that exits with a status.
        first.json("POST", sessions, {"id": "sev-exit"}, expect=201)
        assert first.json("POST", "/api/sessions/sev-exit/run", {"code": "print('up')"})["stdout"] == "up\n"
        assert first.json("POST", "/api/sessions/sev-exit/run", {"code": "import os; os._exit(3)"})["exit_code"] == 3
        body = events_of(first, "sev-exit")
        assert types(body["events"]) == ["kernel_started", "kernel_died"]
        started, died = body["events"]
        assert (started["reason"], started["language"], started["provisioner"]) == ("start", "python", "local")
        assert started["start_ms"] > 0 and started["at"].endswith("Z")
        assert (died["reason"], died["exit_status"]) == ("exit status 3", 3) and "exit status 3" in died["message"]
        assert body["session_id"] == "sev-exit" and body["last_id"] == died["id"] > started["id"]
        assert same_event(last_exit(first, "sev-exit"), died)
        # Paging and the field-naming 400s / 404.
        assert events_of(first, "sev-exit", f"?after={started['id']}")["events"] == [died]
        page = events_of(first, "sev-exit", "?limit=1")
        assert page["events"] == [started] and page["last_id"] == started["id"]
        assert events_of(first, "sev-exit", f"?after={died['id']}") == {"session_id": "sev-exit", "events": [],
                                                                          "last_id": died["id"]}
        for query, field in (("?after=-1", "after"), ("?after=x", "after"), ("?limit=0", "limit"),
                             ("?limit=1001", "limit")):
            status, raw = first.request("GET", f"/api/sessions/sev-exit/events{query}")
            assert_error_shape(status, raw, 400)
            assert json.loads(raw)["field"] == field
        assert_error_shape(*first.request("GET", "/api/sessions/sev-nobody/events"), 404)

        # A timeout whose interrupt does not take: the kernel is stopped, the next run starts one.
        first.json("POST", sessions, {"id": "sev-timeout"}, expect=201)
        result = first.json("POST", "/api/sessions/sev-timeout/run", {"code": IGNORES_SIGINT, "timeout": 1})
        assert result["exit_code"] == 124
        events = events_of(first, "sev-timeout")["events"]
        assert types(events) == ["kernel_started", "kernel_restarted"]
        restarted = events[-1]
        assert (restarted["reason"], restarted["timeout_s"]) == ("timeout", 1)
        assert "ERA_INTERRUPT_GRACE" in restarted["message"]
        assert same_event(last_exit(first, "sev-timeout"), restarted)

        # Package setups, done and failed.
        first.json("POST", sessions, {"id": "sev-setup-ok", "setup": {"commands": ["echo ready"]}}, expect=201)
        first.json("POST", sessions, {"id": "sev-setup-bad", "setup": {"commands": ["echo broken >&2; exit 3"]}},
                   expect=201)
        def setup_ended(sid: str) -> bool:
            return first.json("GET", f"{sessions}/{sid}")["setup_status"] in ("completed", "failed")

        for sid in ("sev-setup-ok", "sev-setup-bad"):
            wait_until(lambda sid=sid: setup_ended(sid), 120, f"the setup of {sid}")
        ok = [e for e in events_of(first, "sev-setup-ok")["events"] if e["type"].startswith("setup_")]
        assert types(ok) == ["setup_completed"] and ok[0]["duration_ms"] > 0
        bad = [e for e in events_of(first, "sev-setup-bad")["events"] if e["type"].startswith("setup_")]
        assert types(bad) == ["setup_failed"]
        assert bad[0]["reason"] and bad[0]["reason"] in bad[0]["message"] and bad[0]["reason"] == bad[0]["error"]
        assert last_exit(first, "sev-setup-bad") is None, "a setup is not a kernel's end"

        # A restart: sev-exit has a live kernel (stopped by the shutdown, and says so);
        # sev-timeout has none, so its last exit is still the timeout.
        assert first.json("POST", "/api/sessions/sev-exit/run", {"code": "print('again')"})["exit_code"] == 0
        before = {sid: events_of(first, sid)["events"] for sid in ("sev-exit", "sev-timeout")}
        assert first.stop(signal.SIGTERM) == 0
        second = ServerProcess(env={"ERA_POOL_SIZE": "0"})
        second.env.update(ERA_DATA_DIR=first.env["ERA_DATA_DIR"], ERA_RUNTIME_DIR=first.env["ERA_RUNTIME_DIR"])
        second.start()
        after = events_of(second, "sev-exit")["events"]
        assert after[:len(before["sev-exit"])] == before["sev-exit"], "kept as they were"
        stopped = after[len(before["sev-exit"]):]
        assert [(e["type"], e["reason"]) for e in stopped] == [("kernel_stopped", "server shutdown")]
        assert same_event(last_exit(second, "sev-exit"), stopped[0])
        assert events_of(second, "sev-timeout")["events"] == before["sev-timeout"]
        assert same_event(last_exit(second, "sev-timeout"), restarted)
        # The log goes on after the restart, its ids still growing.
        assert second.json("POST", "/api/sessions/sev-timeout/run", {"code": "print(1)"})["stdout"] == "1\n"
        newer = events_of(second, "sev-timeout", f"?after={restarted['id']}")["events"]
        assert types(newer) == ["kernel_started"] and newer[0]["id"] > max(e["id"] for e in after)
    finally:
        if second is not None:
            second.cleanup()
        first.cleanup()


# ---- in the engine: eviction, out of memory, restarts and settings -------------------------------
async def settled_events(engine: SessionManager, sid: str) -> list[dict]:
    await engine.settle()
    return await engine.session_events(sid)


async def test_eviction_restart_and_settings_are_session_events(era_settings):
    engine = SessionManager(era_settings.replace(ERA_MAX_KERNELS=1))
    await engine.start()
    try:
        a = (await engine.create({"id": "sev-lru-a"}))["id"]
        assert (await engine.run(a, {"code": "print('a')"}))["stdout"] == "a\n"
        b = (await engine.create({"id": "sev-lru-b"}))["id"]  # the only slot is a's: a is evicted
        events = await settled_events(engine, a)
        assert types(events) == ["kernel_started", "kernel_evicted"]
        evicted = events[-1]
        assert (evicted["reason"], evicted["max_kernels"], evicted["kernel_state"]) == ("kernel limit", 1, "idle")
        assert "ERA_MAX_KERNELS" in evicted["message"] and evicted["idle_s"] >= 0
        assert same_event((await engine.get(a))["kernel"]["last_exit"], evicted)

        assert (await engine.run(b, {"code": "print('b')"}))["stdout"] == "b\n"
        await engine.restart(b)
        assert (await engine.run(b, {"code": "print('b again')"}))["stdout"] == "b again\n"
        await engine.patch(b, {"env": {"X": "1"}})
        events = await settled_events(engine, b)
        assert [(e["type"], e["reason"]) for e in events] == [
            ("kernel_started", "start"), ("kernel_restarted", "request"), ("kernel_started", "start"),
            ("kernel_stopped", "settings changed")]
        assert events[-1]["fields"] == ["env"]
        assert same_event((await engine.get(b))["kernel"]["last_exit"], events[-1])
        assert (await engine.session_events(b, after=events[1]["id"], limit=1)) == [events[2]]
        await engine.delete(b)
        assert await engine.store.list_session_events(b) == [], "a deleted session's events go with it"
    finally:
        await engine.shutdown()


async def test_a_kernel_killed_by_its_memory_limit_says_out_of_memory(era_settings):
    if os.getuid() != 0 or not os.path.isdir("/sys/fs/cgroup"):
        pytest.skip("kernel cgroups need root and a cgroup filesystem")
    engine = SessionManager(era_settings.replace(ERA_KERNEL_MEMORY=256 * 1024**2))
    await engine.start()
    try:
        sid = (await engine.create({}))["id"]
        # As tests/test_local_sandbox.py: a child holds 200 MiB, then the kernel (the OOM
        # killer's first choice) takes 60 MiB more, past the session's 256 MiB (whichever
        # the launcher: a forked kernel is charged ~30 MiB less, what it shares with the zygote).
        code = ("import subprocess, sys, time\nopen('/proc/self/oom_score_adj', 'w').write('1000')\n"
                "hold = \"import time\\ntry:\\n    open('/proc/self/oom_score_adj', 'w').write('0')\\n"
                "except OSError:\\n    pass\\nb = b'x' * (200 << 20); time.sleep(10)\"\n"
                "child = subprocess.Popen([sys.executable, '-S', '-c', hold])\ntime.sleep(1.5)\n"
                "x = [b'y' * (1 << 20) for _ in range(60)]\nprint('kernel survived')")
        result = await engine.run(sid, {"code": code, "timeout": 60})
        assert result["error"]["ename"] == "MemoryError", result
        died = (await settled_events(engine, sid))[-1]
        assert (died["type"], died["reason"], died["out_of_memory"]) == ("kernel_died", "out of memory", True)
        assert "ERA_KERNEL_MEMORY" in died["message"]
        assert same_event((await engine.get(sid))["kernel"]["last_exit"], died)
    finally:
        await engine.shutdown()


# ---- what a client bound to the kernel is told ---------------------------------------------------
# Culling passes twice a second and idle kernels go after 3 s; two kernels at most.
CULLING = {"ERA_CULL_INTERVAL": "0.5", "ERA_KERNEL_IDLE_TIMEOUT": "3", "ERA_POOL_SIZE": "0", "ERA_MAX_KERNELS": "2"}


@pytest.fixture(scope="module")
def culling():
    srv = ServerProcess(env=CULLING).start()
    yield srv
    srv.cleanup()


async def api(server: ServerProcess, method: str, path: str, body=None, expect: int | None = 200):
    return await asyncio.to_thread(server.json, method, path, body, expect=expect)


async def delete(server: ServerProcess, path: str) -> None:
    await asyncio.to_thread(server.request, "DELETE", path)


async def wait_culled(server: ServerProcess, sid: str) -> dict:
    """The session's kernel is gone and its last_exit (written once the kernel has
    stopped, a moment after the state says none) is there: returned."""
    deadline = time.monotonic() + 20
    while True:
        kernel = (await api(server, "GET", f"/api/sessions/{sid}"))["kernel"]
        if kernel["state"] == "none" and kernel["last_exit"] is not None:
            return kernel["last_exit"]
        assert time.monotonic() < deadline, "the idle kernel was never culled"
        await asyncio.sleep(0.2)


async def test_a_gateway_client_whose_kernel_was_culled_is_told_why(culling):
    kid = (await api(culling, "POST", "/api/kernels", {"name": "era-python-local"}, expect=201))["id"]
    ws = await websocket_connect(f"{culling.ws_base}/api/kernels/{kid}/channels")
    session_ws = None
    try:
        assert (await run_over_channels(ws, "x = 42"))["reply"]["status"] == "ok"
        exit_ = await wait_culled(culling, kid)
        culled = (await api(culling, "GET", f"/api/sessions/{kid}/events"))["events"][-1]
        assert same_event(exit_, culled)
        assert (culled["type"], culled["reason"], culled["idle_timeout_s"]) == ("kernel_culled", "idle", 3)
        assert culled["idle_s"] >= 3 and "ERA_KERNEL_IDLE_TIMEOUT is 3 s" in culled["message"]
        model = await api(culling, "GET", f"/api/kernels/{kid}")
        assert same_event(model["last_exit"], culled) and model["execution_state"] == "idle"

        # The session's own WebSocket says it in its first message.
        session_ws = await websocket_connect(f"{culling.ws_base}/api/sessions/{kid}/ws")
        hello = json.loads(await session_ws.read_message())
        assert hello["type"] == "status" and hello["state"] == "none" and same_event(hello["last_exit"], culled)

        # The channel's next cell runs on a new kernel, and its output says why x is gone.
        seen = await run_over_channels(ws, "print(x)")
        assert seen["stream"].startswith("[ERA] the kernel was shut down after ")
        assert "ERA_KERNEL_IDLE_TIMEOUT is 3 s" in seen["stream"] and "variables and imports" in seen["stream"]
        assert seen["reply"]["status"] == "error" and seen["reply"]["ename"] == "NameError"
        assert seen["types"][0] == ("iopub", "stream"), "told before the cell's own output"
        seen = await run_over_channels(ws, "x = 1\nprint('told once')")
        assert seen["stream"] == "told once\n"
        ws.close()

        # Culled again: the session socket hears it as it happens, with the reason.
        while True:
            message = json.loads(await asyncio.wait_for(session_ws.read_message(), 20))
            if message["type"] == "status" and message["state"] == "culled":
                assert message["reason"] == "idle"
                break
        # A client that connects after the cull is told on its first cell too.
        ws = await websocket_connect(f"{culling.ws_base}/api/kernels/{kid}/channels")
        seen = await run_over_channels(ws, "print('back')")
        assert seen["stream"].startswith("[ERA] the kernel was shut down after ") and seen["stream"].endswith("back\n")
    finally:
        ws.close()
        if session_ws is not None:
            session_ws.close()
        await delete(culling, f"/api/kernels/{kid}")


async def test_a_gateway_message_with_no_kernel_to_run_on_gets_an_error_reply(culling):
    kid = (await api(culling, "POST", "/api/kernels", {"name": "era-python-local"}, expect=201))["id"]
    ws = await websocket_connect(f"{culling.ws_base}/api/kernels/{kid}/channels")
    busy = ["sev-busy-1", "sev-busy-2"]
    try:
        assert (await run_over_channels(ws, "x = 1"))["reply"]["status"] == "ok"
        # Two sessions take both kernel slots (the gateway kernel is evicted or culled for
        # them) and stay busy: the channel's next cell has no kernel to run on.
        for sid in busy:
            await api(culling, "POST", "/api/sessions", {"id": sid}, expect=201)
            await api(culling, "POST", f"/api/sessions/{sid}/run",
                      {"code": "import time\ntime.sleep(60)", "background": True}, expect=202)
        for sid in busy:
            deadline = time.monotonic() + 30
            while (await api(culling, "GET", f"/api/sessions/{sid}"))["kernel"]["state"] != "busy":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
        gone = (await api(culling, "GET", f"/api/sessions/{kid}"))["kernel"]["last_exit"]
        assert gone["type"] in ("kernel_evicted", "kernel_culled")
        seen = await asyncio.wait_for(run_over_channels(ws, "print('never')"), 30)
        assert seen["reply"]["status"] == "error" and seen["reply"]["ename"] == "Busy"
        assert seen["stream"].startswith("[ERA] no kernel to run this on: kernel limit reached")
        assert f"[ERA] the previous kernel went away: {gone['message']}" in seen["stream"]
        assert seen["types"] == [("iopub", "stream"), ("shell", "execute_reply"), ("iopub", "status")]
    finally:
        ws.close()
        for sid in busy:
            await delete(culling, f"/api/sessions/{sid}")
        await delete(culling, f"/api/kernels/{kid}")
