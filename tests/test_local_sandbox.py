"""The era-local sandbox: what code in a session can and cannot reach (SECURITY.md 8, 9, 18, 19, 21)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket

import pytest

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None and os.environ.get("ERA_REQUIRE_SANDBOX") != "1",
                                reason="bubblewrap not installed (CI installs it and sets ERA_REQUIRE_SANDBOX=1)")


async def run(engine, sid, code, **extra):
    return await engine.run(sid, {"code": code, **extra})


async def test_no_network_unless_allowed(engine):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    code = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2); print('connected')\n"
            "except OSError as e:\n    print('refused', type(e).__name__)\n"
            "try:\n    socket.getaddrinfo('example.com', 80); print('dns ok')\nexcept OSError:\n    print('no dns')")
    try:
        closed = await engine.create({"id": "closed"})
        r = await run(engine, closed["id"], code)
        assert r["stdout"].splitlines()[0].startswith("refused") and "no dns" in r["stdout"]
        opened = await engine.create({"id": "opened", "allowInternetAccess": True})
        r = await run(engine, opened["id"], code)
        assert r["stdout"].splitlines()[0] == "connected"
    finally:
        listener.close()


async def test_host_and_other_sessions_are_invisible(engine, tmp_path):
    a = (await engine.create({"id": "a"}))["id"]
    b = (await engine.create({"id": "b"}))["id"]
    await run(engine, b, "open('b-secret.txt', 'w').write('b only')")
    b_dir = engine.workspace_dir(b)
    host_secret = tmp_path / "host-secret.txt"
    host_secret.write_text("host only")
    code = f"""
import os
for p in [{str(b_dir / 'b-secret.txt')!r}, {str(engine.settings.data_dir / 'era.db')!r}, '/etc/shadow',
          {str(host_secret)!r}, '/root/.bashrc']:
    try:
        open(p).read(); print('READ', p)
    except OSError as e:
        print('denied', type(e).__name__)
print('uid', os.getuid())
print(sorted(os.listdir({str(engine.settings.runtime_dir / 'k')!r})) if os.path.exists({str(engine.settings.runtime_dir / 'k')!r}) else 'no k')
"""
    r = await run(engine, a, code)
    assert "READ" not in r["stdout"], r["stdout"]
    assert "uid 0" not in r["stdout"]


async def test_privileges_are_gone(engine, session):
    r = await run(engine, session, "print(open('/proc/self/status').read())")
    status = dict(line.split(":", 1) for line in r["stdout"].splitlines() if ":" in line)
    assert status["NoNewPrivs"].strip() == "1"
    assert status["CapEff"].strip() == "0000000000000000"
    r = await run(engine, session, "import os\nprint(os.getuid() != 0)\n"
                                   "try:\n    open('/usr/bin/owned', 'w')\nexcept OSError as e: print('ro', e.errno)")
    assert r["stdout"].split() == ["True", "ro", "30"], "non-root, and the host's root is read-only (EROFS)"


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


async def test_fork_bomb_is_contained(engine, session):
    code = ("import os, time\nkids = 0\ntry:\n    for _ in range(5000):\n        if os.fork() == 0:\n"
            "            time.sleep(30); os._exit(0)\n        kids += 1\nexcept OSError as e:\n    print('stopped at', kids, e.errno)")
    r = await run(engine, session, code, timeout=20)
    assert "stopped at" in r["stdout"]
    assert int(r["stdout"].split()[2]) < engine.settings["ERA_KERNEL_PIDS"]
    other = await engine.create({})
    assert (await run(engine, other["id"], "print('still fine')"))["stdout"] == "still fine\n"
    await engine.restart(session)  # kills the pid namespace and every child in it
    r = await run(engine, session, "print('fresh')")
    assert r["stdout"] == "fresh\n"


async def test_memory_bomb_is_stopped_with_a_clear_error(engine, session):
    r = await run(engine, session, "blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 1024 * 1024))",
                  timeout=30)
    assert r["exit_code"] != 0
    assert r["error"]["ename"] in ("MemoryError", "KernelDied")
    r = await run(engine, session, "del blocks\nprint('recovered')") if r["error"]["ename"] == "MemoryError" else \
        await run(engine, session, "print('recovered')")
    assert r["stdout"] == "recovered\n"
    await asyncio.sleep(0)


# ---- SECURITY.md 7: the kernel's own stdout/stderr reach no host file -----------------------

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


async def test_start_failure_still_shows_the_kernels_own_output(tmp_path):
    import json
    import sys

    from jupyter_client.kernelspec import KernelSpecManager

    from era_kernel.errors import KernelFailed
    from era_kernel.kernel import SessionKernel

    from .conftest import short_tmpdir

    spec_dir = tmp_path / "specs" / "broken"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        # More than a pipe holds first: the server must drain while the kernel writes.
        "argv": [sys.executable, "-c", "import sys; sys.stderr.write('x' * 200000 + '\\n'); "
                                       "print('era-marker: broken kernel', flush=True); sys.exit(3)"],
        "display_name": "broken", "language": "python",
        "metadata": {"kernel_provisioner": {"provisioner_name": "era-local"}}}))
    runtime, workspace = short_tmpdir("ert"), short_tmpdir("erw")
    os.chmod(workspace, 0o777)
    kernel = SessionKernel(KernelSpecManager(kernel_dirs=[str(tmp_path / "specs")]), "broken",
                           {"workspace": str(workspace), "runtime_dir": str(runtime)}, [], start_timeout=20)
    try:
        with pytest.raises(KernelFailed) as failure:
            await kernel.start()
        assert "era-marker: broken kernel" in str(failure.value)
        assert len(str(failure.value)) < 10_000, "only a short tail goes into the message"
        assert not list((runtime / "k").iterdir()), "nothing left beside the kernel's directory"
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
        shutil.rmtree(workspace, ignore_errors=True)


# ---- SECURITY.md 3: a session's limits hold for the session as a whole --------------------

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
    then takes 30 MiB more: each within the per-process cap, together over the session's."""
    sid = (await limited.create({}))["id"]
    code = ("import subprocess, sys, time\nopen('/proc/self/oom_score_adj', 'w').write('1000')\n"
            "hold = \"import time\\ntry:\\n    open('/proc/self/oom_score_adj', 'w').write('0')\\nexcept OSError:\\n"
            "    pass\\nb = b'x' * (200 << 20); time.sleep(10)\"\n"
            "child = subprocess.Popen([sys.executable, '-S', '-c', hold])\ntime.sleep(1.5)\n"
            "x = [b'y' * (1 << 20) for _ in range(30)]\nprint('kernel survived')")
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


async def test_tmp_is_sized(limited):
    """/tmp is a tmpfs, i.e. memory: it is bounded by ERA_KERNEL_TMP_SIZE (8 MiB here)."""
    sid = (await limited.create({}))["id"]
    code = ("import errno\ntry:\n    with open('/tmp/fill', 'wb') as f:\n        f.write(b'x' * (1 << 20))\n"
            "        f.flush()\n        f.write(b'x' * (16 << 20))\n        f.flush()\n    print('wrote 17 MiB')\n"
            "except OSError as e:\n    print('full', errno.errorcode[e.errno])")
    assert (await run(limited, sid, code, timeout=60))["stdout"] == "full ENOSPC\n"


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
