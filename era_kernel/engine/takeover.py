"""What a replica does when a session's lease comes to it from another replica, or goes
from it to another (engine/ownership.py decides when; this module does the work).

Taken over: nothing of the old kernel survives the move, so the session starts clean
here: its files are restored from the workspace store by the next kernel start, its
journal continues from the store's last event, the session's log and journal say the
kernel restarted and why, and the runs the old owner left are settled as a restarted
server settles its own (a running one ``interrupted``, queued ones run here, in order).

Lost: the kernel stops without a word to the store (the new owner writes now; this
replica's writes would be refused by the fence anyway), and what this replica kept
about the session is dropped. A session deleted meanwhile by another replica leaves
its local directory here: removed too.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..errors import NotFound
from .events import KernelStopped
from .ownership import OwnershipHooks

if TYPE_CHECKING:
    from .manager import SessionManager

log = logging.getLogger("era.takeover")


def ownership_hooks(engine: "SessionManager") -> OwnershipHooks:
    async def taken_over(session_id: str, previous: str | None) -> None:
        engine.files.forget_restore(session_id)
        engine.runner.forget(session_id)
        engine.journal.forget(session_id)
        await engine.journal.ready(session_id)  # the counter resumes after the store's last event
        details = {"from_replica": previous, "replica": engine.replica.id}
        engine.events.publish(KernelStopped(session_id, "taken over", details))
        engine.events.emit(session_id, {"type": "status", "state": "restarted", "reason": "taken over", **details})
        await engine.queue.recover(lambda sid: lambda: engine._record(sid), engine.journal.ready,
                                   session_id=session_id, reason=f"replica {previous or '?'} lost the session")

    async def lost(session_id: str) -> None:
        engine.queue.forget(session_id)
        await engine.setups.cancel(session_id)
        await engine.table.stop(session_id)
        engine.table.forget(session_id)
        engine.runner.forget(session_id)
        engine.journal.forget(session_id)
        engine.files.forget_restore(session_id)
        try:
            await engine._record(session_id)
        except NotFound:  # deleted by another replica: its local directory goes too
            workdir = engine._workdirs.pop(session_id, None)
            from .records import SessionRecord

            await engine.files.remove_dir(engine.files.path(SessionRecord(session_id, "python", "local", "",
                                                                          workdir=workdir)))

    return OwnershipHooks(taken_over=taken_over, lost=lost)
