"""Workspace volumes: each workspace directory its own ext4 filesystem of
``ERA_WORKSPACE_MAX_BYTES`` (SECURITY.md 11: the workspace fills the disk: ENOSPC inside
the session; the store and logs fine). Real images, loop devices and mounts; every
test leaves none behind (checked, not assumed).

The service first (``Volumes``), then the engine's use of it: sessions, the warm pool
and one-shot runs get one, delete removes it, a restart mounts it again on first use
without mounting anything to list sessions, recovery removes volumes no record owns, a
duplicate copies into its own, and ``ERA_WORKSPACE_VOLUMES=off`` keeps plain directories.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from era_kernel.engine import SessionManager
from era_kernel.errors import EraError
from era_kernel.workspaces import loopfs
from era_kernel.workspaces import volumes as vol
from era_kernel.workspaces.volumes import Volumes, VolumeError, loop_of, mounts_under

CAN_MOUNT = os.getuid() == 0 and os.path.exists("/dev/loop-control") and loopfs.mkfs_tool() is not None
pytestmark = pytest.mark.skipif(not CAN_MOUNT, reason="volumes need root, loop devices and mkfs.ext4")

MiB = 1024**2
UID = 100_777  # a uid no session has: what a kernel's code runs as


def allocated(root: Path) -> int:
    """Bytes the host's disk holds for files under ``root``, not crossing mounts (du -x)."""
    total, dev = 0, os.lstat(root).st_dev
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if os.lstat(os.path.join(dirpath, d)).st_dev == dev]
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_dev == dev:
                total += st.st_blocks * 512
    return total


def as_user(cwd: Path, code: str, uid: int = UID) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "/usr/bin/python3", "-c",
                           code], cwd=cwd, capture_output=True, text=True, timeout=60)


def wait_detached(image: Path, timeout: float = 15.0) -> None:
    """A loop device goes once its last user does: a stopped kernel's sandbox may hold
    the filesystem a moment longer than the unmount."""
    deadline = time.monotonic() + timeout
    while loop_of(image) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert loop_of(image) is None, f"{image} is still attached to a loop device"


