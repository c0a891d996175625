"""Which sessions a culling pass ends, and which kernels it shuts down.

Pure decisions over store records, so a restart does not reset any clock: a session's
age counts from its ``created_at`` and a kernel's idleness from the session's
``last_run_at`` (or ``created_at``), both in the store, and from the last time this
process started or ran that kernel. ``SessionManager.cull`` acts on the answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable


def epoch(timestamp: str) -> float:
    """Seconds since the epoch of a store timestamp (``2026-01-01T00:00:00.000Z``)."""
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


@dataclass
class CullPlan:
    expired: list[str] = field(default_factory=list)  # sessions to delete: past their max age
    idle: list[str] = field(default_factory=list)  # kernels to shut down: idle past the timeout


def plan_cull(records: Iterable[dict[str, Any]], idle_kernels: set[str], active_at: dict[str, float], now: float,
              *, idle_timeout: float, default_max_age: float) -> CullPlan:
    """``idle_kernels``: sessions whose kernel is live and idle (not running, starting or
    queued). A session's own ``max_age`` wins over ``default_max_age``; 0 means never."""
    plan = CullPlan()
    for record in records:
        sid = record["id"]
        max_age = record.get("max_age") or default_max_age
        if max_age and now - epoch(record["created_at"]) > max_age:
            plan.expired.append(sid)
        elif idle_timeout and sid in idle_kernels:
            last = max(epoch(record.get("last_run_at") or record["created_at"]), active_at.get(sid, 0.0))
            if now - last > idle_timeout:
                plan.idle.append(sid)
    return plan
