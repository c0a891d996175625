"""EraProvisioner conformance, lifecycle: interrupt, restart, stop, the IPC seal, a failed
start's own output, and the limits that contain bombs: what every ERA provisioner
promises, checked on each entry of ``PROVISIONERS`` (tests/conformance/provisioners.py
says how kernels are started and shared). docs/security.md cases checked here: 2, 3, 8,
9, 22."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import stat
import time
from pathlib import Path

import pytest

from era_kernel.errors import KernelFailed
from era_kernel.kernel import SessionKernel
from era_kernel.kernel.wire import EraKernelManager
from era_kernel.provisioning.base import LaunchOptions


from .provisioners import MiB, Backend, Kernel, _alive, kernel, new_uid

pytestmark = pytest.mark.asyncio(loop_scope="module")  # the shared kernel lives on the module's loop


# ---------------------------------------------------------------------------- control


async def interrupts(k: Kernel, interrupt) -> None:
    """A busy kernel is interrupted, raises KeyboardInterrupt, and goes on with its state."""
    await k.run("kept = 41")
    msg_id = k.kc.execute("import time; time.sleep(60)")
    await k.kc.get_iopub_msg(timeout=10)  # busy
    started = time.monotonic()
    await asyncio.sleep(0.5)
    await interrupt()
    reply = None
    for _ in range(10):
        with contextlib.suppress(TimeoutError):
            reply = await k.reply(msg_id, timeout=1)
            break
        assert await k.km.is_alive(), f"the kernel died: exit status {await k.provisioner.poll()}"
    assert reply is not None, "no reply within 10 s"
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
    assert time.monotonic() - started < 5
    out = (await k.run("print(kept + 1)"))[1]
    if out == "":
        # Seen about once in a dozen runs on both local launchers: the first run after an
        # interrupt answers ok with its stdout not seen before its idle status (not yet
        # diagnosed; the README's Known limits says so). What this test asks is that the
        # kernel goes on with its state: a lost `kept` fails both runs.
        out = (await k.run("print(kept + 1)"))[1]
    assert out == "42\n"


async def test_interrupt(shared):
    """The kernelspec's interrupt (ours: "message" mode), as SessionKernel interrupts a run."""
    await interrupts(shared.kernel, shared.kernel.km.interrupt_kernel)


async def test_interrupt_by_signal(backend, place, request):
    """SIGINT through the provisioner, as KernelManager.interrupt_kernel sends it for a
    kernelspec in "signal" mode (era-node-local, era-typescript-local)."""
    known_bug(request, backend, "signal-interrupt")
    async with kernel(place) as k:
        await interrupts(k, lambda: k.km.signal_kernel(signal.SIGINT))


def known_bug(request, backend: Backend, check: str) -> None:
    if check in backend.bugs:
        request.applymarker(pytest.mark.xfail(strict=True, reason=backend.bugs[check]))


async def test_restart_keeps_the_connection_info_and_starts_fresh(backend, place):
    """jupyter_client's restart: a new kernel process (the old one's processes gone) on the
    same sockets and key, so connected clients reach it; sealed again afterwards."""
    async with kernel(place) as k:
        info = k.km.get_connection_info()
        old = {**backend.footprint(k), "paths": []}  # the directory stays, the rest goes
        await k.run("x = 1")
        await k.km.restart_kernel(now=True)
        await k.kc.wait_for_ready(timeout=60)
        await k.provisioner.seal_ipc()
        assert k.km.get_connection_info() == info
        status, _, content = await k.run("x")
        assert status == "error" and content["ename"] == "NameError"
        deadline = time.monotonic() + 10
        while backend.remains(old) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert backend.remains(old) == [], "the old kernel survived the restart"
        if os.getuid() == 0:
            assert os.stat(k.kernel_dir).st_uid == 0  # sealed again after the restart


async def test_stop_removes_processes_and_everything_it_made(backend, place):
    """docs/security.md case 9: after a graceful shutdown nothing of the kernel is left:
    its processes (children included), its IPC directory and owner record, its container
    or cgroup."""
    async with kernel(place) as k:
        await k.run("import subprocess; bg = subprocess.Popen(['sleep', '60'])")
        found = backend.footprint(k)
        assert len(found["processes"]) >= 2 and all(os.path.lexists(p) for p in found["paths"]), found
        await k.km.shutdown_kernel()  # the graceful path: shutdown request, wait, cleanup
    deadline = time.monotonic() + 10
    while backend.remains(found) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert backend.remains(found) == []
    assert not list((place.runtime_dir / "k").iterdir()), "nothing left beside the kernel's directory"


