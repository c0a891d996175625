"""A session's snapshot: which file is where in which blob. One JSON object per session.

    {"format": "era-workspace/2", "updated": "...Z",
     "files": {path: {"size", "mtime_ns", "sha256", "blob", "offset"}},
     "blobs": {"blobs/<random hex>": size}}

Small files are packed, many to a blob (one request per pack instead of one per file,
which is what makes pushing or restoring a thousand files cheap on S3); a large file has
a blob of its own. ``blobs`` lists every blob the snapshot owns, so the bytes no file
uses any more (dead bytes in a pack) can be counted and packs repacked.
"""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from .objects import ObjectStore
from .paths import is_safe_relpath, iso_utc

FORMAT = "era-workspace/2"
MANIFEST = "manifest.json"
BLOBS = "blobs"
_BLOB_RE = re.compile(r"blobs/[0-9a-f]{32}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_CACHE_SIZE = 256


@dataclass
class Snapshot:
    files: dict[str, dict] = field(default_factory=dict)
    blobs: dict[str, int] = field(default_factory=dict)

    def copy(self) -> "Snapshot":
        # Entries are never mutated in place, so sharing them is safe.
        return Snapshot(dict(self.files), dict(self.blobs))

    def total_bytes(self) -> int:
        return sum(entry["size"] for entry in self.files.values())

    def live_bytes(self) -> dict[str, int]:
        """Bytes of each blob some file still uses (identical files count once)."""
        ranges = {(e["blob"], e["offset"], e["size"]) for e in self.files.values()}
        live: dict[str, int] = {}
        for blob, _, size in ranges:
            live[blob] = live.get(blob, 0) + size
        return live

    def prune(self) -> list[str]:
        """Forget the blobs no file uses; returns their names (to delete after commit)."""
        used = {entry["blob"] for entry in self.files.values()}
        dead = [blob for blob in self.blobs if blob not in used]
        for blob in dead:
            del self.blobs[blob]
        return dead


def encode(snapshot: Snapshot) -> bytes:
    doc = {"format": FORMAT, "updated": iso_utc(time.time_ns()), "files": snapshot.files, "blobs": snapshot.blobs}
    return json.dumps(doc, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def decode(data: bytes) -> Snapshot:
    """Parse and check a manifest: a tampered one must not steer a restore outside the
    workspace (``..`` names), to another session's objects, or past a blob's end."""
    doc = json.loads(data)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError("not an era workspace manifest")
    files, blobs = doc.get("files"), doc.get("blobs")
    if not isinstance(files, dict) or not isinstance(blobs, dict):
        raise ValueError("manifest is malformed")
    for blob, size in blobs.items():
        if not (isinstance(blob, str) and _BLOB_RE.fullmatch(blob) and type(size) is int and size >= 0):
            raise ValueError(f"manifest names an invalid blob: {blob!r}")
    for path, entry in files.items():
        if not is_safe_relpath(path):
            raise ValueError(f"manifest names an invalid path: {path!r}")
        if not _valid_entry(entry, blobs):
            raise ValueError(f"manifest entry for {path!r} is malformed")
    for path in files:
        if any(parent in files for parent in parent_dirs(path)):
            raise ValueError(f"manifest has {path!r} under a file")
    return Snapshot({p: {k: e[k] for k in ("size", "mtime_ns", "sha256", "blob", "offset")} for p, e in files.items()},
                    dict(blobs))


def _valid_entry(entry, blobs: dict) -> bool:
    return (
        isinstance(entry, dict)
        and type(entry.get("size")) is int and entry["size"] >= 0
        and type(entry.get("offset")) is int and entry["offset"] >= 0
        and type(entry.get("mtime_ns")) is int
        and isinstance(entry.get("sha256"), str) and _SHA_RE.fullmatch(entry["sha256"]) is not None
        and entry.get("blob") in blobs
        and entry["offset"] + entry["size"] <= blobs[entry["blob"]]
    )


def parent_dirs(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _cache(objects: ObjectStore) -> OrderedDict:
    # Decoding and checking a 1,000-file manifest costs more than reading it: remember
    # the last one per session, keyed by its exact bytes (so never stale).
    return objects.manifest_cache


def load(objects: ObjectStore, sid: str) -> Snapshot:
    try:
        data = objects.get(objects.key(sid, MANIFEST))
    except FileNotFoundError:
        return Snapshot()
    cache = _cache(objects)
    hit = cache.get(sid)
    if hit is not None and hit[0] == data:
        cache.move_to_end(sid)
        return hit[1].copy()
    snapshot = decode(data)
    _remember(cache, sid, data, snapshot)
    return snapshot.copy()


def save(objects: ObjectStore, sid: str, snapshot: Snapshot) -> None:
    data = encode(snapshot)
    objects.put(objects.key(sid, MANIFEST), data)  # atomic: the commit point
    _remember(_cache(objects), sid, data, snapshot.copy())


def forget(objects: ObjectStore, sid: str) -> None:
    _cache(objects).pop(sid, None)


def _remember(cache: OrderedDict, sid: str, data: bytes, snapshot: Snapshot) -> None:
    cache[sid] = (data, snapshot)
    cache.move_to_end(sid)
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
