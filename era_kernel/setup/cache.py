"""Content-addressed environments: a local directory each, and one archive each in the store.

Local layout, under ``$ERA_DATA_DIR/envs`` (inside the data directory, which sandboxes
mask, so a kernel sees only the environment bound into it)::

    envs/<key>/                          complete environments (root-owned, read-only to others)
    envs/.staging/<key>-<pid>-<hex>/     one being built or restored
    envs/.staging/<key>-<pid>-<hex>.home scratch HOME of its steps (pip/npm caches)

An environment becomes visible under its key only by a rename of a finished staging
directory, so a crash or a failure never leaves a partial environment behind a key;
staging directories of dead processes are swept. In the workspace store each
environment is one object, ``envs/<key>.tar.gz``, so restoring it is one GET however
many files it has. Archives are read back with strict checks (relative names only,
files, directories and symlinks only, no member under a symlink, no duplicates, size
and count caps), since a store may be shared.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import stat
import tarfile
import time
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from ..errors import NotFound
from ..orphans import pid_alive
from ..workspaces import fdtree
from .layout import MANIFEST
from .steps import SetupFailed

STAGING = ".staging"
MAX_ARCHIVE_MEMBERS = 500_000
COMPRESS_LEVEL = 6
log = logging.getLogger("era.setup")


class CacheError(SetupFailed):
    pass


def archive_key(key: str) -> str:
    return f"envs/{key}.tar.gz"


def _is_regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _write_new(directory: str, name: str, fill: Callable[[Any], None]) -> None:
    """Create ``directory/name`` afresh (replacing a file of that name) without ever
    following a link the sandbox may have planted: a random temporary sibling made with
    O_EXCL|O_NOFOLLOW, then a rename over the name (rename replaces links, never follows)."""
    temp = os.path.join(directory, f".era-tmp-{os.urandom(6).hex()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as out:
            fill(out)
        os.replace(temp, os.path.join(directory, name))
    except BaseException:
        if os.path.lexists(temp):
            os.unlink(temp)
        raise


def _copy_of(path: str) -> Callable[[Any], None]:
    def fill(out) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as src:
            shutil.copyfileobj(src, out, 1024 * 1024)
    return fill


def rmtree(path: Path) -> None:
    """Remove a staging tree, a scratch home or an environment. The setup's commands
    wrote them as the sandbox uid, so they may nest deeper than our open-file limit, hold
    links, or be read-only (go's module cache): ``fdtree`` removes them with a bounded
    number of descriptors, following no link, making read-only directories writable.
    Raises ``OSError`` when something stays (see ``_remove_logged``)."""
    fdtree.remove_tree(path)


def _remove_logged(path: Path) -> None:
    """``rmtree`` for clean-ups that must not turn a setup's outcome (or its own error)
    into a removal error: what stays is logged, and swept again by the next start."""
    try:
        rmtree(path)
    except OSError as exc:
        log.error("could not remove %s completely: %s", path, exc)


class EnvCache:
    def __init__(self, root: Path, store: Any = None, *, max_bytes: int):
        self.root = Path(root)
        # A WorkspaceStore; or a function returning one (the engine builds its store lazily);
        # or None: local directories only.
        self._store = store
        self.max_bytes = max_bytes
        self._swept = False

    @property
    def store(self) -> Any:
        if callable(self._store) and not hasattr(self._store, "get_archive"):
            self._store = self._store()
        return self._store

    def final(self, key: str) -> Path:
        return self.root / key

    def present(self, key: str) -> bool:
        return _is_regular_file(self.final(key) / MANIFEST)

    def manifest(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.final(key) / MANIFEST).read_text())
        except (OSError, ValueError):
            return None

    # --- staging (blocking; called in an executor) ------------------------------------------

    def make_staging(self, key: str, uid: int) -> tuple[Path, Path]:
        """A fresh staging directory and scratch home, owned by ``uid`` (the setup runs as it)."""
        staging_root = self.root / STAGING
        for path in (self.root, staging_root):
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, 0o711)  # sandboxes reach theirs by path; nobody lists
        if not self._swept:
            self._sweep(staging_root)
            self._swept = True
        name = f"{key}-{os.getpid()}-{os.urandom(4).hex()}"
        staging, home = staging_root / name, staging_root / f"{name}.home"
        for path in (staging, home):
            path.mkdir(mode=0o700)
            if os.getuid() == 0 and uid != 0:
                os.chown(path, uid, uid)
        return staging, home

    def _sweep(self, staging_root: Path) -> None:
        """Remove what dead processes left mid-build; a live engine's builds stay."""
        for entry in staging_root.iterdir():
            parts = entry.name.split("-")
            if len(parts) >= 3 and parts[1].isdigit() and not pid_alive(int(parts[1])):
                _remove_logged(entry)

    def discard(self, *paths: Path | None) -> None:
        for path in paths:
            if path is not None:
                _remove_logged(path)

    def seal(self, staging: Path, manifest: dict[str, Any], on_line: Callable[[str], None]) -> dict[str, Any]:
        """Make a built environment shareable: owned by us, readable by every sandbox uid,
        writable by none; hard links broken, special files dropped, size checked; the
        manifest written last. Runs after every process of the setup is gone."""
        owner = (os.getuid(), os.getgid())
        files = total = 0
        for dirpath, dirnames, filenames in os.walk(staging, followlinks=False):
            for name in [*dirnames, *filenames]:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    if os.getuid() == 0:
                        os.lchown(path, *owner)
                    continue
                if stat.S_ISREG(st.st_mode):
                    if st.st_nlink > 1:  # one inode in two places: keep a private copy
                        _write_new(dirpath, name, _copy_of(path))
                    files += 1
                    total += st.st_size
                    if total > self.max_bytes:
                        raise CacheError(f"the environment is larger than the limit of {self.max_bytes} bytes "
                                         "(ERA_SETUP_MAX_BYTES)")
                    mode = 0o755 if st.st_mode & 0o111 else 0o644
                elif stat.S_ISDIR(st.st_mode):
                    mode = 0o755
                else:  # fifos, sockets, devices have no place in a shared read-only tree
                    os.unlink(path)
                    on_line(f"(dropped special file {os.path.relpath(path, staging)})")
                    continue
                if os.getuid() == 0:
                    os.lchown(path, *owner)
                os.chmod(path, mode)
        if os.getuid() == 0:
            os.chown(staging, *owner)
        os.chmod(staging, 0o755)
        manifest = dict(manifest, files=files, bytes=total)
        # Replaces whatever a command may have put under that name (a link included).
        body = json.dumps(manifest, indent=1, sort_keys=True).encode()
        _write_new(str(staging), MANIFEST, lambda out: out.write(body))
        return manifest

    def promote(self, key: str, staging: Path) -> None:
        """Publish a sealed staging directory under its key (atomic rename). When another
        process got there first, its copy is kept and ours dropped."""
        try:
            os.rename(staging, self.final(key))
        except OSError:
            if not self.present(key):
                raise
            _remove_logged(staging)

    # --- archives ---------------------------------------------------------------------------

    @staticmethod
    def pack(staging: Path) -> bytes:
        """The environment as one tar.gz, entries sorted, names relative. GNU format and
        whole-second times: no per-entry PAX header, so reading it back parses half as much."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=COMPRESS_LEVEL, format=tarfile.GNU_FORMAT) as tar:
            for dirpath, dirnames, filenames in os.walk(staging, followlinks=False):
                dirnames.sort()
                for name in sorted([*dirnames, *filenames]):
                    path = os.path.join(dirpath, name)
                    info = tar.gettarinfo(path, arcname=os.path.relpath(path, staging))
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    info.mtime = int(info.mtime)
                    if info.isreg():
                        with open(path, "rb") as fh:
                            tar.addfile(info, fh)
                    elif info.isdir() or info.issym():
                        tar.addfile(info)
        return buf.getvalue()

    def unpack(self, data: bytes, staging: Path) -> None:
        """Extract an archive from the store into an empty staging directory, in one
        streaming pass, refusing anything a packed environment cannot contain. A refusal
        part-way leaves a partial staging directory, which the caller discards."""
        seen: set[str] = set()
        links: set[str] = set()
        dirs: list[Path] = []
        total = 0
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|gz") as tar:
            for count, member in enumerate(tar, 1):
                name = PurePosixPath(member.name)
                rel = str(name)
                if count > MAX_ARCHIVE_MEMBERS:
                    raise CacheError(f"archive has more than {MAX_ARCHIVE_MEMBERS} entries")
                if name.is_absolute() or ".." in name.parts or rel in ("", ".") or "\0" in rel:
                    raise CacheError(f"archive entry {member.name[:80]!r} is outside the environment")
                if rel in seen:
                    raise CacheError(f"archive entry {rel[:80]!r} appears twice")
                if any(str(parent) in links for parent in name.parents):
                    raise CacheError(f"archive entry {rel[:80]!r} lies under a symlink")
                seen.add(rel)
                target = staging / rel
                if member.isdir():
                    target.mkdir(mode=0o755)
                    dirs.append(target)
                elif member.issym():
                    links.add(rel)
                    os.symlink(member.linkname, target)  # never followed here: nothing goes under it
                elif member.isreg():
                    total += member.size
                    if total > self.max_bytes:
                        raise CacheError(f"archive unpacks to more than {self.max_bytes} bytes")
                    source = tar.extractfile(member)
                    assert source is not None
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 0o755 if member.mode & 0o111 else 0o644)
                    with os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(source, out, 1024 * 1024)
                else:
                    raise CacheError(f"archive entry {rel[:80]!r} is not a file, directory or symlink")
        for path in dirs:  # the umask may have narrowed them
            os.chmod(path, 0o755)
        os.chmod(staging, 0o755)

    async def upload(self, key: str, staging: Path, run_blocking) -> int:
        """Store the archive; returns its size. The caller decides what a failure means."""
        data = await run_blocking(self.pack, staging)
        await self.store.put_archive(archive_key(key), data)
        return len(data)

    async def restore(self, key: str, uid: int, run_blocking, on_line: Callable[[str], None]) -> bool:
        """Fetch ``key`` from the store into a local environment. False when the store has
        no such archive (or it is unusable: then it is rebuilt, and overwritten)."""
        if self.store is None:
            return False
        started = time.perf_counter()
        try:
            data = await self.store.get_archive(archive_key(key))
        except NotFound:
            return False
        staging, home = await run_blocking(self.make_staging, key, uid)
        try:
            await run_blocking(self.discard, home)
            await run_blocking(self.unpack, data, staging)
            if not await run_blocking(_is_regular_file, staging / MANIFEST):
                raise CacheError("the archive has no manifest")
            await run_blocking(self.promote, key, staging)
        except (CacheError, tarfile.TarError, OSError, EOFError) as exc:
            await run_blocking(self.discard, staging)
            on_line(f"stored archive of environment {key} is unusable ({exc}); building it again")
            return False
        except BaseException:
            await run_blocking(self.discard, staging)
            raise
        on_line(f"restored environment {key} from the store ({len(data)} bytes) in "
                f"{time.perf_counter() - started:.2f}s")
        built_at = (self.manifest(key) or {}).get("path")
        if built_at and built_at != str(self.final(key)):
            # pip and npm output is relocatable; absolute paths a command wrote may not be.
            on_line(f"note: this environment was built at {built_at} (another ERA_DATA_DIR); "
                    "absolute paths written by its commands may not resolve here")
        return True