# ---------------------------------------------------------------------------- IPC seal (case 22)

ATTACK = r"""
import json, os
from ipykernel.connect import get_connection_file
d = os.path.dirname(get_connection_file())
sock = os.path.join(d, "kernel-1")
result = {}
def attempt(name, action):
    try:
        action()
        result[name] = "done"
    except OSError as exc:
        result[name] = type(exc).__name__
attempt("unlink", lambda: os.unlink(sock))
attempt("rename", lambda: os.rename(sock, os.path.join(d, "moved")))
attempt("symlink", lambda: os.symlink("/run", os.path.join(d, "kernel-9")))
attempt("fifo", lambda: os.mkfifo(os.path.join(d, "fifo")))
attempt("file", lambda: open(os.path.join(d, "flood-0"), "w").close())
attempt("chmod", lambda: os.chmod(d, 0o777))
attempt("home", lambda: open(os.path.join(os.path.expanduser("~"), "mine"), "w").close())
print(json.dumps(result))
"""


def socket_files(kernel_dir: Path) -> dict[str, str]:
    kinds = {}
    for name in sorted(os.listdir(kernel_dir)):
        mode = os.lstat(kernel_dir / name).st_mode
        kinds[name] = "socket" if stat.S_ISSOCK(mode) else "link" if stat.S_ISLNK(mode) else "other"
    return {k: v for k, v in kinds.items() if k.startswith("kernel")}


async def test_sealed_kernel_cannot_replace_or_add_to_its_socket_directory(place):
    """docs/security.md case 22: after seal_ipc the kernel cannot swap its sockets for links
    or FIFOs nor flood their directory; it is still the same kernel, still answering."""
    if os.getuid() != 0:
        pytest.skip("only root can take the directory back (README limits)")
    async with kernel(place) as k:
        before = socket_files(k.kernel_dir)
        assert set(before.values()) == {"socket"} and len(before) == 5, before
        attempts = await k.json(ATTACK)
        refused = {key: v for key, v in attempts.items() if key != "home"}
        assert refused == {key: "PermissionError" for key in refused}, attempts
        assert attempts["home"] == "done"  # the kernel keeps its own writable home
        assert socket_files(k.kernel_dir) == before
        assert not os.path.lexists(k.kernel_dir / "fifo")
        assert (await k.run("print(41 + 1)"))[1] == "42\n"


# ---------------------------------------------------------------------------- failed start


async def test_kernel_log_holds_the_kernels_own_output_after_a_failed_start(backend, place):
    """What SessionKernel puts into a failed start's error. More than a pipe holds comes
    first: the provisioner must drain while the kernel writes. (The pause: Docker reads
    stdout and stderr through two pipes, so output written to both at once is logged in
    the order it read them, which may not be the order written.)"""
    argv = [backend.python(), "-c", "import sys, time; sys.stderr.write('x' * 200000 + '\\n'); sys.stderr.flush(); "
                                    "time.sleep(0.5); print('era-marker: broken kernel', flush=True); sys.exit(3)"]
    uid = new_uid()
    era = LaunchOptions.from_settings(place.settings, backend.name, place.workspace(uid), uid=uid).replace(
        **backend.launch)
    km = EraKernelManager(kernel_name="broken", kernel_spec_manager=place.kernelspec("broken", argv))
    await km.start_kernel(era=era)
    try:
        deadline = time.monotonic() + 30
        while await km.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not await km.is_alive()
        provisioner = km.provisioner
        log = await asyncio.to_thread(provisioner.kernel_log)
        assert "era-marker: broken kernel" in log, log[-300:]
        assert len(log) <= 2000, "only a short tail (the default limit)"
    finally:
        await km.shutdown_kernel(now=True)
    assert not list((place.runtime_dir / "k").iterdir()), "nothing left beside the kernel's directory"

    # What SessionKernel makes of it: the kernel's last words in the error, briefly.
    session_kernel = SessionKernel(place.kernelspec("broken", argv), "broken", era, [], start_timeout=20)
    with pytest.raises(KernelFailed) as failure:
        await session_kernel.start()
    assert "era-marker: broken kernel" in str(failure.value)
    assert len(str(failure.value)) < 10_000, "only a short tail goes into the message"
    assert not list((place.runtime_dir / "k").iterdir()), "nothing left beside the kernel's directory"


# ---------------------------------------------------------------------------- limits (cases 8, 9)

FORK_BOMB = r"""
import json, os, time
children, failure = [], None
for _ in range(2000):
    try:
        pid = os.fork()
    except OSError as e:
        failure = e.errno
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    children.append(pid)
print(json.dumps({'forked': len(children), 'errno': failure}))
"""


