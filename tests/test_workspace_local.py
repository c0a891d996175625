"""Workspace: the local directory, as the server sees it while untrusted code owns it
(docs/security.md cases 11-13, 16, 21 and 22, and the finding "Deep directory trees")."""

import asyncio
import errno
import json
import os
import re
import resource
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import unquote

import pytest

from era_kernel.errors import BadRequest, NotFound, TooLarge
from era_kernel.workspaces import Workspace, fdtree

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
TRAVERSALS = ["../x", unquote("%2e%2e/x"), "/etc/passwd", "..\\x", "a\x00b", "../ws1evil/x", "a/../../x"]


@pytest.fixture
def tree(tmp_path):
    """``ws1`` (the workspace), a sibling ``ws1evil`` and an ``outside`` directory with a secret."""
    (tmp_path / "ws1evil").mkdir()
    (tmp_path / "ws1evil" / "x").write_bytes(b"sibling secret")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"outside secret")
    return tmp_path


@pytest.fixture
async def ws(tree):
    workspace = Workspace(tree / "ws1")
    await workspace.create()
    return workspace


async def test_create_is_private(ws):
    assert stat.S_IMODE(os.stat(ws.root).st_mode) == 0o700


async def test_write_read_list_delete_usage(ws):
    assert await ws.list() == []
    assert await ws.write("a.txt", b"hello") == {"path": "a.txt", "size": 5}
    assert await ws.write("./dir//sub/b.bin", bytes(range(256))) == {"path": "dir/sub/b.bin", "size": 256}
    assert await ws.write("empty", b"") == {"path": "empty", "size": 0}
    assert await ws.read("a.txt") == b"hello"
    assert await ws.read("dir/sub/b.bin") == bytes(range(256))
    listing = await ws.list()
    assert [f["path"] for f in listing] == ["a.txt", "dir/sub/b.bin", "empty"]
    assert [f["size"] for f in listing] == [5, 256, 0]
    assert all(ISO_Z.match(f["uploaded"]) for f in listing)
    assert await ws.usage() == (3, 261)
    assert (await ws.stat("a.txt"))["size"] == 5

    assert (await ws.write("a.txt", b"replaced"))["size"] == 8
    assert await ws.read("a.txt") == b"replaced"
    await ws.delete("a.txt")
    with pytest.raises(NotFound):
        await ws.read("a.txt")
    with pytest.raises(NotFound):
        await ws.delete("a.txt")
    await ws.delete("dir")  # a directory path removes the tree
    assert [f["path"] for f in await ws.list()] == ["empty"]
    assert not [n for n in os.listdir(ws.root) if n.startswith(fdtree.TEMP_PREFIX)]


async def test_missing_workspace_reads_as_empty(tmp_path):
    ws = Workspace(tmp_path / "never-created")
    assert await ws.list() == []
    assert await ws.usage() == (0, 0)
    with pytest.raises(NotFound):
        await ws.read("a")


@pytest.mark.parametrize("bad", TRAVERSALS)
async def test_traversal_is_refused_everywhere(ws, tree, bad):
    for call in (ws.read(bad), ws.write(bad, b"pwned"), ws.delete(bad), ws.stat(bad)):
        with pytest.raises(BadRequest) as info:
            await call
        assert isinstance(info.value, BadRequest) and info.value.field == "path"  # 400
    assert (tree / "ws1evil" / "x").read_bytes() == b"sibling secret"
    assert not (tree / "x").exists() and not (tree / "pwned").exists()


