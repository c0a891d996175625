"""The workspace store: where persistent sessions' files live between kernels.

One fsspec URL (``file://``, ``s3://bucket/prefix``, ``memory://`` for tests) holds a
snapshot per session (see ``snapshots`` for the layout and the crash-safety argument)
plus single-object archives (environment caches). Every method is async; the blocking
work runs in the default executor, where s3fs hands it to its own event-loop thread.

Within one process, operations on one session are serialized by a lock, so a push, a
single-file write and a restore never interleave. Several server processes sharing one
store must not work on the same session at once (the session manager owns a session).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import time
from collections import defaultdict
from typing import Any, Mapping

import fsspec

from ..errors import BadRequest, NotFound, TooLarge
from . import manifest, snapshots
from . import fdtree
from .local import limit_error, map_os_error, run_blocking
from ..validation import is_session_id
from .objects import ObjectStore
from .paths import iso_utc, safe_relpath

ARCHIVES = ".archives"  # '.' cannot start a session id, so no session can collide with it


def check_session_id(session_id: str) -> str:
    if not is_session_id(session_id):
        raise BadRequest("invalid session id: use 1-128 of A-Z a-z 0-9 _ -", field="id")
    return session_id


def parse_options(options: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """``ERA_WORKSPACE_OPTIONS``: a JSON object (or an already parsed mapping)."""
    if options is None or options == "":
        return {}
    if isinstance(options, Mapping):
        return dict(options)
    try:
        parsed = json.loads(options)
    except json.JSONDecodeError as exc:
        raise ValueError(f"ERA_WORKSPACE_OPTIONS is not valid JSON: {exc.msg}") from None
    if not isinstance(parsed, dict):
        raise ValueError("ERA_WORKSPACE_OPTIONS must be a JSON object")
    return parsed


class _BlobGone(OSError):
    """The manifest we read named a blob a concurrent push has since deleted."""

    def __init__(self, rel: str):
        super().__init__(errno.EIO, "store object of a file in the manifest is missing", rel)


class WorkspaceStore:
    """Snapshots of session workspaces in an fsspec filesystem.

    ``max_files`` / ``max_total_bytes`` (``None``: unlimited) bound a session's snapshot:
    a push or a file write that would exceed them raises ``TooLarge`` and changes nothing.
    ``max_depth`` / ``max_entries`` cap the walk of the local directory a push reads (and
    the comparison a restore makes): past them a push is ``TooLarge`` too.
    """

    def __init__(self, fs, root: str, *, durable: bool = True, max_files: int | None = None,
                 max_total_bytes: int | None = None, max_depth: int = fdtree.DEFAULT_MAX_DEPTH,
                 max_entries: int = fdtree.DEFAULT_MAX_ENTRIES):
        self.objects = ObjectStore(fs, root, durable=durable)
        self.max_files = max_files
        self.max_total_bytes = max_total_bytes
        self.max_depth = max_depth
        self.max_entries = max_entries
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # Sessions whose objects this process has listed once and found free of debris
        # (see ``push``): later pushes delete what they replace without listing.
        self._swept: set[str] = set()

    @classmethod
    def from_url(cls, url: str, options: str | Mapping[str, Any] | None = None, **kwargs: Any) -> "WorkspaceStore":
        """Build from ``ERA_WORKSPACE_URL`` and ``ERA_WORKSPACE_OPTIONS``. For ``s3://``,
        s3fs (through botocore) also reads ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
        ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` and ``AWS_REGION`` when the options
        do not set them. Cheap: no I/O until the first call."""
        storage_options = parse_options(options)
        # A cached listing can say a blob another process just wrote does not exist
        # (s3fs consults it even for reads): always ask the store.
        storage_options.setdefault("use_listings_cache", False)
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
        return cls(fs, root, **kwargs)

    def __repr__(self) -> str:
        return f"WorkspaceStore({self.objects.fs.protocol!r}, {self.objects.root!r})"

    # --- whole workspaces ----------------------------------------------------------------

    async def restore(self, session_id: str, local_dir: str | os.PathLike, *, uid: int | None = None) -> dict:
        """Make ``local_dir`` an exact mirror of the session's last complete snapshot (an
        empty directory when there is none). Files are chowned to ``uid`` when root."""
        sid = check_session_id(session_id)
        async with self._locks[sid]:
            try:
                return await run_blocking(snapshots.restore, self.objects, sid, os.fspath(local_dir), uid=uid,
                                          max_entries=self.max_entries)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise TooLarge("no space left to restore the session's files") from None
                raise

    async def push(self, session_id: str, local_dir: str | os.PathLike) -> dict:
        """Upload what changed in ``local_dir`` (deletions included) and commit it as the
        session's snapshot; ``NotFound`` if the directory is gone, ``TooLarge`` over the
        limits, walk caps included (nothing committed). Returns counts: files, bytes, unchanged, hashed,
        uploaded, uploaded_bytes, packs, repacked, deleted, skipped (links, FIFOs and
        unaddressable names), removed_blobs, manifest_written, seconds."""
        sid = check_session_id(session_id)
        async with self._locks[sid]:
            # A killed process may have left orphan blobs: the first push of a session in
            # this process, and the one after a failed push, lists and deletes them.
            full_sweep = sid not in self._swept
            self._swept.discard(sid)
            try:
                stats = await run_blocking(snapshots.push, self.objects, sid, os.fspath(local_dir),
                                           full_sweep=full_sweep, max_files=self.max_files,
                                           max_total_bytes=self.max_total_bytes, max_depth=self.max_depth,
                                           max_entries=self.max_entries)
            except (FileNotFoundError, NotADirectoryError):
                # Never read a vanished directory as "everything was deleted".
                raise NotFound(f"workspace directory of session {sid} is missing") from None
            except fdtree.WalkLimit as exc:
                raise limit_error(exc) from None
            self._swept.add(sid)
            return stats

    async def exists(self, session_id: str) -> bool:
        """True when the session has a snapshot."""
        sid = check_session_id(session_id)
        key = self.objects.key(sid, manifest.MANIFEST)
        return await run_blocking(self.objects.fs.exists, key)

    async def delete(self, session_id: str) -> None:
        """Remove the session's snapshot; the manifest goes first, so an interrupted
        delete leaves an empty snapshot, never a manifest naming missing blobs."""
        sid = check_session_id(session_id)
        async with self._locks[sid]:
            await run_blocking(self._delete_sync, sid)
        self._swept.discard(sid)
        lock = self._locks.get(sid)
        if lock is not None and not lock.locked():  # ids come and go: do not keep a lock per id forever
            del self._locks[sid]

    async def copy(self, src_id: str, dst_id: str) -> dict:
        """Replace ``dst_id``'s snapshot with a copy of ``src_id``'s (server-side on S3)."""
        src, dst = check_session_id(src_id), check_session_id(dst_id)
        if src == dst:
            raise BadRequest("cannot copy a session's files onto itself", field="id")
        first, second = sorted((src, dst))  # one lock order: no deadlock with a reverse copy
        async with self._locks[first], self._locks[second]:
            return await run_blocking(self._copy_sync, src, dst)

    # --- single files (for sessions whose kernel is not running) --------------------------

    async def list(self, session_id: str) -> list[dict]:
        """``[{path, size, uploaded}]`` from the snapshot, sorted by path."""
        sid = check_session_id(session_id)
        snap = await run_blocking(manifest.load, self.objects, sid)
        return [{"path": p, "size": e["size"], "uploaded": iso_utc(e["mtime_ns"])} for p, e in sorted(snap.files.items())]

    async def usage(self, session_id: str) -> tuple[int, int]:
        files = await self.list(session_id)
        return len(files), sum(f["size"] for f in files)

    async def read_file(self, session_id: str, path: str) -> bytes:
        sid, rel = check_session_id(session_id), safe_relpath(path)
        try:
            try:
                return await run_blocking(self._read_sync, sid, rel)
            except _BlobGone:
                # A push committed and collected the blob between our two reads: read
                # again once no push is running.
                async with self._locks[sid]:
                    return await run_blocking(self._read_sync, sid, rel)
        except OSError as exc:
            raise map_os_error(exc, rel) from None

    async def write_file(self, session_id: str, path: str, data: bytes) -> dict:
        """Store one file into the snapshot → ``{path, size}``."""
        sid, rel = check_session_id(session_id), safe_relpath(path)
        async with self._locks[sid]:
            try:
                await run_blocking(self._write_sync, sid, rel, bytes(data))
            except OSError as exc:
                raise map_os_error(exc, rel, writing=True) from None
        return {"path": rel, "size": len(data)}

    async def delete_file(self, session_id: str, path: str) -> None:
        """Remove a file (or every file under a directory path) from the snapshot."""
        sid, rel = check_session_id(session_id), safe_relpath(path)
        async with self._locks[sid]:
            try:
                await run_blocking(self._delete_file_sync, sid, rel)
            except OSError as exc:
                raise map_os_error(exc, rel) from None

    # --- archives (one object each, e.g. cached environments) ------------------------------

    async def put_archive(self, key: str, data: bytes) -> None:
        rel = safe_relpath(key)
        await run_blocking(self.objects.put, self.objects.key(ARCHIVES, rel), bytes(data))

    async def get_archive(self, key: str) -> bytes:
        rel = safe_relpath(key)
        try:
            return await run_blocking(self.objects.get, self.objects.key(ARCHIVES, rel))
        except (FileNotFoundError, IsADirectoryError):
            raise NotFound(f"archive not found: {rel}") from None

    async def delete_archive(self, key: str) -> None:
        rel = safe_relpath(key)
        await run_blocking(self.objects.remove_many, [self.objects.key(ARCHIVES, rel)])

    # --- blocking halves -----------------------------------------------------------------

    def _delete_sync(self, sid: str) -> None:
        self.objects.remove_many([self.objects.key(sid, manifest.MANIFEST)])
        manifest.forget(self.objects, sid)
        self.objects.remove_prefix(self.objects.key(sid))

    def _copy_sync(self, src: str, dst: str) -> dict:
        snap = manifest.load(self.objects, src)
        self._delete_sync(dst)
        self.objects.copy_many([(self.objects.key(src, b), self.objects.key(dst, b)) for b in sorted(snap.blobs)])
        manifest.save(self.objects, dst, snap)  # last: the copy exists only once complete
        return {"files": len(snap.files), "bytes": snap.total_bytes()}

    def _read_sync(self, sid: str, rel: str) -> bytes:
        entry = manifest.load(self.objects, sid).files.get(rel)
        if entry is None:
            raise FileNotFoundError(errno.ENOENT, "not in the snapshot", rel)
        try:
            [data] = self.objects.get_ranges(
                [(self.objects.key(sid, entry["blob"]), entry["offset"], entry["offset"] + entry["size"])])
        except FileNotFoundError:
            raise _BlobGone(rel) from None
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise OSError(errno.EIO, f"store object for {rel!r} does not match its checksum")
        return data

    def _write_sync(self, sid: str, rel: str, data: bytes) -> None:
        snap = manifest.load(self.objects, sid)
        if any(parent in snap.files for parent in manifest.parent_dirs(rel)):
            raise NotADirectoryError(errno.ENOTDIR, "a parent is a file", rel)
        if any(path.startswith(rel + "/") for path in snap.files):
            raise IsADirectoryError(errno.EISDIR, "is a directory", rel)
        others = [e for p, e in snap.files.items() if p != rel]
        snapshots.check_limits(len(others) + 1, sum(e["size"] for e in others) + len(data),
                               self.max_files, self.max_total_bytes)
        sha = hashlib.sha256(data).hexdigest()
        same = next((e for e in snap.files.values() if e["sha256"] == sha), None)
        if same is not None:
            blob, offset = same["blob"], same["offset"]
        else:
            blob, offset = snapshots.new_blob(), 0
            self.objects.put(self.objects.key(sid, blob), data)
            snap.blobs[blob] = len(data)
        snap.files[rel] = {"size": len(data), "mtime_ns": time.time_ns(), "sha256": sha, "blob": blob, "offset": offset}
        self._commit(sid, snap)

    def _delete_file_sync(self, sid: str, rel: str) -> None:
        snap = manifest.load(self.objects, sid)
        gone = [p for p in snap.files if p == rel or p.startswith(rel + "/")]
        if not gone:
            raise FileNotFoundError(errno.ENOENT, "not in the snapshot", rel)
        for path in gone:
            del snap.files[path]
        self._commit(sid, snap)

    def _commit(self, sid: str, snap: manifest.Snapshot) -> None:
        dead = snap.prune()
        manifest.save(self.objects, sid, snap)
        snapshots.delete_blobs(self.objects, sid, dead)
