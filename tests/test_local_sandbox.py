"""What only the era-local sandbox does (docs/security.md cases 4, 7-11 and 18, and the
finding "Kernel output to a host file"): bubblewrap's seccomp filter,
the kernel's output kept in a pipe, the session's cgroup and its sized /tmp. What every
provisioner promises (isolation, privileges, network, environment, limits, interrupt,
restart, stop, kernel_log, IPC seal) is checked for this one too in
tests/conformance/test_provisioner_*.py."""

from __future__ import annotations

import asyncio
import os
import stat
import shutil
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None and os.environ.get("ERA_REQUIRE_SANDBOX") != "1",
                                reason="bubblewrap not installed (CI installs it and sets ERA_REQUIRE_SANDBOX=1)")


async def run(engine, sid, code, **extra):
    return await engine.run(sid, {"code": code, **extra})


async def test_escape_syscalls_are_refused(engine, session):
    code = """
import ctypes, os, subprocess
libc = ctypes.CDLL(None, use_errno=True)
def errno_of(rc):
    return 'ok' if rc == 0 else os.strerror(ctypes.get_errno())
print('unshare', subprocess.run(['unshare', '-U', 'true'], capture_output=True).returncode != 0)
print('unshare-syscall', errno_of(libc.unshare(0x10000000)))
print('mount', errno_of(libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)))
print('ptrace', errno_of(libc.ptrace(0, 0, 0, 0)))
print('keyctl', errno_of(libc.syscall(250, 0, 0, 0, 0)) if os.uname().machine == 'x86_64' else 'Operation not permitted')
print('fork still works', os.fork() and os.wait()[1] == 0 or os._exit(0))
"""
    r = await run(engine, session, code)
    lines = dict(line.split(" ", 1) for line in r["stdout"].splitlines())
    assert lines["unshare"] == "True"
    for call in ("unshare-syscall", "mount", "ptrace", "keyctl"):
        assert lines[call] == "Operation not permitted", (call, lines[call])
    assert lines["fork"] == "still works True"


# ---- docs/security.md, finding "Kernel output to a host file" ------------------------------

def _tree_bytes(path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _kernel_fds(kernel_dir) -> dict[int, list[str]]:
    """Every descriptor of every process of this kernel (bubblewrap and the kernel itself)."""
    from .conftest import kernel_processes

    out = {}
    for pid in kernel_processes(str(kernel_dir)):
        targets = []
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
                except OSError:
                    pass
        except OSError:
            continue
        out[pid] = targets
    return out


async def test_kernel_output_reaches_no_host_file(engine, session):
    assert (await run(engine, session, "print('up')"))["stdout"] == "up\n"
    provisioner = engine.kernels[session].km.provisioner
    kernel_dir, workspace = provisioner.kernel_dir, engine.workspace_dir(session)
    host_before = _tree_bytes(engine.settings.runtime_dir) + _tree_bytes(engine.settings.data_dir)
    rss_before = _rss()
    # ipykernel puts a pipe of its own on fds 1 and 2 and keeps the process's real ones as
    # copies: those are what reach the host (and what non-Python kernels write to directly).
    r = await run(engine, session, "import os, sys\nout = sys.stdout._original_stdstream_copy\n"
                                   "err = sys.stderr._original_stdstream_copy\nchunk = b'x' * (1 << 20)\n"
                                   "for _ in range(50):\n    os.write(out, chunk); os.write(err, chunk[:1024])\n"
                                   "print('wrote')", timeout=60)
    assert r["stdout"] == "wrote\n", r
    await asyncio.sleep(0.5)  # let the server drain what is still in the pipe
    grown = _tree_bytes(engine.settings.runtime_dir) + _tree_bytes(engine.settings.data_dir) - host_before
    assert grown < 1024**2, f"host files grew by {grown} bytes"
    assert _rss() - rss_before < 16 * 1024**2, "the server keeps only a bounded tail"
    tail = provisioner.kernel_log(limit=10**9)
    assert "x" * 1000 in tail and len(tail) <= 64 * 1024, "a bounded tail of it is kept"
    assert (await run(engine, session, "print('alive')"))["stdout"] == "alive\n"

    fds = _kernel_fds(kernel_dir)
    assert fds, "the kernel's processes are found by their kernel directory"
    allowed = ("socket:[", "pipe:[", "anon_inode:", "/dev/null", f"{kernel_dir}/", f"{workspace}/")
    stray = {pid: [t for t in targets if not t.startswith(allowed)] for pid, targets in fds.items()}
    assert not any(stray.values()), f"descriptors the server did not mean to give: {stray}"


# ---- docs/security.md case 8: a session's limits hold for the session as a whole -----------

MiB = 1024**2
LIMITED = {"ERA_KERNEL_MEMORY": 256 * MiB, "ERA_KERNEL_PIDS": 64, "ERA_KERNEL_TMP_SIZE": 8 * MiB}


def _cgroup_dirs(pid: int) -> dict[str, str]:
    """The process's memory and pids cgroup directories, read from /proc (not from our code)."""
    out = {}
    for line in open(f"/proc/{pid}/cgroup"):
        _, controllers, path = line.rstrip("\n").split(":", 2)
        for controller in ("memory", "pids"):
            if controller in controllers.split(","):
                out[controller] = f"/sys/fs/cgroup/{controller}{path}"
        if controllers == "" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):  # unified (v2)
            out.setdefault("memory", f"/sys/fs/cgroup{path}")
            out.setdefault("pids", f"/sys/fs/cgroup{path}")
    return out


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read().strip()


