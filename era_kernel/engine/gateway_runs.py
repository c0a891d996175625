"""Cells run through the Jupyter gateway as run records: an ``execute_request`` a client
sends on ``/api/kernels/{id}/channels`` is relayed to the kernel as it is (the gateway is
a raw relay), and recorded here beside it, ``source: "gateway"``, so it is in the
session's history and ``GET .../runs/{run_id}`` like any run, and its output events are
in the journal.

The kernel runs the cell; this only listens (``SessionKernel.add_listener``) to the
messages parented to the request: output, the reply, the idle status that ends it. A
kernel that goes away first (culled, died, stopped) ends its cells ``interrupted`` with
that reason; a server that stops ends them like any running run (``interrupted``,
"server restarted", at the next start).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from .. import models
from ..kernel import ExecOutcome
from ..kernel.outputs import OutputCollector
from .results import run_result
from .tickets import INTERRUPTED, RunTicket

if TYPE_CHECKING:
    from ..config import Settings
    from ..kernel import SessionKernel
    from ..languages import Language
    from ..store.base import MetadataStore
    from .events import EngineEvents
    from .journal import RunJournal

REPLY_GRACE = 5.0  # seconds a cell whose kernel went idle waits for its execute_reply
MAX_OPEN = 100  # cells one session may have recorded and not yet ended; past it, older ones are dropped unrecorded


@dataclass(eq=False)
class _Cell:
    ticket: RunTicket
    collector: OutputCollector
    language: "Language"
    started: float = field(default_factory=time.monotonic)
    status: str = "ok"
    replied: bool = False
    idle: bool = False
    remove: Callable[[], None] = lambda: None


class GatewayRuns:
    def __init__(self, settings: "Settings", store: "MetadataStore", events: "EngineEvents",
                 journal: "RunJournal") -> None:
        self.settings = settings
        self.store = store
        self.events = events
        self.journal = journal
        self._open: dict[str, dict[str, _Cell]] = {}  # session id -> request msg_id -> cell

    async def execute(self, session_id: str, kernel: "SessionKernel", language: "Language",
                      msg: dict[str, Any]) -> None:
        """Called by the gateway socket just before it relays an ``execute_request``."""
        content = msg.get("content") or {}
        code = content.get("code")
        if not isinstance(code, str) or content.get("silent") is True:
            return  # not a cell a person ran (widgets and completers send silent ones)
        await self.journal.ready(session_id)
        msg_id = msg["header"]["msg_id"]
        ticket = RunTicket(f"gw_{msg_id}"[:128], session_id, models.RunRequest(code=code), source="gateway",
                           code=code)
        cells = self._open.setdefault(session_id, {})
        while len(cells) >= MAX_OPEN:
            cells.pop(next(iter(cells))).remove()
        cell = _Cell(ticket, OutputCollector(self.settings["ERA_OUTPUT_LIMIT"]), language)
        cells[msg_id] = cell
        cell.remove = kernel.add_listener(lambda channel, reply: self._on_message(session_id, msg_id, channel, reply))
        ticket.started(self.store)
        self.events.emit(session_id, {"type": "status", "state": "busy", "run_id": ticket.run_id})

    def _on_message(self, session_id: str, msg_id: str, channel: str, msg: dict[str, Any]) -> None:
        if (msg.get("parent_header") or {}).get("msg_id") != msg_id:
            return
        cell = self._open.get(session_id, {}).get(msg_id)
        if cell is None:
            return
        msg_type, content = msg.get("msg_type") or msg["header"]["msg_type"], msg.get("content") or {}
        # The reply (shell) and the idle status (IOPub) come on different sockets, in
        # either order: the cell ends when both are in, so its status is the reply's.
        if channel == "shell" and msg_type == "execute_reply":
            cell.replied = True
            cell.status = content.get("status", "ok")
            if cell.idle:
                self._finish(session_id, msg_id, cell)
            return
        if channel != "iopub":
            return
        if msg_type == "status" and content.get("execution_state") == "idle":
            cell.idle = True
            if cell.replied:
                self._finish(session_id, msg_id, cell)
            else:  # a reply that never comes (a client that bypassed us) must not keep the cell open
                asyncio.get_running_loop().call_later(REPLY_GRACE, self._finish, session_id, msg_id, cell)
            return
        event = cell.collector.add(msg_type, content)
        if event is not None:
            self.events.emit(session_id, dict(event, run_id=cell.ticket.run_id))

    def _finish(self, session_id: str, msg_id: str, cell: _Cell) -> None:
        if self._open.get(session_id, {}).get(msg_id) is not cell:
            return  # ended already (its reply came, or its kernel went away)
        cell.remove()
        self._open.get(session_id, {}).pop(msg_id, None)
        unreplied = "error" if cell.collector.error is not None else "ok"
        outcome = ExecOutcome(cell.collector, status=cell.status if cell.replied else unreplied,
                              duration=time.monotonic() - cell.started)
        result = run_result(outcome, language=cell.language, timeout=0.0, session_id=session_id, data=None,
                            run_id=cell.ticket.run_id)
        self.events.emit(session_id, {"type": "done", "run_id": cell.ticket.run_id,
                                      **{k: result[k] for k in ("exit_code", "duration", "duration_ms",
                                                                "timed_out", "truncated")}})
        self.events.flush(session_id)  # the journal before the record that says it ended
        cell.ticket.finished(self.store, result, outcome)

    def kernel_gone(self, session_id: str, reason: str) -> None:
        """The session's kernel went away: its open cells end ``interrupted``."""
        for cell in self._open.pop(session_id, {}).values():
            cell.remove()
            cell.ticket.status = INTERRUPTED
            cell.ticket.ended_early(self.store, INTERRUPTED, reason)
