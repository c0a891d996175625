"""A run as a record: ``RunTicket`` is one run from submission to its end, and what the
store keeps of it at each step (``queued``, ``running``, then ``completed``, ``failed``,
``cancelled`` or ``interrupted`` with a ``reason``).

The finished record holds the run's whole result document (what a synchronous run
answers), so ``GET .../runs/{run_id}`` of a background run answers the same, and the
history and the notebook export read the same fields they always did.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable

from ..kernel import ExecOutcome
from .results import utc_now

if TYPE_CHECKING:
    from .. import models
    from ..kernel import SessionKernel
    from ..store.base import MetadataStore

QUEUED, RUNNING = "queued", "running"
COMPLETED, FAILED, CANCELLED, INTERRUPTED = "completed", "failed", "cancelled", "interrupted"
FINISHED = (COMPLETED, FAILED, CANCELLED, INTERRUPTED)
SOURCES = ("rest", "sse", "ws", "gateway", "schedule", "background")


@dataclass(eq=False)
class RunTicket:
    run_id: str
    session_id: str
    request: "models.RunRequest"
    source: str = "rest"  # who submitted it: SOURCES
    background: bool = False
    code: str | None = None  # the request's, or the session's stored program
    submitted_at: str = field(default_factory=utc_now)
    started_at: str | None = None
    status: str = QUEUED
    reason: str | None = None
    kernel_state_lost: bool = False  # resubmitted after a restart: a fresh kernel, nothing of before
    cancel_requested: bool = False
    # POST .../interrupt reached it (RunQueue.interrupt); ``interrupted`` wakes a run still
    # waiting for its kernel's start or package setup, which then ends without running.
    interrupt_requested: bool = False
    interrupted: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    recorded: bool = False  # the store has a record of it (it was queued)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. callback_url, schedule_id: kept on the record
    kernel: "SessionKernel | None" = field(default=None, repr=False)
    task: asyncio.Task | None = field(default=None, repr=False)
    done: asyncio.Future | None = field(default=None, repr=False)  # resolved with the result

    def record(self) -> dict[str, Any]:
        """What the store keeps before the run ends."""
        doc = {"run_id": self.run_id, "session_id": self.session_id, "status": self.status, "source": self.source,
               "background": self.background, "code": self.code if self.code is not None else self.request.code,
               "submitted_at": self.submitted_at, "started_at": self.started_at, "finished_at": None,
               "reason": self.reason, "timeout": self.request.timeout, "env": self.request.env, **self.extra}
        if self.kernel_state_lost:
            doc["kernel_state_lost"] = True
        return doc

    def interrupt(self) -> None:
        self.interrupt_requested = True
        self.interrupted.set()

    def queued(self, store: "MetadataStore") -> Awaitable[None]:
        self.recorded = True
        return store.put_run(self.session_id, self.record())

    def started(self, store: "MetadataStore") -> Awaitable[None]:
        self.status, self.started_at = RUNNING, utc_now()
        return store.put_run(self.session_id, self.record())

    def finished(self, store: "MetadataStore", result: dict[str, Any], outcome: ExecOutcome | None,
                 session_changes: dict[str, Any] | None = None) -> Awaitable[None]:
        """The final record: the run's result with its status and reason."""
        self.status, self.reason = outcome_status(result, outcome, self.cancel_requested, self.interrupt_requested)
        doc = {**self.record(), **result, "status": self.status, "reason": self.reason, "finished_at": utc_now()}
        return store.put_run(self.session_id, doc, session_changes)

    def ended_early(self, store: "MetadataStore", status: str, reason: str) -> Awaitable[None]:
        """Never ran to its end: cancelled while queued, or cut off by a restart."""
        self.status, self.reason = status, reason
        return store.put_run(self.session_id, {**self.record(), "finished_at": utc_now()})


def outcome_status(result: dict[str, Any], outcome: ExecOutcome | None, cancelled: bool,
                   interrupted: bool = False) -> tuple[str, str | None]:
    """(status, reason) of a run that ran: completed when its code ended with exit code 0,
    failed when the code itself ended otherwise (an exception, ``sys.exit(n)``),
    interrupted when something stopped it (its timeout, the kernel dying, a request:
    a cancel, or an interrupt that took, i.e. the code did not end well after it)."""
    if cancelled:
        return INTERRUPTED, "cancelled by request"
    if outcome is not None:
        if outcome.status == "timeout":
            return INTERRUPTED, "timeout" + ("; the interrupt did not take, the kernel was restarted"
                                             if outcome.restarted else "")
        if outcome.status == "cut":
            return INTERRUPTED, "message too large: the kernel's connection was cut"
        if outcome.status == "dead":
            if outcome.out_of_memory:
                return INTERRUPTED, "killed: out of memory"
            status = outcome.dead_status
            return INTERRUPTED, f"kernel died (exit status {status})" if status is not None else "kernel died"
    if result.get("exit_code") == 0:
        return COMPLETED, None
    return (INTERRUPTED, "interrupted by request") if interrupted else (FAILED, None)