def _memory_limit(memory_dir: str) -> int:
    for name in ("memory.limit_in_bytes", "memory.max"):
        if os.path.exists(f"{memory_dir}/{name}"):
            return int(_read(f"{memory_dir}/{name}"))
    raise AssertionError(f"no memory limit file in {memory_dir}")


def _kernel_pid(engine, sid) -> int:
    from .conftest import kernel_processes

    kernel_dir = str(engine.kernels[sid].km.provisioner.kernel_dir)
    argvs = {p: open(f"/proc/{p}/cmdline").read().split("\0") for p in kernel_processes(kernel_dir)}
    pids = [p for p, argv in argvs.items() if "ipykernel_launcher" in argv and "bwrap" not in argv[0]]
    assert len(pids) == 1, pids
    return pids[0]


@pytest.fixture
async def limited(era_settings):
    if os.getuid() != 0 or not os.path.isdir("/sys/fs/cgroup"):
        pytest.skip("kernel cgroups need root and a cgroup filesystem")
    from era_kernel.sessions import SessionManager

    engine = SessionManager(era_settings.replace(**LIMITED))
    await engine.start()
    yield engine
    await engine.shutdown()


async def test_session_memory_is_bounded_as_a_whole(limited):
    """Four children touching 100 MiB each under a 256 MiB session: each is under the
    per-process cap, their sum is not. Some are killed, and the run says why."""
    sid = (await limited.create({}))["id"]
    assert (await run(limited, sid, "print('up')"))["stdout"] == "up\n"
    memory_dir = _cgroup_dirs(_kernel_pid(limited, sid))["memory"]
    code = ("import subprocess, sys\nhog = \"b = b'x' * (100 << 20); import time; time.sleep(3)\"\n"
            "kids = [subprocess.Popen([sys.executable, '-S', '-c', hog]) for _ in range(4)]\n"
            "print(sorted(k.wait() for k in kids))")
    r = await run(limited, sid, code, timeout=60)
    if r["error"] and r["error"]["ename"] == "MemoryError":
        pass  # the OOM killer chose the kernel itself: the run says out of memory
    else:
        statuses = [int(s) for s in r["stdout"].strip("[]\n").split(",")]
        assert -9 in statuses, f"no child was killed: the session used more than its limit ({statuses})"
        assert "memory limit" in r["stderr"], r
    peak = next(f"{memory_dir}/{n}" for n in ("memory.max_usage_in_bytes", "memory.peak", "memory.current")
                if os.path.exists(f"{memory_dir}/{n}"))
    assert int(_read(peak)) <= LIMITED["ERA_KERNEL_MEMORY"], "the session's total stayed under its limit"
    assert (await run(limited, sid, "print('usable')"))["stdout"] == "usable\n"


