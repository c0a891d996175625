"""Blocking push/restore between a local directory and a session's snapshot in the store.

Layout of one session under the store root::

    <session_id>/manifest.json       which file is where (see ``manifest``)
    <session_id>/blobs/<random hex>  packs of small files, or one large file; immutable

Crash safety: blobs get fresh random names and are never overwritten, and the manifest
is replaced in one atomic write *after* every blob it names is complete. So at any
instant, including after a SIGKILL mid-push, the store holds exactly one complete
snapshot: the previous one or the new one. Blobs no manifest uses any more (replaced
files, debris of a killed push) are deleted after the new manifest is in place.

Change detection: a file whose size and mtime match its entry is unchanged without being
read; otherwise it is hashed, and uploaded only if its sha256 is not already stored (a
large file of a size nothing stored has is sent at once, hashed on the way).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import time

from ..errors import TooLarge
from . import fdtree
from .manifest import BLOBS, MANIFEST, Snapshot, load, parent_dirs, save
from .objects import ObjectStore
from .paths import is_safe_relpath

SMALL_FILE = 8 * 1024 * 1024     # up to this, files are read whole and packed; larger stream
PACK_BYTES = 32 * 1024 * 1024    # a pack is uploaded once it holds this much...
PACK_FILES = 4096                # ...or this many files
REPACK_BELOW = 0.5               # a pack less than half used is rewritten on the next push
FETCH_BYTES = 64 * 1024 * 1024   # memory bound of one round of downloads


def new_blob() -> str:
    return f"{BLOBS}/{secrets.token_hex(16)}"


def check_limits(count: int, total: int, max_files: int | None, max_total_bytes: int | None) -> None:
    if max_files is not None and count > max_files:
        raise TooLarge(f"the workspace holds {count} files, over the limit of {max_files}")
    if max_total_bytes is not None and total > max_total_bytes:
        raise TooLarge(f"the workspace holds {total} bytes, over the limit of {max_total_bytes}")


def delete_blobs(objects: ObjectStore, sid: str, blobs) -> int:
    keys = [objects.key(sid, blob) for blob in blobs]
    objects.remove_many(keys)
    return len(keys)


def sweep(objects: ObjectStore, sid: str, snapshot: Snapshot) -> int:
    """Delete every object of the session but the manifest and its blobs: debris a
    killed process left (orphan blobs, temporary files). Costs one listing."""
    strip = objects.fs._strip_protocol
    wanted = {strip(objects.key(sid, blob)) for blob in snapshot.blobs}
    wanted.add(strip(objects.key(sid, MANIFEST)))
    unused = [key for key in objects.find(objects.key(sid)) if strip(key) not in wanted]
    objects.remove_many(unused)
    return len(unused)


# --- push ---------------------------------------------------------------------------


class _Packer:
    """Collects small files into packs and uploads each pack as one object."""

    def __init__(self, objects: ObjectStore, sid: str, snapshot: Snapshot, stats: dict):
        self.objects, self.sid, self.snapshot, self.stats = objects, sid, snapshot, stats
        self.blob, self.parts, self.size = new_blob(), [], 0

    def add(self, data: bytes) -> tuple[str, int]:
        offset = self.size
        self.parts.append(data)
        self.size += len(data)
        self.stats["uploaded"] += 1
        self.stats["uploaded_bytes"] += len(data)
        placed = (self.blob, offset)
        if self.size >= PACK_BYTES or len(self.parts) >= PACK_FILES:
            self.flush()
        return placed

    def flush(self) -> None:
        if self.parts:
            self.objects.put(self.objects.key(self.sid, self.blob), b"".join(self.parts))
            self.snapshot.blobs[self.blob] = self.size
            self.stats["packs"] += 1
            self.blob, self.parts, self.size = new_blob(), [], 0


def push(objects: ObjectStore, sid: str, local_dir, *, full_sweep: bool = False,
         max_files: int | None = None, max_total_bytes: int | None = None,
         max_depth: int = fdtree.DEFAULT_MAX_DEPTH, max_entries: int = fdtree.DEFAULT_MAX_ENTRIES) -> dict:
    """Make the store's snapshot of ``sid`` equal to the regular files of ``local_dir``.
    ``full_sweep`` also lists the session's objects to delete debris of a killed push.
    A tree past ``max_depth`` / ``max_entries`` raises ``fdtree.WalkLimit`` before
    anything is uploaded: a snapshot without the deep part would delete it from the store."""
    started = time.perf_counter()
    old = load(objects, sid)
    stats = {"files": 0, "bytes": 0, "unchanged": 0, "hashed": 0, "uploaded": 0, "uploaded_bytes": 0,
             "packs": 0, "repacked": 0, "deleted": 0, "skipped": 0, "removed_blobs": 0, "manifest_written": False}
    root_fd = fdtree.open_root(local_dir)
    try:
        found: list[tuple[str, os.stat_result]] = []
        for rel, st, _, name in fdtree.walk(root_fd, max_depth=max_depth, max_entries=max_entries):
            if stat.S_ISDIR(st.st_mode) or fdtree.is_temp_name(name):
                continue
            if stat.S_ISREG(st.st_mode) and is_safe_relpath(rel):
                found.append((rel, st))
            else:  # links, FIFOs, sockets; names the API cannot address
                stats["skipped"] += 1
        check_limits(len(found), sum(st.st_size for _, st in found), max_files, max_total_bytes)
        new = _upload_changes(objects, sid, root_fd, found, old, stats)
    finally:
        os.close(root_fd)
    dead = new.prune()
    stats["deleted"] = len(old.files.keys() - new.files.keys())
    stats["files"], stats["bytes"] = len(new.files), new.total_bytes()
    if new.files != old.files or new.blobs != old.blobs:
        save(objects, sid, new)
        stats["manifest_written"] = True
        stats["removed_blobs"] = delete_blobs(objects, sid, dead)
    if full_sweep:
        stats["removed_blobs"] += sweep(objects, sid, new)
    stats["seconds"] = round(time.perf_counter() - started, 6)
    return stats


class _Stored:
    """Contents already in the store, by sha256 (and which sizes occur, to tell when a
    large file is worth hashing before it is sent)."""

    def __init__(self, entries, exclude: set[str] = frozenset()):
        self.by_sha: dict[str, dict] = {}
        self.sizes: set[int] = set()
        for entry in entries:
            if entry["blob"] not in exclude:
                self.add(entry)

    def add(self, entry: dict) -> None:
        self.by_sha.setdefault(entry["sha256"], entry)
        self.sizes.add(entry["size"])

    def get(self, sha: str) -> dict | None:
        return self.by_sha.get(sha)


def _upload_changes(objects, sid, root_fd, found, old: Snapshot, stats: dict) -> Snapshot:
    new = Snapshot(files={}, blobs=dict(old.blobs))
    stored = _Stored(old.files.values())
    packer = _Packer(objects, sid, new, stats)
    for rel, st in found:
        prev = old.files.get(rel)
        if _same(prev, st):
            new.files[rel] = prev
            stats["unchanged"] += 1
            continue
        entry = _read_and_place(objects, sid, root_fd, rel, stored, packer, new, stats)
        if entry is not None:
            new.files[rel] = entry
            stored.add(entry)
    # Packs less than half used now: their files are packed again so the old pack can
    # go (otherwise one surviving file could pin a 32 MiB pack forever).
    live = new.live_bytes()
    weak = {blob for blob, size in old.blobs.items() if size and live.get(blob, 0) < REPACK_BELOW * size}
    if weak:
        stored = _Stored(new.files.values(), exclude=weak)
        for rel in [rel for rel, entry in new.files.items() if entry["blob"] in weak]:
            entry = _read_and_place(objects, sid, root_fd, rel, stored, packer, new, stats)
            if entry is None:
                del new.files[rel]  # gone meanwhile
            else:
                new.files[rel] = entry
                stored.add(entry)
                stats["repacked"] += 1
    packer.flush()
    return new


def _read_and_place(objects, sid, root_fd, rel, stored: _Stored, packer: _Packer, new: Snapshot, stats: dict):
    """Hash ``rel`` and find its bytes a place: an already stored copy, the current pack,
    or (large files) a blob of its own. None when it is no longer a regular file."""
    try:
        fd, fst = fdtree.open_file(root_fd, rel)
    except OSError:
        return None  # removed or replaced by a link since the walk
    try:
        stats["hashed"] += 1
        if fst.st_size <= SMALL_FILE:
            data = fdtree.read_fd(fd)
            size, sha = len(data), hashlib.sha256(data).hexdigest()
            same = stored.get(sha)
            blob, offset = (same["blob"], same["offset"]) if same else packer.add(data)
        else:
            # Hash first only when a stored file has this size (a touched or copied file):
            # otherwise send it in one pass, hashing as it goes.
            same = stored.get(_hash_fd(fd)) if fst.st_size in stored.sizes else None
            if same:
                size, sha, blob, offset = same["size"], same["sha256"], same["blob"], same["offset"]
            else:
                os.lseek(fd, 0, os.SEEK_SET)
                blob, offset = new_blob(), 0
                # What was sent is what the entry describes, even if the file changed.
                size, sha = objects.put_stream(objects.key(sid, blob), fd)
                new.blobs[blob] = size
                stats["uploaded"] += 1
                stats["uploaded_bytes"] += size
    finally:
        os.close(fd)
    # mtime from before the read: a write during the read shows up as a change next time.
    return {"size": size, "mtime_ns": fst.st_mtime_ns, "sha256": sha, "blob": blob, "offset": offset}


def _same(entry: dict | None, st: os.stat_result) -> bool:
    return entry is not None and entry["size"] == st.st_size and entry["mtime_ns"] == st.st_mtime_ns


def _hash_fd(fd: int) -> str:
    digest = hashlib.sha256()
    while True:
        chunk = os.read(fd, fdtree.CHUNK)
        if not chunk:
            return digest.hexdigest()
        digest.update(chunk)


# --- restore ------------------------------------------------------------------------


def restore(objects: ObjectStore, sid: str, local_dir, *, uid: int | None = None,
            max_entries: int = fdtree.DEFAULT_MAX_ENTRIES) -> dict:
    """Make ``local_dir`` an exact mirror of the snapshot: missing or stale files are
    fetched, everything else (files, links, directories, debris) removed. Leftovers too
    many to compare (over ``max_entries``) are removed wholesale and everything fetched."""
    started = time.perf_counter()
    snapshot = load(objects, sid)
    files = snapshot.files
    stats = {"files": len(files), "bytes": snapshot.total_bytes(), "kept": 0, "downloaded": 0,
             "downloaded_bytes": 0, "requests": 0, "removed": 0}
    root_fd = fdtree.open_root(local_dir, create=True, uid=uid)
    try:
        try:
            current = _keep_current(root_fd, files, max_entries, stats)
        except fdtree.WalkLimit:
            os.close(root_fd)
            root_fd = -1
            fdtree.remove_tree(local_dir)
            stats["removed"] += 1
            root_fd = fdtree.open_root(local_dir, create=True, uid=uid)
            current = set()
        stats["kept"] = len(current)
        todo = {path: entry for path, entry in files.items() if path not in current}
        _fetch(objects, sid, root_fd, snapshot, todo, uid, stats)
    finally:
        if root_fd >= 0:
            os.close(root_fd)
    stats["seconds"] = round(time.perf_counter() - started, 6)
    return stats


def _keep_current(root_fd: int, files: dict, max_entries: int, stats: dict) -> set[str]:
    """Remove what the snapshot does not have; returns the paths already up to date.

    Only the snapshot's directories are entered, so the walk is as deep as its paths
    (at most 512 levels: ``MAX_PATH_BYTES``) and no depth cap applies; anything else is
    removed whole, at any depth. ``fdtree.WalkLimit`` past ``max_entries``."""
    wanted_dirs = {parent for path in files for parent in parent_dirs(path)}
    current: set[str] = set()
    for rel, st, parent_fd, name in fdtree.walk(root_fd, descend=wanted_dirs.__contains__,
                                                max_depth=None, max_entries=max_entries):
        if stat.S_ISDIR(st.st_mode) and rel in wanted_dirs:
            continue
        entry = files.get(rel)
        if entry is not None and stat.S_ISREG(st.st_mode):
            if st.st_size == entry["size"] and st.st_mtime_ns == entry["mtime_ns"]:
                current.add(rel)
            continue  # a stale file is replaced by the rename below
        fdtree.remove_entry(parent_fd, name)
        stats["removed"] += 1
    return current


def _fetch(objects, sid, root_fd, snapshot: Snapshot, todo: dict, uid, stats: dict) -> None:
    def write(path: str, entry: dict, data: bytes) -> None:
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise OSError(f"store object for {path!r} does not match its checksum")
        fdtree.write_atomic(root_fd, path, lambda fd: fdtree.write_all(fd, data), uid=uid, mtime_ns=entry["mtime_ns"])
        stats["downloaded"] += 1
        stats["downloaded_bytes"] += len(data)

    by_blob: dict[str, list[tuple[str, dict]]] = {}
    for path, entry in sorted(todo.items()):
        by_blob.setdefault(entry["blob"], []).append((path, entry))
    whole: list[str] = []      # packs mostly needed: one GET each
    ranged: list[tuple[str, dict]] = []  # a few files out of a big pack: one ranged GET each
    for blob, entries in by_blob.items():
        blob_size = snapshot.blobs[blob]
        if blob_size > SMALL_FILE and all(e["offset"] == 0 and e["size"] == blob_size for _, e in entries):
            for path, entry in entries:  # a large file's own blob: streamed straight to disk
                _fetch_large(objects, sid, root_fd, path, entry, uid, stats)
            continue
        needed = sum(size for _, _, size in {(e["blob"], e["offset"], e["size"]) for _, e in entries})
        if 2 * needed >= blob_size:
            whole.append(blob)
        else:
            ranged.extend(entries)

    start = 0
    while start < len(whole):  # whole packs, a bounded amount of memory at a time
        end, total = start, 0
        while end < len(whole) and (end == start or total + snapshot.blobs[whole[end]] <= FETCH_BYTES):
            total += snapshot.blobs[whole[end]]
            end += 1
        keys = [objects.key(sid, blob) for blob in whole[start:end]]
        contents = objects.get_many(keys)
        stats["requests"] += len(keys)
        for blob, key in zip(whole[start:end], keys):
            pack = memoryview(contents.pop(key))
            for path, entry in by_blob[blob]:
                write(path, entry, bytes(pack[entry["offset"]:entry["offset"] + entry["size"]]))
        start = end

    start = 0
    while start < len(ranged):
        end, total = start, 0
        while end < len(ranged) and (end == start or total + ranged[end][1]["size"] <= FETCH_BYTES):
            total += ranged[end][1]["size"]
            end += 1
        chunk = ranged[start:end]
        datas = objects.get_ranges([(objects.key(sid, e["blob"]), e["offset"], e["offset"] + e["size"])
                                    for _, e in chunk])
        stats["requests"] += len(chunk)
        for (path, entry), data in zip(chunk, datas):
            write(path, entry, data)
        start = end


def _fetch_large(objects, sid, root_fd, path, entry, uid, stats) -> None:
    def fill(fd: int) -> int:
        size, sha = objects.get_stream(objects.key(sid, entry["blob"]), fd)
        if size != entry["size"] or sha != entry["sha256"]:
            raise OSError(f"store object for {path!r} does not match its checksum")
        return size

    stats["downloaded_bytes"] += fdtree.write_atomic(root_fd, path, fill, uid=uid, mtime_ns=entry["mtime_ns"])
    stats["downloaded"] += 1
    stats["requests"] += 1
