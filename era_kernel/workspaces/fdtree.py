"""Blocking, descriptor-relative file operations that never follow a symbolic link.

The kernel that owns a workspace can create, rename and replace anything in it at any
moment, including swapping a directory for a symlink to ``/`` between our check and our
use. So nothing here resolves a path string: every step opens the next name relative to
the already-open parent directory with ``O_NOFOLLOW`` (``openat``-style walking), and a
symlink anywhere ends the walk with ``ELOOP``. Callers get built-in ``OSError``
subclasses (and ``WalkLimit``); mapping them to HTTP errors is the async layer's job.

The kernel also decides how deep and how wide the tree is: 20,000 nested directories
are a few lines of code. So no operation here holds a descriptor per level without a
cap: walks stop at ``max_depth`` and ``max_entries``, and removal keeps at most
``REMOVE_FDS`` directories open whatever the depth.

Everything here blocks; the async classes run it in an executor.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from typing import Callable, Iterator

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO the kernel left in place of a file must not hang us.
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# Prefix of our temporary files (atomic writes). Entries with it are never listed,
# pushed or copied: they are either in flight or debris of a killed process.
TEMP_PREFIX = ".era-tmp-"
CHUNK = 1024 * 1024

# Defaults of ERA_WORKSPACE_MAX_DEPTH / ERA_WORKSPACE_MAX_ENTRIES (config.py holds the
# same numbers): node_modules trees are ~20 deep, and a path the files API can address
# (1024 bytes) has at most 512 levels anyway.
DEFAULT_MAX_DEPTH = 64
DEFAULT_MAX_ENTRIES = 100_000
REMOVE_FDS = 32         # directories one removal keeps open at most
REMOVE_BATCH = 10_000   # names one removal reads from a directory at a time

FileEntry = tuple[str, os.stat_result]


class WalkLimit(Exception):
    """A walk met one of its caps: ``kind`` is ``"depth"`` or ``"entries"``, ``limit`` the
    cap. Not an ``OSError``: nothing failed, the tree is larger than the caller allows
    (``local.limit_error`` turns it into a 413 that names the setting)."""

    def __init__(self, kind: str, limit: int):
        super().__init__(f"the tree is over its {kind} limit of {limit}")
        self.kind = kind
        self.limit = limit


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX)


def owner_for(uid: int | None) -> int | None:
    """The uid to chown new files to: only when asked and only when we can (root)."""
    if uid is None or os.geteuid() != 0:
        return None
    return uid


def open_root(path: str | os.PathLike, *, create: bool = False, uid: int | None = None, mode: int = 0o700) -> int:
    """Open the workspace directory itself (created ``mode`` and chowned when asked).

    Its parents belong to the server, so they are resolved normally; its own name must
    not be a symlink.
    """
    path = os.fspath(path)
    made = False
    if create:
        parent = os.path.dirname(path.rstrip("/"))
        if parent:
            os.makedirs(parent, exist_ok=True)
        try:
            os.mkdir(path, mode)
            made = True
        except FileExistsError:
            pass
    fd = os.open(path, DIR_FLAGS)
    try:
        if made:
            os.fchmod(fd, mode)  # the umask must not widen or narrow what we chose
            owner = owner_for(uid)
            if owner is not None:
                os.fchown(fd, owner, owner)
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_dir(root_fd: int, names: list[str], *, create: bool = False, uid: int | None = None) -> int:
    """Open ``root/names...`` one name at a time; symlinked components raise ``ELOOP``."""
    owner = owner_for(uid)
    fd = os.dup(root_fd)
    try:
        for name in names:
            made = False
            try:
                child = os.open(name, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)
                    made = True
                except FileExistsError:
                    pass  # raced with the kernel: the open below decides what it is
                child = os.open(name, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
            if made and owner is not None:
                os.fchown(fd, owner, owner)  # on the open descriptor: a swap cannot redirect it
        return fd
    except BaseException:
        os.close(fd)
        raise


def scan(dir_fd: int, at_most: int | None = None) -> list[FileEntry]:
    """Names and ``lstat`` results of one directory, sorted; vanished entries skipped.
    Reads no more than ``at_most`` entries (walks pass their remaining budget plus one,
    so a directory of millions of names costs neither the time nor the memory)."""
    out: list[FileEntry] = []
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            if at_most is not None and len(out) >= at_most:
                break
            try:
                out.append((entry.name, entry.stat(follow_symlinks=False)))
            except FileNotFoundError:
                continue
    out.sort(key=lambda item: item[0])
    return out


def walk(
    root_fd: int,
    *,
    descend: Callable[[str], bool] | None = None,
    max_depth: int | None = DEFAULT_MAX_DEPTH,
    max_entries: int | None = DEFAULT_MAX_ENTRIES,
    on_limit: Callable[[WalkLimit], None] | None = None,
) -> Iterator[tuple[str, os.stat_result, int, str]]:
    """Yield ``(relpath, lstat, parent_fd, name)`` for every entry, parents first.

    Directories are entered (with ``O_NOFOLLOW``) when ``descend(relpath)`` is true or
    no predicate is given; one that became a symlink or vanished meanwhile is skipped.
    ``parent_fd`` is valid only until the next item, which lets callers open or unlink
    the entry without walking again. Iterative, so Python's recursion limit plays no part.

    Bounded for a tree the kernel shaped: entries lie at most ``max_depth`` levels down
    (those directly in the root are level 1), so the walk holds at most ``max_depth`` + 1
    descriptors; and at most ``max_entries`` entries are read. A non-empty directory at
    the last level, or one entry too many, raises ``WalkLimit``; with ``on_limit`` the
    walk reports it there instead and goes on, without that directory (depth) or
    without reading further (entries), for callers content with a lower bound (usage).
    ``None`` lifts a cap: only for trees bounded otherwise (restore's, by its manifest).
    """
    seen = 0
    exhausted = False

    def over(exc: WalkLimit) -> None:
        if on_limit is None:
            raise exc
        on_limit(exc)

    def listing(fd: int) -> Iterator[FileEntry]:
        nonlocal seen, exhausted
        if max_entries is None:
            return iter(scan(fd))
        room = max_entries - seen
        entries = scan(fd, room + 1)
        if len(entries) > room:
            over(WalkLimit("entries", max_entries))
            exhausted = True
            entries = entries[:room]
        seen += len(entries)
        return iter(entries)

    stack: list[tuple[int, str, Iterator[FileEntry]]] = []
    first = os.dup(root_fd)
    try:
        stack.append((first, "", listing(first)))
    except BaseException:
        os.close(first)
        raise
    try:
        while stack:
            fd, prefix, entries = stack[-1]
            item = next(entries, None)
            if item is None:
                os.close(fd)
                stack.pop()
                continue
            name, st = item
            rel = prefix + name
            yield rel, st, fd, name
            if not stat.S_ISDIR(st.st_mode) or exhausted or (descend is not None and not descend(rel)):
                continue
            child = _open_walked(fd, name)
            if child is None:
                continue
            if max_depth is not None and len(stack) >= max_depth:
                # Its entries would lie past the last level: only an empty one is fine.
                try:
                    deeper = _has_entries(child)
                finally:
                    os.close(child)
                if deeper:
                    over(WalkLimit("depth", max_depth))
                continue
            try:
                stack.append((child, rel + "/", listing(child)))
            except BaseException:
                os.close(child)
                raise
    finally:
        for fd, _, _ in stack:
            os.close(fd)


def _open_walked(dir_fd: int, name: str) -> int | None:
    """Open a directory the walk saw; None when it vanished or became a link or a file."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        raise


def _has_entries(dir_fd: int) -> bool:
    with os.scandir(dir_fd) as entries:
        return next(entries, None) is not None


def iter_files(root_fd: int, **limits) -> Iterator[tuple[str, os.stat_result, int, str]]:
    """Regular files only (no symlinks, FIFOs, devices, sockets, temp files); ``limits``
    are ``walk``'s caps."""
    for rel, st, parent_fd, name in walk(root_fd, **limits):
        if stat.S_ISREG(st.st_mode) and not is_temp_name(name):
            yield rel, st, parent_fd, name


def open_regular(dir_fd: int, name: str) -> tuple[int, os.stat_result]:
    """Open a regular file for reading; anything else is ``FileNotFoundError``.

    The ``lstat`` first avoids even opening a device; the ``fstat`` after closes the race
    where the name was replaced between the two.
    """
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode):
        raise FileNotFoundError(errno.ENOENT, "not a regular file", name)
    fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise FileNotFoundError(errno.ENOENT, "not a regular file", name)
    return fd, st