def assert_nothing_left(data_dir: Path) -> None:
    assert not mounts_under(data_dir), mounts_under(data_dir)
    deadline = time.monotonic() + 15
    while loopfs.loops_backed_under(data_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not loopfs.loops_backed_under(data_dir)


@pytest.fixture
async def volumes(tmp_path):
    service = Volumes(tmp_path, 32 * MiB)
    await service.start("on")
    yield service
    loopfs.release_everything_under(tmp_path)


async def new_dir(volumes: Volumes, name: str, root: str = "sessions") -> Path:
    path = volumes.data_dir / root / name
    path.mkdir(parents=True, mode=0o700)
    os.chown(path, UID, UID)
    await volumes.make(path, UID)
    return path


# ---- the service ---------------------------------------------------------------------

async def test_a_new_volume_is_the_sessions_own_empty_bounded_sparse_filesystem(volumes):
    path = await new_dir(volumes, "s1")
    assert os.path.ismount(path) and volumes.is_mounted(path)
    st = os.stat(path)
    assert (st.st_uid, st.st_mode & 0o777) == (UID, 0o700)
    assert os.listdir(path) == [], "no lost+found for the session to trip over"
    fs = os.statvfs(path)
    usable = fs.f_bavail * fs.f_frsize
    assert 32 * MiB <= usable <= 32 * MiB * 1.1, usable
    image = volumes.image(path)
    assert image == volumes.data_dir / "volumes" / "sessions" / "s1.img"
    assert (os.stat(image).st_mode & 0o777) == 0o600 and os.stat(image.parent.parent).st_mode & 0o777 == 0o700
    assert os.stat(image).st_blocks * 512 < 2 * MiB, "the image is sparse"
    options = [line.split()[5] for line in Path("/proc/self/mountinfo").read_text().splitlines()
               if line.split()[4] == str(path)][0]
    assert "nosuid" in options and "nodev" in options


async def test_new_volumes_come_from_a_stock_made_ahead_which_refills_and_goes_at_shutdown(tmp_path):
    """ERA_WORKSPACE_VOLUME_STOCK: a new workspace's volume is one made ahead (no mkfs on
    its way), yet the same as one made on demand: the session's own empty bounded
    filesystem, its own device. A stock left by a previous process is never used."""
    gone = tmp_path / "volumes" / "stock" / "999999999-1"  # a process that is gone: never one of ours
    gone.mkdir(parents=True)
    (gone / "left.img").write_bytes(b"its size may not be ours")
    service = Volumes(tmp_path, 32 * MiB, stock=2)
    stock_dir = service.stock.directory
    await service.start("on")
    assert not stock_dir.exists() and gone.exists(), "made by a server only (start_stock), not by `era run`"
    service.start_stock()

    async def stocked(count: int) -> set[Path]:
        for _ in range(400):
            if len(service.stock) >= count:
                break
            await asyncio.sleep(0.05)
        assert len(service.stock) == count
        return set(stock_dir.glob("*.img"))

    try:
        ready = await stocked(2)
        assert len(ready) == 2 and not gone.exists()
        first = await new_dir(service, "s1")
        assert service.stock.taken == 1 and len(set(stock_dir.glob("*.img")) & ready) == 1, "one taken from the stock"
        st = os.stat(first)
        assert (st.st_uid, st.st_mode & 0o777) == (UID, 0o700) and os.listdir(first) == []
        assert 32 * MiB <= os.statvfs(first).f_bavail * os.statvfs(first).f_frsize <= 32 * MiB * 1.1
        tmp = service.tmp_of(first)
        assert (os.stat(tmp).st_uid, os.stat(tmp).st_mode & 0o7777) == (0, 0o1777)
        assert as_user(first, "open('mine', 'w').write('x')").returncode == 0
        await stocked(2)  # refilled once no volume was asked for a moment
        second = await new_dir(service, "s2")
        assert service.stock.taken == 2 and os.stat(second).st_dev != os.stat(first).st_dev
        assert os.listdir(second) == [], "each from the stock is a filesystem of its own"
        await service.remove(first)
        assert not service.image(first).exists()
    finally:
        await service.release_all()
    assert not stock_dir.exists(), "the stock goes with the server"
    assert_nothing_left(tmp_path)


async def test_writes_past_the_bound_fail_with_enospc_and_the_host_holds_at_most_the_image(volumes):
    path = await new_dir(volumes, "filler")
    before = allocated(volumes.data_dir)
    r = as_user(path, "import errno\ntry:\n    with open('big', 'wb') as f:\n        for _ in range(64):\n"
                      "            f.write(b'x' * 2**20)\nexcept OSError as e:\n    print(errno.errorcode[e.errno])")
    assert r.stdout.strip() == "ENOSPC", r
    assert 30 * MiB <= os.path.getsize(path / "big") <= 34 * MiB
    grown = allocated(volumes.data_dir) - before
    assert grown <= os.path.getsize(volumes.image(path)) and grown <= 32 * MiB * 1.15, grown
    assert await volumes.full(path) is not None
    assert "ERA_WORKSPACE_MAX_BYTES" in volumes.full_message(0) and "32 MiB" in volumes.full_message(0)
    # Root's reserve: the server's own small write (the data file) still fits.
    (path / ".session_data.json").write_bytes(b"{}" * 100_000)
    os.remove(path / "big")
    assert await volumes.full(path) is None
    assert as_user(path, "open('again', 'w').write('ok')").returncode == 0


async def test_release_keeps_the_usage_for_listings_and_attach_mounts_it_again(volumes):
    path = await new_dir(volumes, "s2")
    (path / "kept.txt").write_text("kept")
    await volumes.release(path, (1, 4))
    assert not os.path.ismount(path) and not volumes.is_mounted(path) and os.listdir(path) == []
    assert await volumes.idle_usage(path) == (1, 4), "read beside the image, without mounting it"
    assert not os.path.ismount(path)
    wait_detached(volumes.image(path))
    assert await volumes.attach(path) is True
    assert (path / "kept.txt").read_text() == "kept"
    assert await volumes.idle_usage(path) is None, "mounted: the directory is walked instead"
    await volumes.release(path)  # no usage kept (a host that went down): the superblock's estimate
    files, size = await volumes.idle_usage(path)
    assert files == 1 and 0 <= size <= 64 * 1024


async def test_attach_shares_a_filesystem_a_stopping_sandbox_still_holds(volumes, tmp_path):
    """A kernel stopped a moment ago may still hold the volume in its sandbox's mount
    namespace, with writes not yet in the image: attaching the image to a second loop
    device would show stale files (and put two filesystems over one file)."""
    path = await new_dir(volumes, "s3")
    sandbox_view = tmp_path / "sandbox-view"
    sandbox_view.mkdir()
    device = loop_of(volumes.image(path))
    loopfs.mount_ext4(device, sandbox_view)  # what a sandbox's copy of the mount amounts to
    try:
        (path / "late.txt").write_text("written just before the stop")
        await volumes.release(path)
        assert loop_of(volumes.image(path)) == device
        await volumes.attach(path)
        assert loop_of(volumes.image(path)) == device, "the same device, not a second one"
        assert (path / "late.txt").read_text() == "written just before the stop"
    finally:
        loopfs.unmount(sandbox_view)


async def test_remove_leaves_no_image_mount_or_loop_device(volumes):
    path = await new_dir(volumes, "s4")
    image = volumes.image(path)
    (path / "f").write_bytes(b"x" * MiB)
    await volumes.remove(path)
    assert not image.exists() and not image.with_suffix(".json").exists()
    assert not os.path.ismount(path)
    wait_detached(image)
    assert_nothing_left(volumes.data_dir)
    await volumes.remove(path)  # twice: nothing to do


async def test_a_directory_without_an_image_is_left_plain(volumes):
    path = volumes.data_dir / "sessions" / "legacy"
    path.mkdir(parents=True)
    (path / "old.txt").write_text("made before volumes")
    assert await volumes.attach(path) is False
    assert (path / "old.txt").read_text() == "made before volumes" and not os.path.ismount(path)
    assert await volumes.idle_usage(path) is None


async def test_many_volumes_at_once_get_loop_devices_made_as_needed(volumes):
    """Only /dev/loop0-7 exist without udev: the service makes the nodes it needs."""
    existing = {str(p) for p in Path("/dev").glob("loop[0-9]*")}
    # More volumes than free nodes, so some must be made; attached nodes (other servers'
    # volumes, or leaks on a long-lived machine) count for nothing, else their number
    # would set this test's size.
    free = [p for p in existing if not Path(f"/sys/block/{Path(p).name}/loop/backing_file").exists()]
    paths = [volumes.data_dir / "pool" / f"p{i:02d}" for i in range(len(free) + 4)]
    for path in paths:
        path.mkdir(parents=True)
    await asyncio.gather(*(volumes.make(path, UID) for path in paths))
    devices = {loop_of(volumes.image(path)) for path in paths}
    assert len(devices) == len(paths) and None not in devices
    assert all(os.path.ismount(path) for path in paths)
    await asyncio.gather(*(volumes.remove(path) for path in paths))
    assert_nothing_left(volumes.data_dir)
    loopfs.forget_loop_nodes()
    assert not (loopfs._made_devices or loopfs._made_nodes), "the loop devices made for this are gone again"
    # Of the nodes this test needed beyond those that existed, none is left. (Not a count
    # of /dev: a server another test module left running may make a node of its own meanwhile.)
    made_here = {d for d in devices if d not in existing}
    assert made_here and not {d for d in made_here if os.path.exists(d)}, made_here


async def test_a_new_process_adopts_the_mounts_a_dead_one_left_and_releases_them(volumes):
    path = await new_dir(volumes, "s5")
    later = Volumes(volumes.data_dir, 32 * MiB)
    await later.start("auto")
    assert await later.adopt() == [path]
    assert later.is_mounted(path)
    await later.release_all()
    assert not os.path.ismount(path)
    assert_nothing_left(volumes.data_dir)


async def test_modes(volumes, tmp_path, monkeypatch):
    off = Volumes(tmp_path / "off", 32 * MiB)
    await off.start("off")
    (tmp_path / "off" / "sessions" / "x").mkdir(parents=True)
    await off.make(tmp_path / "off" / "sessions" / "x", UID)
    assert not os.path.ismount(tmp_path / "off" / "sessions" / "x") and not off.enabled
    # Off after volumes were made: the ones there are still mounted, no new ones.
    path = await new_dir(volumes, "made-when-on")
    await volumes.release(path)
    still = Volumes(volumes.data_dir, 32 * MiB)
    await still.start("off")
    assert not still.enabled and still.active
    assert await still.attach(path) and os.path.ismount(path)
    await still.release_all()

    monkeypatch.setattr(vol, "_probed", vol.Support(False, "no loop devices here"))
    with pytest.raises(VolumeError, match="no loop devices here"):
        await Volumes(tmp_path / "on", 32 * MiB).start("on")
    auto = Volumes(tmp_path / "auto", 32 * MiB)
    await auto.start("auto")
    assert not auto.enabled and auto.reason == "no loop devices here"


# ---- the engine ------------------------------------------------------------------------

def small(era_settings, **more):
    return era_settings.replace(ERA_WORKSPACE_MAX_BYTES=32 * MiB, **more)


async def test_delete_leaves_no_image_mount_or_loop_device(era_settings):
    engine = SessionManager(small(era_settings))
    await engine.start()
    try:
        sid = (await engine.create({}))["id"]
        path = engine.workspace_dir(sid)
        image = engine.files.volumes.image(path)
        assert os.path.ismount(path) and image.is_file()
        r = await engine.run(sid, {"code": "import os; s = os.statvfs('.'); print(s.f_blocks * s.f_frsize)"})
        assert 32 * MiB <= int(r["stdout"]) <= 40 * MiB, "the kernel sees its own small filesystem"
        await engine.delete(sid)
        assert not image.exists() and not path.exists()
        wait_detached(image)
        r = await engine.execute({"code": "import os; s = os.statvfs('.'); print(s.f_blocks * s.f_frsize)"})
        assert 32 * MiB <= int(r["stdout"]) <= 40 * MiB, "a one-shot run's scratch directory has one too"
        await engine.settle()
        for _ in range(100):
            if not list((engine.settings.data_dir / "volumes" / "scratch").iterdir()):
                break
            await asyncio.sleep(0.05)
        assert not list((engine.settings.data_dir / "volumes" / "scratch").iterdir())
    finally:
        await engine.shutdown()
    assert_nothing_left(era_settings.data_dir)


async def test_a_restart_lists_without_mounting_and_mounts_again_on_first_use(era_settings):
    settings = small(era_settings)
    first = SessionManager(settings)
    await first.start()
    try:
        sid = (await first.create({"id": "kept"}))["id"]
        await first.run(sid, {"code": "open('a.txt', 'w').write('1234')"})
        before = await first.get(sid)
    finally:
        await first.shutdown()
    path = first.workspace_dir(sid)
    assert not os.path.ismount(path), "a stopped engine holds no mounts"
    assert_nothing_left(era_settings.data_dir)

    second = SessionManager(settings)
    await second.start()
    try:
        listed = {d["id"]: d for d in await second.list()}
        assert (listed[sid]["file_count"], listed[sid]["total_size_bytes"]) == \
            (before["file_count"], before["total_size_bytes"]) == (2, before["total_size_bytes"])
        assert not os.path.ismount(path), "listing mounts nothing"
        assert [f["path"] for f in await second.list_files(sid)] == [".session_data.json", "a.txt"]
        assert os.path.ismount(path), "the files API mounted it"
        r = await second.run(sid, {"code": "print(open('a.txt').read())"})
        assert r["stdout"] == "1234\n"
    finally:
        await second.shutdown()
    assert_nothing_left(era_settings.data_dir)


async def test_a_kernel_start_mounts_it_again_too(era_settings):
    settings = small(era_settings)
    first = SessionManager(settings)
    await first.start()
    try:
        sid = (await first.create({}))["id"]
        await first.write_file(sid, "in.txt", b"up")
    finally:
        await first.shutdown()
    second = SessionManager(settings)
    await second.start()
    try:
        r = await second.run(sid, {"code": "print(open('in.txt').read())"})
        assert r["stdout"] == "up\n", r
    finally:
        await second.shutdown()
    assert_nothing_left(era_settings.data_dir)


async def test_a_duplicate_copies_into_its_own_volume(era_settings):
    engine = SessionManager(small(era_settings))
    await engine.start()
    try:
        src = (await engine.create({"id": "src"}))["id"]
        await engine.run(src, {"code": "open('notes.txt', 'w').write('remember')"})
        await engine.duplicate(src, {"id": "copy"})
        a, b = engine.workspace_dir("src"), engine.workspace_dir("copy")
        assert os.path.ismount(b) and loop_of(engine.files.volumes.image(a)) != loop_of(engine.files.volumes.image(b))
        assert await engine.read_file("copy", "notes.txt") == b"remember"
        r = await engine.run("copy", {"code": "import os\nopen('notes.txt', 'w').write('changed')\n"
                                              "s = os.statvfs('.'); print(s.f_blocks * s.f_frsize)"})
        assert int(r["stdout"]) <= 40 * MiB
        assert await engine.read_file("src", "notes.txt") == b"remember"
    finally:
        await engine.shutdown()
    assert_nothing_left(era_settings.data_dir)


async def test_pooled_kernels_directories_are_volumes_that_follow_the_session(era_settings):
    engine = SessionManager(small(era_settings, ERA_POOL_SIZE=1))
    await engine.start()
    try:
        for _ in range(600):
            if engine.pool.stats()["pools"][f"python:{engine.settings['ERA_PROVISIONER']}"]["ready"]:
                break
            await asyncio.sleep(0.1)
        warm = [w.workdir for w in engine.pool.waiting()]
        assert warm and all(os.path.ismount(p) for p in warm)
        sid = (await engine.create({}))["id"]
        assert engine.workspace_dir(sid) == warm[0]
        r = await engine.run(sid, {"code": "import os; s = os.statvfs('.'); print(s.f_blocks * s.f_frsize)"})
        assert 32 * MiB <= int(r["stdout"]) <= 40 * MiB
        await engine.delete(sid)
        assert not engine.files.volumes.image(warm[0]).exists()
    finally:
        await engine.shutdown()
    assert_nothing_left(era_settings.data_dir)
    assert not list((era_settings.data_dir / "volumes" / "pool").iterdir()), "discarded pooled kernels' volumes go"


async def test_recovery_removes_volumes_no_record_owns_and_adopts_left_mounts(era_settings):
    settings = small(era_settings)
    first = SessionManager(settings)
    await first.start()
    try:
        kept = (await first.create({"id": "kept"}))["id"]
        gone = (await first.create({"id": "gone"}))["id"]
        await first.write_file(kept, "k.txt", b"k")
        await first.store.delete_session(gone)  # a record lost some other way: its volume is nobody's
        scratch_dead = settings.data_dir / "scratch" / "deadbeefdeadbeef"
        scratch_live = settings.data_dir / "scratch" / "0123456789abcdef"
        for path in (scratch_dead, scratch_live):
            await first.files.make_dir(path, UID)
        meta = first.files.volumes._meta(scratch_dead)
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "owner": [2**22 + 1, 1]}))  # a dead process
        first.files.volumes._mounted.clear()  # as if the process died: nothing released
    finally:
        await first.shutdown()
    assert os.path.ismount(first.workspace_dir(kept)), "left mounted, as a SIGKILLed server leaves it"

    second = SessionManager(settings)
    await second.start()
    try:
        volumes = second.files.volumes
        assert not volumes.image(settings.data_dir / "sessions" / gone).exists()
        assert not (settings.data_dir / "sessions" / gone).exists()
        assert not volumes.image(scratch_dead).exists() and not scratch_dead.exists()
        assert volumes.image(scratch_live).exists(), "a live process's one-shot volume is its own"
        assert volumes.is_mounted(second.workspace_dir(kept)), "the left mount is taken over"
        assert await second.read_file(kept, "k.txt") == b"k"
        await second.files.remove_dir(scratch_live)
    finally:
        await second.shutdown()
    assert_nothing_left(era_settings.data_dir)


