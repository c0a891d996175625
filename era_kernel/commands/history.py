"""What outlives a background process's server: its record and its output, kept in the store.

A background process or terminal lives in memory (``process.py``) while the server that
started it runs. So that a client can still ask what it printed and how it ended after
that server stopped or was killed (its processes went with their kernels), the service
also keeps, per session:

- its record, as two session events (``GET /api/sessions/{id}/events``):
  ``process_started`` (pid, cmd, kind, journal id) and ``process_ended`` (state, exit
  code, reason, duration);
- its output, in the run journal (``engine/journal.py``) under its own journal id
  (``process-<hex>``) in place of a run id, numbered ``n`` like the ring's ``seq``,
  group-committed and bounded per process as a run's output is.

A process that a previous server started and never saw end is reported ``killed``, with
the reason that its server stopped. Foreground commands are not kept: their answer
carries their output.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

from ..engine.results import utc_now
from .process import Process

log = logging.getLogger("era.commands")

OUTPUT_TYPES = {"stdout": "process_stdout", "stderr": "process_stderr", "exit": "process_exit"}
KEPT = 100  # records of ended processes a session lists from earlier servers
SERVER_GONE = "the server that ran it stopped, and the session's kernel and its processes with it"


class ProcessHistory:
    """``journal``: the engine's RunJournal; ``store``: its MetadataStore."""

    def __init__(self, journal: Any, store: Any) -> None:
        self.journal = journal
        self.store = store
        self._writes: set[asyncio.Future] = set()

    async def ready(self, sid: str) -> None:
        """Called before ``follow`` for a session: its journal counter is loaded."""
        await self.journal.ready(sid)

    def follow(self, sid: str, process: Process) -> None:
        """Keep ``process`` (not yet started) from its start on: its record, then every
        output event. Synchronous, so it is listening before the process can print."""
        process.journal_id = f"process-{secrets.token_hex(6)}"

        def keep(event: dict[str, Any]) -> None:
            if event.get("type") == "start":
                self._note(sid, {"type": "process_started", "at": process.started, "pid": event["pid"],
                                 "cmd": process.argv, "kind": process.kind, "journal_id": process.journal_id,
                                 "message": f"{process.kind} process {event['pid']} started: "
                                            f"{' '.join(process.argv)[:200]}"})
                return
            kind = OUTPUT_TYPES.get(event.get("type", ""))
            if kind is None:
                return
            entry = {k: v for k, v in event.items() if k not in ("type", "seq")}
            self.journal.record(sid, {**entry, "type": kind, "run_id": process.journal_id, "n": event["seq"]})
            if kind == "process_exit":
                self._note(sid, {"type": "process_ended", "at": utc_now(), "pid": process.pid,
                                 "journal_id": process.journal_id, "state": process.state,
                                 "exit_code": process.exit_code, "reason": process.reason,
                                 "duration_ms": event.get("duration_ms"),
                                 "message": f"{process.kind} process {process.pid} {process.state}"
                                            + (f" with exit code {process.exit_code}"
                                               if process.exit_code is not None else "")})

        process.listeners.append(keep)

    def _note(self, sid: str, entry: dict[str, Any]) -> None:
        written = asyncio.ensure_future(self.store.add_session_event(sid, entry))
        self._writes.add(written)
        written.add_done_callback(self._written)

    def _written(self, future: asyncio.Future) -> None:
        self._writes.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.info("a process record was not kept (its session went?): %s", future.exception())

    async def settle(self) -> None:
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    # ---- read back, for processes this server does not hold ----------------------------------
    async def earlier(self, sid: str, held: set[str]) -> list[dict[str, Any]]:
        """Documents (as ``Process.document``) of the session's kept processes whose journal
        id is not in ``held`` (those this server runs or remembers), oldest first."""
        started: dict[str, dict[str, Any]] = {}
        ended: dict[str, dict[str, Any]] = {}
        after = 0
        while True:
            page = await self.store.list_session_events(sid, after, 1000)
            for entry in page:
                jid = entry.get("journal_id")
                if jid and jid not in held:
                    if entry.get("type") == "process_started":
                        started[jid] = entry
                    elif entry.get("type") == "process_ended":
                        ended[jid] = entry
            if len(page) < 1000:
                break
            after = page[-1]["id"]
        docs = []
        for jid, start in started.items():
            end = ended.get(jid)
            docs.append({"pid": start.get("pid"), "cmd": start.get("cmd"), "kind": start.get("kind"),
                         "started": start.get("at"), "state": end["state"] if end else "killed",
                         "exit_code": end.get("exit_code") if end else None,
                         "ended": end.get("at") if end else None,
                         "reason": end.get("reason") if end else SERVER_GONE, "journal_id": jid})
        return docs[-KEPT:]

    async def restore(self, sid: str, doc: dict[str, Any]) -> Process:
        """A process from ``earlier`` as an ended ``Process``, its output read back from the
        journal, so every route that follows a process answers for it as for one of ours."""
        await self.journal.ready(sid)
        process = Process(0, list(doc.get("cmd") or []), doc.get("kind") or "background", 2**62)
        process.pid, process.started, process.journal_id = doc["pid"], doc["started"], doc["journal_id"]
        after, exit_seq = 0, None
        while True:
            batch = await self.journal.read(sid, after, run_id=doc["journal_id"], limit=1000)
            for event in batch:
                kind = event["type"].removeprefix("process_")
                if kind == "exit":
                    exit_seq = event["n"]
                else:
                    process.events.append({"type": kind, "content": event.get("content", ""), "seq": event["n"],
                                           "pid": process.pid})
                    process.seq = event["n"]
            if len(batch) < 1000:
                break
            after = batch[-1]["seq"]
        process.state, process.exit_code, process.reason = doc["state"], doc["exit_code"], doc["reason"]
        process.ended_at = doc["ended"]
        process.seq = exit_seq or process.seq + 1  # the exit it printed, or one for the end it never saw
        process.events.append({"type": "exit", "exit_code": doc["exit_code"], "state": doc["state"],
                               "reason": doc["reason"], "seq": process.seq, "pid": process.pid})
        process.started_event.set()
        process.done.set()
        return process
