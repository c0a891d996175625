"""Empty workspace volume images made ahead of demand (``ERA_WORKSPACE_VOLUME_STOCK``),
so that a new workspace's volume is a rename and a mount, not a ``mkfs`` on the way of
its session's create.

Measured in a burst of 30 creates on 2 cores, each workspace's ``mkfs.ext4`` (a process
of its own, ~15 ms of CPU and 15-30 ms to finish) was about a third of the server's CPU
for the burst, spent while the burst's kernels started. The stock is made while the
server is quiet instead: one image at a time, and only once no image was asked for
during ``QUIET`` seconds, so a burst's CPU goes to its kernels first and the stock
refills after it.

Images in the stock are fresh filesystems no session ever saw (made exactly as
``Volumes`` makes one on demand, root owning the root directory: its two directories
get their owners when it is first mounted), under ``<data>/volumes/stock/`` (the
server's: ``volumes/`` is 0700), in a directory of the process's own
(``<pid>-<start time>``: servers sharing a data directory keep theirs apart). Each is
written as ``<name>.tmp`` and renamed when complete; the stock is deleted at shutdown,
and what a process that is gone left, at start (its size may not be the one wanted).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

from ..provisioning.owner import me, owner_gone
from .local import run_blocking

log = logging.getLogger("era.volumes")

STOCK_DIR = "stock"  # under volumes/
QUIET = 0.5  # seconds without a take before the stock is refilled
RETRY = 30.0  # seconds after a failed image before the next try


class VolumeStock:
    """Up to ``target`` ready images in ``directory``; ``make(path)`` makes one (blocking)."""

    def __init__(self, directory: Path, target: int, make: Callable[[Path], None]) -> None:
        self.base = Path(directory)
        pid, started = me()
        self.directory = self.base / f"{pid}-{started}"
        self.target = max(0, target)
        self._make = make
        self._ready: deque[Path] = deque()
        self._lock = threading.Lock()  # take() runs on worker threads, the filler on another
        self._last_take = 0.0
        self._task: asyncio.Task | None = None
        self.made = 0
        self.taken = 0

    def start(self) -> None:
        """Begin filling in the background (on the event loop); returns at once."""
        if self.target and self._task is None:
            self._task = asyncio.create_task(self._fill(), name="era-volume-stock")

    async def stop(self) -> None:
        """Stop filling and delete the images left (none of them was ever mounted)."""
        if self._task is None:
            return  # never started (volumes off, not a server) or stopped already: nothing to delete
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        try:
            await run_blocking(self._clear)
        except OSError as exc:  # the next start's sweep deletes it
            log.warning("could not delete the stock of workspace volumes: %s", exc)

    def take(self) -> Path | None:
        """A ready image, now the caller's to rename into place, or None. Any thread."""
        with self._lock:
            self._last_take = time.monotonic()
            if not self._ready:
                return None
            self.taken += 1
            return self._ready.popleft()

    def __len__(self) -> int:
        return len(self._ready)

    async def _fill(self) -> None:
        await run_blocking(self._sweep)
        while True:
            with self._lock:
                count, quiet_for = len(self._ready), time.monotonic() - self._last_take
            if count >= self.target:
                await asyncio.sleep(1.0)
                continue
            if quiet_for < QUIET:
                await asyncio.sleep(QUIET - quiet_for)
                continue
            path = self.directory / f"{secrets.token_hex(8)}.img"
            try:
                await run_blocking(self._make_one, path)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - on-demand creation still works; say why and retry later
                log.warning("could not make a workspace volume ahead of demand (retry in %.0f s): %s", RETRY, exc)
                await asyncio.sleep(RETRY)
                continue
            with self._lock:
                self._ready.append(path)
            self.made += 1

    def _make_one(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        try:
            self._make(tmp)
            os.rename(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _clear(self) -> None:
        """Delete our stock (at shutdown)."""
        with self._lock:
            self._ready.clear()
        _remove(self.directory)

    def _sweep(self) -> None:
        """At start: an empty directory of ours; the stocks of processes that are gone deleted."""
        self.base.mkdir(mode=0o700, parents=True, exist_ok=True)
        for entry in self.base.iterdir():
            pid, _, started = entry.name.partition("-")
            if entry == self.directory or not (pid.isdigit() and started.isdigit()) or \
                    owner_gone(int(pid), int(started)):
                try:
                    _remove(entry)
                except OSError as exc:  # not ours to fix here; it does not stop our stock
                    log.warning("could not delete %s from the stock of workspace volumes: %s", entry, exc)
        self.directory.mkdir(mode=0o700, exist_ok=True)


def _remove(path: Path) -> None:
    """A stock directory and its images (plain files), or a stray file."""
    if path.is_dir() and not path.is_symlink():
        for entry in path.iterdir():
            entry.unlink(missing_ok=True)
        path.rmdir()
    else:
        path.unlink(missing_ok=True)
