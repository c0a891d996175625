"""Schedules on a real engine with real kernels: firings are background runs in the
history, one per slot even with two schedulers on one store, a restart catches up once,
and a firing that cannot run is skipped and noted, never queued up.

Slots come every second or two (a six-field cron, seconds first), so the tests run on
the real clock; nothing is faked.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone

import pytest

from era_kernel.cron import parse_time
from era_kernel.engine import SessionManager
from era_kernel.engine.schedules import Scheduler
from era_kernel.errors import BadRequest, NotFound
from era_kernel.store.base import store_for_url


async def scheduled_runs(engine: SessionManager, sid: str, at_least: int, timeout: float = 30.0) -> list[dict]:
    """The session's finished runs fired by a schedule, once there are ``at_least``."""
    deadline = time.monotonic() + timeout
    while True:
        runs = [r for r in await engine.runs(sid, limit=1000) if r.get("source") == "schedule"]
        if len(runs) >= at_least:
            return runs
        assert time.monotonic() < deadline, f"{len(runs)} scheduled runs after {timeout}s; wanted {at_least}"
        await asyncio.sleep(0.1)


async def until(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := await predicate()):
        assert time.monotonic() < deadline, f"no {what} after {timeout}s"
        await asyncio.sleep(0.1)
    return value


async def test_a_schedule_fires_background_runs_into_the_history(engine, session):
    doc = await engine.create_schedule(session, {"cron": "*/2 * * * * *", "code": "print('tick')"})
    assert doc["id"].startswith("sch_") and doc["session_id"] == session
    assert doc["cron"] == "*/2 * * * * *" and doc["timezone"] == "UTC" and doc["code"] == "print('tick')"
    assert doc["last_slot"] is None and doc["last_run_id"] is None and doc["last_skipped"] is None
    next_run = parse_time(doc["next_run_at"])
    assert datetime.now(timezone.utc) < next_run and next_run.second % 2 == 0 and next_run.microsecond == 0
    without_next = lambda d: {k: v for k, v in d.items() if k != "next_run_at"}  # noqa: E731  (it moves on)
    assert [without_next(d) for d in await engine.list_schedules(session)] == [without_next(doc)]
    runs = await scheduled_runs(engine, session, 2)
    slots = [r["slot"] for r in runs]
    assert len(set(slots)) == len(slots) and slots == sorted(slots), "one run per slot, in slot order"
    for r in runs:
        assert r["schedule_id"] == doc["id"] and r["background"] is True and r["status"] == "completed"
        assert r["stdout"] == "tick\n" and parse_time(r["slot"]).second % 2 == 0
        assert parse_time(r["submitted_at"]) >= parse_time(r["slot"]), "never before its slot"
    listed = await engine.get_schedule(session, doc["id"])
    assert listed["last_slot"] >= runs[-1]["slot"] and listed["last_run_id"]
    await engine.delete_schedule(session, doc["id"])
    assert await engine.list_schedules(session) == []
    await asyncio.sleep(0.5)  # a firing submitted just before the delete finishes
    settled = len(await scheduled_runs(engine, session, 0))
    await asyncio.sleep(3)
    assert len(await scheduled_runs(engine, session, 0)) == settled, "a deleted schedule fires no more"
    with pytest.raises(NotFound):
        await engine.delete_schedule(session, doc["id"])


async def test_without_code_a_firing_runs_the_stored_program(engine, session):
    with pytest.raises(BadRequest) as info:
        await engine.create_schedule(session, {"cron": "* * * * *"})
    assert info.value.field == "code", "neither code nor a stored program"
    await engine.set_code(session, "print('stored program')")
    doc = await engine.create_schedule(session, {"cron": "* * * * * *", "timezone": "Europe/Paris"})
    assert doc["code"] is None and doc["timezone"] == "Europe/Paris"
    (run, *_) = await scheduled_runs(engine, session, 1)
    assert run["stdout"] == "stored program\n" and run["code"] == "print('stored program')"


