"""Blocking push/restore between a local directory and a session's snapshot in the store.

Layout of one session under the store root::

    <session_id>/manifest.json       {"format", "updated", "files": {path: entry}}
    <session_id>/blobs/<random hex>  file contents, immutable once written

An entry is ``{"size", "mtime_ns", "sha256", "blob"}``. Blobs are never overwritten and
the manifest is replaced in one atomic write *after* every blob it names is complete,
so at any instant, including after a SIGKILL mid-push, the store holds exactly one
complete snapshot: the previous one or the new one. Blobs no manifest names any more
(replaced files, debris of a killed push) are deleted after the new manifest is in
place. Blob names are random rather than content hashes so a large file can be hashed
while it streams up; identical contents still share one blob through the sha256.

Change detection: a file whose size and mtime match its manifest entry is unchanged
without being read; otherwise it is hashed and uploaded only if its sha256 is new.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import stat
import time

from ..errors import TooLarge
from . import fdtree
from .objects import ObjectStore
from .paths import is_safe_relpath, iso_utc

FORMAT = "era-workspace/1"
MANIFEST = "manifest.json"
BLOBS = "blobs"
SMALL_FILE = 8 * 1024 * 1024      # read whole and sent in batches; larger files stream
BATCH_BYTES = 64 * 1024 * 1024    # memory bound of one batch of small files
BATCH_COUNT = 256
_BLOB_RE = re.compile(r"^blobs/[0-9a-f]{32}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")

Files = dict[str, dict]


def new_blob() -> str:
    return f"{BLOBS}/{secrets.token_hex(16)}"


# --- manifest -----------------------------------------------------------------------


def encode_manifest(files: Files) -> bytes:
    doc = {"format": FORMAT, "updated": iso_utc(time.time_ns()), "files": files}
    return json.dumps(doc, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def decode_manifest(data: bytes) -> Files:
    """Parse and check a manifest: a tampered one must not steer a restore outside the
    workspace (``..`` names) or to another session's objects."""
    doc = json.loads(data)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("files"), dict):
        raise ValueError("not an era workspace manifest")
    files: Files = {}
    for path, entry in doc["files"].items():
        if not is_safe_relpath(path):
            raise ValueError(f"manifest names an invalid path: {path!r}")
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int) and entry["size"] >= 0
            and isinstance(entry.get("mtime_ns"), int)
            and isinstance(entry.get("sha256"), str) and _SHA_RE.match(entry["sha256"])
            and isinstance(entry.get("blob"), str) and _BLOB_RE.match(entry["blob"])
        ):
            raise ValueError(f"manifest entry for {path!r} is malformed")
        files[path] = {k: entry[k] for k in ("size", "mtime_ns", "sha256", "blob")}
    for path in files:
        if any(parent in files for parent in parent_dirs(path)):
            raise ValueError(f"manifest has {path!r} under a file")
    return files


