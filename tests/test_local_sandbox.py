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