async def test_fork_bomb_is_contained(backend, place):
    async with kernel(place, pids=64, **backend.fork_bomb_options) as k:
        result = await k.json(FORK_BOMB, timeout=60)
        assert result["errno"] == errno.EAGAIN and result["forked"] < 64, result
        identities = backend.processes(k)
        assert result["forked"] <= len(identities) <= 64 + backend.host_helpers
        # The kernel still answers (it may itself fail to start a thread while the table
        # is full), and recovers once the children are gone.
        assert (await k.run("1"))[0] in ("ok", "error")
        answer = await k.run("import signal\nfor p in children[:5]: os.kill(p, signal.SIGKILL)\n"
                             "for p in children[:5]: os.waitpid(p, 0)\nprint(1 + 1)")
        assert answer[1].strip() == "2", answer
    # Shutdown removed every process the bomb made (docs/security.md case 9).
    deadline = time.monotonic() + 10
    while any(_alive(i) for i in identities) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert not [pid for pid, start in identities if _alive((pid, start))]


async def test_memory_bomb_is_contained(backend, place):
    """The kernel gets a MemoryError or is killed (and the provisioner says it was for
    memory); the host keeps working; after a MemoryError the kernel goes on."""
    async with kernel(place, memory=256 * MiB) as k:
        msg_id = k.kc.execute("hog = []\nwhile True:\n    hog.append(b'x' * (16 * 1024**2))")
        outcome = None
        deadline = time.monotonic() + 60
        while outcome is None and time.monotonic() < deadline:
            try:
                outcome = (await k.reply(msg_id, timeout=1))["content"].get("ename")
            except TimeoutError:
                if not await k.km.is_alive():
                    outcome = "killed"
        assert outcome in ("MemoryError", "killed"), outcome
        if outcome == "killed":
            assert k.provisioner.oom_killed
        else:
            assert (await k.run("del hog\nprint('recovered')"))[1] == "recovered\n"
        assert sum(range(10**6)) == 499999500000  # this process is fine


OOM_CHILD = r"""
import json, subprocess, sys, time
hog = "import time\ntry:\n    open('/proc/self/oom_score_adj', 'w').write('{child}')\nexcept OSError:\n    pass\n" \
      "b = b'x' * (48 << 20)\ntime.sleep(60)"
open('/proc/self/oom_score_adj', 'w').write('{kernel}')
kids, killed = [], None
for _ in range(40):
    kids.append(subprocess.Popen([sys.executable, '-S', '-c', hog]))
    time.sleep(0.3)
    codes = [k.poll() for k in kids]
    if -9 in codes:
        killed = codes.index(-9)
        break
for k in kids:
    k.kill(); k.wait()
print(json.dumps({{'kids': len(kids), 'killed': killed}}))
"""


async def test_memory_limit_kills_are_reported(backend, place):
    """docs/security.md case 8: the memory limit bounds the session as a whole (processes
    each under it, together over it, are killed), ``oom_kills`` counts those kills (or says
    it cannot: None), and when the kernel itself is killed ``oom_killed`` says so."""
    if reason := backend.session_memory_unbounded():
        pytest.skip(reason)
    async with kernel(place, memory=256 * MiB) as k:
        if backend.oom_kills_the_session:  # no child is picked: the session's kernel dies, and says why
            k.kc.execute(OOM_CHILD.format(child=1000, kernel=0))
            deadline = time.monotonic() + 60
            while await k.km.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert not await k.km.is_alive(), "the kernel outlived the session's memory limit"
            assert k.provisioner.oom_killed is True
            return
        before = k.provisioner.oom_kills()
        assert before in (0, None)
        # Children holding 48 MiB each, the first choice of the OOM killer, until one is killed.
        result = await k.json(OOM_CHILD.format(child=1000, kernel=0), timeout=60)
        assert result["killed"] is not None, f"no child was killed: the session used more than its limit {result}"
        after = k.provisioner.oom_kills()
        assert before is None and after is None or after > before, (before, after)
        assert await k.km.is_alive()
        # Now the kernel is the first choice: it is killed, and the provisioner says why.
        k.kc.execute(OOM_CHILD.format(child=0, kernel=1000))
        deadline = time.monotonic() + 60
        while await k.km.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert not await k.km.is_alive(), "the kernel outlived the session's memory limit"
        assert k.provisioner.oom_killed is True
        last = k.provisioner.oom_kills()
        assert after is None and last is None or last > after, (after, last)
