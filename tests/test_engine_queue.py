"""The run queue through the engine API, with real kernels: cancelling a run that waits
its turn (a synchronous one has no task to cancel), and the records it leaves."""

from __future__ import annotations

import asyncio

import pytest

from era_kernel.errors import Conflict


async def wait_status(engine, sid, run_id, wanted, timeout=30.0):
    async def poll():
        while True:
            try:
                record = await engine.get_run(sid, run_id)
            except KeyError:  # NotFound: not recorded yet
                record = {}
            if record.get("status") in wanted:
                return record
            await asyncio.sleep(0.02)

    return await asyncio.wait_for(poll(), timeout)


async def test_a_synchronous_run_cancelled_while_it_waits_is_refused_and_never_runs(engine, session):
    blocker = asyncio.create_task(engine.run(session, {"code": "import time; time.sleep(1.5)"}))
    await asyncio.sleep(0.3)
    waiting = asyncio.create_task(engine.run(session, {"code": "open('ran.txt', 'w').write('ran')"},
                                             run_id="waiting-1"))
    await wait_status(engine, session, "waiting-1", {"queued"})
    cancelled = await engine.cancel_run(session, "waiting-1")
    assert cancelled["status"] == "queued", "marked; it ends when its turn comes"
    with pytest.raises(Conflict, match="cancelled by request"):
        await waiting
    assert (await blocker)["exit_code"] == 0
    record = await engine.get_run(session, "waiting-1")
    assert (record["status"], record["reason"]) == ("cancelled", "cancelled by request")
    assert "ran.txt" not in [f["path"] for f in await engine.list_files(session)]


async def test_a_background_run_cancelled_while_queued_leaves_a_cancelled_record(engine, session):
    first = await engine.run(session, {"code": "import time; time.sleep(1)", "background": True})
    second = await engine.run(session, {"code": "print('never')", "background": True})
    assert second["position"] == 1
    record = await engine.cancel_run(session, second["run_id"])
    assert (record["status"], record["reason"]) == ("cancelled", "cancelled by request")
    assert (await wait_status(engine, session, first["run_id"], {"completed"}))["exit_code"] == 0
    history = [(r["run_id"], r["status"]) for r in await engine.runs(session)]
    assert (second["run_id"], "cancelled") in history