async def test_with_volumes_off_workspaces_are_plain_directories(era_settings):
    engine = SessionManager(small(era_settings, ERA_WORKSPACE_VOLUMES="off"))
    await engine.start()
    try:
        sid = (await engine.create({}))["id"]
        path = engine.workspace_dir(sid)
        r = await engine.run(sid, {"code": "open('big', 'wb').write(b'x' * (40 * 2**20)); print('written')"})
        assert r["stdout"] == "written\n" and "[era]" not in r["stderr"], "unbounded, as before"
        assert not os.path.ismount(path) and not (era_settings.data_dir / "volumes").exists()
        assert (await engine.get(sid))["total_size_bytes"] >= 40 * MiB
        # Past the upload quota, the server's own data file is still written before a run
        # (it used to answer 413, so such a session could not run code to clean up).
        await engine.patch(sid, {"data": {"n": 5}})
        r = await engine.run(sid, {"code": "import json; print(json.load(open('.session_data.json'))['n'])"})
        assert r["stdout"] == "5\n", r
        await engine.delete(sid)
        assert not path.exists()
    finally:
        await engine.shutdown()


async def test_a_persistent_session_restored_on_another_host_gets_a_volume_there(era_settings, tmp_path):
    shared = {"ERA_STORE_URL": f"sqlite:///{tmp_path / 'shared.db'}",
              "ERA_WORKSPACE_URL": f"file://{tmp_path / 'shared-store'}"}
    a = SessionManager(small(era_settings, **shared))
    await a.start()
    try:
        await a.create({"id": "roams", "persistent": True})
        await a.write_file("roams", "f.txt", b"from a")
    finally:
        await a.shutdown()
    other = era_settings.data_dir.parent / "other-host"
    b = SessionManager(small(era_settings, ERA_DATA_DIR=str(other), **shared))
    await b.start()
    try:
        assert await b.read_file("roams", "f.txt") == b"from a"
        path = b.workspace_dir("roams")
        assert os.path.ismount(path) and b.files.volumes.image(path).is_file()
        r = await b.run("roams", {"code": "import os; s = os.statvfs('.'); print(s.f_blocks * s.f_frsize)"})
        assert int(r["stdout"]) <= 40 * MiB
    finally:
        await b.shutdown()
    loopfs.release_everything_under(other)
    assert_nothing_left(other)


