"""Loop devices, mounts and ext4 images: the system calls under ``volumes.py``.

Loop devices are attached with the loop ioctls rather than ``losetup``/``mount -o
loop``: this host has no udev, so a device the kernel hands out (``LOOP_CTL_GET_FREE``)
may have no ``/dev/loopN`` node yet, which util-linux cannot create; we make the node
and configure that very device (``LOOP_CONFIGURE``, with ``LO_FLAGS_AUTOCLEAR``),
retrying when another process took it first. ``mount(2)`` and ``umount2(2)`` are called
through libc for the same reason plus one fork less per step; ``mkfs.ext4`` is the one
command run. Everything here blocks: ``Volumes`` calls it from threads.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import shutil
import stat
import struct
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("era.volumes")

BLOCK = 4096
MIN_IMAGE = 16 * 1024**2  # mkfs.ext4 wants room for a journal
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
MS_NOSUID, MS_NODEV, MS_BIND = 2, 4, 4096
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_attach_lock = threading.Lock()  # one LOOP_CTL_GET_FREE .. LOOP_CONFIGURE at a time in this process
# Loop devices this process's LOOP_CTL_GET_FREE created, and nodes it made for devices
# without one: removed again by forget_loop_nodes.
_made_devices: set[int] = set()
_made_nodes: set[int] = set()
class VolumeError(OSError):
    pass


def human(size: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} bytes"


# ---- loop devices and mounts ----------------------------------------------------------------

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
            known = {name for name in os.listdir("/sys/block") if name.startswith("loop")}  # not Path.glob: 10x dearer
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


def loops_made() -> bool:
    """Whether loop devices or nodes this process made are still there to forget."""
    return bool(_made_devices or _made_nodes)


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


def bind_mount(source: Path, target: Path) -> None:
    """Bind ``source`` (a directory on a volume we mounted) onto ``target``; the bind keeps
    the volume's nosuid/nodev."""
    _check(_libc.mount(os.fsencode(source), os.fsencode(target), None, MS_BIND, None), "mount --bind", str(target))


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


