"""A session's local workspace: the kernel's working directory, seen from the server.

The server reads and writes it on behalf of API callers while untrusted code inside the
kernel owns it. Every operation therefore walks descriptors without following links
(see ``fdtree``), writes atomically, and maps what went wrong to an ``EraError`` that
does not reveal anything about the world outside the workspace: a symlink to
``/etc/passwd`` reads as "not found" whether or not the target exists.

Quotas here bound what the *server* writes (uploads); what the kernel writes itself is
bounded by the filesystem (or a quota on it), not by this class.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import stat
import weakref
from pathlib import Path
from typing import Any, Callable, TypeVar

from ..errors import BadRequest, NotFound, TooLarge
from ..serial_thread import SerialThread
from . import fdtree
from .paths import is_safe_relpath, iso_utc, safe_relpath

T = TypeVar("T")
log = logging.getLogger("era.workspace")

# errno values that mean "there is no regular file you may read here": missing, a
# symlink in the way (ELOOP from O_NOFOLLOW), a file where a directory was expected.
_NOT_FOUND_ERRNOS = {errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.ENXIO, errno.EISDIR}
_NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


# Small capped reads (at most a few syscalls each) share one thread: a cheaper hop than
# the default executor, and short enough that queueing behind each other costs nothing.
SMALL_READ_BYTES = 256 * 1024
_small_reads = SerialThread("era-small-reads")


async def run_blocking(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run blocking file work in the default executor, keeping the event loop free.

    A thread cannot be stopped: if the caller is cancelled, the cancellation takes effect
    only once the work is over, so a lock the caller holds is never released while its
    work still runs (a second push would otherwise interleave with the first).
    """
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(None, functools.partial(func, *args, **kwargs))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            try:
                await asyncio.shield(future)
            except asyncio.CancelledError:
                continue
            except BaseException:
                break
        raise


def limit_error(exc: fdtree.WalkLimit) -> TooLarge:
    """The 413 for a walk that met a cap: which limit, its setting, and what to do (the
    tree is the session's own doing, so its code is where to fix it)."""
    if exc.kind == "depth":
        return TooLarge(f"the workspace is deeper than {exc.limit} levels (ERA_WORKSPACE_MAX_DEPTH); "
                        "remove the deep directories from the session's code")
    return TooLarge(f"the workspace holds more than {exc.limit} entries (ERA_WORKSPACE_MAX_ENTRIES); "
                    "remove files or directories from the session's code")


def not_found(rel: str) -> NotFound:
    return NotFound(f"file not found: {rel}")


def map_os_error(exc: OSError, rel: str, *, writing: bool = False) -> Exception:
    """Translate a low-level error on ``rel`` into the API's error, revealing nothing
    about what lies behind a symlink."""
    code = exc.errno
    if code in _NO_SPACE_ERRNOS:
        return TooLarge("no space left in the workspace for this file")
    if code == errno.ENAMETOOLONG:
        return BadRequest("invalid file path: too long", field="path")
    if writing and code in (errno.ELOOP, errno.ENOTDIR):
        return BadRequest("invalid file path: a parent is a file or a symbolic link", field="path")
    if writing and code == errno.EISDIR:
        return BadRequest("invalid file path: it is a directory", field="path")
    if code in _NOT_FOUND_ERRNOS:
        return not_found(rel)
    return exc


