"""docs/security.md case 5: one message over the limit from a kernel (a huge display) is refused
unread, the run fails with a clear error instead of at its timeout, and the session
goes on in a fresh kernel. Both provisioners; a 1 MiB limit stands in for 256 MiB."""

from __future__ import annotations

import asyncio

import pytest

from era_kernel.sessions import SessionManager

from .conftest import both_provisioners

pytestmark = both_provisioners

HUGE_DISPLAY = "display({'text/plain': 'x' * 3_000_000}, raw=True)"


@pytest.fixture
async def engine(era_settings):
    manager = SessionManager(era_settings.replace(ERA_KERNEL_MESSAGE_LIMIT=1024**2, ERA_OUTPUT_LIMIT=256 * 1024))
    await manager.start()
    yield manager
    await manager.shutdown()


async def test_an_oversized_message_fails_the_run_with_a_reason(engine):
    sid = (await engine.create({"language": "python"}))["id"]
    await engine.run(sid, {"code": "kept = 1"})

    result = await engine.run(sid, {"code": f"print('before', flush=True)\n{HUGE_DISPLAY}\nprint('after')",
                                    "timeout": 120})
    assert result["exit_code"] == 1 and not result["timed_out"], result
    assert result["error"]["ename"] == "MessageTooLarge"
    assert "1 MiB" in result["error"]["evalue"] and "ERA_KERNEL_MESSAGE_LIMIT" in result["error"]["evalue"]
    assert result["stdout"] == "before\n"  # what came before the cut is kept

    # The session goes on, in a fresh kernel (the evalue says the state is gone).
    nxt = await engine.run(sid, {"code": "print('kept' in dir())", "timeout": 60})
    assert nxt["exit_code"] == 0 and nxt["stdout"] == "False\n", nxt
    history = await engine.runs(sid)
    assert [r["error"]["ename"] if r["error"] else None for r in history] == [None, "MessageTooLarge", None]


async def test_an_oversized_message_between_runs_does_not_leave_a_deaf_kernel(engine):
    sid = (await engine.create({"language": "python"}))["id"]
    code = f"import threading\nthreading.Timer(0.3, lambda: {HUGE_DISPLAY}).start()\nprint('armed')"
    assert (await engine.run(sid, {"code": code}))["stdout"] == "armed\n"
    for _ in range(100):  # until the engine has noticed the cut
        if engine.kernels[sid].state == "dead":
            break
        await asyncio.sleep(0.05)
    assert engine.kernels[sid].state == "dead"
    result = await engine.run(sid, {"code": "print('fresh')", "timeout": 60})
    assert result["exit_code"] == 0 and result["stdout"] == "fresh\n", result