async def test_symlinks_are_never_followed(ws, tree):
    os.symlink("/etc/passwd", ws.root / "p")
    os.symlink("/", ws.root / "r")
    os.symlink(tree / "outside", ws.root / "d")
    os.symlink(tree / "outside" / "missing", ws.root / "dangling")
    await ws.write("real.txt", b"ok")

    # Listing: links are neither listed nor walked into.
    assert [f["path"] for f in await ws.list()] == ["real.txt"]
    assert await ws.usage() == (1, 2)

    # Reading through or at a link: the same "not found", whether the target exists or not.
    messages = set()
    for path in ("p", "r/etc/passwd", "d/secret", "dangling", "d/missing"):
        with pytest.raises(NotFound) as info:
            await ws.read(path)
        messages.add(info.value.message.replace(path, "<path>"))
    assert messages == {"file not found: <path>"}

    # Writing through a linked directory is refused and creates nothing outside.
    for path in ("r/tmp/era-pwned", "d/new", "d/secret"):
        with pytest.raises(BadRequest):
            await ws.write(path, b"pwned")
    assert not os.path.exists("/tmp/era-pwned")
    assert sorted(os.listdir(tree / "outside")) == ["secret"]
    assert (tree / "outside" / "secret").read_bytes() == b"outside secret"

    # Writing *at* a link replaces the link itself, never its target.
    os.symlink(tree / "outside" / "secret", ws.root / "leaf")
    await ws.write("leaf", b"mine")
    assert not os.path.islink(ws.root / "leaf")
    assert (tree / "outside" / "secret").read_bytes() == b"outside secret"

    # Deleting a link removes the link; deleting through one is "not found".
    await ws.delete("d")
    assert (tree / "outside" / "secret").exists()
    os.symlink(tree / "outside", ws.root / "d")
    with pytest.raises(NotFound):
        await ws.delete("d/secret")
    assert (tree / "outside" / "secret").exists()


async def test_fifo_and_special_files_do_not_hang(ws):
    os.mkfifo(ws.root / "fifo")
    with pytest.raises(NotFound):
        await asyncio.wait_for(ws.read("fifo"), 5)
    assert await asyncio.wait_for(ws.list(), 5) == []
    await ws.write("dir/f", b"x")
    with pytest.raises(NotFound):
        await ws.read("dir")  # a directory is not a file


async def test_write_conflicts(ws):
    await ws.write("file", b"x")
    await ws.write("dir/inner", b"y")
    with pytest.raises(BadRequest):
        await ws.write("file/child", b"z")  # a parent is a file
    with pytest.raises(BadRequest):
        await ws.write("dir", b"z")  # it is a directory
    assert await ws.read("dir/inner") == b"y"


async def test_quotas(tree):
    ws = Workspace(tree / "q", max_file_bytes=10, max_total_bytes=25, max_files=3, max_read_bytes=12)
    await ws.create()
    with pytest.raises(TooLarge) as info:
        await ws.write("big", b"x" * 11)
    assert isinstance(info.value, TooLarge)  # 413
    await ws.write("a", b"x" * 10)
    await ws.write("b", b"x" * 10)
    with pytest.raises(TooLarge):
        await ws.write("c", b"x" * 6)  # 26 > 25
    await ws.write("a", b"x" * 5)  # replacing counts the difference: 15 + 5 fits
    await ws.write("c", b"x" * 10)
    with pytest.raises(TooLarge):
        await ws.write("d", b"")  # a fourth file
    assert await ws.usage() == (3, 25)
    # Downloads of files the kernel made bigger than the read cap.
    (ws.root / "made-by-kernel").write_bytes(b"y" * 13)
    with pytest.raises(TooLarge):
        await ws.read("made-by-kernel")
    assert await ws.read("made-by-kernel", max_bytes=13) == b"y" * 13


async def test_disk_full_is_413_and_leaves_no_temp(ws, monkeypatch):
    # ENOSPC cannot be produced for real without root (a tiny tmpfs): inject it.
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fdtree, "write_all", full)
    with pytest.raises(TooLarge):
        await ws.write("a", b"data")
    assert os.listdir(ws.root) == []


async def test_chown_when_root(tree):
    ws = Workspace(tree / "owned", uid=54321)
    await ws.create()
    await ws.write("d/e/f.txt", b"x")
    await ws.write("g.txt", b"y", uid=54322)
    expected = (54321, 54322) if os.geteuid() == 0 else (os.geteuid(), os.geteuid())
    for path in ("", "d", "d/e", "d/e/f.txt"):
        assert os.stat(ws.root / path).st_uid == expected[0]
    assert os.stat(ws.root / "g.txt").st_uid == expected[1]


async def test_temp_files_are_not_listed(ws):
    (ws.root / (fdtree.TEMP_PREFIX + "deadbeef")).write_bytes(b"partial")
    await ws.write("a", b"x")
    assert [f["path"] for f in await ws.list()] == ["a"]


async def test_unaddressable_names_are_not_listed(ws):
    (ws.root / "bad\nname").write_bytes(b"x")
    (ws.root / "ok").write_bytes(b"y")
    assert [f["path"] for f in await ws.list()] == ["ok"]