async def test_kernel_killed_by_its_sessions_limit_reports_out_of_memory(limited):
    """A child holds 200 MiB; the kernel (which made itself the OOM killer's first choice)
    then takes 60 MiB more: each within the per-process cap, together over the session's
    (whichever the launcher: a forked kernel's cgroup is not charged for the pages it
    shares with the zygote, about 30 MiB less than a bubblewrap-launched one's)."""
    sid = (await limited.create({}))["id"]
    code = ("import subprocess, sys, time\nopen('/proc/self/oom_score_adj', 'w').write('1000')\n"
            "hold = \"import time\\ntry:\\n    open('/proc/self/oom_score_adj', 'w').write('0')\\nexcept OSError:\\n"
            "    pass\\nb = b'x' * (200 << 20); time.sleep(10)\"\n"
            "child = subprocess.Popen([sys.executable, '-S', '-c', hold])\ntime.sleep(1.5)\n"
            "x = [b'y' * (1 << 20) for _ in range(60)]\nprint('kernel survived')")
    r = await run(limited, sid, code, timeout=60)
    assert r["exit_code"] == 137 and r["error"]["ename"] == "MemoryError", r
    assert "out of memory" in r["error"]["evalue"]
    assert (await run(limited, sid, "print('fresh')"))["stdout"] == "fresh\n"


async def test_kernel_has_its_own_cgroup_and_a_sized_tmp(limited):
    sid = (await limited.create({}))["id"]
    assert (await run(limited, sid, "print('up')"))["stdout"] == "up\n"
    kernel = _kernel_pid(limited, sid)
    mine, its = _cgroup_dirs(os.getpid()), _cgroup_dirs(kernel)
    for controller in ("memory", "pids"):
        assert its[controller] != mine[controller], f"the kernel shares the server's {controller} cgroup"
        assert its[controller].startswith(mine[controller].rstrip("/") + "/"), "nested under the server's own"
    assert _memory_limit(its["memory"]) == LIMITED["ERA_KERNEL_MEMORY"]
    if os.path.exists(f"{its['memory']}/memory.memsw.limit_in_bytes"):
        assert int(_read(f"{its['memory']}/memory.memsw.limit_in_bytes")) == LIMITED["ERA_KERNEL_MEMORY"]
    assert int(_read(f"{its['pids']}/pids.max")) == LIMITED["ERA_KERNEL_PIDS"]
    from .conftest import kernel_processes

    kernel_dir = str(limited.kernels[sid].km.provisioner.kernel_dir)
    assert all(_cgroup_dirs(p) == its for p in kernel_processes(kernel_dir)), "bubblewrap is inside too"

    await limited.delete(sid)
    for controller in ("memory", "pids"):
        assert not os.path.exists(its[controller]), f"{controller} cgroup left after the session was deleted"


