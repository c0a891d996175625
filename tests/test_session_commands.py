"""Commands in a session's sandbox (``KernelLauncher.run_command``), on both provisioners,
beside the session's real kernel: same uid, same workspace and /tmp, no network unless
asked, a timeout that kills everything and says 124, bounded output; and the session's
/tmp itself: kept across kernel restarts, private to the session, gone on delete
(SECURITY.md cases 11, 13, 21)."""

from __future__ import annotations

import asyncio
import os

import pytest

from .conftest import both_provisioners, kernel_processes

pytestmark = both_provisioners


async def _run(engine, sid, code):
    r = await engine.run(sid, {"code": code, "timeout": 60})
    assert r["exit_code"] == 0, r
    return r["stdout"]


async def _record(engine, sid):
    return await engine._record(sid)


async def test_a_command_runs_beside_the_kernel_in_the_same_sandbox(engine):
    sid = (await engine.create({"language": "python", "env": {"FROM_SESSION": "s"}}))["id"]
    await _run(engine, sid, "open('/tmp/from-kernel', 'w').write('k'); open('w.txt', 'w').write('w')")
    record = await _record(engine, sid)
    r = await engine.launcher.run_command(record, ["bash", "-c", (
        "cat /tmp/from-kernel w.txt; echo; pwd; id -u; echo \"$FROM_SESSION $EXTRA\"; echo oops >&2; "
        "echo c > /tmp/from-command; exit 3")], timeout=30, env={"EXTRA": "e"})
    assert r.exit_code == 3 and not r.timed_out and not r.truncated
    cwd = "/workspace" if record.provisioner == "docker" else str(engine.files.path(record))
    from era_kernel.engine.records import session_uid

    assert r.stdout.split("\n") == ["kw", cwd, str(session_uid(record)), "s e", ""]
    assert r.stderr == "oops\n"
    assert (await _run(engine, sid, "print(open('/tmp/from-command').read())")) == "c\n\n"


async def test_no_network_unless_asked_and_bounded_output(engine):
    sid = (await engine.create({"language": "python"}))["id"]
    record = await _record(engine, sid)
    # A service on the host's loopback (SECURITY.md case 19): unreachable by default; the
    # caller can turn the network on (setup commands do, as package steps always have).
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    probe = ["python3", "-c", f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), 2)\n"
             "    print('connected')\nexcept OSError as e:\n    print('refused')\n"]
    try:
        off = await engine.launcher.run_command(record, probe, timeout=30)
        on = await engine.launcher.run_command(record, probe, timeout=30, allow_network=True)
    finally:
        server.close()
    assert (off.exit_code, off.stdout) == (0, "refused\n"), off
    assert (on.exit_code, on.stdout) == (0, "connected\n"), on
    r = await engine.launcher.run_command(record, ["bash", "-c", "head -c 300000 /dev/zero | tr '\\0' x; echo done >&2"],
                                          timeout=30, max_output=1000)
    assert r.exit_code == 0 and r.truncated and len(r.stdout) == 1000 and r.stderr == "done\n"


async def test_timeout_kills_everything_and_says_124(engine):
    sid = (await engine.create({"language": "python"}))["id"]
    record = await _record(engine, sid)
    marker = f"sleep 7{os.getpid() % 1000}"
    r = await engine.launcher.run_command(record, ["bash", "-c", f"echo started; ({marker}; echo never) & {marker}"],
                                          timeout=2)
    assert r.exit_code == 124 and r.timed_out and r.stdout == "started\n"
    assert not kernel_processes(marker), "the timeout left processes behind"


async def test_tmp_outlives_the_kernel_is_private_and_goes_with_the_session(engine):
    a = (await engine.create({"language": "python"}))["id"]
    b = (await engine.create({"language": "python"}))["id"]
    # The kernel's IPC directory is mounted below /tmp (the runtime directory): the session
    # swaps the mount point's top directory for a link, and plants one to / beside it.
    runtime = str(engine.settings.runtime_dir)
    assert runtime.startswith("/tmp/")
    top = "/tmp/" + runtime.split("/")[2]
    moved = await _run(engine, a, (
        "import os\nos.makedirs('/tmp/d', exist_ok=True); open('/tmp/d/a.txt', 'w').write('A')\n"
        f"try:\n    os.rename({top!r}, '/tmp/moved'); print('moved')\nexcept OSError as e:\n    print('kept', e.errno)\n"
        "os.symlink('/', '/tmp/root-link')"))
    assert moved.startswith("kept"), "the mount points in /tmp are root's, in a sticky directory"
    await engine.restart(a)
    assert await _run(engine, a, "print(open('/tmp/d/a.txt').read())") == "A\n"  # a restart keeps /tmp
    seen = await _run(engine, b, "import os; print(os.path.exists('/tmp/d/a.txt'))")
    assert seen == "False\n", "another session's /tmp is its own"
    record = await _record(engine, a)
    tmp = engine.files.tmp_path(engine.files.path(record))
    assert (tmp / "d" / "a.txt").read_text() == "A"
    await engine.delete(a)
    assert not tmp.exists(), "the session's /tmp is removed with it"
    assert os.path.isdir("/etc") and os.listdir("/")  # the links were not followed


async def test_a_start_removes_tmp_directories_a_deleted_session_left(era_settings):
    from era_kernel.sessions import SessionManager

    engine = SessionManager(era_settings)
    await engine.start()
    try:
        leftover = era_settings.data_dir / "tmp" / "sessions" / "gone"
        (leftover / "deep" / "er").mkdir(parents=True)
        (leftover / "link").symlink_to("/etc")
        os.chmod(leftover / "deep", 0o500)
    finally:
        await engine.shutdown()
    engine = SessionManager(era_settings)
    await engine.start()
    try:
        assert not leftover.exists()
        assert os.path.isdir("/etc")
    finally:
        await engine.shutdown()