@pytest.mark.parametrize("body, field", [
    ({"cron": "61 * * * *"}, "cron"), ({"cron": "* * *"}, "cron"), ({"cron": "0 0 30 2 *"}, "cron"),
    ({"cron": "* * * * * * *"}, "cron"), ({"cron": "@sometimes"}, "cron"), ({"cron": 5}, "cron"), ({}, "cron"),
    ({"cron": "* * * * *", "timezone": "Mars/Olympus"}, "timezone"),
    ({"cron": "* * * * *", "timezone": "../../etc/passwd"}, "timezone"), ({"cron": "* * * * *", "code": 1}, "code"),
])
async def test_invalid_schedules_are_refused_naming_the_field(engine, session, body, field):
    with pytest.raises(BadRequest) as info:
        await engine.create_schedule(session, {"code": "1", **body})
    assert info.value.field == field, info.value.message
    assert await engine.list_schedules(session) == []


async def test_unknown_session_or_schedule_is_not_found(engine, session):
    for call in (engine.create_schedule("absent", {"cron": "* * * * *", "code": "1"}),
                 engine.list_schedules("absent"), engine.get_schedule(session, "sch_absent"),
                 engine.delete_schedule(session, "sch_absent")):
        with pytest.raises(NotFound):
            await call
    doc = await engine.create_schedule(session, {"cron": "0 0 1 1 *", "code": "1"})
    other = (await engine.create({}))["id"]
    with pytest.raises(NotFound):  # a schedule is found through its own session only
        await engine.delete_schedule(other, doc["id"])
    assert [s["id"] for s in await engine.list_schedules(session)] == [doc["id"]]


async def test_two_schedulers_on_one_store_fire_each_slot_once(engine, session):
    """A second scheduler on its own store object over the same database (as a second
    server would be) races the engine's for every slot; the store's claim decides."""
    store = store_for_url(engine.settings["ERA_STORE_URL"])
    await store.open()
    second = Scheduler(engine.settings, store, engine.run)
    second.start()
    try:
        doc = await engine.create_schedule(session, {"cron": "* * * * * *", "code": "print('once')"})
        second.changed()  # as its rescan would, sooner
        runs = await scheduled_runs(engine, session, 4)
        await engine.delete_schedule(session, doc["id"])
    finally:
        await second.stop()
        await store.close()
    await asyncio.sleep(1)
    runs = await scheduled_runs(engine, session, 0)
    slots = [r["slot"] for r in runs]
    assert len(slots) == len(set(slots)) >= 4, slots
    first = engine.scheduler.counts
    assert first["fired"] + second.counts["fired"] == len(runs)
    assert first["lost"] + second.counts["lost"] >= 1, "the two did race for slots"


async def test_a_firing_while_the_previous_run_runs_is_skipped_not_queued(engine, session):
    doc = await engine.create_schedule(session, {"cron": "* * * * * *", "code": "import time; time.sleep(3)"})
    skipped = await until(lambda: _skipped(engine, session, doc["id"]), what="skipped firing")
    assert "still queued or running" in skipped["reason"]
    await engine.delete_schedule(session, doc["id"])
    runs = await scheduled_runs(engine, session, 1)
    await engine.settle()
    assert len(runs) == 1, "one run at a time, never a queue of firings"


async def test_a_full_run_queue_skips_the_firing_and_notes_it(era_settings):
    engine = SessionManager(era_settings.replace(run_queue_max=1))
    await engine.start()
    try:
        sid = (await engine.create({}))["id"]
        running = await engine.run(sid, {"code": "import time; time.sleep(30)", "background": True})
        await until(lambda: _status(engine, sid, running["run_id"], "running"), what="a running run")
        queued = await engine.run(sid, {"code": "1", "background": True})
        assert queued["position"] >= 1
        doc = await engine.create_schedule(sid, {"cron": "* * * * * *", "code": "print('never')"})
        skipped = await until(lambda: _skipped(engine, sid, doc["id"]), what="skipped firing")
        assert "run queue is full" in skipped["reason"] and "ERA_RUN_QUEUE_MAX" in skipped["reason"]
        await engine.delete_schedule(sid, doc["id"])
        for answer in (queued, running):
            await engine.cancel_run(sid, answer["run_id"])
    finally:
        await engine.shutdown()