def open_file(root_fd: int, rel: str) -> tuple[int, os.stat_result]:
    """Open ``rel`` (already checked by ``safe_relpath``) for reading, no link followed."""
    *parents, leaf = rel.split("/")
    dir_fd = open_dir(root_fd, parents)
    try:
        return open_regular(dir_fd, leaf)
    finally:
        os.close(dir_fd)


def read_fd(fd: int, limit: int | None = None) -> bytes:
    """Read to the end; past ``limit`` bytes raise ``EFBIG`` (the file grew while read)."""
    chunks = []
    total = 0
    while True:
        chunk = os.read(fd, CHUNK)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if limit is not None and total > limit:
            raise OSError(errno.EFBIG, "file is larger than allowed")
        chunks.append(chunk)


def write_all(fd: int, data: bytes | memoryview) -> int:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    return len(data)


def copy_fd(src_fd: int, dst_fd: int) -> int:
    """Copy from the current offset to the end (in-kernel when the filesystem allows)."""
    total = 0
    while True:
        try:
            count = os.copy_file_range(src_fd, dst_fd, 64 * CHUNK)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            break
        if count == 0:
            return total
        total += count
    while True:  # plain read/write fallback, from where the fast path stopped
        chunk = os.read(src_fd, CHUNK)
        if not chunk:
            return total
        total += write_all(dst_fd, chunk)


