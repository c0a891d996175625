"""Runs on real sandboxed kernels: results, exit codes, env, data, timeouts, dead kernels."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from era_kernel.engine import SessionManager
from era_kernel.errors import BadRequest

from .conftest import both_provisioners

# Every session behaviour holds in Docker exactly as locally.
pytestmark = both_provisioners


async def run(engine, sid, code, **extra):
    return await engine.run(sid, {"code": code, **extra})


async def test_stdout_stderr_outputs_and_state(engine, session):
    r = await run(engine, session, "import sys\nx = 41\nprint('hello')\nprint('oops', file=sys.stderr)\nx + 1")
    assert r["exit_code"] == 0 and r["error"] is None
    assert r["stdout"] == "hello\n"
    assert r["stderr"] == "oops\n"
    assert r["session_id"] == session
    kinds = [o["output_type"] for o in r["outputs"]]
    assert kinds == ["stream", "stream", "execute_result"]
    assert r["outputs"][-1]["data"]["text/plain"] == "42"
    assert r["execution_count"] >= 1 and r["duration_ms"] > 0 and r["duration"].endswith("s")
    r2 = await run(engine, session, "print(x * 2)")
    assert r2["stdout"] == "82\n", "variables persist between runs"


async def test_rich_display_kept(engine, session):
    r = await run(engine, session, "from IPython.display import HTML, display\ndisplay(HTML('<b>hi</b>'))")
    display = [o for o in r["outputs"] if o["output_type"] == "display_data"]
    assert display and display[0]["data"]["text/html"] == "<b>hi</b>"


@pytest.mark.parametrize("code, exit_code, ename", [
    ("1/0", 1, "ZeroDivisionError"),
    ("import sys; sys.exit(3)", 3, "SystemExit"),
    ("import sys; sys.exit('bye')", 1, "SystemExit"),
    ("import sys; sys.exit(0)", 0, None),
    ("raise SystemExit", 0, None),
])
async def test_exit_codes(engine, session, code, exit_code, ename):
    r = await run(engine, session, code)
    assert r["exit_code"] == exit_code
    assert (r["error"] or {}).get("ename") == ename
    if ename:
        assert r["error"]["traceback"], "the traceback is kept"


async def test_era_env_session_env_and_run_env(engine):
    doc = await engine.create({"id": "envtest", "env": {"GREETING": "hi $(touch /tmp/pwned)"}})
    code = "import os; print(os.environ['ERA_SESSION'], os.environ['ERA_SESSION_ID'], os.environ['ERA_LANGUAGE'], " \
           "os.environ['GREETING'], os.environ.get('ONLY_THIS_RUN'), os.getcwd())"
    r = await run(engine, doc["id"], code, env={"ONLY_THIS_RUN": "yes"})
    ws = "/workspace" if engine.settings["ERA_PROVISIONER"] == "docker" else str(engine.workspace_dir("envtest"))
    assert r["stdout"].split() == ["true", "envtest", "python", "hi", "$(touch", "/tmp/pwned)", "yes", ws]
    r = await run(engine, doc["id"], code)
    assert "None" in r["stdout"].split(), "a run's env does not leak into the next run"


async def test_any_unicode_env_value_reaches_the_kernel(engine):
    """Non-BMP characters (which JSON may carry as surrogate pairs) and line separators
    round-trip into the kernel's environment, from the session's env and a run's."""
    value = "smile \U0001F600 \u00fc \u2028 \"q\" \\ end"
    doc = await engine.create({"env": {"E": value}})
    code = "import os, json; print(json.dumps([os.environ['E'], os.environ.get('R')]))"
    r = await run(engine, doc["id"], code, env={"R": "\U0001F680"})
    assert r["exit_code"] == 0, r
    assert json.loads(r["stdout"]) == [value, "\U0001F680"]


