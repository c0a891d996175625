"""A hard bound on a workspace's bytes: every session directory is its own ext4
filesystem, in a sparse image file under ``<data>/volumes/``, mounted on the directory.

Code in a session writes as its own uid into its directory; nothing else stops it from
filling the disk that holds the store and the logs. This kernel has no filesystem quota
support to lean on (ext4 ``quota`` and XFS ``prjquota`` both need ``CONFIG_QUOTA``), so
the bound is a filesystem of its own: a write past it fails with ENOSPC inside the
session, and the host's disk holds at most the image (sparse: only what was written,
and, mounted with ``discard``, blocks the session frees go back to the host).

- ``make(path, uid)``: a new empty directory gets a fresh image (``mkfs.ext4``, the
  root owned by the session's uid, ``lost+found`` removed), attached to a loop device
  and mounted ``nodev,nosuid,discard``. The image is sized so that the session can
  write about ``size`` bytes (ext4's journal and inode tables come on top), plus a
  small reserve only root may use: the server's own small writes (the session's data
  file before each run) still succeed when the session filled its share.
- ``attach(path)``: mount an existing image again (after a server stop, or a reboot);
  a directory without an image (made with volumes off) is left as it is.
- ``release(path, usage)``: unmount (lazily when something still holds it), the loop
  device detaching itself when the last user goes; ``usage`` (files, bytes) is kept
  beside the image, so listing an unmounted session costs one small read, not a mount.
- ``remove(path)``: release and delete the image.

Loop devices are attached with the loop ioctls rather than ``losetup``/``mount -o
loop``: this host has no udev, so a device the kernel hands out
(``LOOP_CTL_GET_FREE``) may have no ``/dev/loopN`` node, which util-linux cannot
create; we make the node and configure that very device (``LOOP_CONFIGURE``, with
``LO_FLAGS_AUTOCLEAR``), retrying when another process took it first. ``mount(2)`` and
``umount2(2)`` are called through libc for the same reason plus one fork less per
step; ``mkfs.ext4`` is the one command run. Everything that blocks runs in threads.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import json
import logging
import os
import shutil
import stat
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from ..provisioning.owner import me
from ..serial_thread import SerialThread
from .local import run_blocking

log = logging.getLogger("era.volumes")

VOLUMES_ROOT = "volumes"  # under the data directory
ROOTS = ("sessions", "pool", "scratch")  # where workspace directories live; mirrored under volumes/
IMAGE_SUFFIX = ".img"
META_SUFFIX = ".json"
BLOCK = 4096
MIN_IMAGE = 16 * 1024**2  # mkfs.ext4 wants room for a journal
FULL_BELOW = 4 * 1024**2  # a volume with less free than this (or 1/64 of it) is full for a session

# <linux/loop.h>
LOOP_MAJOR = 7
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_REMOVE = 0x4C81
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_AUTOCLEAR = 4
LO_NAME_SIZE = 64
# <sys/mount.h>
MS_NOSUID, MS_NODEV = 2, 4
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_attach_lock = threading.Lock()  # one LOOP_CTL_GET_FREE .. LOOP_CONFIGURE at a time in this process
# Loop devices this process's LOOP_CTL_GET_FREE created, and nodes it made for devices
# without one: removed again by forget_loop_nodes.
_made_devices: set[int] = set()
_made_nodes: set[int] = set()
_stats = SerialThread("era-volume-stats")  # statvfs after every run: a cheap hop


class VolumeError(OSError):
    pass


def human(size: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} bytes"


# ---- the system calls ----------------------------------------------------------------

def _check(result: int, what: str, path: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise VolumeError(code, f"{what}: {os.strerror(code)}", path)


def _loop_info(image: str) -> bytes:
    """``struct loop_info64`` with autoclear set and the backing file's name."""
    name = os.fsencode(image)[:LO_NAME_SIZE - 1]
    # lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit (u64); lo_number,
    # lo_encrypt_type, lo_encrypt_key_size, lo_flags (u32); file name, crypt name,
    # key; lo_init[2] (u64): 232 bytes.
    return struct.pack("=5Q4I64s64s32s2Q", 0, 0, 0, 0, 0, 0, 0, 0, LO_FLAGS_AUTOCLEAR, name, b"", b"", 0, 0)


