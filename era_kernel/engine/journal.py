"""The journal: every event a session's subscribers see, numbered per session and kept in
the store, so a client that lost its connection (or a server restart) loses nothing it
can ask for again.

``record`` gives an event its ``seq`` (per session, only growing, resumed from the store
after a restart) and queues it; a batch goes to the store every ``FLUSH_SECONDS`` or
``BATCH`` events, in one transaction (group commit), never one transaction per event.
What a SIGKILL can lose is the batch not yet written: at most ``FLUSH_SECONDS`` of events
(the store applies calls in order, so a read sees every batch written before it).
Readers (``read``) get the committed events after an offset, and can wait for more.

A run's journal is bounded like its output: past ``limit`` bytes of a run's output
events (about its output cap plus per-event overhead), further output events still
reach live subscribers but are not numbered or kept; its ``done`` and status events always are.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..store.base import MetadataStore

log = logging.getLogger("era.journal")

FLUSH_SECONDS = 0.02
BATCH = 512
EVENT_OVERHEAD = 64  # bytes counted per event beyond its content: many tiny prints add up
BOUNDED = frozenset({"stdout", "stderr", "display", "error", "setup", "process_stdout", "process_stderr"})


class RunJournal:
    def __init__(self, store: MetadataStore, limit: int, enabled: bool = True) -> None:
        self.store = store
        self.enabled = enabled  # off (ERA_RUN_JOURNAL) only to measure the journal's cost
        self.limit = limit  # bytes of output events kept per run
        self._run_bytes: dict[str, int] = {}  # run id -> bytes of its output events kept
        self._seq: dict[str, int] = {}  # session id -> last seq given
        self._pending: dict[str, list[dict[str, Any]]] = {}
        self._changed: dict[str, asyncio.Event] = {}  # readers waiting for more
        self._timer: asyncio.TimerHandle | None = None
        self._writes: set[asyncio.Future] = set()

    async def ready(self, session_id: str) -> None:
        """Called before a session's first event in this process: its counter resumes
        after the highest seq in the store."""
        if session_id not in self._seq:
            last = await self.store.last_event_seq(session_id)
            self._seq.setdefault(session_id, last)

    def record(self, session_id: str, event: dict[str, Any]) -> dict[str, Any]:
        """The event with its ``seq``, queued for the store. Synchronous: called for
        every event on its way to subscribers. A session whose counter was never loaded
        (``ready``) gets its events delivered without a seq and not journaled."""
        last = self._seq.get(session_id)
        if last is None or not self.enabled:
            return event
        run_id = event.get("run_id")
        if run_id is not None:
            if event.get("type") in BOUNDED:
                kept = self._run_bytes.get(run_id, 0)
                if kept >= self.limit:
                    return event  # past the run's bound: live only
                self._run_bytes[run_id] = kept + EVENT_OVERHEAD + _size(event)
            elif event.get("type") in ("done", "process_exit"):  # a run's, or a background process's end
                self._run_bytes.pop(run_id, None)
        numbered = dict(event, seq=last + 1)
        self._seq[session_id] = last + 1
        pending = self._pending.setdefault(session_id, [])
        pending.append(numbered)
        if len(pending) >= BATCH:
            self._write(session_id)
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)
        changed = self._changed.get(session_id)
        if changed is not None:
            changed.set()
        return numbered

    def last_seq(self, session_id: str) -> int | None:
        return self._seq.get(session_id)

    def flush(self, session_id: str | None = None) -> None:
        """Queue what is pending (one session's, or all) for the store; a read or a run
        record written after this sees it."""
        if session_id is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            for sid in list(self._pending):
                self._write(sid)
        else:
            self._write(session_id)

    def _write(self, session_id: str) -> None:
        batch = self._pending.pop(session_id, None)
        if not batch:
            return
        written = asyncio.ensure_future(self.store.append_events(session_id, batch))
        self._writes.add(written)
        written.add_done_callback(self._written)

    def _written(self, future: asyncio.Future) -> None:
        self._writes.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.error("journal events were not written: %s", future.exception())

    async def read(self, session_id: str, after: int = 0, *, run_id: str | None = None, limit: int = 1000,
                   wait: float = 0.0) -> list[dict[str, Any]]:
        """Journal events after ``after``, oldest first (one run's when ``run_id``); with
        ``wait``, when there are none yet, wait up to that many seconds for some."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, wait)
        while True:
            changed = self._changed.setdefault(session_id, asyncio.Event())
            changed.clear()
            self.flush(session_id)
            events = await self.store.read_events(session_id, after, limit, run_id)
            remaining = deadline - loop.time()
            if events or remaining <= 0:
                return events
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                pass

    async def settle(self) -> None:
        """Everything recorded so far is in the store (shutdown, tests)."""
        self.flush()
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    def forget(self, session_id: str) -> None:
        """The session is gone (its journal rows with it)."""
        self._seq.pop(session_id, None)
        self._pending.pop(session_id, None)
        changed = self._changed.pop(session_id, None)
        if changed is not None:
            changed.set()  # waiting readers return (and find nothing)


def _size(event: dict[str, Any]) -> int:
    content = event.get("content")
    if isinstance(content, str):
        return len(content)
    return sum(len(str(v)) for k, v in event.items() if k not in ("type", "run_id"))