async def test_a_session_made_with_volumes_off_keeps_its_plain_directory(era_settings):
    plain = SessionManager(small(era_settings, ERA_WORKSPACE_VOLUMES="off"))
    await plain.start()
    try:
        sid = (await plain.create({}))["id"]
        await plain.write_file(sid, "old.txt", b"before volumes")
    finally:
        await plain.shutdown()
    engine = SessionManager(small(era_settings))
    await engine.start()
    try:
        assert engine.files.volumes.enabled
        assert await engine.read_file(sid, "old.txt") == b"before volumes"
        assert not os.path.ismount(engine.workspace_dir(sid)), "not migrated: its files stay where they are"
        new = (await engine.create({}))["id"]
        assert os.path.ismount(engine.workspace_dir(new))
    finally:
        await engine.shutdown()
    assert_nothing_left(era_settings.data_dir)


async def test_a_volume_that_cannot_be_mounted_is_an_error_that_names_it(era_settings):
    engine = SessionManager(small(era_settings))
    await engine.start()
    try:
        sid = (await engine.create({}))["id"]
        await engine.write_file(sid, "f.txt", b"x")
        path = engine.workspace_dir(sid)
        await engine.table.stop(sid)
        await engine.files.volumes.release(path)
        wait_detached(engine.files.volumes.image(path))
        with open(engine.files.volumes.image(path), "r+b") as fh:  # a broken superblock
            fh.seek(1024)
            fh.write(bytes(1024))
        with pytest.raises(EraError, match="could not be mounted") as err:
            await engine.list_files(sid)
        assert type(err.value) is EraError  # a server-side failure (500), no more specific kind
        assert [d["id"] for d in await engine.list()] == [sid], "listing does not need it"
        await engine.delete(sid)
        assert not engine.files.volumes.image(path).exists()
    finally:
        await engine.shutdown()
    assert_nothing_left(era_settings.data_dir)


