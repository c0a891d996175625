"""What a server does once at start, over what a previous process left: kernels and
containers whose owner is gone, pooled directories nobody claimed, package setups that
never finished.

Only a serving engine recovers (``SessionManager.start(recover=True)``): a one-shot
``era run`` on the same data directory must leave a running server's kernels, pool and
directories alone. Nothing a session left on disk may stop a start: every removal that
fails is logged and skipped.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Awaitable, Callable

from ..config import Settings
from ..listing import record_chunks
from ..orphans import reap_orphans
from ..store.base import MetadataStore
from .files import POOL_ROOT, SessionFiles
from .records import SessionRecord

log = logging.getLogger("era.recovery")

# Restarts a session's package setup (the engine's, with its status callbacks).
SetupStarter = Callable[[SessionRecord], Awaitable[None]]


async def recover(settings: Settings, store: MetadataStore, files: SessionFiles, start_setup: SetupStarter) -> None:
    reaped = await reap_orphans(settings)
    if reaped:
        log.info("reaped %d orphaned kernel(s) from a previous process", reaped)
    claimed: set[Path] = set()
    async for rows in record_chunks(store):
        for row in rows:
            record = SessionRecord.from_row(row)
            claimed.add(files.path(record))
            if record.setup and record.setup_status in ("pending", "running"):  # never finished
                await start_setup(record)
    await remove_unclaimed_workdirs(settings, files, claimed)


async def remove_unclaimed_workdirs(settings: Settings, files: SessionFiles, claimed: set[Path]) -> None:
    """Pooled kernels' directories a previous process left unclaimed: every directory
    under ``pool/`` that no record names (``claimed``: every record's directory), and the
    ``sessions/pool-<hex>`` ones of the older layout that no record names either."""

    def unclaimed() -> list[Path]:
        found = list((settings.data_dir / POOL_ROOT).iterdir())
        found += [p for p in (settings.data_dir / "sessions").iterdir() if p.name.startswith("pool-")]
        return [p for p in found if p not in claimed]

    for path in await asyncio.to_thread(unclaimed):
        try:
            await files.workspace(path).remove()
        except Exception as exc:
            log.error("cannot remove the unclaimed pool directory %s: %s", path.name, exc)
