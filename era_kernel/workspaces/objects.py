"""Whole-object reads and writes on an fsspec filesystem, every write atomic.

"Atomic" means a reader (or a restart after SIGKILL) sees an object complete under its
real name or not at all:
- S3 and other object stores: a single PUT, or a multipart upload, only becomes visible
  when it completes; an aborted stream is discarded, never committed;
- ``file://``: we write a temporary sibling, ``fsync`` it, ``rename`` it over the real
  name and ``fsync`` the directory (fsspec's local writes go straight to the target);
- ``memory://``: a single in-process assignment.

Everything here blocks (s3fs runs its requests on its own event loop thread); the store
calls it from an executor. Batch reads use s3fs's concurrency (``cat`` of many keys or
ranges at once) and degrade to loops elsewhere.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import OrderedDict
from typing import Iterable

from fsspec.implementations.local import LocalFileSystem

from . import fdtree

STREAM_BLOCK = 8 * 1024 * 1024


class ObjectStore:
    """Objects addressed by ``/``-joined keys under ``root`` on ``fs``."""

    def __init__(self, fs, root: str, *, durable: bool = True):
        self.fs = fs
        self.root = root.rstrip("/") if root not in ("", "/") else root
        self.local = isinstance(fs, LocalFileSystem)
        # fsync on file:// so that a power cut, not only a killed process, keeps the
        # manifest pointing at complete blobs. Tests and benches may turn it off.
        self.durable = durable
        self.manifest_cache: OrderedDict = OrderedDict()  # see manifest.load

    def key(self, *parts: str) -> str:
        if self.root in ("", "/"):
            return self.root + "/".join(parts)
        return "/".join([self.root, *parts])

    # --- writes -----------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        if self.local:
            self._local_write(key, lambda fd: fdtree.write_all(fd, data))
        else:
            self.fs.pipe_file(key, data)

    def put_stream(self, key: str, src_fd: int) -> tuple[int, str]:
        """Upload from ``src_fd``'s offset to its end; returns ``(size, sha256)`` of what
        was actually sent (the file may change while we read it)."""
        digest = hashlib.sha256()

        def chunks():
            while True:
                chunk = os.read(src_fd, STREAM_BLOCK)
                if not chunk:
                    return
                digest.update(chunk)
                yield chunk

        if self.local:
            size = self._local_write(key, lambda fd: sum(fdtree.write_all(fd, c) for c in chunks()))
            return size, digest.hexdigest()
        handle = self.fs.open(key, "wb", block_size=max(STREAM_BLOCK, 5 * 2**20))
        size = 0
        try:
            for chunk in chunks():
                handle.write(chunk)
                size += len(chunk)
        except BaseException:
            # Closing would commit what was sent so far under the real name.
            discard = getattr(handle, "discard", None)
            if discard is not None:
                discard()
            raise
        handle.close()
        return size, digest.hexdigest()

    def copy_many(self, pairs: list[tuple[str, str]]) -> None:
        if not pairs:
            return
        if self.local:
            for src, dst in pairs:
                fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    self._local_write(dst, lambda out: fdtree.copy_fd(fd, out))
                finally:
                    os.close(fd)
        elif getattr(self.fs, "async_impl", False):
            self.fs.copy([s for s, _ in pairs], [d for _, d in pairs])  # server-side copies
        else:
            for src, dst in pairs:
                self.fs.cp_file(src, dst)

    def _local_write(self, key: str, fill) -> int:
        directory, name = os.path.split(key)
        os.makedirs(directory, exist_ok=True)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return fdtree.write_atomic(dir_fd, name, fill, durable=self.durable)
        finally:
            os.close(dir_fd)

    # --- reads ------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        return self.fs.cat_file(key)

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        if not keys:
            return {}
        if self.local or not getattr(self.fs, "async_impl", False) or len(keys) == 1:
            return {key: self.get(key) for key in keys}
        found = self.fs.cat(list(keys), on_error="raise")  # concurrent GETs
        return {key: found[self.fs._strip_protocol(key)] for key in keys}

    def get_ranges(self, ranges: list[tuple[str, int, int]]) -> list[bytes]:
        """``[(key, start, end)]`` → the bytes of each range (concurrent on S3)."""
        if not ranges:
            return []
        if self.local or not getattr(self.fs, "async_impl", False) or len(ranges) == 1:
            return [self.fs.cat_file(key, start=start, end=end) for key, start, end in ranges]
        return self.fs.cat_ranges([r[0] for r in ranges], [r[1] for r in ranges], [r[2] for r in ranges],
                                  on_error="raise")

    def get_stream(self, key: str, dst_fd: int) -> tuple[int, str]:
        """Download into ``dst_fd``; returns ``(size, sha256)``."""
        digest = hashlib.sha256()
        size = 0
        with self.fs.open(key, "rb", block_size=STREAM_BLOCK) as handle:
            while True:
                chunk = handle.read(STREAM_BLOCK)
                if not chunk:
                    return size, digest.hexdigest()
                digest.update(chunk)
                size += fdtree.write_all(dst_fd, chunk)

    def find(self, prefix: str) -> list[str]:
        """Every object key under ``prefix`` (fresh listing, no cache)."""
        self.fs.invalidate_cache(prefix)
        try:
            return list(self.fs.find(prefix))
        except FileNotFoundError:
            return []

    # --- deletes ----------------------------------------------------------------------

    def remove_many(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        if not keys:
            return
        if self.local or not getattr(self.fs, "async_impl", False):
            for key in keys:
                try:
                    self.fs.rm_file(key)
                except FileNotFoundError:
                    pass
        else:
            self.fs.rm(keys)  # batched DeleteObjects

    def remove_prefix(self, prefix: str) -> None:
        if self.local:
            try:
                shutil.rmtree(prefix)  # the store's own directory: the kernel cannot reach it
            except FileNotFoundError:
                pass
            return
        try:
            self.fs.rm(prefix, recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(prefix)