class Workspace:
    """Async file operations on one workspace directory.

    ``uid``: owner of what the server writes when it runs as root (the session's uid,
    so the sandboxed kernel can use the files). Limits are ``None`` for unlimited:
    ``max_file_bytes`` per upload, ``max_total_bytes`` and ``max_files`` for the whole
    workspace after the upload; ``max_read_bytes`` bounds what one download loads into
    memory. Exceeding one raises ``TooLarge``. ``max_depth`` and ``max_entries`` cap
    every walk of the tree (listing, quota check, copy; see ``fdtree.walk``): past them
    those answer ``TooLarge`` too, while ``usage`` counts what lies within.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        uid: int | None = None,
        max_file_bytes: int | None = None,
        max_total_bytes: int | None = None,
        max_files: int | None = None,
        max_read_bytes: int | None = None,
        max_depth: int = fdtree.DEFAULT_MAX_DEPTH,
        max_entries: int = fdtree.DEFAULT_MAX_ENTRIES,
    ):
        self.root = Path(root)
        self.uid = uid
        self.max_file_bytes = max_file_bytes
        self.max_total_bytes = max_total_bytes
        self.max_files = max_files
        self.max_read_bytes = max_read_bytes
        self.max_depth = max_depth
        self.max_entries = max_entries

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    # --- lifecycle -------------------------------------------------------------------

    async def create(self, uid: int | None = None) -> None:
        """Make the directory (mode 0700, owned by the session's uid when we are root)."""
        fd = await run_blocking(fdtree.open_root, self.root, create=True, uid=self._uid(uid))
        os.close(fd)

    async def exists(self) -> bool:
        return await run_blocking(self.root.is_dir)

    async def remove(self) -> None:
        """Delete the workspace and everything in it, at any depth; links are removed, not
        followed. Raises ``OSError`` when something could not be removed."""
        await run_blocking(fdtree.remove_tree, self.root)

    # --- files -------------------------------------------------------------------------

    async def list(self) -> list[dict]:
        """``[{path, size, uploaded}]`` for every regular file, sorted by path. Names the
        API could not address (control characters, ...) are left out. A tree past the
        walk caps is ``TooLarge``."""
        return await run_blocking(self._list_sync)

    async def read(self, path: str, *, max_bytes: int | None = None) -> bytes:
        """The bytes of a regular file; ``NotFound`` for anything else (absent, directory,
        symlink, FIFO). Larger than ``max_bytes`` (default ``max_read_bytes``): ``TooLarge``."""
        rel = safe_relpath(path)
        limit = self.max_read_bytes if max_bytes is None else max_bytes
        try:
            if limit is not None and limit <= SMALL_READ_BYTES:  # the data file, after every run
                return await _small_reads.submit(self._read_sync, rel, limit)
            return await run_blocking(self._read_sync, rel, limit)
        except OSError as exc:
            raise map_os_error(exc, rel) from None

    async def stat(self, path: str) -> dict:
        """``{path, size, uploaded}`` of one regular file, or ``NotFound``."""
        rel = safe_relpath(path)
        try:
            st = await run_blocking(self._stat_sync, rel)
        except OSError as exc:
            raise map_os_error(exc, rel) from None
        return {"path": rel, "size": st.st_size, "uploaded": iso_utc(st.st_mtime_ns)}

    async def write(self, path: str, data: bytes, uid: int | None = None) -> dict:
        """Create or replace a file atomically → ``{path, size}``. Parents are created;
        a symlink or file among them is refused (400); quotas give 413."""
        rel = safe_relpath(path)
        data = bytes(data)
        if self.max_file_bytes is not None and len(data) > self.max_file_bytes:
            raise TooLarge(f"file is larger than the limit of {self.max_file_bytes} bytes")
        owner = self._uid(uid)
        async with _write_lock(self.root):
            try:
                size = await run_blocking(self._write_sync, rel, data, owner)
            except OSError as exc:
                raise map_os_error(exc, rel, writing=True) from None
        return {"path": rel, "size": size}

    async def delete(self, path: str) -> None:
        """Remove a file (or link, or directory tree); ``NotFound`` when nothing is there."""
        rel = safe_relpath(path)
        try:
            removed = await run_blocking(self._delete_sync, rel)
        except OSError as exc:
            raise map_os_error(exc, rel) from None
        if not removed:
            raise not_found(rel)

    async def usage(self) -> tuple[int, int]:
        """``(file_count, total_bytes)`` of the regular files, links not followed.

        Every session document (so the list of all sessions) shows it: it never raises.
        Past the walk caps, or when the walk fails (out of descriptors under load, a
        directory the kernel made unreadable), it is a lower bound: what was counted."""
        return await run_blocking(self._usage_sync)

    async def copy_to(self, other: "str | os.PathLike | Workspace", uid: int | None = None) -> tuple[int, int]:
        """Copy every regular file into another directory (created if needed); returns
        ``(files, bytes)``. Links are not copied and never followed: the source is walked
        by descriptor, so a directory swapped for a link mid-copy is skipped, and the
        destination is written with the same no-follow walk. A source past the walk caps
        is ``TooLarge``, possibly after part of it was copied: the caller (session
        creation) removes the destination."""
        target = other.root if isinstance(other, Workspace) else Path(other)
        owner = self._uid(uid if uid is not None else (other.uid if isinstance(other, Workspace) else None))
        try:
            return await run_blocking(_copy_tree, self.root, target, owner, self._limits())
        except fdtree.WalkLimit as exc:
            raise limit_error(exc) from None

    # --- blocking halves ---------------------------------------------------------------

    def _uid(self, uid: int | None) -> int | None:
        return uid if uid is not None else self.uid

    def _limits(self) -> dict[str, int]:
        return {"max_depth": self.max_depth, "max_entries": self.max_entries}

    def _files(self, root_fd: int):
        """``fdtree.iter_files`` within this workspace's caps; past them ``TooLarge``."""
        try:
            yield from fdtree.iter_files(root_fd, **self._limits())
        except fdtree.WalkLimit as exc:
            raise limit_error(exc) from None

    def _open_root(self) -> int:
        try:
            return fdtree.open_root(self.root)
        except NotADirectoryError:
            raise FileNotFoundError(errno.ENOENT, "workspace is not a directory", str(self.root)) from None

    def _list_sync(self) -> list[dict]:
        try:
            root_fd = self._open_root()
        except FileNotFoundError:
            return []
        try:
            return [
                {"path": rel, "size": st.st_size, "uploaded": iso_utc(st.st_mtime_ns)}
                for rel, st, _, _ in self._files(root_fd)
                if is_safe_relpath(rel)
            ]
        finally:
            os.close(root_fd)

    def _read_sync(self, rel: str, limit: int | None) -> bytes:
        root_fd = self._open_root()
        try:
            fd, st = fdtree.open_file(root_fd, rel)
        finally:
            os.close(root_fd)
        try:
            if limit is not None and st.st_size > limit:
                raise TooLarge(f"file is larger than the limit of {limit} bytes")
            try:
                return fdtree.read_fd(fd, limit)
            except OSError as exc:
                if exc.errno == errno.EFBIG:  # it grew past the limit while we read it
                    raise TooLarge(f"file is larger than the limit of {limit} bytes") from None
                raise
        finally:
            os.close(fd)

    def _stat_sync(self, rel: str) -> os.stat_result:
        root_fd = self._open_root()
        try:
            fd, st = fdtree.open_file(root_fd, rel)
            os.close(fd)
            return st
        finally:
            os.close(root_fd)

    def _write_sync(self, rel: str, data: bytes, owner: int | None) -> int:
        root_fd = fdtree.open_root(self.root, create=True, uid=owner)
        try:
            if self.max_total_bytes is not None or self.max_files is not None:
                self._check_quota(root_fd, rel, len(data))
            return fdtree.write_atomic(root_fd, rel, lambda fd: fdtree.write_all(fd, data), uid=owner)
        finally:
            os.close(root_fd)

    def _check_quota(self, root_fd: int, rel: str, size: int) -> None:
        count, total, replaced = 0, 0, 0
        for path, st, _, _ in self._files(root_fd):
            count += 1
            total += st.st_size
            if path == rel:
                replaced = st.st_size
                count -= 1
        if self.max_files is not None and count + 1 > self.max_files:
            raise TooLarge(f"the workspace already holds the limit of {self.max_files} files")
        if self.max_total_bytes is not None and total - replaced + size > self.max_total_bytes:
            raise TooLarge(f"the workspace would exceed its limit of {self.max_total_bytes} bytes")

    def _delete_sync(self, rel: str) -> bool:
        root_fd = self._open_root()
        try:
            *parents, leaf = rel.split("/")
            dir_fd = fdtree.open_dir(root_fd, parents)
            try:
                return fdtree.remove_entry(dir_fd, leaf)
            finally:
                os.close(dir_fd)
        finally:
            os.close(root_fd)

    def _usage_sync(self) -> tuple[int, int]:
        count = total = 0
        capped: list[fdtree.WalkLimit] = []
        try:
            root_fd = self._open_root()
        except FileNotFoundError:
            return 0, 0
        except OSError as exc:
            log.warning("usage of %s not counted: %s", self.root, exc)
            return 0, 0
        try:
            for _, st, _, _ in fdtree.iter_files(root_fd, **self._limits(), on_limit=capped.append):
                count += 1
                total += st.st_size
        except OSError as exc:
            log.warning("usage of %s counted in part: %s", self.root, exc)
        finally:
            os.close(root_fd)
        if capped:  # the listing, copy and push of this workspace answer 413 with the reason
            log.debug("usage of %s is a lower bound: %s", self.root, "; ".join(map(str, capped)))
        return count, total


# One lock per directory, shared by every Workspace object on it (callers may build a
# new one per request): the server's own writes are serialized so that two uploads
# cannot both pass a quota check. Weak values: a lock lives while someone holds it.
_WRITE_LOCKS: "weakref.WeakValueDictionary[str, asyncio.Lock]" = weakref.WeakValueDictionary()


def _write_lock(root: Path) -> asyncio.Lock:
    key = os.path.abspath(root)
    lock = _WRITE_LOCKS.get(key)
    if lock is None:
        lock = _WRITE_LOCKS[key] = asyncio.Lock()
    return lock


def _copy_tree(source: Path, target: Path, owner: int | None, limits: dict[str, int]) -> tuple[int, int]:
    try:
        src_root = fdtree.open_root(source)
    except (FileNotFoundError, NotADirectoryError):
        src_root = None
    dst_root = fdtree.open_root(target, create=True, uid=owner)
    files = total = 0
    try:
        if src_root is None:
            return 0, 0
        for rel, st, parent_fd, name in fdtree.walk(src_root, **limits):
            if not is_safe_relpath(rel) or fdtree.is_temp_name(name):
                continue
            if stat.S_ISDIR(st.st_mode):
                os.close(fdtree.open_dir(dst_root, rel.split("/"), create=True, uid=owner))
                continue
            if not stat.S_ISREG(st.st_mode):
                continue  # links, FIFOs, sockets, devices: never copied
            try:
                src_fd, _ = fdtree.open_regular(parent_fd, name)
            except OSError:
                continue  # replaced or removed by the kernel meanwhile
            try:
                total += fdtree.write_atomic(
                    dst_root, rel, lambda fd: fdtree.copy_fd(src_fd, fd), uid=owner, mtime_ns=st.st_mtime_ns
                )
                files += 1
            finally:
                os.close(src_fd)
        return files, total
    finally:
        if src_root is not None:
            os.close(src_root)
        os.close(dst_root)