async def test_copy_to(ws, tree):
    await ws.write("a.txt", b"A")
    await ws.write("sub/b.txt", b"B")
    os.symlink("/etc/passwd", ws.root / "p")
    os.symlink("/", ws.root / "r")
    os.symlink(tree / "outside", ws.root / "sub" / "d")
    os.mkfifo(ws.root / "fifo")
    mtime = os.stat(ws.root / "a.txt").st_mtime_ns
    other = Workspace(tree / "copy", uid=4242)
    assert await ws.copy_to(other) == (2, 2)
    assert sorted(f["path"] for f in await other.list()) == ["a.txt", "sub/b.txt"]
    assert await other.read("sub/b.txt") == b"B"
    assert os.stat(other.root / "a.txt").st_mtime_ns == mtime
    assert sorted(os.listdir(other.root)) == ["a.txt", "sub"]
    assert sorted(os.listdir(other.root / "sub")) == ["b.txt"]
    if os.geteuid() == 0:
        assert os.stat(other.root / "sub" / "b.txt").st_uid == 4242


async def test_copy_skips_a_directory_swapped_for_a_link(ws, tree, monkeypatch):
    """Deterministic race: the walk has seen ``sub`` as a directory; before it is opened,
    the kernel replaces it with a link to ``outside``. The copy must not follow it."""
    await ws.write("sub/ok.txt", b"ok")
    real_scan = fdtree.scan
    swapped = []

    def scan_then_swap(dir_fd, *args):
        entries = real_scan(dir_fd, *args)
        if not swapped and any(name == "sub" for name, _ in entries):
            os.rename(ws.root / "sub", ws.root / "sub.old")
            os.symlink(tree / "outside", ws.root / "sub")
            swapped.append(True)
        return entries

    monkeypatch.setattr(fdtree, "scan", scan_then_swap)
    await ws.copy_to(tree / "copy")
    assert swapped
    found = [os.path.join(d, f) for d, _, fs in os.walk(tree / "copy") for f in fs]
    assert not any(f.endswith("secret") for f in found), found


async def test_copy_under_a_racing_swapper(ws, tree):
    """The kernel flips ``sub`` between a directory and a link to ``outside`` as fast as
    it can while copies run: no copy ever contains the outside secret."""
    await ws.write("sub/ok.txt", b"ok")
    (ws.root / "sub_dir").mkdir()
    stop = threading.Event()

    def swapper():
        sub = ws.root / "sub"
        while not stop.is_set():
            try:
                os.rename(sub, ws.root / "sub_dir_tmp")
                os.symlink(tree / "outside", sub)
                os.unlink(sub)
                os.rename(ws.root / "sub_dir_tmp", sub)
            except OSError:
                pass

    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 1.5
        runs = 0
        while time.monotonic() < deadline:
            target = tree / f"copy{runs}"
            await ws.copy_to(target)
            found = [f for _, _, fs in os.walk(target) for f in fs]
            assert "secret" not in found
            runs += 1
    finally:
        stop.set()
        thread.join()
    assert runs > 3


async def test_remove_does_not_follow_links(ws, tree):
    await ws.write("deep/er/file", b"x")
    os.symlink(tree / "outside", ws.root / "deep" / "link")
    os.symlink("/", ws.root / "root-link")
    await ws.remove()
    assert not ws.root.exists()
    assert (tree / "outside" / "secret").read_bytes() == b"outside secret"
    await ws.remove()  # idempotent


# --- trees deeper than the open-file limit, or wider than a walk may visit ---------------


@pytest.fixture
def few_fds():
    """Lower this process's soft open-file limit (restored after), so that a tree deeper
    than it takes a few hundred levels to build instead of ~20,000. Returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = len(os.listdir("/proc/self/fd")) + 200
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def make_deep(root, depth: int, leaf: str = "leaf") -> None:
    """``root/d/d/.../d/leaf`` with ``depth`` directories, built descriptor-relative (its
    path is far longer than PATH_MAX) with two descriptors at a time, as a kernel can."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        os.close(os.open(leaf, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