def _loop_node(number: int) -> str:
    """``/dev/loopN``, made when the kernel has the device but no node exists yet (no
    udev; devtmpfs makes one too, but a moment later)."""
    dev = f"/dev/loop{number}"
    try:
        os.mknod(dev, stat.S_IFBLK | 0o600, os.makedev(LOOP_MAJOR, number))
    except FileExistsError:
        pass
    else:
        _made_nodes.add(number)
    return dev


def attach_loop(image: Path) -> tuple[str, int]:
    """Attach ``image`` to a free loop device with autoclear → ``(device, open fd)``. The
    device detaches itself once the fd is closed and nothing mounts it."""
    for _ in range(64):
        with _attach_lock:
            known = {entry.name for entry in Path("/sys/block").glob("loop*")}
            ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
            try:
                number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            finally:
                os.close(ctl)
            if f"loop{number}" not in known:  # none was free: the kernel made this one for us
                _made_devices.add(number)
            dev = _loop_node(number)
            loop_fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
            image_fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
            try:
                info = _loop_info(str(image))
                try:  # struct loop_config: fd, block_size, info, 8 reserved u64
                    fcntl.ioctl(loop_fd, LOOP_CONFIGURE, struct.pack("=II", image_fd, 0) + info + bytes(64))
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.ENOTTY):
                        raise
                    fcntl.ioctl(loop_fd, LOOP_SET_FD, image_fd)  # kernels before 5.8
                    try:
                        fcntl.ioctl(loop_fd, LOOP_SET_STATUS64, info)
                    except OSError:
                        fcntl.ioctl(loop_fd, LOOP_CLR_FD)
                        raise
                return dev, loop_fd
            except OSError as exc:
                os.close(loop_fd)
                if exc.errno != errno.EBUSY:  # EBUSY: another process took this one first
                    raise
            finally:
                os.close(image_fd)
    raise VolumeError(errno.EBUSY, "no free loop device", str(image))


def loop_of(image: Path) -> str | None:
    """The loop device ``image`` is attached to now, if any (a deleted file never matches:
    sysfs adds " (deleted)" to its name)."""
    target = os.path.abspath(image)
    for entry in Path("/sys/block").glob("loop*"):
        try:
            if (entry / "loop" / "backing_file").read_text().rstrip("\n") == target:
                return f"/dev/{entry.name}"
        except OSError:
            continue
    return None


def forget_loop_nodes() -> list[str]:
    """Remove the loop devices this process's attaches made the kernel create, and the
    ``/dev`` nodes it made, once free again, so a stopped server leaves ``/dev`` as it
    found it. One still attached (a filesystem some mount namespace still holds) is
    kept: it detaches by itself, and a later call removes it."""
    removed = []
    with _attach_lock:
        for number in sorted(_made_devices | _made_nodes):
            if os.path.exists(f"/sys/block/loop{number}/loop/backing_file"):
                continue
            if number in _made_devices:
                try:
                    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
                    try:
                        fcntl.ioctl(ctl, LOOP_CTL_REMOVE, number)
                    finally:
                        os.close(ctl)
                except OSError as exc:
                    if exc.errno != errno.ENODEV:  # EBUSY: open somewhere; keep it
                        continue
            if number in _made_nodes or number in _made_devices:
                try:
                    os.unlink(f"/dev/loop{number}")  # devtmpfs removes its own; ours stays otherwise
                except OSError:
                    pass
            _made_devices.discard(number)
            _made_nodes.discard(number)
            removed.append(f"/dev/loop{number}")
    return removed


def mount_ext4(device: str, path: Path) -> None:
    _check(_libc.mount(device.encode(), os.fsencode(path), b"ext4", MS_NOSUID | MS_NODEV, b"discard"),
           "mount", str(path))


def unmount(path: Path) -> bool:
    """Unmount ``path``; lazily (``MNT_DETACH``) when something still holds it. False
    when it was not mounted."""
    target = os.fsencode(path)
    if _libc.umount2(target, 0) == 0:
        return True
    code = ctypes.get_errno()
    if code == errno.EBUSY:
        _check(_libc.umount2(target, MNT_DETACH), "umount -l", str(path))
        log.warning("volume on %s was busy; unmounted lazily (freed when its last user goes)", path)
        return True
    if code in (errno.EINVAL, errno.ENOENT):
        return False
    raise VolumeError(code, f"umount: {os.strerror(code)}", str(path))