async def test_kernel_env_holds_no_server_secrets(engine, monkeypatch):
    monkeypatch.setenv("ERA_API_KEY", "server-secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "storage-secret")
    r = await engine.execute({"code": "import os; print(sorted(os.environ))"})
    assert "ERA_API_KEY" not in r["stdout"] and "AWS_SECRET_ACCESS_KEY" not in r["stdout"]


async def test_session_data_roundtrip(engine):
    doc = await engine.create({"data": {"count": 1}})
    code = ("import json\nd = json.load(open('.session_data.json'))\nd['count'] += 1\n"
            "json.dump(d, open('.session_data.json', 'w'))\nprint(d['count'])")
    r = await run(engine, doc["id"], code)
    assert r["stdout"] == "2\n" and r["data"] == {"count": 2}
    r = await run(engine, doc["id"], code)
    assert r["data"] == {"count": 3}
    assert (await engine.get(doc["id"]))["data"] == {"count": 3}
    await engine.patch(doc["id"], {"data": {"count": 10}})
    r = await run(engine, doc["id"], code)
    assert r["data"] == {"count": 11}


async def test_session_data_symlink_is_not_followed(engine, session):
    r = await run(engine, session, "import os; os.remove('.session_data.json'); os.symlink('/etc/passwd', '.session_data.json')")
    assert r["exit_code"] == 0
    doc = await engine.get(session)
    assert "root" not in str(doc["data"])


async def test_timeout_interrupts_and_session_stays_usable(engine, session):
    await run(engine, session, "kept = 'still here'")
    started = time.perf_counter()
    r = await run(engine, session, "import time\nwhile True: time.sleep(0.1)", timeout=1)
    assert r["exit_code"] == 124 and r["timed_out"] is True
    assert r["error"]["ename"] == "TimeoutError"
    assert time.perf_counter() - started < 5
    r = await run(engine, session, "print(kept)")
    assert r["stdout"] == "still here\n", "an interrupt that takes keeps the kernel"


async def test_timeout_escalates_to_restart_when_sigint_is_ignored(engine, session):
    code = ("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "while True:\n    try:\n        time.sleep(0.1)\n    except BaseException:\n        pass")
    started = time.perf_counter()
    r = await run(engine, session, code, timeout=1)
    assert r["exit_code"] == 124 and r["timed_out"]
    assert time.perf_counter() - started < 1 + engine.settings["ERA_INTERRUPT_GRACE"] + 3
    r = await run(engine, session, "print('fresh')")
    assert r["exit_code"] == 0 and r["stdout"] == "fresh\n"


@pytest.mark.parametrize("code, status", [
    ("import os; os._exit(7)", 7),
    ("import ctypes; ctypes.string_at(0)", 139),  # SIGSEGV
])
async def test_dead_kernel_reports_and_next_run_gets_fresh_kernel(engine, session, code, status):
    await run(engine, session, "y = 1")
    started = time.perf_counter()
    r = await run(engine, session, code, timeout=20)
    assert time.perf_counter() - started < 5, "a dead kernel is noticed within the liveness interval"
    assert r["error"]["ename"] == "KernelDied" and r["exit_code"] == status
    assert "fresh kernel" in r["error"]["evalue"]
    r = await run(engine, session, "print('y' in dir())")
    assert r["exit_code"] == 0 and r["stdout"] == "False\n"


async def test_runs_on_one_session_are_serialized_in_order(engine, session):
    await run(engine, session, "order = []")
    codes = [f"import time; time.sleep(0.05); order.append({i})" for i in range(6)]
    await asyncio.gather(*(run(engine, session, c) for c in codes))
    r = await run(engine, session, "print(order)")
    assert r["stdout"] == "[0, 1, 2, 3, 4, 5]\n"


async def test_sessions_run_concurrently(engine):
    a, b = [(await engine.create({}))["id"] for _ in range(2)]
    await asyncio.gather(run(engine, a, "1"), run(engine, b, "1"))  # both kernels warm
    started = time.perf_counter()
    ra, rb = await asyncio.gather(run(engine, a, "import time; time.sleep(1)"), run(engine, b, "import time; time.sleep(1)"))
    assert ra["exit_code"] == rb["exit_code"] == 0
    assert time.perf_counter() - started < 1.8


async def test_output_cap_truncates_and_bounds_memory(era_settings):
    engine = SessionManager(era_settings.replace(ERA_OUTPUT_LIMIT=1024 * 1024))
    await engine.start()
    try:
        session = (await engine.create({}))["id"]
        # 60 MB in 1 MB prints: well past the cap, within a Docker kernel's 512 MiB.
        r = await run(engine, session, "import time\nfor _ in range(60):\n    print('x' * 1_000_000)\n"
                                       "    time.sleep(0.01)", timeout=60)
        assert r["exit_code"] == 0 and r["truncated"] is True
        assert len(r["stdout"]) <= 1024 * 1024
        r = await run(engine, session, "print('small')")
        assert r["truncated"] is False and r["stdout"] == "small\n"
    finally:
        await engine.shutdown()


async def test_input_is_answered_by_the_handler(engine, session):
    async def answer(prompt, password):
        assert prompt == "name? "
        return "Ada"

    events = []
    r = await engine.run(session, {"code": "print('hi', input('name? '))"}, on_input=answer, on_event=events.append)
    assert r["stdout"].endswith("hi Ada\n")
    assert {"type": "input_request", "prompt": "name? ", "password": False}.items() <= \
        [e for e in events if e["type"] == "input_request"][0].items()


async def test_events_stream_in_order_to_callers_and_subscribers(engine, session):
    seen, mine = [], []
    unsubscribe = engine.subscribe(session, seen.append)
    # flush: ipykernel buffers stdout and stderr apart, so unflushed their order is its own
    r = await engine.run(session, {"code": "print('a', flush=True); import sys; print('b', file=sys.stderr); 1/0"},
                         on_event=mine.append)
    unsubscribe()
    types = [e["type"] for e in mine if e["type"] != "status"]
    assert types == ["stdout", "stderr", "error", "done"]
    assert all(e["run_id"] == r["run_id"] for e in mine)
    assert [e["type"] for e in seen if e["type"] != "status"] == types
    assert [e for e in mine if e["type"] == "done"][0]["exit_code"] == 1


async def test_run_without_code_uses_the_stored_program(engine, session):
    with pytest.raises(BadRequest) as err:
        await engine.run(session, {})
    assert err.value.field == "code"
    await engine.set_code(session, "print('stored program')")
    r = await engine.run(session, {})
    assert r["stdout"] == "stored program\n"
    stored = await engine.get_code(session)
    assert stored["code"] == "print('stored program')" and stored["code_length"] == len(stored["code"])
    assert (await engine.get(session))["data"]["code"] == "print('stored program')", "kept in data, as in ERA"


async def test_one_shot_execute_is_discarded(engine):
    r = await engine.execute({"code": "print(open('in.txt').read())", "files": {"in.txt": "payload"}})
    assert r["exit_code"] == 0 and r["stdout"] == "payload\n" and r["session_id"] is None
    for _ in range(100):  # the kernel is stopped after the answer, not before it
        if engine.slots.used == 0:
            break
        await asyncio.sleep(0.05)
    assert not list((engine.settings.data_dir / "scratch").iterdir()), "scratch workspace removed"
    assert not [p for p in (engine.settings.runtime_dir / "k").iterdir()], "kernel dir removed"
    assert engine.slots.used == 0


async def test_a_session_filling_its_workspace_gets_enospc_and_nothing_else_suffers(era_settings):
    """SECURITY.md 11: code writing past ERA_WORKSPACE_MAX_BYTES gets ENOSPC inside its
    session, its run says why, the host's disk grows by at most the bound, other sessions
    and the store carry on, and deleting the file makes the session whole again."""
    from era_kernel.workspaces.volumes import mounts_under

    from .test_workspace_volumes import CAN_MOUNT, allocated

    if not CAN_MOUNT:
        pytest.skip("volumes need root, loop devices and mkfs.ext4")
    bound = 48 * 1024**2
    engine = SessionManager(era_settings.replace(ERA_WORKSPACE_MAX_BYTES=bound))
    await engine.start()
    try:
        sid = (await engine.create({"data": {"n": 1}}))["id"]
        other = (await engine.create({}))["id"]
        await run(engine, sid, "1")
        before = allocated(engine.settings.data_dir)
        fill = ("import errno\nwritten = 0\ntry:\n    with open('big', 'wb') as f:\n        for _ in range(96):\n"
                "            f.write(b'x' * 2**20)\n            written += 1\n"
                "except OSError as e:\n    print(errno.errorcode[e.errno], written)")
        r = await run(engine, sid, fill, timeout=60)
        assert r["exit_code"] == 0 and r["stdout"].startswith("ENOSPC "), r
        assert 40 <= int(r["stdout"].split()[1]) <= 50
        assert "[era] the workspace is full (48 MiB, ERA_WORKSPACE_MAX_BYTES" in r["stderr"], r["stderr"]
        grown = allocated(engine.settings.data_dir) - before
        assert grown <= bound * 1.1, f"the host's disk grew by {grown} bytes"
        assert mounts_under(engine.settings.data_dir), "the bound is the session's volume"

        # Everything else carries on: another session, the files API, the store.
        r = await run(engine, other, "open('fine.txt', 'w').write('fine'); print('ok')")
        assert r["stdout"] == "ok\n" and "[era]" not in r["stderr"]
        await engine.write_file(other, "up.txt", b"uploaded")
        assert (await engine.create({"id": "newcomer"}))["id"] == "newcomer"
        assert {d["id"] for d in await engine.list()} == {sid, other, "newcomer"}
        # The server's own write before a run (new data) still fits in the full session.
        await engine.patch(sid, {"data": {"n": 2}})
        r = await run(engine, sid, "import json, os\nprint(json.load(open('.session_data.json'))['n'])\n"
                                   "os.remove('big')\nopen('small.txt', 'w').write('room again')")
        assert r["exit_code"] == 0 and r["stdout"] == "2\n", r
        r = await run(engine, sid, "print(open('small.txt').read())")
        assert r["stdout"] == "room again\n" and "[era]" not in r["stderr"], r
    finally:
        await engine.shutdown()


async def test_an_interrupt_before_the_kernel_begins_the_cell_still_reaches_it(engine, session):
    """ipykernel ignores SIGINT until it handles a request: an interrupt that comes after
    a run was sent but before the kernel began it (here: another client's cell still
    running ahead of it in the kernel) must wait for it, not hit the other cell or nothing."""
    await engine.run(session, {"code": "1"})  # the kernel is up
    kernel = engine.kernels[session]
    ahead = kernel.kc.session.msg("execute_request", {"code": "import time; time.sleep(1.5)", "silent": False,
                                                      "store_history": False, "user_expressions": {},
                                                      "allow_stdin": False, "stop_on_error": True})
    kernel.send_raw("shell", ahead)  # a Jupyter client's cell, ahead of ours in the kernel
    ours = asyncio.ensure_future(engine.run(session, {"code": "import time; time.sleep(30)", "timeout": 60}))
    while not kernel._pending:  # ours is sent, the kernel still runs the other one
        await asyncio.sleep(0.005)
    started = time.monotonic()
    await engine.interrupt(session)
    result = await asyncio.wait_for(ours, 20)
    assert result["error"] and result["error"]["ename"] == "KeyboardInterrupt", result
    assert time.monotonic() - started < 10