def parent_dirs(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def load_manifest(objects: ObjectStore, sid: str) -> Files:
    try:
        data = objects.get(objects.key(sid, MANIFEST))
    except FileNotFoundError:
        return {}
    return decode_manifest(data)


def save_manifest(objects: ObjectStore, sid: str, files: Files) -> None:
    objects.put(objects.key(sid, MANIFEST), encode_manifest(files))


def collect_garbage(objects: ObjectStore, sid: str, files: Files) -> int:
    """Delete every object of the session but the manifest and the blobs it names:
    replaced contents, and debris of a killed push (orphan blobs, temporary files)."""
    strip = objects.fs._strip_protocol
    wanted = {strip(objects.key(sid, entry["blob"])) for entry in files.values()}
    wanted.add(strip(objects.key(sid, MANIFEST)))
    unused = [key for key in objects.find(objects.key(sid)) if strip(key) not in wanted]
    objects.remove_many(unused)
    return len(unused)


def check_limits(count: int, total: int, max_files: int | None, max_total_bytes: int | None) -> None:
    if max_files is not None and count > max_files:
        raise TooLarge(f"the workspace holds {count} files, over the limit of {max_files}")
    if max_total_bytes is not None and total > max_total_bytes:
        raise TooLarge(f"the workspace holds {total} bytes, over the limit of {max_total_bytes}")


# --- push ---------------------------------------------------------------------------


def push(objects: ObjectStore, sid: str, local_dir, *, max_files=None, max_total_bytes=None) -> dict:
    """Make the store's snapshot of ``sid`` equal to the regular files of ``local_dir``."""
    started = time.perf_counter()
    old = load_manifest(objects, sid)
    stats = {"files": 0, "bytes": 0, "unchanged": 0, "hashed": 0, "uploaded": 0, "uploaded_bytes": 0,
             "deleted": 0, "skipped": 0, "removed_blobs": 0, "manifest_written": False}
    root_fd = fdtree.open_root(local_dir)
    try:
        found: list[tuple[str, os.stat_result]] = []
        for rel, st, _, name in fdtree.walk(root_fd):
            if stat.S_ISDIR(st.st_mode) or fdtree.is_temp_name(name):
                continue
            if stat.S_ISREG(st.st_mode) and is_safe_relpath(rel):
                found.append((rel, st))
            else:  # links, FIFOs, sockets; names the API cannot address
                stats["skipped"] += 1
        check_limits(len(found), sum(st.st_size for _, st in found), max_files, max_total_bytes)
        new = _snapshot(objects, sid, root_fd, found, old, stats)
    finally:
        os.close(root_fd)
    stats["deleted"] = len(old.keys() - new.keys())
    stats["files"] = len(new)
    stats["bytes"] = sum(entry["size"] for entry in new.values())
    if new != old:
        save_manifest(objects, sid, new)  # the commit point
        stats["manifest_written"] = True
    # Also after a no-op push: that is how debris of a killed push (or of a killed
    # collection) goes away without anything else changing. One listing.
    stats["removed_blobs"] = collect_garbage(objects, sid, new)
    stats["seconds"] = round(time.perf_counter() - started, 6)
    return stats


def _snapshot(objects, sid, root_fd, found, old: Files, stats: dict) -> Files:
    blob_by_sha = {entry["sha256"]: entry["blob"] for entry in old.values()}
    new: Files = {}
    batch: dict[str, bytes] = {}
    batch_bytes = 0
    for rel, st in found:
        prev = old.get(rel)
        if prev is not None and prev["size"] == st.st_size and prev["mtime_ns"] == st.st_mtime_ns:
            new[rel] = prev
            stats["unchanged"] += 1
            continue
        try:
            fd, fst = fdtree.open_file(root_fd, rel)
        except OSError:
            continue  # removed or replaced by a link since the walk: not a file any more
        try:
            stats["hashed"] += 1
            if fst.st_size <= SMALL_FILE:
                data = fdtree.read_fd(fd)
                size, sha = len(data), hashlib.sha256(data).hexdigest()
                blob = blob_by_sha.get(sha)
                if blob is None:
                    blob = blob_by_sha[sha] = new_blob()
                    batch[objects.key(sid, blob)] = data
                    batch_bytes += size
                    stats["uploaded"] += 1
                    stats["uploaded_bytes"] += size
            else:
                size, sha = fst.st_size, _hash_fd(fd)
                blob = blob_by_sha.get(sha)
                if blob is None:
                    os.lseek(fd, 0, os.SEEK_SET)
                    blob = new_blob()
                    # What was sent is what the entry describes, even if the file changed.
                    size, sha = objects.put_stream(objects.key(sid, blob), fd)
                    blob_by_sha.setdefault(sha, blob)
                    stats["uploaded"] += 1
                    stats["uploaded_bytes"] += size
        finally:
            os.close(fd)
        # mtime from before the read: a write during the read shows up as a change next time.
        new[rel] = {"size": size, "mtime_ns": fst.st_mtime_ns, "sha256": sha, "blob": blob}
        if batch_bytes >= BATCH_BYTES or len(batch) >= BATCH_COUNT:
            objects.put_many(batch)
            batch, batch_bytes = {}, 0
    objects.put_many(batch)
    return new


def _hash_fd(fd: int) -> str:
    digest = hashlib.sha256()
    while True:
        chunk = os.read(fd, fdtree.CHUNK)
        if not chunk:
            return digest.hexdigest()
        digest.update(chunk)


# --- restore ------------------------------------------------------------------------


def restore(objects: ObjectStore, sid: str, local_dir, *, uid: int | None = None) -> dict:
    """Make ``local_dir`` an exact mirror of the snapshot: missing or stale files are
    fetched, everything else (files, links, directories, debris) removed."""
    started = time.perf_counter()
    files = load_manifest(objects, sid)
    wanted_dirs = {parent for path in files for parent in parent_dirs(path)}
    stats = {"files": len(files), "bytes": sum(e["size"] for e in files.values()), "kept": 0,
             "downloaded": 0, "downloaded_bytes": 0, "removed": 0}
    root_fd = fdtree.open_root(local_dir, create=True, uid=uid)
    try:
        current: set[str] = set()
        for rel, st, parent_fd, name in fdtree.walk(root_fd, descend=wanted_dirs.__contains__):
            if stat.S_ISDIR(st.st_mode) and rel in wanted_dirs:
                continue
            entry = files.get(rel)
            if entry is not None and stat.S_ISREG(st.st_mode):
                if st.st_size == entry["size"] and st.st_mtime_ns == entry["mtime_ns"]:
                    current.add(rel)
                continue  # a stale file is replaced by the rename below
            fdtree.remove_entry(parent_fd, name)
            stats["removed"] += 1
        stats["kept"] = len(current)
        _fetch(objects, sid, root_fd, {p: e for p, e in files.items() if p not in current}, uid, stats)
    finally:
        os.close(root_fd)
    stats["seconds"] = round(time.perf_counter() - started, 6)
    return stats


def _fetch(objects, sid, root_fd, todo: Files, uid, stats: dict) -> None:
    small = [(p, e) for p, e in sorted(todo.items()) if e["size"] <= SMALL_FILE]
    large = [(p, e) for p, e in sorted(todo.items()) if e["size"] > SMALL_FILE]
    start = 0
    while start < len(small):
        end, total = start, 0
        while end < len(small) and end - start < BATCH_COUNT and total < BATCH_BYTES:
            total += small[end][1]["size"]
            end += 1
        chunk = small[start:end]
        contents = objects.get_many(sorted({objects.key(sid, e["blob"]) for _, e in chunk}))
        for path, entry in chunk:
            data = contents[objects.key(sid, entry["blob"])]
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise OSError(f"store object for {path!r} does not match its checksum")
            fdtree.write_atomic(root_fd, path, lambda fd: fdtree.write_all(fd, data),
                                uid=uid, mtime_ns=entry["mtime_ns"])
            stats["downloaded"] += 1
            stats["downloaded_bytes"] += len(data)
        start = end
    for path, entry in large:
        def fill(fd: int, key=objects.key(sid, entry["blob"]), entry=entry, path=path) -> int:
            size, sha = objects.get_stream(key, fd)
            if sha != entry["sha256"]:
                raise OSError(f"store object for {path!r} does not match its checksum")
            return size

        stats["downloaded_bytes"] += fdtree.write_atomic(root_fd, path, fill, uid=uid, mtime_ns=entry["mtime_ns"])
        stats["downloaded"] += 1
