"""docs/security.md case 22 on era-local: a kernel's home, inside its IPC directory, flooded with
files, is removed without stalling the server. That a kernel cannot replace or add to
its socket directory once sealed, and that a restart hands the directory back, is checked
for every provisioner in tests/conformance/test_provisioner_*.py."""

from __future__ import annotations

import asyncio
import os
import time


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