def mounts_under(root: Path) -> list[tuple[Path, str]]:
    """``(mount point, source)`` of every mount at or below ``root``, deepest first."""
    prefix = os.fsencode(os.path.abspath(root)).rstrip(b"/") + b"/"
    found = []
    with open("/proc/self/mountinfo", "rb") as fh:
        for line in fh:
            fields = line.split()
            point = _unescape(fields[4])
            if (point + b"/").startswith(prefix):
                source = fields[fields.index(b"-") + 2]
                found.append((Path(os.fsdecode(point)), os.fsdecode(_unescape(source))))
    return sorted(found, key=lambda m: len(m[0].parts), reverse=True)


def _unescape(field: bytes) -> bytes:
    return field.replace(b"\\040", b" ").replace(b"\\011", b"\t").replace(b"\\012", b"\n").replace(b"\\134", b"\\")


def loops_backed_under(root: Path) -> list[str]:
    """Loop devices whose backing file lies under ``root``."""
    prefix = os.path.abspath(root).rstrip("/") + "/"
    found = []
    for entry in Path("/sys/block").glob("loop*"):
        try:
            backing = (entry / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if backing.removesuffix(" (deleted)").startswith(prefix):
            found.append(f"/dev/{entry.name}")
    return found


def release_everything_under(root: Path) -> list[str]:
    """Unmount every mount below ``root`` and detach every loop device backed by a file
    below it (tests' teardown; a crashed engine's leftovers). Returns what it undid."""
    undone = []
    for point, _ in mounts_under(root):
        try:
            if unmount(point):
                undone.append(str(point))
        except OSError as exc:
            log.error("cannot unmount %s: %s", point, exc)
    for dev in loops_backed_under(root):
        try:
            fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.ioctl(fd, LOOP_CLR_FD)
            undone.append(dev)
        except OSError:
            pass  # busy: autoclear detaches it when its last user goes
        finally:
            os.close(fd)
    return undone + forget_loop_nodes()


# ---- images --------------------------------------------------------------------------

@dataclass(frozen=True)
class Superblock:
    blocks: int
    free_blocks: int
    reserved_blocks: int
    inodes: int
    free_inodes: int
    first_inode: int
    block_size: int

    @property
    def session_bytes(self) -> int:
        """What a non-root user can write once mounted: free blocks less root's reserve
        and ext4's own reserve for metadata (2 %, at most 4096 blocks)."""
        return (self.free_blocks - self.reserved_blocks - min(self.blocks // 50, 4096)) * self.block_size


def read_superblock(image: Path) -> Superblock:
    with open(image, "rb") as fh:
        fh.seek(1024)
        sb = fh.read(1024)
    if len(sb) < 1024 or struct.unpack_from("<H", sb, 56)[0] != 0xEF53:
        raise VolumeError(errno.EINVAL, "not an ext4 image", str(image))
    inodes, blocks_lo, r_lo, free_lo, free_inodes = struct.unpack_from("<5I", sb, 0)
    log_block = struct.unpack_from("<I", sb, 24)[0]
    first_inode = struct.unpack_from("<I", sb, 84)[0] or 11
    blocks_hi, r_hi, free_hi = struct.unpack_from("<3I", sb, 0x150)
    incompat = struct.unpack_from("<I", sb, 96)[0]
    if not incompat & 0x80:  # no 64bit feature: the high words mean nothing
        blocks_hi = r_hi = free_hi = 0
    return Superblock(blocks_lo | blocks_hi << 32, free_lo | free_hi << 32, r_lo | r_hi << 32, inodes,
                      free_inodes, first_inode, 1024 << log_block)


def mkfs_tool() -> str | None:
    path = os.environ.get("PATH", os.defpath) + os.pathsep + "/usr/sbin:/sbin"
    return shutil.which("mkfs.ext4", path=path)


def make_image(image: Path, size: int, uid: int, reserve: int) -> Superblock:
    """A fresh sparse ext4 image of ``size`` bytes whose root ``uid`` owns, with
    ``reserve`` bytes only root may use. mkfs discards (punches) the file first, so the
    inode tables count as zeroed and are never written: the image stays sparse."""
    tool = mkfs_tool()
    if tool is None:
        raise VolumeError(errno.ENOENT, "mkfs.ext4 not found (apt-get install e2fsprogs)", str(image))
    with open(image, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.truncate(size)
    percent = f"{min(50.0, 100.0 * reserve / size):.6f}"
    done = subprocess.run([tool, "-q", "-F", "-b", str(BLOCK), "-i", "16384", "-I", "256", "-m", percent,
                           "-E", f"lazy_itable_init=1,lazy_journal_init=1,root_owner={uid}:{uid}", str(image)],
                          capture_output=True, text=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    if done.returncode != 0:
        raise VolumeError(errno.EIO, f"mkfs.ext4 failed: {(done.stderr or done.stdout).strip()}", str(image))
    return read_superblock(image)


def _estimate(size: int, reserve: int) -> int:
    """A first guess at the image size that leaves ``size`` bytes to the session: ext4's
    inode tables (1/64), journal (up to 1/32, at most 64 MiB here), metadata reserve
    (2 %, at most 16 MiB), group metadata, and root's reserve."""
    journal = min(max(size // 32, 4 * 1024**2), 64 * 1024**2)
    guess = size + reserve + size // 64 + journal + min(size // 50, 16 * 1024**2) + size // 256 + 2 * 1024**2
    return max(MIN_IMAGE, -(-guess // BLOCK) * BLOCK)


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

    def __init__(self, data_dir: Path, size: int, reserve: int = 1024**2) -> None:
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / VOLUMES_ROOT
        self.size = size
        self.reserve = reserve
        self.enabled = False  # new directories get volumes
        self.active = False  # existing volumes are mounted and removed (also when ``off``)
        self.reason = "not started"
        self._mounted: set[Path] = set()  # mounted by (or adopted into) this process
        self._plain: set[Path] = set()  # directories found without a volume (made with volumes off)
        self._locks: dict[Path, asyncio.Lock] = {}
        self._image_size: int | None = None  # learnt from the first mkfs

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
        self._write_meta(path, {"base_blocks": sb.blocks - sb.free_blocks})
        try:
            self._mount_sync(path, image, fresh=True)
        except BaseException:
            image.unlink(missing_ok=True)
            self._meta(path).unlink(missing_ok=True)
            raise

    def _mount_sync(self, path: Path, image: Path, fresh: bool) -> None:
        if not fresh and self._mount_live(path, image):
            return
        dev, fd = attach_loop(image)
        try:
            mount_ext4(dev, path)
        finally:
            os.close(fd)  # mounted, the device stays; otherwise autoclear detaches it now
        if fresh:
            try:
                os.rmdir(path / "lost+found")  # e2fsck's; nothing a session should see
            except OSError:
                pass
            os.chmod(path, 0o700)  # like every workspace directory (mkfs makes its root 0755)

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

    @staticmethod
    def _unmount_sync(path: Path) -> None:
        if os.path.ismount(path):
            unmount(path)

    def _delete_sync(self, path: Path) -> None:
        image = self.image(path)
        if image.exists():
            image.unlink()  # a lazily unmounted volume's space returns when its loop device lets go
        self._meta(path).unlink(missing_ok=True)

    async def release_all(self, usage_of: Callable[[Path], Awaitable[tuple[int, int]]] | None = None) -> None:
        """Release every volume this process mounted (engine shutdown): a stopped server
        holds no mounts and no loop devices. ``usage_of(path)``: awaitable usage to keep."""
        async def one(path: Path) -> None:
            try:
                usage = await usage_of(path) if usage_of is not None else None
                await self.release(path, usage)
            except Exception as exc:
                log.error("cannot release the workspace volume on %s: %s", path, exc)

        paths = self.mounted()
        for start in range(0, len(paths), 8):
            await asyncio.gather(*(one(p) for p in paths[start:start + 8]))
        for _ in range(25):  # an unmounted device detaches a moment later (autoclear)
            if not (_made_devices or _made_nodes):
                break
            await run_blocking(forget_loop_nodes)
            if _made_devices or _made_nodes:
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
        for point, _ in mounts_under(self.data_dir):
            if point.parent not in roots:
                continue
            if self.image(point).is_file():
                adopted.append(point)
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
        files = max(0, sb.inodes - sb.free_inodes - (sb.first_inode - 1))
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