def write_atomic(
    root_fd: int,
    rel: str,
    fill: Callable[[int], int],
    *,
    uid: int | None = None,
    mtime_ns: int | None = None,
    durable: bool = False,
) -> int:
    """Create ``rel`` through a temporary file and ``rename``; returns ``fill``'s size.

    Parents are created as needed (never through a symlink). A reader, the kernel or a
    crash sees the old file or the new one, never a half-written one. Replacing a symlink
    replaces the link itself (``rename`` does not follow its target).
    """
    *parents, leaf = rel.split("/")
    owner = owner_for(uid)
    dir_fd = open_dir(root_fd, parents, create=True, uid=uid)
    try:
        try:
            existing = os.stat(leaf, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", rel)
        temp = TEMP_PREFIX + secrets.token_hex(8)
        fd = os.open(temp, _TEMP_FLAGS, 0o644, dir_fd=dir_fd)
        try:
            try:
                size = fill(fd)
                if owner is not None:
                    os.fchown(fd, owner, owner)
                if mtime_ns is not None:
                    os.utime(fd, ns=(mtime_ns, mtime_ns))
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temp, leaf, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            try:
                os.unlink(temp, dir_fd=dir_fd)
            except OSError:
                pass
            raise
        if durable:
            os.fsync(dir_fd)
        return size
    finally:
        os.close(dir_fd)


def remove_entry(dir_fd: int, name: str, *, max_fds: int = REMOVE_FDS) -> bool:
    """Remove a file, link or whole directory tree at ``dir_fd/name`` without following
    links; returns False when there was nothing.

    Works at any depth with at most ``max_fds`` directories open: when the stack is
    full, the next directory down is renamed (descriptor-relative, so no link is
    followed) into the top directory under a temporary name, and removed from there
    later; a chain of 20,000 directories costs 20,000 / ``max_fds`` renames. Names are
    read ``REMOVE_BATCH`` at a time, so a huge directory does not fill memory either.

    Raises what it cannot remove (a directory it may not write even after making it
    writable, a mount point, the kernel adding files as fast as they go): the caller
    must know that files remain.
    """
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        _unlink(dir_fd, name)
        return True
    top = _open_subdir(dir_fd, name)
    if top is None:
        return True
    try:
        _empty(top, max(2, max_fds))
    finally:
        os.close(top)
    _rmdir(dir_fd, name)
    return True


def remove_tree(path: str | os.PathLike) -> bool:
    """``remove_entry`` by path, for a tree whose *parent* the server owns (a workspace,
    a kernel's directory, a setup's staging directory): the parent is resolved normally,
    nothing below it is. False when there was nothing."""
    parent, name = os.path.split(os.fspath(path).rstrip("/"))
    try:
        parent_fd = os.open(parent or ".", DIR_FLAGS & ~os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        return remove_entry(parent_fd, name)
    finally:
        os.close(parent_fd)


class _Frame:
    """One open directory of a removal: the names left to remove, read a batch at a time."""

    def __init__(self, fd: int, name: str | None):
        self.fd, self.name = fd, name  # name in the directory below it on the stack
        self.names: list[str] = []
        self.more = True  # the directory may hold names not read yet

    def refill(self) -> None:
        """Read the next batch. What was removed is gone, so reading from the start
        again finds only what is left."""
        with os.scandir(self.fd) as entries:
            self.names = [entry.name for _, entry in zip(range(REMOVE_BATCH), entries)]
        self.more = len(self.names) == REMOVE_BATCH


def _empty(top: int, max_fds: int) -> None:
    """Remove everything inside the open directory ``top`` (see ``remove_entry``)."""
    stack = [_Frame(top, None)]
    try:
        while stack:
            frame = stack[-1]
            if not frame.names:
                if frame.more:
                    frame.refill()
                    continue
                stack.pop()
                if frame.name is not None:  # ``top`` itself is the caller's to close and remove
                    os.close(frame.fd)
                    _rmdir(stack[-1].fd, frame.name)
                continue
            name = frame.names.pop()
            try:
                st = os.stat(name, dir_fd=frame.fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                _unlink(frame.fd, name)
            elif len(stack) >= max_fds:
                _move_up(frame.fd, name, top)
                stack[0].more = True  # ``top`` now holds it: read ``top`` again when back there
            else:
                child = _open_subdir(frame.fd, name)
                if child is not None:
                    stack.append(_Frame(child, name))
    finally:
        for frame in stack[1:]:
            os.close(frame.fd)


def _move_up(dir_fd: int, name: str, top: int) -> None:
    """Rename ``dir_fd/name`` to a fresh temporary name in ``top`` (same filesystem: a
    workspace cannot hold a mount point the server sees; if it did, this raises)."""
    temp = f"{TEMP_PREFIX}rm-{secrets.token_hex(8)}"
    try:
        os.rename(name, temp, src_dir_fd=dir_fd, dst_dir_fd=top)
    except PermissionError:
        # Moving a directory to another parent rewrites its "..": both directories and
        # the moved one must be writable (a non-root server, a kernel's chmod).
        _make_writable(dir_fd)
        _make_writable(top)
        child = _open_subdir(dir_fd, name)
        if child is None:
            return
        try:
            _make_writable(child)
        finally:
            os.close(child)
        os.rename(name, temp, src_dir_fd=dir_fd, dst_dir_fd=top)


def _open_subdir(dir_fd: int, name: str, *, unlock: bool = True) -> int | None:
    """Open a directory about to be removed; if it became a link or file, unlink that.
    One we may not read (mode 000, left so by the kernel) is made readable first."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except PermissionError:
        if not unlock:
            raise
        _chmod_unreadable(dir_fd, name)
        return _open_subdir(dir_fd, name, unlock=False)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            _unlink(dir_fd, name)
            return None
        raise


def _chmod_unreadable(dir_fd: int, name: str) -> None:
    """Give the owner rwx on a directory we cannot open for reading. ``O_PATH`` opens it
    without read permission (and without following a link); chmod through its
    ``/proc/self/fd`` entry then acts on exactly that inode (what glibc does for
    ``fchmodat(AT_SYMLINK_NOFOLLOW)``). Raises on one we do not own. If it vanished or
    became a link meanwhile, nothing is done: the caller's next open says what it is."""
    try:
        fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return
        raise
    try:
        os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(os.fstat(fd).st_mode) | stat.S_IRWXU)
    finally:
        os.close(fd)


def _make_writable(dir_fd: int) -> None:
    os.fchmod(dir_fd, stat.S_IMODE(os.fstat(dir_fd).st_mode) | stat.S_IRWXU)


def _unlink(dir_fd: int, name: str) -> None:
    """Unlink a non-directory; in a read-only directory (go's module cache, a kernel's
    chmod) the directory is made writable and the unlink tried once more."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except PermissionError:
        _make_writable(dir_fd)
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass


def _rmdir(dir_fd: int, name: str) -> None:
    """Remove an emptied directory (as ``_unlink``). ``ENOTEMPTY`` is raised: something
    was added meanwhile, and the caller must know it is still there."""
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except PermissionError:
        _make_writable(dir_fd)
        try:
            os.rmdir(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
