"""Schedules: a session's code run as a background run at each slot of a cron expression.

``Scheduler`` keeps each schedule's next slot (croniter, in the schedule's time zone,
``era_kernel/cron.py``) and one task that sleeps until the earliest of them: never a
poll per second, woken early when this engine changes the schedules, and at least every
``ERA_SCHEDULE_RESCAN`` seconds to read the store again (another server on the same
store may have made or deleted some). At a slot it claims the firing in the store, then
submits a background run through the engine's run path (``source: "schedule"``; the run
record keeps ``schedule_id`` and ``slot``), so a firing is a run like any other: in the
history, cancellable, requeued by a restart. The claim is the store's unique row per
(schedule, slot): two servers on one store fire each slot once, and neither holds a lock.

A firing never piles up: at start, a schedule whose latest slot passed while no server
was running fires once for that slot (``ERA_SCHEDULE_CATCH_UP``), never once per missed
slot; a scheduler woken late fires the slot it missed and moves on to the next one after
now. A firing that cannot run is skipped, logged and noted on the schedule
(``last_skipped``), never retried: its previous run still queued or running (a program
slower than its schedule runs back to back, not in a growing queue), the session's run
queue full, or its session gone.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable

from ..cron import next_slot, parse_time, previous_slot, slot_text
from ..errors import Busy, EraError, NotFound
from .results import new_run_id, utc_now
from .tickets import QUEUED, RUNNING

if TYPE_CHECKING:
    from .. import models
    from ..config import Settings
    from ..store.base import MetadataStore

log = logging.getLogger("era.schedules")

# The engine's run path: SessionManager.run(session_id, body, run_id=..., source=..., extra=...).
Submit = Callable[..., Awaitable[dict[str, Any]]]
ERROR_PAUSE = 5.0  # seconds before trying again after a pass failed (the store closing, say)


def new_schedule_id() -> str:
    """``sch_<ms>_<8 hex>``, in the shape of session and run ids."""
    return f"sch_{int(time.time() * 1000)}_{secrets.token_hex(4)}"


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Scheduler:
    def __init__(self, settings: "Settings", store: "MetadataStore", submit: Submit) -> None:
        self.settings = settings
        self.store = store
        self._submit = submit
        # Whether this replica serves a session (engine/ownership.py); None: one server, always.
        self.serves: Callable[[str], Awaitable[bool]] | None = None
        self._due: dict[str, datetime] = {}  # schedule id -> its next slot (UTC)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.counts = {"fired": 0, "skipped": 0, "lost": 0}  # lost: another scheduler claimed the slot first

    # ---- schedules, as the engine answers them ----------------------------------------------
    async def create(self, session_id: str, req: "models.ScheduleRequest") -> dict[str, Any]:
        """Store a validated schedule of an existing session; its document."""
        doc = {"id": new_schedule_id(), "session_id": session_id, "cron": req.cron, "timezone": req.timezone,
               "code": req.code, "created_at": utc_now(), "last_skipped": None}
        if not await self.store.put_schedule(doc):
            raise NotFound(f"session {session_id} not found")
        self.changed()
        return (await self.documents([dict(doc, last_slot=None, last_run_id=None)]))[0]

    async def list(self, session_id: str) -> list[dict[str, Any]]:
        return await self.documents(await self.store.list_schedules(session_id))

    async def get(self, session_id: str, schedule_id: str) -> dict[str, Any]:
        found = [d for d in await self.store.list_schedules(session_id) if d["id"] == schedule_id]
        if not found:
            raise NotFound(f"schedule {schedule_id[:128]} not found in session {session_id}")
        return (await self.documents(found))[0]

    async def delete(self, session_id: str, schedule_id: str) -> None:
        if not await self.store.delete_schedule(session_id, schedule_id):
            raise NotFound(f"schedule {schedule_id[:128]} not found in session {session_id}")
        self.changed()

    async def documents(self, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Store documents with ``next_run_at``, the next slot from now."""
        now = _utc_now()
        slots = await _next_slots(docs, now)
        return [dict(doc, next_run_at=slot_text(slots[doc["id"]])) for doc in docs]

    # ---- the task ---------------------------------------------------------------------------
    def start(self) -> None:
        """Called by the engine's start (a serving one, after runs of a previous process
        were recovered): the first pass catches up, then firings as they come."""
        self._task = asyncio.create_task(self._loop(), name="era-scheduler")

    async def stop(self) -> None:
        """Called first by the engine's shutdown: nothing fires while it stops."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def changed(self) -> None:
        """The schedules changed (one made or deleted, a session deleted): read them again now."""
        self._wake.set()

    async def _loop(self) -> None:
        catch_up = True
        while True:
            self._wake.clear()  # before the pass: a change during it wakes the next one at once
            try:
                await self._pass(catch_up)
                catch_up = False
                wait = self._sleep_seconds()
            except Exception:
                log.exception("scheduler pass failed")
                wait = ERROR_PAUSE
            # asyncio.timeout, not wait_for: on Python 3.11, wait_for swallows a cancel that
            # arrives as the event is set (a session deleted just before shutdown), and
            # stop() would wait for a task that never ends.
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _sleep_seconds(self) -> float:
        """Until the earliest slot, at most ERA_SCHEDULE_RESCAN (schedules of other servers,
        and a wall clock that was set while we slept)."""
        wait = self.settings["ERA_SCHEDULE_RESCAN"]
        if self._due:
            wait = min(wait, (min(self._due.values()) - _utc_now()).total_seconds())
        return max(0.0, wait)

    async def _pass(self, catch_up: bool) -> None:
        """Read the schedules; catch up (first pass) and fire what is due; plan the next slots."""
        schedules = {doc["id"]: doc for doc in await self.store.list_schedules()}
        for gone in self._due.keys() - schedules.keys():  # deleted, or its session was
            del self._due[gone]
        now = _utc_now()
        new = [doc for sid, doc in schedules.items() if sid not in self._due]
        due = [(schedules[sid], slot) for sid, slot in self._due.items() if slot <= now]
        if catch_up and new:
            missed = await asyncio.to_thread(lambda: {d["id"]: previous_slot(d["cron"], d["timezone"], now)
                                                      for d in new})
            for doc in new:
                await self._catch_up(doc, missed[doc["id"]])
        # The next slot after now, not after the one fired: a scheduler woken late fires
        # the slot it missed once, then goes on from the present.
        self._due.update(await _next_slots([*new, *(doc for doc, _ in due)], now))
        for doc, slot in due:
            await self._fire(doc, slot)

    async def _catch_up(self, doc: dict[str, Any], latest: datetime) -> None:
        """At start: fire the latest slot once if it passed after the schedule's last
        firing (or skip, or creation), so a server that was down never fires a backlog."""
        skipped = doc.get("last_skipped") or {}
        handled = max(parse_time(t) for t in (doc["created_at"], doc.get("last_slot"), skipped.get("slot")) if t)
        if latest <= handled:
            return
        if self.settings["ERA_SCHEDULE_CATCH_UP"]:
            log.info("schedule %s: slot %s passed while no server was running; firing it once",
                     doc["id"], slot_text(latest))
            await self._fire(doc, latest)
        else:
            await self._skip(doc, slot_text(latest), "missed while no server was running (ERA_SCHEDULE_CATCH_UP "
                             "is off)", logging.INFO)

    async def _fire(self, doc: dict[str, Any], slot: datetime) -> None:
        sid, schedule_id, slot_s = doc["session_id"], doc["id"], slot_text(slot)
        if self.serves is not None and not await self.serves(sid):
            self.counts["lost"] += 1  # another replica serves the session: its scheduler fires it
            return
        # The slot is claimed either way, so one server decides about it: for a new run, or,
        # while the previous firing's run is still queued or running, for that run (the
        # slot is skipped, and the next firing asks about the same run again).
        previous = await self._unfinished_previous(doc)
        run_id = previous or new_run_id()
        if not await self.store.claim_firing(schedule_id, slot_s, run_id):
            self.counts["lost"] += 1  # another server claimed it, or the schedule was just deleted
            return
        if previous is not None:
            # As designed, not a fault: INFO (a program slower than its schedule skips every slot).
            await self._skip(doc, slot_s, f"its previous run {previous} is still queued or running", logging.INFO)
            return
        body: dict[str, Any] = {"background": True}
        if doc.get("code") is not None:
            body["code"] = doc["code"]  # else the session's stored program, read when the run starts
        try:
            await self._submit(sid, body, run_id=run_id, source="schedule",
                               extra={"schedule_id": schedule_id, "slot": slot_s})
        except NotFound:
            log.info("schedule %s: its session %s is gone", schedule_id, sid)
            self.changed()
        except Busy as exc:
            await self._skip(doc, slot_s, f"the session's run queue is full: {exc.message}")
        except EraError as exc:
            await self._skip(doc, slot_s, exc.message)
        else:
            self.counts["fired"] += 1
            log.info("schedule %s fired slot %s: run %s", schedule_id, slot_s, run_id,
                     extra={"event": "schedule", "session_id": sid, "schedule_id": schedule_id, "slot": slot_s,
                            "run_id": run_id})

    async def _unfinished_previous(self, doc: dict[str, Any]) -> str | None:
        """The run of the schedule's latest firing, when it is still queued or running."""
        run_id = doc.get("last_run_id")
        if not run_id:
            return None
        run = await self.store.get_run(doc["session_id"], run_id)
        return run_id if run is not None and run.get("status") in (QUEUED, RUNNING) else None

    async def _skip(self, doc: dict[str, Any], slot_s: str, reason: str, level: int = logging.WARNING) -> None:
        self.counts["skipped"] += 1
        log.log(level, "schedule %s: slot %s skipped: %s", doc["id"], slot_s, reason,
                extra={"event": "schedule", "session_id": doc["session_id"], "schedule_id": doc["id"],
                       "slot": slot_s, "skipped": reason})
        # None when the schedule was deleted meanwhile: nothing to note it on
        await self.store.update_schedule(doc["id"], {"last_skipped": {"slot": slot_s, "reason": reason,
                                                                       "at": utc_now()}})


async def _next_slots(docs: Iterable[dict[str, Any]], now: datetime) -> dict[str, datetime]:
    """Schedule id -> its first slot after ``now``. croniter is pure Python at about half
    a millisecond a slot: more than a few are computed off the event loop."""
    docs = list(docs)

    def compute() -> dict[str, datetime]:
        return {d["id"]: next_slot(d["cron"], d["timezone"], now) for d in docs}

    return compute() if len(docs) <= 2 else await asyncio.to_thread(compute)
