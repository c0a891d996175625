"""A session's files: the local workspace directory, and for persistent sessions its
snapshot in the workspace store (``ERA_WORKSPACE_URL``: file://, s3://, memory://).

The local directory is what the kernel works in. A persistent session's directory is
restored from the store the first time this process needs it (kernel start, or a files
API call), and pushed back after every run and every change made through the files
API, so the store always holds the last complete state and a session can be picked up
on another machine. Non-persistent sessions keep their directory for the session's life.

Every workspace directory (a session's, a pooled kernel's, a one-shot run's) is made
and removed here (``make_dir``, ``remove_dir``), and with ``ERA_WORKSPACE_VOLUMES`` each
is its own filesystem of ``ERA_WORKSPACE_MAX_BYTES`` (``workspaces/volumes.py``). A
volume a previous process released is mounted again by ``ensure_ready``, which every
kernel start and files API call goes through; listings never mount (``usage``).

Each workspace directory has a ``/tmp`` of its own beside it (``tmp_path``): bound at
``/tmp`` in every sandbox of that directory (kernels, setup commands, commands run in
the session), so what one writes there the next one finds, as in ERA's VM. It lives
as long as the workspace: kept across kernel restarts, removed with the directory.
With volumes it lies inside the workspace's volume (beside, not under, the workspace
the session sees), so it counts against the same ``ERA_WORKSPACE_MAX_BYTES``; without,
it is a directory ``tmp/<root>/<name>`` under the data directory. Either way its parents
are the server's, so the session cannot swap it for a link to somewhere else.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from ..config import Settings
from ..errors import Conflict, EraError
from ..workspaces import Workspace, WorkspaceStore, fdtree
from ..workspaces.volumes import Volumes
from .records import SessionRecord

log = logging.getLogger("era.files")

POOL_ROOT = "pool"  # under the data directory, beside sessions/
TMP_ROOT = "tmp"  # sessions' /tmp directories without volumes: tmp/<sessions|pool|scratch>/<name>


class SessionFiles:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._store: WorkspaceStore | None = None
        self._restored: set[str] = set()
        self._restore_locks: dict[str, asyncio.Lock] = {}
        # Root's share of each volume, beyond the session's: the data file the server
        # writes before every run must fit when the session's code filled its part.
        reserve = max(1024**2, 2 * settings["ERA_MAX_DATA_BYTES"] + 64 * 1024)
        self.volumes = Volumes(settings.data_dir, settings["ERA_WORKSPACE_MAX_BYTES"], reserve,
                               stock=settings["ERA_WORKSPACE_VOLUME_STOCK"])
        self._tmp_ready: set[Path] = set()

    async def start(self) -> None:
        """Decide on volumes (``ERA_WORKSPACE_VOLUMES``; ``on`` raises when impossible)."""
        await self.volumes.start(self.settings["ERA_WORKSPACE_VOLUMES"])

    async def shutdown(self) -> None:
        """Release every volume this process mounted, keeping each one's usage for listings."""
        await self.volumes.release_all(lambda path: self.workspace(path).usage())

    @property
    def store(self) -> WorkspaceStore:
        if self._store is None:  # no I/O until a persistent session needs it
            s = self.settings
            self._store = WorkspaceStore.from_url(s["ERA_WORKSPACE_URL"], s["ERA_WORKSPACE_OPTIONS"] or None,
                                                  max_files=s["ERA_WORKSPACE_MAX_FILES"],
                                                  max_total_bytes=s["ERA_WORKSPACE_MAX_BYTES"],
                                                  max_depth=s["ERA_WORKSPACE_MAX_DEPTH"],
                                                  max_entries=s["ERA_WORKSPACE_MAX_ENTRIES"],
                                                  durable=s["ERA_WORKSPACE_FSYNC"])
        return self._store

    def path(self, record: SessionRecord) -> Path:
        """The session's local directory: ``sessions/<id>``, or the directory of the pooled
        kernel it claimed (whose sandbox already has it mounted): ``pool/<hex>``. Pooled
        directories live under their own root, so no session id can name one. Records
        from before that kept ``pool-<hex>`` under ``sessions/``."""
        workdir = record.workdir
        if workdir and "/" in workdir:
            return self.settings.data_dir / workdir
        return self.settings.data_dir / "sessions" / (workdir or record.id)

    def pool_path(self, name: str) -> Path:
        """Where a pooled kernel's directory is made (``name``: a random hex string)."""
        return self.settings.data_dir / POOL_ROOT / name

    def workspace(self, root: Path | str) -> Workspace:
        s = self.settings
        return Workspace(root, max_file_bytes=s["ERA_WORKSPACE_MAX_FILE"], max_total_bytes=s["ERA_WORKSPACE_MAX_BYTES"],
                         max_files=s["ERA_WORKSPACE_MAX_FILES"], max_read_bytes=s["ERA_WORKSPACE_MAX_READ"],
                         max_depth=s["ERA_WORKSPACE_MAX_DEPTH"], max_entries=s["ERA_WORKSPACE_MAX_ENTRIES"])

    def of(self, record: SessionRecord) -> Workspace:
        return self.workspace(self.path(record))

    def own(self, record: SessionRecord) -> Workspace:
        """The session's directory for the server's own small file (the data file, bounded
        by ``ERA_MAX_DATA_BYTES``): no upload quota, which would walk the whole tree before
        every run and refuse the write when the session's code filled its workspace."""
        s = self.settings
        return Workspace(self.path(record), max_depth=s["ERA_WORKSPACE_MAX_DEPTH"],
                         max_entries=s["ERA_WORKSPACE_MAX_ENTRIES"])

    # ---- the session's /tmp ---------------------------------------------------------------
    def tmp_path(self, workspace: Path) -> Path | None:
        """The /tmp of the workspace directory ``workspace`` (a session's, a pooled kernel's,
        a one-shot run's): inside its volume when it has one, else under ``tmp/``. None
        for a volume of the older layout (its filesystem is all workspace): there a /tmp
        outside it would be unbounded on the host's disk, so its kernels keep a private
        tmpfs per kernel, as before. Call after ``ensure_ready`` (or ``make_dir``): where
        it lives depends on the volume."""
        inside = self.volumes.tmp_of(workspace)
        if inside is not None:
            return inside
        if self.volumes.is_mounted(Path(workspace)):
            return None
        return self._plain_tmp(workspace)

    def _plain_tmp(self, workspace: Path) -> Path:
        return self.settings.data_dir / TMP_ROOT / Path(workspace).relative_to(self.settings.data_dir)

    async def ensure_tmp(self, workspace: Path, uid: int | None) -> Path | None:
        """The workspace's /tmp, made when missing (sessions from before it existed, a
        directory restored on another host), owned by ``uid``, private to it."""
        path = self.tmp_path(workspace)
        if path is not None and path not in self._tmp_ready:
            await asyncio.to_thread(_make_tmp, path, self.settings.data_dir, uid)
            self._tmp_ready.add(path)
        return path

    async def remove_tmp(self, workspace: Path) -> None:
        """Remove the workspace's /tmp outside its volume (one inside goes with the volume).
        Whatever the session left there (links, deep or read-only trees) is removed without
        following anything (``fdtree``)."""
        path = self._plain_tmp(workspace)
        self._tmp_ready.discard(self.volumes.tmp_of(workspace))
        self._tmp_ready.discard(path)
        await asyncio.to_thread(fdtree.remove_tree, path)

    async def tmp_usage(self, workspace: Path) -> tuple[int, int]:
        """(files, bytes) in the workspace's /tmp (0, 0 when it has none yet)."""
        path = self.tmp_path(workspace)
        if path is None or not await asyncio.to_thread(path.is_dir):
            return 0, 0
        return await self.workspace(path).usage()

    # ---- directories -------------------------------------------------------------------
    async def make_dir(self, path: Path, uid: int | None) -> Workspace:
        """A new, empty workspace directory (with its volume) and its /tmp, owned by ``uid``."""
        ws = self.workspace(path)
        if self.volumes.is_mounted(ws.root):
            raise Conflict(f"{path.name} already has its workspace volume")
        await ws.create(uid=uid)
        if self.volumes.enabled and uid is not None:
            try:
                await self.volumes.make(ws.root, uid)
            except BaseException as exc:
                await self.remove_dir(ws.root)
                if isinstance(exc, OSError):
                    log.error("cannot make the workspace volume of %s: %s", path.name, exc)
                    raise EraError(f"the workspace could not be made ({exc.strerror or exc}); "
                                   "`era doctor` checks workspace volumes") from None
                raise
        try:
            await self.remove_tmp(ws.root)  # debris of a directory of that name: never adopted
            await self.ensure_tmp(ws.root, uid)
        except BaseException:
            await self.remove_dir(ws.root)
            raise
        return ws

    async def remove_dir(self, path: Path) -> None:
        """Remove a workspace directory and everything in it: its volume first (one
        unmount and one unlink, however many files, its /tmp included), then the
        directory, then a /tmp kept outside a volume."""
        await self.volumes.remove(path)
        await self.workspace(path).remove()
        await self.remove_tmp(path)

    async def usage(self, record: SessionRecord) -> tuple[int, int]:
        """``(file_count, total_bytes)`` for the session's document. An unmounted volume
        answers what it held when it was released, without being mounted."""
        path = self.path(record)
        idle = await self.volumes.idle_usage(path)
        return idle if idle is not None else await self.workspace(path).usage()

    async def full_note(self, root: Path) -> str | None:
        """After a run: the sentence for its stderr when its workspace volume is full."""
        left = await self.volumes.full(root)
        return None if left is None else self.volumes.full_message(left)

    # ---- lifecycle -------------------------------------------------------------------
    async def check_unused(self, record: SessionRecord) -> None:
        """Before a new session is stored: its directory must not exist yet. One that does
        is debris of an older layout or of a failed delete, and a new session never
        adopts (or, rolling back, removes) files it did not make."""
        if not record.workdir and await self.of(record).exists():
            raise Conflict(f"a directory for session {record.id} already exists on this host; pick another id",
                           field="id", details={"id": record.id})

    async def create(self, record: SessionRecord, uid: int, copy_from: SessionRecord | None = None,
                     copy_from_uid: int | None = None) -> None:
        """A new session's directory (and store snapshot, when persistent)."""
        sid = record.id
        if record.workdir:  # a pooled kernel's directory, already made (with its volume) and now this session's
            ws = self.of(record)
            await ws.create(uid=uid)
        else:
            ws = await self.make_dir(self.path(record), uid)
        if copy_from is not None:
            await self.ensure_ready(copy_from, copy_from_uid)
            await self.of(copy_from).copy_to(ws.root, uid=uid)
        if record.persistent:
            if copy_from is not None and copy_from.persistent:
                await self.store.copy(copy_from.id, sid)
            elif copy_from is not None:
                await self.store.push(sid, ws.root)
            self._restored.add(sid)  # the local directory is the truth for a new session

    async def remove(self, record: SessionRecord) -> None:
        sid = record.id
        await self.remove_dir(self.path(record))
        if record.persistent:
            await self.store.delete(sid)
        self._restored.discard(sid)
        self._restore_locks.pop(sid, None)

    def forget_restore(self, session_id: str) -> None:
        """The session's files may have changed elsewhere (another replica served it): its
        next kernel start or files call restores it from the workspace store again."""
        self._restored.discard(session_id)

    async def ensure_ready(self, record: SessionRecord, uid: int | None) -> None:
        """Make the session's directory usable: its volume mounted (again, after a server
        stop), and a persistent session's files brought up to its last snapshot, once per
        process. Every kernel start and files API call comes through here."""
        sid, path = record.id, self.path(record)
        if self.volumes.active and not self.volumes.is_mounted(path):
            async with self._restore_locks.setdefault(sid, asyncio.Lock()):
                try:
                    attached = await self.volumes.attach(path)
                except OSError as exc:
                    log.error("cannot mount the workspace volume of %s: %s", sid, exc)
                    raise EraError(f"the workspace of session {sid} could not be mounted ({exc.strerror or exc}); "
                                   "its files are kept in its volume image") from None
                if (not attached and self.volumes.enabled and uid is not None
                        and not await self.workspace(path).exists()):
                    await self.make_dir(path, uid)  # new to this host (a persistent session restored here)
        await self.ensure_tmp(path, uid)
        if not record.persistent or sid in self._restored:
            return
        async with self._restore_locks.setdefault(sid, asyncio.Lock()):
            if sid in self._restored:
                return
            stats = await self.store.restore(sid, self.path(record), uid=uid)
            self._restored.add(sid)
            log.info("restored %s from the workspace store: %s", sid, stats)

    async def sync(self, record: SessionRecord) -> str | None:
        """Push a persistent session's changes; returns an error sentence, or None."""
        if not record.persistent:
            return None
        try:
            await self.store.push(record.id, self.path(record))
        except Exception as exc:  # the run itself succeeded; say what did not persist
            log.warning("workspace push of %s failed: %s", record.id, exc)
            return f"the workspace could not be saved to the store: {getattr(exc, 'message', exc)}"
        return None

    # ---- the files API ---------------------------------------------------------------
    async def list(self, record: SessionRecord, uid: int) -> list[dict[str, Any]]:
        await self.ensure_ready(record, uid)
        return await self.of(record).list()

    async def read(self, record: SessionRecord, uid: int, path: str) -> bytes:
        await self.ensure_ready(record, uid)
        return await self.of(record).read(path)

    async def write(self, record: SessionRecord, uid: int, path: str, data: bytes) -> dict[str, Any]:
        await self.ensure_ready(record, uid)
        result = await self.of(record).write(path, data, uid=uid)
        await self._push_or_raise(record)
        return result

    async def delete(self, record: SessionRecord, uid: int, path: str) -> None:
        await self.ensure_ready(record, uid)
        await self.of(record).delete(path)
        await self._push_or_raise(record)

    async def _push_or_raise(self, record: SessionRecord) -> None:
        if record.persistent:
            await self.store.push(record.id, self.path(record))


def _make_tmp(path: Path, data_dir: Path, uid: int | None) -> None:
    """Blocking: make ``path`` (a session's /tmp) and the parents it needs under the data
    directory. Parents are the server's (0711: sandboxes get theirs by a bind, nobody
    lists). The directory is like a real /tmp: root's, 1777 (sticky), so the mount
    points the server makes in it stay the server's (``prepare_tmp_mountpoints``); only
    this session's sandboxes ever see it."""
    made = []
    parent = path.parent
    while not parent.exists() and parent != data_dir:
        made.append(parent)
        parent = parent.parent
    for directory in reversed(made):
        try:
            directory.mkdir(mode=0o711)
        except FileExistsError:
            pass
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        if not path.is_dir() or path.is_symlink():
            raise
    os.chmod(path, 0o1777)
