"""A hard bound on a workspace's bytes: every session directory is its own ext4
filesystem, in a sparse image file under ``<data>/volumes/``, mounted on the directory.

Code in a session writes as its own uid into its directory; nothing else stops it from
filling the disk that holds the store and the logs. This kernel has no filesystem quota
support to lean on (ext4 ``quota`` and XFS ``prjquota`` both need ``CONFIG_QUOTA``), so
the bound is a filesystem of its own: a write past it fails with ENOSPC inside the
session, and the host's disk holds at most the image (sparse: only what was written,
and, mounted with ``discard``, blocks the session frees go back to the host).

- ``make(path, uid)``: a new empty directory gets a fresh image (``mkfs.ext4``,
  ``lost+found`` removed), attached to a loop device and mounted ``nodev,nosuid,discard``
  at ``<data>/volumes/mnt/<root>/<name>`` (hidden: ``volumes/`` is the server's). The
  filesystem holds two directories: ``ws/`` (the session's uid's), bound onto the
  workspace directory, and ``tmp/`` (root's, 1777), the session's ``/tmp``
  (``tmp_of``): one bound for both, as a VM's disk is. Images made before that layout
  (their root is the workspace) are mounted on the directory as they were. The image is sized so that the session can
  write about ``size`` bytes (ext4's journal and inode tables come on top), plus a
  small reserve only root may use: the server's own small writes (the session's data
  file before each run) still succeed when the session filled its share.
- ``attach(path)``: mount an existing image again (after a server stop, or a reboot);
  a directory without an image (made with volumes off) is left as it is.
- ``release(path, usage)``: unmount (lazily when something still holds it), the loop
  device detaching itself when the last user goes; ``usage`` (files, bytes) is kept
  beside the image, so listing an unmounted session costs one small read, not a mount.
- ``remove(path)``: release and delete the image.

The loop devices, mounts and images themselves: ``loopfs.py``.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from ..provisioning.owner import me
from ..serial_thread import SerialThread
from .local import run_blocking
from .volume_stock import STOCK_DIR, VolumeStock
from .loopfs import (BLOCK, MIN_IMAGE, Superblock, VolumeError, _estimate, attach_loop, bind_mount, forget_loop_nodes, human,
                     loop_of,
                     loops_made, make_image, mkfs_tool, mount_ext4, mounts_under, read_superblock,
                     release_everything_under, unmount)  # noqa: F401  (release_everything_under: for tests)

log = logging.getLogger("era.volumes")

VOLUMES_ROOT = "volumes"  # under the data directory
ROOTS = ("sessions", "pool", "scratch")  # where workspace directories live; mirrored under volumes/
IMAGE_SUFFIX = ".img"
META_SUFFIX = ".json"
MOUNTS = "mnt"  # volumes/mnt/<root>/<name>: where a two-directory volume's filesystem is mounted
LAYOUT = 2  # meta "layout": the filesystem holds ws/ and tmp/ (absent: its root is the workspace)
FULL_BELOW = 4 * 1024**2  # a volume with less free than this (or 1/64 of it) is full for a session

_stats = SerialThread("era-volume-stats")  # statvfs after every run: a cheap hop


# ---- the service -----------------------------------------------------------------------

@dataclass(frozen=True)
class Support:
    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


_probed: Support | None = None


def support(data_dir: Path) -> Support:
    """Whether this process can give workspaces volumes: root, mkfs.ext4, the loop
    driver, and a real make-mount-unmount of a small image under ``data_dir`` (cached
    per process: the answer is the host's)."""
    global _probed
    if _probed is not None:
        return _probed
    if os.getuid() != 0:
        found = Support(False, "the server does not run as root")
    elif mkfs_tool() is None:
        found = Support(False, "mkfs.ext4 not found (apt-get install e2fsprogs)")
    elif not os.path.exists("/dev/loop-control"):
        found = Support(False, "no /dev/loop-control (the loop driver is missing, or this is a container)")
    else:
        found = _probe(data_dir)
    _probed = found
    return found


def _probe(data_dir: Path) -> Support:
    root = data_dir / VOLUMES_ROOT
    image, point = root / f".probe-{os.getpid()}.img", root / f".probe-{os.getpid()}"
    made_root = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o700)
        point.mkdir(exist_ok=True)
        make_image(image, MIN_IMAGE, 0, 0)
        dev, fd = attach_loop(image)
        try:
            mount_ext4(dev, point)
        finally:
            os.close(fd)
        return Support(True, "ext4 images on loop devices")
    except OSError as exc:
        return Support(False, f"a test volume could not be made and mounted: {exc.strerror or exc}")
    finally:
        try:
            unmount(point)
        except OSError:
            pass
        image.unlink(missing_ok=True)
        for made in (point, root) if made_root else (point,):
            try:
                made.rmdir()
            except OSError:
                pass