@pytest.fixture
async def deep_ws(ws, few_fds):
    """The workspace with a file at the top and a chain of directories deeper than the
    open-file limit (so a walk holding a descriptor per level dies with EMFILE)."""
    await ws.write("top.txt", b"12345")
    make_deep(ws.root, few_fds + 200)
    return ws


async def test_deep_tree_usage_never_raises(deep_ws):
    # Every session document (and so the list of all sessions) computes usage: it must
    # answer, counting what lies within the depth limit.
    assert await deep_ws.usage() == (1, 5)


async def test_usage_never_raises_when_out_of_descriptors(ws):
    """Under load the process may be out of descriptors before any cap is reached: the
    session list still answers, with what could be counted."""
    await ws.write("top.txt", b"12345")
    make_deep(ws.root, 60)  # within the depth cap
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = {int(name) for name in os.listdir("/proc/self/fd")}
    free = [fd for fd in range(max(used) + 10) if fd not in used]
    resource.setrlimit(resource.RLIMIT_NOFILE, (free[5], hard))  # about five descriptors left
    try:
        count, total = await ws.usage()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert (count, total) in ((0, 0), (1, 5))
    assert await ws.usage() == (2, 5)  # with descriptors again: all of it


async def test_deep_tree_listing_and_copy_are_refused_cleanly(deep_ws, tree):
    for call in (deep_ws.list, lambda: deep_ws.copy_to(tree / "copy")):
        with pytest.raises(TooLarge) as info:
            await call()
        assert isinstance(info.value, TooLarge)  # 413
        assert "ERA_WORKSPACE_MAX_DEPTH" in info.value.message and "64 levels" in info.value.message


async def test_deep_tree_blocks_quota_checked_writes(tree, few_fds):
    ws = Workspace(tree / "q", max_files=10)
    await ws.create()
    make_deep(ws.root, few_fds + 200)
    with pytest.raises(TooLarge) as info:
        await ws.write("a", b"x")
    assert "ERA_WORKSPACE_MAX_DEPTH" in info.value.message


async def test_deep_tree_is_removed_completely(deep_ws, tree, few_fds):
    os.symlink(tree / "outside", deep_ws.root / "link")
    make_deep(tree / "outside", 3)  # reachable only through the link: must survive
    await deep_ws.delete("d")  # a directory path: the whole chain goes
    assert sorted(os.listdir(deep_ws.root)) == ["link", "top.txt"]
    make_deep(deep_ws.root, few_fds + 200)
    await deep_ws.remove()
    assert not deep_ws.root.exists()
    assert (tree / "outside" / "secret").read_bytes() == b"outside secret"
    assert (tree / "outside" / "d" / "d" / "d" / "leaf").exists()


def test_remove_entry_keeps_few_descriptors(tmp_path, few_fds):
    """Directly on fdtree, with files and links at every level of a branching tree."""
    top = tmp_path / "top"
    top.mkdir()
    make_deep(top, few_fds + 100)
    for level in (1, 5, 40):
        branch = top / "/".join(["d"] * level)
        (branch / "file").write_bytes(b"x")
        (branch / "sub").mkdir()
        make_deep(branch / "sub", 50)
        os.symlink("/", branch / "root-link")
    parent = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert fdtree.remove_entry(parent, "top") is True
        assert fdtree.remove_entry(parent, "top") is False
    finally:
        os.close(parent)
    assert os.listdir(tmp_path) == []


def test_deep_kernel_home_is_removed(tmp_path, few_fds):
    from era_kernel.provisioning.ipc import make_kernel_dir, remove_kernel_dir, seal_kernel_dir, write_pid_record

    kernel_dir = make_kernel_dir(tmp_path)
    (kernel_dir / "home").mkdir()
    make_deep(kernel_dir / "home", few_fds + 200)
    if os.geteuid() == 0:
        os.chown(kernel_dir / "home", 54321, 54321)  # the kernel's uid owns its home
    seal_kernel_dir(kernel_dir)  # as after a kernel started: root-owned, 0711 (when root)
    write_pid_record(kernel_dir, 1)
    assert remove_kernel_dir(kernel_dir) is True
    assert os.listdir(kernel_dir.parent) == []


# Run in a child: as root it drops to an unprivileged uid after the imports (root never
# meets a permission error, which is the point here).
_REMOVE_AS_USER = """
import json, os, sys
from era_kernel.workspaces import fdtree
if os.geteuid() == 0:
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
parent = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
try:
    print(json.dumps(fdtree.remove_entry(parent, sys.argv[2])))
except OSError as exc:
    print(json.dumps(exc.errno))
"""


