"""SECURITY.md 22: a kernel cannot swap its IPC sockets for symlinks or FIFOs, nor flood
their directory, and the server neither follows nor hangs. Both provisioners."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time

import pytest

from .conftest import both_provisioners

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="only root can take the directory back (README limits)")

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


def socket_files(kernel_dir) -> dict[str, str]:
    kinds = {}
    for name in sorted(os.listdir(kernel_dir)):
        mode = os.lstat(os.path.join(kernel_dir, name)).st_mode
        kinds[name] = "socket" if stat.S_ISSOCK(mode) else "link" if stat.S_ISLNK(mode) else "other"
    return {k: v for k, v in kinds.items() if k.startswith("kernel")}


@both_provisioners
async def test_kernel_cannot_replace_or_add_to_its_socket_directory(engine):
    sid = (await engine.create({"language": "python"}))["id"]
    assert (await engine.run(sid, {"code": "print('up')"}))["stdout"] == "up\n"  # the kernel is started
    kernel_dir = engine.kernels[sid].km.provisioner.kernel_dir
    before = socket_files(kernel_dir)
    assert set(before.values()) == {"socket"} and len(before) == 5, before

    result = await engine.run(sid, {"code": ATTACK})
    attempts = json.loads(result["stdout"])
    refused = {k: v for k, v in attempts.items() if k != "home"}
    assert refused == {k: "PermissionError" for k in refused}, attempts
    assert attempts["home"] == "done"  # the kernel keeps its own writable home

    assert socket_files(kernel_dir) == before
    assert not os.path.lexists(os.path.join(kernel_dir, "fifo"))
    # Still the same kernel, still answering.
    again = await engine.run(sid, {"code": "print(41 + 1)"})
    assert again["stdout"] == "42\n"
    await engine.delete(sid)
    assert not os.path.exists(kernel_dir)


@both_provisioners
async def test_restart_hands_the_directory_back_to_the_new_kernel(engine):
    sid = (await engine.create({"language": "python"}))["id"]
    await engine.run(sid, {"code": "x = 1"})
    await engine.restart(sid)
    result = await engine.run(sid, {"code": "print('x' in dir())"})
    assert result["stdout"] == "False\n"
    kernel_dir = engine.kernels[sid].km.provisioner.kernel_dir
    assert os.stat(kernel_dir).st_uid == 0  # sealed again after the restart
    await engine.delete(sid)


async def test_a_flooded_home_is_removed_without_stalling_the_server(engine):
    sid = (await engine.create({"language": "python"}))["id"]
    flood = ("import os\nh = os.path.expanduser('~')\n"
             "for i in range(20000):\n    open(os.path.join(h, f'f{i}'), 'w').close()\nprint('ok')")
    assert (await engine.run(sid, {"code": flood}))["stdout"] == "ok\n"
    kernel_dir = engine.kernels[sid].km.provisioner.kernel_dir

    gaps: list[float] = []

    async def tick() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    try:
        await engine.delete(sid)
    finally:
        ticker.cancel()
    assert not os.path.exists(kernel_dir)
    # Removing 20,000 files takes a good fraction of a second; the loop kept turning.
    assert max(gaps) < 0.2, max(gaps)