class Volumes:
    """Per-directory filesystems under one data directory. ``size``: what a session may
    write (``ERA_WORKSPACE_MAX_BYTES``); ``reserve``: root's share on top.

    Paths are workspace directories under ``<data>/{sessions,pool,scratch}``; each one's
    image is ``<data>/volumes/<root>/<name>.img``, its notes (``usage`` at the last
    release, the owning process) ``<name>.json``. Disabled (``enabled`` false), every
    call is a no-op and directories stay plain (``active``: volumes made before are
    still handled).
    """

    def __init__(self, data_dir: Path, size: int, reserve: int = 1024**2, stock: int = 0) -> None:
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / VOLUMES_ROOT
        self.size = size
        self.reserve = reserve
        # Images made ahead of demand (``volume_stock.py``); used once volumes are on.
        self.stock = VolumeStock(self.root / STOCK_DIR, stock, self._stock_image) if stock > 0 else None
        self.enabled = False  # new directories get volumes
        self.active = False  # existing volumes are mounted and removed (also when ``off``)
        self.reason = "not started"
        self._mounted: set[Path] = set()  # mounted by (or adopted into) this process
        self._plain: set[Path] = set()  # directories found without a volume (made with volumes off)
        self._locks: dict[Path, asyncio.Lock] = {}
        self._image_size: int | None = None  # learnt from the first mkfs
        self._split: set[Path] = set()  # directories whose volume holds ws/ and tmp/ (LAYOUT)

    # ---- start -----------------------------------------------------------------------
    async def start(self, mode: str) -> None:
        """``mode``: ``auto`` (on when the host can), ``on`` (fail when it cannot), ``off``
        (no new volumes; the ones already made are still mounted, so their sessions keep
        their files)."""
        if mode == "off":
            self.enabled, self.reason = False, "ERA_WORKSPACE_VOLUMES=off"
            if await run_blocking(self._any_image):
                found = await asyncio.to_thread(support, self.data_dir)
                self.active = bool(found)
                if not found:
                    log.error("sessions made with workspace volumes keep their files in images this host cannot "
                              "mount (%s): their workspaces look empty", found.reason)
            return
        found = await asyncio.to_thread(support, self.data_dir)
        if not found:
            if mode == "on":
                raise VolumeError(errno.ENOTSUP, f"ERA_WORKSPACE_VOLUMES=on, but workspace volumes are "
                                                 f"unavailable: {found.reason}")
            log.warning("workspace volumes off (%s): code in a session can fill the data directory's disk; "
                        "`era doctor` says more", found.reason)
            self.enabled, self.reason = False, found.reason
            return
        await run_blocking(self._make_roots)
        self.enabled = self.active = True
        self.reason = found.reason

    def start_stock(self) -> None:
        """Begin making volumes ahead of demand (a server's; ``era run`` makes none). On
        the event loop; a no-op without volumes or with ``ERA_WORKSPACE_VOLUME_STOCK=0``."""
        if self.enabled and self.stock is not None:
            self.stock.start()

    def _any_image(self) -> bool:
        return any(next((self.root / name).glob("*" + IMAGE_SUFFIX), None) for name in ROOTS
                   if (self.root / name).is_dir())

    def _make_roots(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)  # images are the server's: no kernel or user reads them
        for name in ROOTS:
            (self.root / name).mkdir(exist_ok=True)

    # ---- naming ----------------------------------------------------------------------
    def image(self, path: Path) -> Path:
        rel = Path(path).relative_to(self.data_dir)
        return self.root / rel.parent / (rel.name + IMAGE_SUFFIX)

    def _meta(self, path: Path) -> Path:
        return self.image(path).with_suffix(META_SUFFIX)

    def workspace_of(self, image: Path) -> Path:
        rel = image.relative_to(self.root)
        return self.data_dir / rel.parent / rel.name.removesuffix(IMAGE_SUFFIX)

    def _mnt(self, path: Path) -> Path:
        rel = Path(path).relative_to(self.data_dir)
        return self.root / MOUNTS / rel

    def tmp_of(self, path: Path) -> Path | None:
        """Where the /tmp of workspace ``path`` lives inside its mounted volume, or None
        when it lives outside (no volume, or one of the older layout; see
        ``engine/files.py``). Known once the volume is made or mounted here."""
        path = Path(path)
        return self._mnt(path) / "tmp" if path in self._split else None

    def is_mounted(self, path: Path) -> bool:
        return Path(path) in self._mounted

    def mounted(self) -> list[Path]:
        return sorted(self._mounted)

    def _lock(self, path: Path) -> asyncio.Lock:
        return self._locks.setdefault(Path(path), asyncio.Lock())

    # ---- lifecycle -------------------------------------------------------------------
    async def make(self, path: Path, uid: int) -> None:
        """Give the new, empty directory ``path`` a fresh volume, mounted. An image left
        under that name (debris) is replaced: a new directory never adopts old files."""
        if not self.enabled:
            return
        path = Path(path)
        async with self._lock(path):
            if path in self._mounted:
                raise VolumeError(errno.EEXIST, "this workspace already has its volume", str(path))
            await run_blocking(self._make_sync, path, uid)
            self._mounted.add(path)
            self._plain.discard(path)

    def _make_sync(self, path: Path, uid: int) -> None:
        image = self.image(path)
        image.parent.mkdir(parents=True, exist_ok=True)
        image.unlink(missing_ok=True)  # debris: a new file, never one a loop device may still serve
        sb = self._take_stocked(image)
        if sb is None:
            sb = self._new_image(image, uid)
        self._write_meta(path, {"base_blocks": sb.blocks - sb.free_blocks, "layout": LAYOUT})
        try:
            self._mount_sync(path, image, fresh=True, uid=uid)
        except BaseException:
            self._unmount_sync(path)
            image.unlink(missing_ok=True)
            self._meta(path).unlink(missing_ok=True)
            raise

    def _take_stocked(self, image: Path) -> Superblock | None:
        """A stock image (made ahead, never mounted: a fresh filesystem like ``_new_image``'s)
        renamed to ``image``; None when none is ready (or its directory went meanwhile)."""
        stocked = self.stock.take() if self.stock is not None else None
        if stocked is None:
            return None
        try:
            os.rename(stocked, image)
            return read_superblock(image)
        except FileNotFoundError:
            return None

    def _new_image(self, image: Path, uid: int) -> Superblock:
        """``mkfs`` a fresh image at ``image`` that leaves the session ``size`` bytes."""
        size = self._image_size or _estimate(self.size, self.reserve)
        for _ in range(4):
            sb = make_image(image, size, uid, self.reserve)
            short = self.size - sb.session_bytes
            if short <= 0:
                break
            size += -(-(short + BLOCK * 64) // BLOCK) * BLOCK  # grow by what was missing, once more
        else:
            raise VolumeError(errno.ENOSPC, "could not size the workspace image", str(image))
        self._image_size = size
        return sb

    def _stock_image(self, image: Path) -> None:
        """One image of the stock: root owns its root directory, as every new volume's
        (``_mount_sync`` gives ``ws/`` the session's uid when it is first mounted)."""
        self._new_image(image, 0)

    def _mount_sync(self, path: Path, image: Path, fresh: bool, uid: int | None = None) -> None:
        split = self._read_meta(path).get("layout") == LAYOUT
        point = self._mnt(path) if split else path
        if split:
            point.mkdir(mode=0o700, parents=True, exist_ok=True)
        if fresh or not self._mount_live(point, image):
            dev, fd = attach_loop(image)
            try:
                mount_ext4(dev, point)
            finally:
                os.close(fd)  # mounted, the device stays; otherwise autoclear detaches it now
        if fresh:
            try:
                os.rmdir(point / "lost+found")  # e2fsck's; nothing a session should see
            except OSError:
                pass
        if not split:
            if fresh:
                os.chmod(path, 0o700)  # like every workspace directory (mkfs makes its root 0755)
            return
        if fresh:
            os.chown(point, 0, 0)
            os.chmod(point, 0o711)  # the filesystem's root is ours; its two directories are reached by path
            (point / "ws").mkdir(mode=0o700)
            if uid is not None:
                os.chown(point / "ws", uid, uid)
            (point / "tmp").mkdir(mode=0o700)
            os.chmod(point / "tmp", 0o1777)  # root's and sticky, as a /tmp is (engine/files.py)
        bind_mount(point / "ws", path)
        self._split.add(path)

    @staticmethod
    def _mount_live(path: Path, image: Path) -> bool:
        """Mount the filesystem ``image`` still has on a loop device, if it has one: a
        kernel that was stopped a moment ago may still hold it in its sandbox's mounts,
        with writes not yet in the image. Attaching the image to a second device would
        put two filesystems over one file; mounting the same device shares the live one."""
        for _ in range(50):
            dev = loop_of(image)
            if dev is None:
                return False
            try:
                mount_ext4(dev, path)
                return True
            except OSError:  # being detached right now: wait for it to finish
                time.sleep(0.02)
        raise VolumeError(errno.EBUSY, "the volume's loop device neither serves nor detaches", str(image))

    async def attach(self, path: Path) -> bool:
        """Mount ``path``'s existing volume if it is not mounted. False when the
        directory has no volume (it was made with volumes off)."""
        path = Path(path)
        if not self.active or path in self._mounted or path in self._plain:
            return path in self._mounted
        async with self._lock(path):
            if path in self._mounted:
                return True
            mounted = await run_blocking(self._attach_sync, path)
            (self._mounted if mounted else self._plain).add(path)
            return mounted

    def _attach_sync(self, path: Path) -> bool:
        image = self.image(path)
        if not image.is_file():
            return False
        if os.path.ismount(path):  # mounted by a previous process of ours
            if self._read_meta(path).get("layout") == LAYOUT:
                self._split.add(path)
            return True
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._mount_sync(path, image, fresh=False)
        meta = self._read_meta(path)
        meta.pop("usage", None)  # stale from now on
        self._write_meta(path, meta)
        log.info("mounted the workspace volume of %s again", path.relative_to(self.data_dir))
        return True

    async def release(self, path: Path, usage: tuple[int, int] | None = None) -> None:
        """Unmount ``path``'s volume (lazily if busy); ``usage`` (files, bytes) is what
        listings show until it is mounted again."""
        path = Path(path)
        if not self.active:
            return
        async with self._lock(path):
            await run_blocking(self._release_sync, path, usage)
            self._mounted.discard(path)

    def _release_sync(self, path: Path, usage: tuple[int, int] | None) -> None:
        if usage is not None and self.image(path).is_file():
            meta = self._read_meta(path)
            meta["usage"] = list(usage)
            self._write_meta(path, meta)
        self._unmount_sync(path)

    async def remove(self, path: Path) -> None:
        """Unmount and delete ``path``'s volume (its files with it); the empty directory
        is the caller's to remove. Nothing to do for a directory without one."""
        path = Path(path)
        if not self.active:
            return
        async with self._lock(path):
            await run_blocking(self._unmount_sync, path)
            self._mounted.discard(path)
            await run_blocking(self._delete_sync, path)
        self._locks.pop(path, None)
        self._plain.discard(path)

    def _unmount_sync(self, path: Path) -> None:
        """The workspace (a bind, or the filesystem itself), then the hidden mount."""
        if os.path.ismount(path):
            unmount(path)
        point = self._mnt(path)
        if os.path.ismount(point):
            unmount(point)
        self._split.discard(Path(path))

    def _delete_sync(self, path: Path) -> None:
        image = self.image(path)
        if image.exists():
            image.unlink()  # a lazily unmounted volume's space returns when its loop device lets go
        self._meta(path).unlink(missing_ok=True)
        try:
            self._mnt(path).rmdir()  # its empty mount point
        except OSError:
            pass

    async def release_all(self, usage_of: Callable[[Path], Awaitable[tuple[int, int]]] | None = None) -> None:
        """Release every volume this process mounted (engine shutdown): a stopped server
        holds no mounts and no loop devices. ``usage_of(path)``: awaitable usage to keep."""
        async def one(path: Path) -> None:
            try:
                usage = await usage_of(path) if usage_of is not None else None
                await self.release(path, usage)
            except Exception as exc:
                log.error("cannot release the workspace volume on %s: %s", path, exc)

        if self.stock is not None:
            await self.stock.stop()
        paths = self.mounted()
        for start in range(0, len(paths), 8):
            await asyncio.gather(*(one(p) for p in paths[start:start + 8]))
        for _ in range(25):  # an unmounted device detaches a moment later (autoclear)
            if not loops_made():
                break
            await run_blocking(forget_loop_nodes)
            if loops_made():
                await asyncio.sleep(0.02)

    # ---- what is there ---------------------------------------------------------------
    async def adopt(self) -> list[Path]:
        """Take over the volumes a previous process left mounted (a crashed server's),
        so this one releases them; mounts on workspace directories whose image is gone
        are unmounted. Returns the adopted directories."""
        if not self.active:
            return []
        adopted, stray = await run_blocking(self._adopt_sync)
        self._mounted.update(adopted)
        for path in stray:
            log.warning("unmounted %s: a mount on a workspace directory without its volume image", path)
        return adopted

    def _adopt_sync(self) -> tuple[list[Path], list[Path]]:
        adopted, stray = [], []
        roots = {self.data_dir / name for name in ROOTS}
        hidden = {self.root / MOUNTS / name: self.data_dir / name for name in ROOTS}
        for point, _ in mounts_under(self.data_dir):
            if point.parent in hidden:  # a two-directory volume's filesystem: kept while its image is
                if not self.image(hidden[point.parent] / point.name).is_file():
                    unmount(point)
                    stray.append(point)
                continue
            if point.parent not in roots:
                continue
            if self.image(point).is_file():
                adopted.append(point)
                if self._read_meta(point).get("layout") == LAYOUT:
                    self._split.add(point)
            else:
                unmount(point)
                stray.append(point)
        return adopted, stray

    async def images(self) -> list[Path]:
        """The workspace directories that have a volume image."""
        if not self.active:
            return []

        def scan() -> list[Path]:
            return [self.workspace_of(img) for name in ROOTS if (self.root / name).is_dir()
                    for img in (self.root / name).glob("*" + IMAGE_SUFFIX)]

        return await run_blocking(scan)

    async def idle_usage(self, path: Path) -> tuple[int, int] | None:
        """(files, bytes) of an unmounted volume without mounting it: as kept at its last
        release, or, without that (the host went down with it mounted), estimated from
        its superblock (inodes and blocks in use). None when ``path`` is mounted or has
        no volume: walk the directory then."""
        path = Path(path)
        if not self.active or path in self._mounted:
            return None
        return await run_blocking(self._idle_usage_sync, path)

    def _idle_usage_sync(self, path: Path) -> tuple[int, int] | None:
        image = self.image(path)
        if not image.is_file():
            return None
        meta = self._read_meta(path)
        if "usage" in meta:
            files, size = meta["usage"]
            return int(files), int(size)
        try:
            sb = read_superblock(image)
        except OSError:
            return 0, 0
        # ext4's reserved inodes, and ws/ and tmp/ of a two-directory volume, are not files
        # (what its /tmp holds is: it shares the bound).
        own = 2 if meta.get("layout") == LAYOUT else 0
        files = max(0, sb.inodes - sb.free_inodes - (sb.first_inode - 1) - own)
        used = max(0, sb.blocks - sb.free_blocks - int(meta.get("base_blocks", 0)))
        return files, used * sb.block_size

    async def full(self, path: Path) -> int | None:
        """The bytes left on ``path``'s mounted volume when it is (nearly) full for a
        session's writes, else None. Nearly: a failed large write leaves some room (ext4
        keeps slack for blocks in flight; a 40 MiB write into 32 MiB stops 1.8 MiB
        short), so less than ``max(4 MiB, size / 64)`` counts, as does no inode left."""
        path = Path(path)
        if path not in self._mounted:
            return None
        try:
            st = await _stats.submit(os.statvfs, path)
        except OSError:
            return None
        left = st.f_bavail * st.f_frsize
        if left < max(FULL_BELOW, self.size // 64) or (st.f_files > 0 and st.f_favail == 0):
            return left
        return None

    def full_message(self, left: int) -> str:
        return (f"the workspace is full ({human(self.size)}, ERA_WORKSPACE_MAX_BYTES; {human(left)} left): "
                "writes past it fail with 'No space left on device' until files are deleted")

    # ---- notes beside the image --------------------------------------------------------
    def _read_meta(self, path: Path) -> dict:
        try:
            return json.loads(self._meta(path).read_text())
        except (OSError, ValueError):
            return {}

    def _write_meta(self, path: Path, meta: dict) -> None:
        meta["owner"] = list(me())
        target = self._meta(path)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, target)

    def owner(self, path: Path) -> tuple[int, int] | None:
        """(pid, start time) of the process that last mounted ``path``'s volume."""
        owner = self._read_meta(path).get("owner")
        return (int(owner[0]), int(owner[1])) if owner else None