def _remove_as_user(base, name):
    done = subprocess.run([sys.executable, "-c", _REMOVE_AS_USER, str(base), name], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _chown_tree(path, uid):
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames]:
            os.lchown(os.path.join(dirpath, name), uid, uid)
    os.lchown(path, uid, uid)


def test_removal_opens_read_only_and_closed_directories(tmp_path):
    """Code running as the server's own uid (no root), or a tool (go's module cache),
    leaves directories read-only (0555) or closed (000), deeper than the removal's
    descriptor stack: removal makes them writable or readable instead of stopping."""
    base = Path(tempfile.mkdtemp(prefix="era-rm-", dir="/tmp"))  # reachable by the unprivileged uid
    try:
        top = base / "tree"
        chain = top / "/".join(["d"] * (fdtree.REMOVE_FDS + 10))
        chain.mkdir(parents=True)
        (chain / "f").write_bytes(b"x")
        (top / "closed").mkdir()
        (top / "closed" / "inner").mkdir()
        (top / "closed" / "inner" / "f").write_bytes(b"x")
        if os.geteuid() == 0:
            _chown_tree(base, 65534)
        os.chmod(top / "closed", 0)
        path = chain
        while path != base:
            os.chmod(path, 0o555)
            path = path.parent
        assert _remove_as_user(base, "tree") is True
        assert os.listdir(base) == []
    finally:
        subprocess.run(["chmod", "-R", "u+rwx", str(base)], check=False)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a directory of another owner")
def test_removal_raises_what_it_cannot_remove(tmp_path):
    """Not a silent partial removal: the caller learns that files remain."""
    base = Path(tempfile.mkdtemp(prefix="era-rm-", dir="/tmp"))
    try:
        (base / "tree" / "foreign").mkdir(parents=True)
        (base / "tree" / "foreign" / "f").write_bytes(b"x")
        (base / "tree" / "mine").write_bytes(b"y")
        _chown_tree(base, 65534)
        os.chown(base / "tree" / "foreign", 0, 0)  # root's, 0755: the unprivileged uid may not empty it
        assert _remove_as_user(base, "tree") in (errno.EPERM, errno.EACCES)
        assert (base / "tree" / "foreign" / "f").exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def test_wide_tree_over_the_entry_limit(tree):
    ws = Workspace(tree / "wide", max_entries=50, max_files=1000)
    await ws.create()
    for i in range(60):
        (ws.root / f"f{i:02d}").write_bytes(b"x")
    count, total = await ws.usage()  # a lower bound, never an error
    assert count == total and 0 < count <= 50
    for call in (ws.list, lambda: ws.copy_to(tree / "copy"), lambda: ws.write("new", b"y")):
        with pytest.raises(TooLarge) as info:
            await call()
        assert "ERA_WORKSPACE_MAX_ENTRIES" in info.value.message and "50" in info.value.message
    await ws.remove()
    assert not ws.root.exists()


async def test_depth_limit_is_exact(tree):
    ws = Workspace(tree / "exact", max_depth=3)
    await ws.create()
    await ws.write("a/b/c", b"x")  # three levels: within the limit
    (ws.root / "a" / "b" / "empty").mkdir()  # an empty directory at the limit: nothing below it
    assert [f["path"] for f in await ws.list()] == ["a/b/c"]
    await ws.write("a/b/empty/d", b"y")  # four levels: the write itself lands, the walk refuses
    with pytest.raises(TooLarge) as info:
        await ws.list()
    assert "deeper than 3 levels" in info.value.message
    assert await ws.usage() == (1, 1)


async def test_concurrent_writes_respect_total_quota(tree):
    ws = Workspace(tree / "c", max_total_bytes=100)
    await ws.create()
    # A new Workspace object per request, as a server handler may build them.
    writes = (Workspace(tree / "c", max_total_bytes=100).write(f"f{i}", b"x" * 30) for i in range(6))
    results = await asyncio.gather(*writes, return_exceptions=True)
    assert sum(isinstance(r, TooLarge) for r in results) == 3
    assert (await ws.usage())[1] == 90
