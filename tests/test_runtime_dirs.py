"""Servers on one machine never delete each other's kernel directories (docs/security.md,
finding "Servers sharing a runtime directory").

Each server gets its own runtime directory by default; every kernel directory (local and
Docker) has an owner record beside it; the start-up reaper removes only what a provably
dead owner left.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time

from era_kernel.config import Settings
from era_kernel.sessions import SessionManager

from .conftest import both_provisioners, short_tmpdir

SECOND_SERVER = textwrap.dedent("""
    import asyncio, sys
    from era_kernel.config import Settings
    from era_kernel.sessions import SessionManager

    async def main():
        engine = SessionManager(Settings.from_env({}, data_dir=sys.argv[1], runtime_dir=sys.argv[2], pool_size=0))
        await engine.start()   # reaps what it believes orphaned
        await engine.shutdown()

    asyncio.run(main())
""")


def test_each_data_dir_gets_its_own_runtime_dir(tmp_path):
    a = Settings.from_env({}, data_dir=str(tmp_path / "a"))
    b = Settings.from_env({}, data_dir=str(tmp_path / "b"))
    again = Settings.from_env({"ERA_DATA_DIR": str(tmp_path / "a")})
    assert a.runtime_dir != b.runtime_dir and a.runtime_dir == again.runtime_dir
    assert a.runtime_dir.parent == b.runtime_dir.parent == Settings.from_env({}).runtime_dir.parent
    longest = a.runtime_dir / "k" / ("0" * 10) / "kernel-5"
    assert len(str(longest).encode()) <= 107
    explicit = Settings.from_env({"ERA_RUNTIME_DIR": "/tmp/era-x"}, data_dir=str(tmp_path / "a"))
    assert str(explicit.runtime_dir) == "/tmp/era-x", "ERA_RUNTIME_DIR still overrides"


@both_provisioners
async def test_second_server_leaves_first_servers_kernels_alone(era_settings, tmp_path):
    """The reported case: another server (own data dir) sharing the runtime directory
    deleted a live Docker kernel's directory at its start. Here both share the same
    explicit ERA_RUNTIME_DIR, the worst case; the default no longer even shares it.
    (That every kernel directory has the owner record the reaper reads is checked for
    each provisioner in tests/conformance/test_provisioner_*.py.)"""
    runtime = era_settings.runtime_dir
    first = SessionManager(era_settings)
    await first.start()
    try:
        sid = (await first.create({"id": "k"}))["id"]
        assert (await first.run(sid, {"code": "print('up')"}))["stdout"] == "up\n"
        kernel_dir = first.kernels[sid].km.provisioner.kernel_dir

        second = await asyncio.create_subprocess_exec(sys.executable, "-c", SECOND_SERVER, str(tmp_path / "two"),
                                                      str(runtime), stderr=subprocess.PIPE)
        _, err = await asyncio.wait_for(second.communicate(), 120)
        assert second.returncode == 0, err.decode()[-2000:]

        assert kernel_dir.is_dir(), "the second server deleted a live kernel's directory"
        assert (kernel_dir / "kernel-1").exists()
        r = await first.run(sid, {"code": "print('still here')"})
        assert r["stdout"] == "still here\n", r
        await first.restart(sid)  # reconnects through the socket paths: they must still be there
        assert (await first.run(sid, {"code": "print('again')"}))["stdout"] == "again\n"
    finally:
        await first.shutdown()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_reaper_removes_only_what_a_dead_owner_left(tmp_path):
    from era_kernel.orphans import reap_kernel_dirs
    from era_kernel.provisioning.ipc import make_kernel_dir, write_pid_record
    from era_kernel.provisioning.owner import start_time

    runtime = short_tmpdir("ert")
    try:
        ours = make_kernel_dir(runtime)  # this live process owns it (a Docker kernel: no pid)
        dead = make_kernel_dir(runtime)
        (dead.parent / f"{dead.name}.pid").write_text(f"0 {_dead_pid()} 12345")
        reused = make_kernel_dir(runtime)  # the owner pid is alive, but it is another process now
        (reused.parent / f"{reused.name}.pid").write_text(f"0 {os.getppid()} {start_time(os.getppid()) + 1}")
        young = make_kernel_dir(runtime)  # no record at all: left alone for a while
        (young.parent / f"{young.name}.pid").unlink()
        old = make_kernel_dir(runtime)
        (old.parent / f"{old.name}.pid").unlink()
        hours_ago = time.time() - 2 * 3600
        os.utime(old, (hours_ago, hours_ago))
        local = make_kernel_dir(runtime)
        write_pid_record(local, 999_999_999)  # a local kernel's record: ours, so kept

        reap_kernel_dirs(runtime)
        left = {p.name for p in (runtime / "k").iterdir() if p.is_dir()}
        assert left == {ours.name, young.name, local.name}
        records = {p.name for p in (runtime / "k").iterdir() if not p.is_dir()}
        assert records == {f"{ours.name}.pid", f"{local.name}.pid"}
    finally:
        subprocess.run(["rm", "-rf", str(runtime)])
