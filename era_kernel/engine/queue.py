"""Submitting runs: each session's runs wait in one FIFO queue, recorded in the store, so a
run is an addressable object from the moment it is submitted, and a restart neither
loses a queued run nor runs anything twice.

A synchronous run (REST, SSE, WebSocket) is submitted and awaited; a background run
answers at once with its id and position and is run by a task of its own. A client that
goes away never cancels a run: ``cancel`` does, explicitly (a queued run is dropped, a
running one interrupted). At start (``recover``), a run the previous process was running
is recorded ``interrupted`` ("server restarted") and the queued ones are submitted again,
in their order, on a fresh kernel.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from .. import models
from ..errors import Busy, Conflict, EraError, NotFound
from ..kernel import EventSink, InputHandler
from .results import new_run_id
from .tickets import CANCELLED, FAILED, FINISHED, INTERRUPTED, QUEUED, RUNNING, RunTicket

# A cancel's interrupt is sent again this many times, this far apart, while the run still
# runs: ipykernel ignores SIGINT until it has entered the cell, so one that lands between
# the engine sending the run and the kernel starting it is lost.
REINTERRUPTS, REINTERRUPT_EVERY_S = 6, 0.5

if TYPE_CHECKING:
    from ..config import Settings
    from ..store.base import MetadataStore
    from .kernels import KernelTable
    from .records import SessionRecord
    from .runner import SessionRunner

log = logging.getLogger("era.queue")

Loader = Callable[[], Awaitable["SessionRecord"]]
# Told about every run that ends (callbacks, schedules): (ticket, its final result).
Finished = Callable[[RunTicket, dict[str, Any]], None]


class RunQueue:
    def __init__(self, settings: "Settings", store: "MetadataStore", table: "KernelTable",
                 runner: "SessionRunner") -> None:
        self.settings = settings
        self.store = store
        self.table = table
        self.runner = runner
        self._waiting: dict[str, list[RunTicket]] = {}  # session id -> queued runs, in order
        self._running: dict[str, RunTicket] = {}
        self._tasks: set[asyncio.Task] = set()  # background runs
        self._reinterrupts: set[asyncio.Task] = set()  # cancels sending their interrupt again
        self.on_finished: list[Finished] = []

    # ---- submitting --------------------------------------------------------------------
    async def submit(self, session_id: str, body: Any, load: Loader, *, source: str = "rest",
                     on_event: EventSink | None = None, on_input: InputHandler | None = None,
                     run_id: str | None = None, fresh_id: bool = False,
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run the session's code; the result once it ran (synchronous), or at once
        ``{run_id, status, position}`` when the body asks for ``background``. A given
        ``run_id`` (a client's) is checked unused unless ``fresh_id`` says the server just
        made it."""
        req = models.parse(models.RunRequest, body)
        if run_id is not None and not fresh_id and (self.live(session_id, run_id)
                                                    or await self.store.get_run(session_id, run_id)):
            # A run id names one run for good (GET .../runs/{run_id}): a client's own id
            # (the WebSocket's "id") may not be given twice in a session.
            raise Conflict(f"run id {run_id} is already used in this session; send a new one", field="id")
        if req.background:
            await load()  # 404 before anything is recorded (a synchronous run loads under its lock)
        ticket = RunTicket(run_id or new_run_id(), session_id, req, source=source, background=req.background,
                           extra=dict(extra or {}))
        if req.callback_url is not None:  # kept on the record: callbacks.py posts there once the run ends
            ticket.extra["callback_url"] = req.callback_url
        if not req.background:
            return await self._run(ticket, load, on_event, on_input)
        limit = self.settings["ERA_RUN_QUEUE_MAX"]
        if len(self._waiting.get(session_id, ())) >= limit:
            raise Busy(f"{limit} runs are already queued on this session (ERA_RUN_QUEUE_MAX); retry later",
                       retry_after=5)
        ticket.source = source if source != "rest" else "background"
        self.start_background(ticket, load)
        return {"run_id": ticket.run_id, "status": ticket.status, "position": self.position(ticket)}

    def start_background(self, ticket: RunTicket, load: Loader) -> None:
        """Run the ticket in a task of its own (a background run, or one resumed at start)."""
        ticket.background = True
        self._enqueue(ticket)
        task = asyncio.create_task(self._run(ticket, load, None, None), name=f"era-run-{ticket.run_id}")
        ticket.task = task
        self._tasks.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background run failed: %s", task.exception())

    def _enqueue(self, ticket: RunTicket) -> None:
        waiting = self._waiting.setdefault(ticket.session_id, [])
        if ticket not in waiting:
            waiting.append(ticket)
            self.runner.in_background(ticket.queued(self.store))

    async def _run(self, ticket: RunTicket, load: Loader, on_event: EventSink | None,
                   on_input: InputHandler | None) -> dict[str, Any]:
        sid = ticket.session_id
        lock = self.table.run_lock(sid)
        if lock.locked() and not ticket.background:
            self._enqueue(ticket)  # it waits: a queued record, so a restart still runs it
        try:
            await lock.acquire()
        except asyncio.CancelledError:
            self._dequeue(ticket)
            if ticket.cancel_requested:
                await ticket.ended_early(self.store, CANCELLED, "cancelled by request")
                self._finished(ticket, {})  # it ended too, without a result
            raise
        try:
            self._dequeue(ticket)
            if ticket.cancel_requested:  # cancelled while it waited (a synchronous one has no task to cancel)
                await ticket.ended_early(self.store, CANCELLED, "cancelled by request")
                self._finished(ticket, {})
                if ticket.background:
                    raise asyncio.CancelledError
                raise Conflict(f"run {ticket.run_id} was cancelled by request before it started")
            self._running[sid] = ticket
            try:
                result = await self.runner.run_locked(ticket, load, on_event, on_input)
            except asyncio.CancelledError:
                # Cancelled by request while it waited for its kernel or setup (a shutdown
                # leaves it queued in the store: the next start runs it).
                if ticket.status == QUEUED and ticket.recorded and ticket.cancel_requested:
                    await ticket.ended_early(self.store, CANCELLED, "cancelled by request")
                    self._finished(ticket, {})
                raise
            except Exception as err:
                # Refused before it ran (no code, the kernel or setup failed): a queued
                # record must not stay queued (a restart would run it again). A
                # synchronous run that never waited has no record; its caller has the error.
                if ticket.status == QUEUED and ticket.recorded:
                    await ticket.ended_early(self.store, FAILED, _failure(err))
                    self._finished(ticket, {})
                raise
        finally:
            if self._running.get(sid) is ticket:
                del self._running[sid]
            lock.release()
        self._finished(ticket, result)
        return result

    def _finished(self, ticket: RunTicket, result: dict[str, Any]) -> None:
        """Tell ``on_finished`` of a run that ended: ``result`` is empty for one that never
        ran (cancelled while queued, cut off by a restart)."""
        for callback in self.on_finished:
            try:
                callback(ticket, result)
            except Exception:
                log.exception("a run-finished callback failed")

    def _dequeue(self, ticket: RunTicket) -> None:
        waiting = self._waiting.get(ticket.session_id)
        if waiting and ticket in waiting:
            waiting.remove(ticket)
            if not waiting:
                del self._waiting[ticket.session_id]

    # ---- looking and cancelling -----------------------------------------------------------
    def position(self, ticket: RunTicket) -> int:
        """0: running (or about to); n: n runs go before it."""
        waiting = self._waiting.get(ticket.session_id, [])
        ahead = waiting.index(ticket) if ticket in waiting else 0
        return ahead + (1 if ticket.session_id in self._running or self.table.in_use(ticket.session_id) else 0)

    def live(self, session_id: str, run_id: str) -> RunTicket | None:
        running = self._running.get(session_id)
        if running is not None and running.run_id == run_id:
            return running
        return next((t for t in self._waiting.get(session_id, ()) if t.run_id == run_id), None)

    async def get(self, session_id: str, run_id: str) -> dict[str, Any]:
        """The run's record: its status, position while queued, and its result once done."""
        record = await self.store.get_run(session_id, run_id)
        if record is None:
            raise NotFound(f"run {run_id[:128]} not found in session {session_id}")
        ticket = self.live(session_id, run_id)
        if ticket is not None and record.get("status") not in FINISHED:
            # The ticket is ahead of its record (a write in flight): its word wins.
            record["status"], record["reason"] = ticket.status, ticket.reason
            if ticket.status in (QUEUED, RUNNING):
                record["position"] = self.position(ticket)
        return record

    async def cancel(self, session_id: str, run_id: str) -> dict[str, Any]:
        """Drop a queued run; interrupt a running one (it ends ``interrupted``, reason
        "cancelled by request"). A finished run is left as it is."""
        ticket = self.live(session_id, run_id)
        if ticket is None:
            return await self.get(session_id, run_id)  # 404, or finished already
        ticket.cancel_requested = True
        if ticket.status == RUNNING and ticket.kernel is not None:
            await ticket.kernel.interrupt()
            self._interrupt_again(ticket)
        elif ticket.task is not None:  # a queued background run
            ticket.task.cancel()
            await asyncio.gather(ticket.task, return_exceptions=True)
        return await self.get(session_id, run_id)

    async def interrupt(self, session_id: str) -> None:
        """``POST .../interrupt``, Jupyter's rule: it stops the session's current run only;
        the runs queued behind it run next. A current run still waiting for its kernel's
        start (or package setup) ends ``interrupted`` without running its code, and the
        start goes on; a running one gets the kernel's interrupt. With no run of ours, a
        live kernel gets it (a Jupyter client's cell; nothing when idle), but never a
        kernel that is starting: it would break its startup cells, and the start with them."""
        ticket = self._running.get(session_id)
        if ticket is not None and ticket.status == QUEUED:  # its code is not sent yet
            ticket.interrupt()
            return
        if self.table.starting(session_id) is not None:
            return
        kernel = self.table.kernel(session_id)
        if kernel is None:
            return
        if ticket is not None and ticket.kernel is kernel:
            ticket.interrupt_requested = True  # it ends "interrupted" if the interrupt takes
        await kernel.interrupt()

    def _interrupt_again(self, ticket: RunTicket) -> None:
        kernel = ticket.kernel

        async def again() -> None:
            for _ in range(REINTERRUPTS):
                await asyncio.sleep(REINTERRUPT_EVERY_S)
                # Checked and sent with no await between: the run after this one cannot
                # have started while this ticket is still running on the same kernel.
                if ticket.status != RUNNING or ticket.kernel is not kernel:
                    return
                try:
                    await kernel.interrupt()
                except Exception:  # the kernel went away: the run ends with it
                    return

        task = asyncio.create_task(again(), name=f"era-reinterrupt-{ticket.run_id}")
        self._reinterrupts.add(task)
        task.add_done_callback(self._reinterrupts.discard)

    # ---- restarts --------------------------------------------------------------------------
    async def recover(self, load_for: Callable[[str], Loader], ready: Callable[[str], Awaitable[None]],
                      session_id: str | None = None, reason: str = "server restarted") -> dict[str, int]:
        """Called once by a starting server, before it serves: runs the previous process
        left running are ``interrupted`` (``reason``); queued ones run again, in their
        order, each noted ``kernel_state_lost``. With ``session_id``, only that session's
        (a replica taking a session over, engine/takeover.py)."""
        counts = {"interrupted": 0, "requeued": 0}
        for doc in await self.store.unfinished_runs():
            sid = doc["session_id"]
            if session_id is not None and sid != session_id:
                continue
            ticket = RunTicket(doc["run_id"], sid, models.parse(models.RunRequest, {
                "code": doc.get("code"), "timeout": doc.get("timeout"), "env": doc.get("env") or {}}),
                               source=doc.get("source", "rest"), code=doc.get("code"),
                               submitted_at=doc.get("submitted_at") or doc.get("started_at") or "",
                               started_at=doc.get("started_at"),
                               extra={k: doc[k] for k in ("callback_url", "schedule_id", "slot") if k in doc})
            if doc.get("status") == RUNNING:
                ticket.status = RUNNING
                await ticket.ended_early(self.store, INTERRUPTED, reason)
                self._finished(ticket, {})
                counts["interrupted"] += 1
            else:
                ticket.kernel_state_lost = True
                await ready(sid)  # its events are journaled like any run's
                self.start_background(ticket, load_for(sid))
                counts["requeued"] += 1
        return counts

    async def shutdown(self) -> None:
        """Stop background runs that have not started (they stay queued in the store, and
        the next start runs them); running ones end with the kernels."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def forget(self, session_id: str) -> None:
        for ticket in self._waiting.pop(session_id, []):
            if ticket.task is not None:
                ticket.task.cancel()


def _failure(err: Exception) -> str:
    return f"not started: {err.message if isinstance(err, EraError) else type(err).__name__}"[:500]


__all__ = ["RunQueue", "QUEUED", "RUNNING"]