async def test_tmp_is_in_the_volume_and_an_older_volume_keeps_a_tmpfs(era_settings):
    """A new volume holds the workspace and the session's /tmp (one bound for both); a
    volume made before that layout (its whole filesystem is the workspace) gets no /tmp
    directory outside it, which the host's disk would have to hold unbounded: its
    kernels keep a private tmpfs, as they had."""
    settings = small(era_settings)
    first = SessionManager(settings)
    await first.start()
    try:
        sid = (await first.create({"id": "older"}))["id"]
        await first.run(sid, {"code": "open('/tmp/t.txt', 'w').write('t')"})
        path = first.workspace_dir(sid)
        tmp = first.files.tmp_path(path)
        assert tmp == settings.data_dir / "volumes" / "mnt" / "sessions" / sid / "tmp"
        assert (tmp / "t.txt").read_text() == "t"
    finally:
        await first.shutdown()
    meta_path = first.files.volumes.image(path).with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta.pop("layout")  # as an image of the older layout has it
    meta_path.write_text(json.dumps(meta))

    def older_root() -> None:  # and its root the session's, as mkfs made it then
        point = settings.data_dir / "older-mnt"
        point.mkdir()
        dev, fd = loopfs.attach_loop(first.files.volumes.image(path))
        try:
            loopfs.mount_ext4(dev, point)
        finally:
            os.close(fd)
        st = os.stat(point / "ws")
        os.chown(point, st.st_uid, st.st_gid)
        os.chmod(point, 0o700)
        loopfs.unmount(point)
        point.rmdir()
        wait_detached(first.files.volumes.image(path))

    await asyncio.to_thread(older_root)
    second = SessionManager(settings)
    await second.start()
    try:
        r = await second.run(sid, {"code": "open('/tmp/u.txt', 'w').write('u'); import os; print(sorted(os.listdir()))"})
        assert r["exit_code"] == 0 and "'ws'" in r["stdout"], r.get("error")  # the filesystem's root is its workspace
        assert second.files.tmp_path(path) is None
        assert not (settings.data_dir / "tmp" / "sessions" / sid).exists(), "no unbounded /tmp on the host's disk"
    finally:
        await second.shutdown()
    assert_nothing_left(era_settings.data_dir)