async def test_deleting_the_session_deletes_its_schedules_and_the_scheduler_notices(engine):
    sid = (await engine.create({}))["id"]
    doc = await engine.create_schedule(sid, {"cron": "* * * * * *", "code": "1"})
    await until(lambda: _has_due(engine, doc["id"]), what="planned slot")
    await engine.delete(sid)
    await until(lambda: _has_due(engine, doc["id"], False), timeout=5, what="forgotten schedule")
    assert await engine.store.list_schedules() == []


# ---- restarts ---------------------------------------------------------------------------------
YEARLY = {"cron": "0 0 1 1 *", "code": "print('caught up')"}  # at most one slot passes during a test


async def schedule_missed_for_years(era_settings) -> tuple[str, str]:
    """A session with a yearly schedule that last fired in 2020 and was created before:
    as a server down for years would find it. (session id, schedule id)"""
    engine = SessionManager(era_settings)
    await engine.start()
    try:
        sid = (await engine.create({}))["id"]
        doc = await engine.create_schedule(sid, YEARLY)
        stored = (await engine.store.list_schedules(sid))[0]
        await engine.store.put_schedule(dict(stored, created_at="2019-06-01T00:00:00.000Z"))
        assert await engine.store.claim_firing(doc["id"], "2020-01-01T00:00:00.000Z", None)
    finally:
        await engine.shutdown()
    return sid, doc["id"]


async def test_a_restart_fires_the_latest_missed_slot_once(era_settings):
    sid, schedule_id = await schedule_missed_for_years(era_settings)
    latest = f"{datetime.now(timezone.utc).year}-01-01T00:00:00.000Z"
    for restart in range(2):  # the second start finds that slot fired: nothing more
        engine = SessionManager(era_settings)
        await engine.start()
        try:
            runs = await scheduled_runs(engine, sid, 1)
            await asyncio.sleep(2)
            runs = await scheduled_runs(engine, sid, 1)
            assert [r["slot"] for r in runs] == [latest], "once, for the latest slot, not once per missed year"
            assert runs[0]["stdout"] == "caught up\n" and runs[0]["schedule_id"] == schedule_id
            assert (await engine.get_schedule(sid, schedule_id))["last_slot"] == latest
        finally:
            await engine.shutdown()


async def test_without_catch_up_the_missed_slot_is_skipped_and_noted(era_settings):
    sid, schedule_id = await schedule_missed_for_years(era_settings)
    engine = SessionManager(era_settings.replace(schedule_catch_up=False))
    await engine.start()
    try:
        skipped = await until(lambda: _skipped(engine, sid, schedule_id), timeout=10, what="skipped firing")
        assert skipped["slot"] == f"{datetime.now(timezone.utc).year}-01-01T00:00:00.000Z"
        assert "ERA_SCHEDULE_CATCH_UP" in skipped["reason"]
        await asyncio.sleep(1)
        assert await engine.runs(sid) == []
    finally:
        await engine.shutdown()


async def _skipped(engine: SessionManager, sid: str, schedule_id: str) -> dict | None:
    return (await engine.get_schedule(sid, schedule_id))["last_skipped"]


async def _status(engine: SessionManager, sid: str, run_id: str, status: str) -> bool:
    return (await engine.get_run(sid, run_id))["status"] == status


async def _has_due(engine: SessionManager, schedule_id: str, present: bool = True) -> bool:
    return (schedule_id in engine.scheduler._due) == present


async def test_a_background_run_that_cannot_start_ends_failed_not_queued(engine, session):
    """A firing's run is a background run; one that fails before it runs (here: no code
    and no stored program) must not stay ``queued``: the schedule would wait on it for
    good, and every restart would run it again."""
    answer = await engine.run(session, {"background": True})
    record = await until(lambda: _finished(engine, session, answer["run_id"]), timeout=10, what="finished record")
    assert record["status"] == "failed" and "code" in record["reason"]
    assert answer["run_id"] not in {r["run_id"] for r in await engine.store.unfinished_runs()}


async def _finished(engine: SessionManager, sid: str, run_id: str) -> dict | None:
    record = await engine.store.get_run(sid, run_id)  # as a restart would read it
    return record if record["status"] not in ("queued", "running") else None