async def test_tmp_shares_the_workspace_bound(era_settings):
    """The session's /tmp is a directory in its workspace volume (as a VM's disk holds
    both): what it writes there counts against ERA_WORKSPACE_MAX_BYTES with the
    workspace, and past it the write fails with ENOSPC inside the session (SECURITY.md
    case 11), whatever ERA_KERNEL_TMP_SIZE says."""
    from era_kernel.sessions import SessionManager
    from era_kernel.workspaces.volumes import support

    if not support(era_settings.data_dir):
        pytest.skip(f"workspace volumes unavailable: {support(era_settings.data_dir).reason}")
    engine = SessionManager(era_settings.replace(ERA_WORKSPACE_MAX_BYTES=32 * MiB, ERA_KERNEL_TMP_SIZE=1 * MiB))
    await engine.start()
    try:
        sid = (await engine.create({}))["id"]
        code = ("import errno, os\n"
                "open('ws.bin', 'wb').write(b'w' * (20 << 20))\n"  # 20 MiB in the workspace: fits
                "try:\n"
                "    with open('/tmp/fill', 'wb') as f:\n"
                "        for _ in range(20):\n"
                "            f.write(b't' * (1 << 20))\n"
                "            f.flush()\n"
                "    print('wrote 40 MiB')\n"
                "except OSError as e:\n"
                "    print('full', errno.errorcode[e.errno], os.path.getsize('/tmp/fill') >> 20)")
        out = (await run(engine, sid, code, timeout=60))["stdout"].split()
        assert out[:2] == ["full", "ENOSPC"], out
        assert 2 <= int(out[2]) <= 14, "the workspace's 20 MiB and /tmp's share one 32 MiB bound"
        tmp = engine.files.tmp_path(engine.files.path(await engine._record(sid)))
        assert str(tmp).startswith(str(era_settings.data_dir / "volumes")), "inside the volume, beside the workspace"
    finally:
        await engine.shutdown()


async def test_reaper_removes_cgroups_of_dead_owners(era_settings):
    if os.getuid() != 0:
        pytest.skip("kernel cgroups need root")
    import subprocess
    import time

    from era_kernel.orphans import reap_orphans
    from era_kernel.provisioning import cgroups

    found = cgroups.support()
    if not found:
        pytest.skip(found.reason)
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = cgroups.KernelCgroup(found, cgroups.group_name("0123456789", (gone.pid, 1)))  # its owner exited
    elsewhere = cgroups.KernelCgroup(found, f"{gone.pid}.1.1.fedcba9876")  # another pid namespace's: not judged
    live = cgroups.KernelCgroup.for_kernel("abcdef0123")  # ours: this process is alive
    for group in (dead, elsewhere, live):
        group.create(64 * MiB, 16)
    leftover = subprocess.Popen(cgroups.wrap_argv(dead, ["sleep", "30"]))
    try:
        deadline = time.time() + 5
        while leftover.pid not in dead.pids() and time.time() < deadline:
            time.sleep(0.01)
        await reap_orphans(era_settings)
        assert not any(d.exists() for d in dead.dirs), "a dead owner's cgroup is removed"
        assert leftover.wait(5) == -9, "and what was left in it killed"
        assert all(d.is_dir() for d in live.dirs), "a live owner's cgroup stays"
        assert all(d.is_dir() for d in elsewhere.dirs), "so does one from another pid namespace"
    finally:
        leftover.kill()
        for group in (dead, elsewhere, live):
            group.remove()


def test_mount_points_in_a_sessions_tmp_never_follow_what_the_session_planted(tmp_path):
    """SECURITY.md case 13 for the session's /tmp: bubblewrap, as root, makes the mount
    points below /tmp (the IPC directory's) itself; a link the session left where one
    goes (``era-0 -> ../../oldroot/etc``), or a directory of its own there, is replaced by
    a root-owned directory first, and nothing outside is touched."""
    if os.getuid() != 0:
        pytest.skip("without root the sandbox runs as our own uid: nothing to take over")
    from era_kernel.provisioning.local import prepare_tmp_mountpoints

    tmp = tmp_path / "session-tmp"
    tmp.mkdir(mode=0o1777)
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp / "era-0").symlink_to(outside)
    (tmp / "mine").mkdir()
    os.chown(tmp / "mine", 4242, 4242)
    (tmp / "mine" / "kept.txt").write_text("x")
    os.symlink("/etc/passwd", tmp / "file-link")
    prepare_tmp_mountpoints(tmp, ["/tmp/era-0/abc/k1", "/tmp/mine/ws", "/tmp/file-link/x", "/srv/not-under-tmp"])
    for rel in ("era-0/abc/k1", "mine/ws", "file-link/x"):
        path = tmp / rel
        while path != tmp:
            st = os.lstat(path)
            assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o755, path
            path = path.parent
    assert list(outside.iterdir()) == [] and (tmp / "mine" / "kept.txt").read_text() == "x"
    assert os.path.isfile("/etc/passwd") and not os.path.exists("/srv/not-under-tmp")


