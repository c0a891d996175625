"""What a server does once at start, over what a previous process left: kernels and
containers whose owner is gone, pooled directories nobody claimed, package setups that
never finished, workspace volumes: the ones still mounted are taken over, those no
record names (and one-shot runs' whose process is gone) are unmounted and deleted.

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
from ..provisioning.owner import owner_gone
from ..store.base import MetadataStore
from .files import POOL_ROOT, SessionFiles
from .records import SessionRecord

log = logging.getLogger("era.recovery")

# Restarts a session's package setup (the engine's, with its status callbacks).
SetupStarter = Callable[[SessionRecord], Awaitable[None]]


async def recover(settings: Settings, store: MetadataStore, files: SessionFiles,
                  start_setup: SetupStarter | None) -> None:
    """``start_setup`` None: unfinished setups are not restarted (among replicas, the
    session's owner's to finish)."""
    reaped = await reap_orphans(settings)
    if reaped:
        log.info("reaped %d orphaned kernel(s) from a previous process", reaped)
    claimed: set[Path] = set()
    async for rows in record_chunks(store):
        for row in rows:
            record = SessionRecord.from_row(row)
            claimed.add(files.path(record))
            if start_setup and record.setup and record.setup_status in ("pending", "running"):  # never finished
                await start_setup(record)
    try:
        adopted = await files.volumes.adopt()
        if adopted:
            log.info("took over %d workspace volume(s) a previous process left mounted", len(adopted))
    except Exception as exc:
        log.error("cannot read the mounts a previous process left: %s", exc)
    await remove_unclaimed_workdirs(settings, files, claimed)
    await remove_unclaimed_volumes(settings, files, claimed)
    await remove_orphan_tmps(settings, files)


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
            await files.remove_dir(path)
        except Exception as exc:
            log.error("cannot remove the unclaimed pool directory %s: %s", path.name, exc)


async def remove_unclaimed_volumes(settings: Settings, files: SessionFiles, claimed: set[Path]) -> None:
    """Volumes no record names (a session deleted while its removal failed half-way, a
    pooled kernel's), and one-shot runs' volumes whose process is gone (an ``era run``
    beside this server keeps its own): unmounted and deleted, with their directory when
    it is empty. A session's files are never here: its record claims its volume."""
    scratch = settings.data_dir / "scratch"
    try:
        found = await files.volumes.images()
    except Exception as exc:
        log.error("cannot list the workspace volumes: %s", exc)
        return
    for path in found:
        if path in claimed:
            continue
        if path.parent == scratch:
            owner = await asyncio.to_thread(files.volumes.owner, path)
            if owner is not None and not owner_gone(*owner):
                continue
        try:
            await files.volumes.remove(path)
            await asyncio.to_thread(_rmdir_if_empty, path)
            log.info("removed the workspace volume of %s: no session owns it", path.relative_to(settings.data_dir))
        except Exception as exc:
            log.error("cannot remove the unclaimed workspace volume of %s: %s", path.name, exc)


async def remove_orphan_tmps(settings: Settings, files: SessionFiles) -> None:
    """Sessions' /tmp directories kept outside a volume (``tmp/<root>/<name>``) whose
    workspace directory is gone (a delete cut short, a one-shot run's of a dead
    process): removed whatever the session left in them (links, deep or read-only
    trees: ``fdtree`` follows nothing), so a start is never stopped by them."""
    from .files import TMP_ROOT

    def orphans() -> list[Path]:
        base = settings.data_dir / TMP_ROOT
        if not base.is_dir():
            return []
        found = []
        for root in base.iterdir():
            if root.is_dir() and not root.is_symlink():
                found += [settings.data_dir / root.name / p.name for p in root.iterdir()
                          if not (settings.data_dir / root.name / p.name).exists()]
        return found

    try:
        gone = await asyncio.to_thread(orphans)
    except OSError as exc:
        log.error("cannot list the sessions' /tmp directories: %s", exc)
        return
    for workspace in gone:
        try:
            await files.remove_tmp(workspace)
        except Exception as exc:
            log.error("cannot remove the /tmp of %s: %s", workspace.name, exc)


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # not empty (files made without a volume), or gone: left as it is
