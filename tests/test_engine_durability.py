"""Kill the engine with SIGKILL mid-life, start again: everything is there, nothing is orphaned."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from era_kernel.engine import SessionManager

from .conftest import kernel_processes

FIRST_LIFE = textwrap.dedent("""
    import asyncio, json, sys
    from era_kernel.config import Settings
    from era_kernel.engine import SessionManager

    async def main():
        engine = SessionManager(Settings.from_env({}, data_dir=sys.argv[1], runtime_dir=sys.argv[2], pool_size=2))
        await engine.start()
        for i in range(3):
            sid = f"s{i}"
            await engine.create({"id": sid, "data": {"n": i}, "metadata": {"life": 1}})
            await engine.run(sid, {"code": f"open('file{i}.txt', 'w').write('content {i}'); v = {i}"})
        # A run is answered before its history row commits (README, Performance): wait for
        # the commits, so the kill tests what is on disk rather than that window.
        await engine.settle()
        # And for the pool's refills: a kernel killed mid-launch (inside bubblewrap's own
        # setup) can outlive the server until the next start reaps it (README, Known
        # limits); this test is about the kernels that run.
        for _ in range(600):
            if all(p["starting"] == 0 for p in engine.pool.stats()["pools"].values()):
                break
            await asyncio.sleep(0.1)
        print(json.dumps({"ready": True}), flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


async def test_sigkill_then_restart_keeps_everything_and_reaps_kernels(era_settings):
    data_dir, runtime_dir = str(era_settings.data_dir), str(era_settings.runtime_dir)
    proc = subprocess.Popen([sys.executable, "-c", FIRST_LIFE, data_dir, runtime_dir],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 90)
        assert json.loads(line)["ready"]
        assert len(kernel_processes(runtime_dir)) >= 3
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.time() + 10
    while kernel_processes(runtime_dir) and time.time() < deadline:
        await asyncio.sleep(0.1)
    assert not kernel_processes(runtime_dir), "kernels die with the process that started them"

    engine = SessionManager(era_settings)
    await engine.start()
    try:
        assert not any((era_settings.runtime_dir / "k").iterdir()), "stale IPC directories reaped"
        docs = {d["id"]: d for d in await engine.list()}
        assert sorted(docs) == ["s0", "s1", "s2"]
        for i in range(3):
            sid = f"s{i}"
            assert docs[sid]["data"] == {"n": i} and docs[sid]["metadata"] == {"life": 1}
            assert docs[sid]["kernel"]["state"] == "none", "kernels restart lazily"
            assert docs[sid]["file_count"] >= 1
            history = await engine.runs(sid)
            assert len(history) == 1 and "file" in history[0]["code"]
            r = await engine.run(sid, {"code": f"print(open('file{i}.txt').read()); print('v' in dir())"})
            assert r["stdout"] == f"content {i}\nFalse\n"
    finally:
        await engine.shutdown()
    assert not kernel_processes(runtime_dir)


def test_orphan_reaper_leaves_other_live_engines_alone(era_settings):
    from era_kernel.orphans import _cmdline, reap_kernel_dirs
    from era_kernel.provisioning.ipc import make_kernel_dir, read_pid_record

    kernel_dir = make_kernel_dir(era_settings.runtime_dir)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", str(kernel_dir)],
                               start_new_session=True)
    deadline = time.time() + 5
    while str(kernel_dir) not in _cmdline(sleeper.pid) and time.time() < deadline:
        time.sleep(0.01)  # /proc/<pid>/cmdline can read empty for a moment right after exec
    try:
        # Owned by a live process (this test runner): not ours to reap.
        (kernel_dir.parent / f"{kernel_dir.name}.pid").write_text(f"{sleeper.pid} {os.getppid()}")
        assert reap_kernel_dirs(era_settings.runtime_dir) == 0 and sleeper.poll() is None
        # Owned by a dead process: reaped.
        (kernel_dir.parent / f"{kernel_dir.name}.pid").write_text(f"{sleeper.pid} 999999999")
        assert read_pid_record(kernel_dir)[:2] == (sleeper.pid, 999999999)
        assert reap_kernel_dirs(era_settings.runtime_dir) == 1
        assert sleeper.wait(5) == -signal.SIGKILL and not kernel_dir.exists()
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