def _untraversable_above(path: str) -> str | None:
    """The first directory above ``path`` that others may not pass through."""
    for parent in reversed(Path(path).parents):
        if not parent.stat().st_mode & 0o001:
            return str(parent)
    return None


async def test_commands_work_without_a_sandbox_and_as_the_kernel_runs(era_settings):
    """ERA_SANDBOX=none (no bubblewrap): commands still run beside the kernel, as the
    kernel's uid, in its workspace, with no_new_privs, and background ones are signalled.
    A data directory its uid cannot reach (under pytest's 0700 one, as under /root) is a
    clear error at kernel start, not a bare EACCES from inside the kernel; so is an
    interpreter it cannot reach (then the commands cannot be tried)."""
    from era_kernel.engine.manager import SessionManager
    from era_kernel.errors import KernelFailed

    from .conftest import kernel_processes, short_tmpdir

    if os.geteuid() != 0:
        pytest.skip("kernels of their own uid need root")
    engine = SessionManager(era_settings.replace(ERA_SANDBOX="none"))
    await engine.start()
    try:
        sid = (await engine.create({"language": "python"}))["id"]
        with pytest.raises(KernelFailed, match="ERA_SANDBOX=none.*cannot pass through"):
            await engine.run(sid, {"code": "1"})
    finally:
        await engine.shutdown()
    data = short_tmpdir("erd")
    data.chmod(0o711)
    engine = SessionManager(era_settings.replace(ERA_SANDBOX="none", ERA_DATA_DIR=str(data / "data")))
    await engine.start()
    try:
        sid = (await engine.create({"language": "python"}))["id"]
        assert engine.kernels.get(sid) is None or not engine.kernels[sid].km.provisioner.sandboxed
        blocked = _untraversable_above(sys.base_prefix) or _untraversable_above(sys.prefix)
        if blocked:  # an interpreter installed under /root (pyenv's), say: named, not a loader's error
            with pytest.raises(KernelFailed, match=f"cannot pass through {blocked} .*the Python the kernels run"):
                await engine.run(sid, {"code": "1"})
            return
        kernel_uid = (await engine.run(sid, {"code": "import os; print(os.getuid())"}))["stdout"].strip()
        assert not engine.kernels[sid].km.provisioner.sandboxed
        r = await engine.commands.run(sid, {"cmd": "id -u; pwd; grep NoNewPrivs /proc/self/status", "shell": True})
        record = await engine._record(sid)
        assert r["stdout"].split("\n")[:3] == [kernel_uid, str(engine.files.path(record).resolve()),
                                               "NoNewPrivs:\t1"], r
        bg = await engine.commands.run(sid, {"cmd": ["sleep", "423"], "background": True})
        await engine.commands.send_signal(sid, bg["pid"], {"signal": "TERM"})
        process = await engine.commands.process(sid, bg["pid"])
        await asyncio.wait_for(process.done.wait(), 10)
        assert (process.state, process.exit_code) == ("exited", 143)
    finally:
        await engine.shutdown()
        shutil.rmtree(data, ignore_errors=True)
    for _ in range(100):
        if not kernel_processes("sleep 423"):
            break
        await asyncio.sleep(0.1)
    assert not kernel_processes("sleep 423")
