"""WorkspaceStore conformance: the same behaviour on file://, memory:// and s3:// (a real
S3-speaking server: moto's ThreadedMotoServer on 127.0.0.1, as s3fs's own tests use).

docs/security.md cases 12 and 13 (no traversal, links never followed on sync) are checked
for every backend.
"""

import asyncio
import hashlib
import json
import os
import threading
import uuid

import boto3
import pytest

from era_kernel.errors import BadRequest, NotFound, TooLarge
from era_kernel.workspaces import WorkspaceStore, manifest, snapshots
from era_kernel.workspaces.store import parse_options

from ..test_workspace_local import few_fds, make_deep  # noqa: F401 (a fixture)
from ..support.s3 import moto_endpoint

BUCKET = "era-workspaces"
CREDENTIALS = {"key": "testing", "secret": "testing"}


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_endpoint(BUCKET) as endpoint:
        yield endpoint


def s3_options(endpoint: str) -> dict:
    return {**CREDENTIALS, "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}


# The backends, in one place: a new one is one more param here and a branch below that
# builds its (url, options). Every test in this module, and tests/test_engine_persistence.py
# (which imports this fixture), then runs on it.
@pytest.fixture(params=["file", "memory", "s3"])
def store_spec(request, tmp_path):
    """``(url, options_json)`` of a fresh, empty store on each backend."""
    unique = uuid.uuid4().hex[:12]
    if request.param == "file":
        return f"file://{tmp_path}/store", ""
    if request.param == "memory":
        return f"memory://era-test-{unique}", ""
    endpoint = request.getfixturevalue("s3_endpoint")
    return f"s3://{BUCKET}/{unique}", json.dumps(s3_options(endpoint))


@pytest.fixture
def store(store_spec):
    return WorkspaceStore.from_url(*store_spec)


def make_files(root, files: dict) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def read_tree(root) -> dict:
    """Files under ``root`` as bytes and links as ``"<link>"`` (not followed); directories
    only show through their contents."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if os.path.islink(full):
                out[rel] = "<link>"
            elif os.path.isfile(full):
                with open(full, "rb") as fh:
                    out[rel] = fh.read()
    return out


def store_objects(store, sid) -> dict:
    objects = store.objects
    return {key: objects.get(key) for key in objects.find(objects.key(sid))}


def referenced_blobs(store, sid) -> set:
    """Blobs the manifest owns, each used by at least one file."""
    strip = store.objects.fs._strip_protocol
    snap = manifest.load(store.objects, sid)
    assert {e["blob"] for e in snap.files.values()} == set(snap.blobs)
    return {strip(store.objects.key(sid, blob)) for blob in snap.blobs}


def blob_keys(store, sid) -> set:
    strip = store.objects.fs._strip_protocol
    return {strip(k) for k in store.objects.find(store.objects.key(sid, manifest.BLOBS))}


SAMPLE = {
    "a.txt": b"alpha",
    "empty": b"",
    "dir/sub/b.bin": bytes(range(256)) * 4,
    "données/été.csv": "é,à\n".encode(),
    ".hidden": b"h",
}


async def test_push_restore_roundtrip(store, tmp_path):
    src = tmp_path / "src"
    make_files(src, SAMPLE)
    stats = await store.push("s1", src)
    assert (stats["files"], stats["uploaded"], stats["deleted"]) == (5, 5, 0)
    assert stats["bytes"] == sum(map(len, SAMPLE.values()))
    dst = tmp_path / "dst"
    restored = await store.restore("s1", dst)
    assert restored["downloaded"] == 5
    assert read_tree(dst) == SAMPLE
    for rel in SAMPLE:  # mtimes survive, so "uploaded" does and the next push is a no-op
        assert os.stat(dst / rel).st_mtime_ns == os.stat(src / rel).st_mtime_ns
    listing = await store.list("s1")
    assert [f["path"] for f in listing] == sorted(SAMPLE)
    assert await store.usage("s1") == (5, sum(map(len, SAMPLE.values())))
    assert (await store.push("s1", dst))["manifest_written"] is False
    assert await store.exists("s1") and not await store.exists("never")


async def test_restore_of_unknown_session_is_empty(store, tmp_path):
    dst = tmp_path / "dst"
    make_files(dst, {"stale": b"x"})
    assert (await store.restore("nobody", dst))["files"] == 0
    assert read_tree(dst) == {}
    assert await store.list("nobody") == []


async def test_push_sends_only_what_changed(store, tmp_path):
    src = tmp_path / "src"
    make_files(src, {f"f{i:02d}.txt": f"content {i}".encode() for i in range(20)})
    assert (await store.push("s", src))["uploaded"] == 20

    again = await store.push("s", src)
    assert (again["uploaded"], again["hashed"], again["manifest_written"]) == (0, 0, False)

    (src / "f03.txt").write_bytes(b"changed")
    one = await store.push("s", src)
    assert (one["uploaded"], one["hashed"], one["unchanged"]) == (1, 1, 19)

    os.utime(src / "f04.txt", ns=(1, 1))  # touched, same bytes: hashed, not sent
    touched = await store.push("s", src)
    assert (touched["hashed"], touched["uploaded"], touched["manifest_written"]) == (1, 0, True)

    os.rename(src / "f05.txt", src / "renamed.txt")  # same bytes under a new name: not sent
    renamed = await store.push("s", src)
    assert (renamed["uploaded"], renamed["deleted"]) == (0, 1)

    (src / "f06.txt").unlink()
    gone = await store.push("s", src)
    assert (gone["deleted"], gone["files"]) == (1, 19)

    dst = tmp_path / "dst"
    await store.restore("s", dst)
    assert read_tree(dst) == read_tree(src)
    assert blob_keys(store, "s") == referenced_blobs(store, "s")  # replaced contents were collected


async def test_large_files_stream_both_ways(store, tmp_path, monkeypatch):
    monkeypatch.setattr(snapshots, "SMALL_FILE", 1024)
    big = os.urandom(11 * 1024 * 1024)  # over one 8 MiB part: a real multipart upload on S3
    src = tmp_path / "src"
    make_files(src, {"big.bin": big, "copy.bin": big, "small": b"s"})
    stats = await store.push("s", src)
    assert stats["uploaded"] == 2  # two identical large files share one blob
    dst = tmp_path / "dst"
    await store.restore("s", dst)
    assert (dst / "big.bin").read_bytes() == big and (dst / "copy.bin").read_bytes() == big
    assert await store.read_file("s", "small") == b"s"


async def test_restore_is_an_exact_mirror(store, tmp_path):
    src = tmp_path / "src"
    make_files(src, {"keep.txt": b"same", "stale.txt": b"new", "dir/file": b"f", "x/y": b"xy"})
    await store.push("s", src)
    dst = tmp_path / "dst"
    make_files(dst, {"keep.txt": b"same", "stale.txt": b"old!", "extra.txt": b"e", "junk/deep/z": b"z",
                     "dir/file/inner": b"a directory where a file should be"})
    os.utime(dst / "keep.txt", ns=(os.stat(src / "keep.txt").st_mtime_ns,) * 2)
    os.symlink("/etc/passwd", dst / "p")
    os.symlink("/", dst / "r")
    os.symlink(tmp_path / "src", dst / "x")  # a link where a directory should be
    stats = await store.restore("s", dst)
    assert stats["kept"] == 1
    assert read_tree(dst) == {"keep.txt": b"same", "stale.txt": b"new", "dir/file": b"f", "x/y": b"xy"}
    assert sorted(os.listdir(dst)) == ["dir", "keep.txt", "stale.txt", "x"]  # junk/ and links gone
    assert read_tree(src) == {"keep.txt": b"same", "stale.txt": b"new", "dir/file": b"f", "x/y": b"xy"}


async def test_links_are_never_followed_on_push(store, tmp_path):
    outside = tmp_path / "outside"
    make_files(outside, {"secret": b"outside secret"})
    src = tmp_path / "src"
    make_files(src, {"real.txt": b"real"})
    os.symlink("/etc/passwd", src / "p")
    os.symlink("/", src / "r")
    os.symlink(outside, src / "d")
    os.mkfifo(src / "fifo")
    stats = await asyncio.wait_for(store.push("s", src), 30)
    assert (stats["files"], stats["skipped"]) == (1, 4)
    assert [f["path"] for f in await store.list("s")] == ["real.txt"]
    with open("/etc/passwd", "rb") as fh:
        passwd = fh.read()
    for data in store_objects(store, "s").values():
        assert passwd not in data and b"outside secret" not in data
    dst = tmp_path / "dst"
    await store.restore("s", dst)
    assert read_tree(dst) == {"real.txt": b"real"}


async def test_push_of_a_missing_directory_changes_nothing(store, tmp_path):
    src = tmp_path / "src"
    make_files(src, {"a": b"a"})
    await store.push("s", src)
    with pytest.raises(NotFound):
        await store.push("s", tmp_path / "gone")
    assert [f["path"] for f in await store.list("s")] == ["a"]


async def test_delete_session(store, tmp_path):
    src = tmp_path / "src"
    make_files(src, SAMPLE)
    await store.push("s", src)
    await store.delete("s")
    assert await store.list("s") == [] and not await store.exists("s")
    assert store_objects(store, "s") == {}
    await store.delete("s")  # idempotent


async def test_copy_is_independent(store, tmp_path):
    src = tmp_path / "src"
    make_files(src, SAMPLE)
    await store.push("s1", src)
    make_files(tmp_path / "other", {"to-be-replaced": b"x"})
    await store.push("s2", tmp_path / "other")
    assert (await store.copy("s1", "s2"))["files"] == len(SAMPLE)
    (src / "a.txt").write_bytes(b"changed in s1")
    await store.push("s1", src)
    await store.delete("s1")
    dst = tmp_path / "dst"
    await store.restore("s2", dst)
    assert read_tree(dst) == SAMPLE
    with pytest.raises(BadRequest):
        await store.copy("s2", "s2")


async def test_single_file_api(store, tmp_path):
    assert await store.write_file("s", "dir/a.txt", b"A") == {"path": "dir/a.txt", "size": 1}
    await store.write_file("s", "./b.txt", b"B")
    await store.write_file("s", "dir/a.txt", b"A2")
    assert await store.read_file("s", "dir/a.txt") == b"A2"
    assert [f["path"] for f in await store.list("s")] == ["b.txt", "dir/a.txt"]
    with pytest.raises(NotFound):
        await store.read_file("s", "nope")
    with pytest.raises(BadRequest):
        await store.write_file("s", "b.txt/child", b"x")  # a parent is a file
    with pytest.raises(BadRequest):
        await store.write_file("s", "dir", b"x")  # it is a directory
    for bad in ("../x", "/etc/passwd", "..\\x", "a\x00b", "../ws1evil/x"):
        with pytest.raises(BadRequest):
            await store.read_file("s", bad)
        with pytest.raises(BadRequest):
            await store.write_file("s", bad, b"x")
        with pytest.raises(BadRequest):
            await store.delete_file("s", bad)
    dst = tmp_path / "dst"
    await store.restore("s", dst)
    assert read_tree(dst)["dir/a.txt"] == b"A2"
    await store.delete_file("s", "dir")
    with pytest.raises(NotFound):
        await store.delete_file("s", "dir/a.txt")
    assert [f["path"] for f in await store.list("s")] == ["b.txt"]
    assert blob_keys(store, "s") == referenced_blobs(store, "s")


async def test_quotas(store_spec, tmp_path):
    store = WorkspaceStore.from_url(*store_spec, max_files=3, max_total_bytes=100)
    src = tmp_path / "src"
    make_files(src, {"a": b"x" * 40, "b": b"x" * 40})
    await store.push("s", src)
    make_files(src, {"c": b"x" * 40})
    with pytest.raises(TooLarge) as info:
        await store.push("s", src)
    assert isinstance(info.value, TooLarge)  # 413
    assert [f["path"] for f in await store.list("s")] == ["a", "b"]  # nothing committed
    with pytest.raises(TooLarge):
        await store.write_file("s", "c", b"x" * 21)
    await store.write_file("s", "c", b"x" * 20)
    with pytest.raises(TooLarge):
        await store.write_file("s", "d", b"")


async def test_archives(store):
    await store.put_archive("envs/python-abc.tar.zst", b"v1")
    await store.put_archive("envs/python-abc.tar.zst", b"v2")
    assert await store.get_archive("envs/python-abc.tar.zst") == b"v2"
    with pytest.raises(NotFound):
        await store.get_archive("envs/missing")
    with pytest.raises(BadRequest):
        await store.put_archive("../escape", b"x")
    await store.delete_archive("envs/python-abc.tar.zst")
    with pytest.raises(NotFound):
        await store.get_archive("envs/python-abc.tar.zst")


@pytest.mark.parametrize("bad_id", ["", "../x", "a/b", ".archives", "x" * 129, "a\x00", "sess\u202e"])
async def test_invalid_session_ids(store, tmp_path, bad_id):
    for call in (store.push(bad_id, tmp_path), store.restore(bad_id, tmp_path / "d"), store.delete(bad_id),
                 store.list(bad_id), store.read_file(bad_id, "a"), store.write_file(bad_id, "a", b""),
                 store.copy("ok", bad_id)):
        with pytest.raises(BadRequest):
            await call


async def test_tampered_manifest_cannot_escape(store, tmp_path):
    blob = "blobs/" + "0" * 32
    entry = {"size": 1, "mtime_ns": 0, "sha256": "0" * 64, "blob": blob, "offset": 0}
    for files, blobs in [({"../escaped": entry}, {blob: 1}),
                         ({"ok": entry}, {"../../other-session/blobs/x": 1}),
                         ({"ok": {**entry, "offset": 5}}, {blob: 1}),          # past the blob's end
                         ({"a": entry, "a/b": entry}, {blob: 1})]:             # a file under a file
        evil = {"format": manifest.FORMAT, "files": files, "blobs": blobs}
        store.objects.put(store.objects.key("s", manifest.MANIFEST), json.dumps(evil).encode())
        with pytest.raises(ValueError):
            await store.restore("s", tmp_path / "dst")
    assert not (tmp_path / "escaped").exists()


async def test_restore_chowns_when_root(store, tmp_path):
    src = tmp_path / "src"
    make_files(src, {"d/f": b"x"})
    await store.push("s", src)
    dst = tmp_path / "dst"
    await store.restore("s", dst, uid=4321)
    expected = 4321 if os.geteuid() == 0 else os.geteuid()
    assert {os.stat(dst / p).st_uid for p in ("", "d", "d/f")} == {expected}


async def test_concurrent_operations_stay_consistent(store, tmp_path):
    src = tmp_path / "src"
    make_files(src, {f"f{i}": str(i).encode() for i in range(30)})
    await store.push("s", src)
    for i in range(30):
        (src / f"f{i}").write_bytes(b"v2 %d" % i)
    results = await asyncio.gather(
        store.push("s", src), store.write_file("s", "extra", b"e"), store.push("s", src),
        *(store.read_file("s", f"f{i}") for i in range(30)), store.list("s"))
    assert all(results[3 + i] in (str(i).encode(), b"v2 %d" % i) for i in range(30))  # old or new, whole
    listing = {f["path"] for f in await store.list("s")}
    assert {f"f{i}" for i in range(30)} <= listing
    assert blob_keys(store, "s") == referenced_blobs(store, "s")


def test_options_parsing():
    assert parse_options("") == {} and parse_options(None) == {}
    assert parse_options('{"anon": false}') == {"anon": False}
    assert parse_options({"a": 1}) == {"a": 1}
    with pytest.raises(ValueError):
        parse_options("{not json")
    with pytest.raises(ValueError):
        parse_options("[1, 2]")


async def test_s3_settings_from_aws_environment(s3_endpoint, tmp_path, monkeypatch):
    """No options: endpoint and keys come from the standard AWS_* variables (botocore)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    store = WorkspaceStore.from_url(f"s3://{BUCKET}/from-env-{uuid.uuid4().hex[:8]}", "")
    make_files(tmp_path / "src", {"a": b"env"})
    await store.push("s", tmp_path / "src")
    client = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    key = store.objects.key("s", manifest.MANIFEST).split("/", 1)[1]
    doc = json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    assert list(doc["files"]) == ["a"]
    assert doc["files"]["a"]["sha256"] == hashlib.sha256(b"env").hexdigest()


async def test_sibling_session_ids_stay_apart(store, tmp_path):
    make_files(tmp_path / "one", {"a": b"one"})
    make_files(tmp_path / "ten", {"a": b"ten"})
    await store.push("s10", tmp_path / "ten")
    await store.push("s1", tmp_path / "one")  # its first push lists "s1": must not see "s10"
    await store.delete("s1")
    assert await store.read_file("s10", "a") == b"ten"
    await store.restore("s10", tmp_path / "dst")
    assert read_tree(tmp_path / "dst") == {"a": b"ten"}


async def test_small_files_travel_in_packs(store, tmp_path):
    src = tmp_path / "src"
    make_files(src, {f"d{i % 3}/f{i}": os.urandom(100) for i in range(50)})
    stats = await store.push("s", src)
    assert (stats["uploaded"], stats["packs"]) == (50, 1)
    assert len(blob_keys(store, "s")) == 1
    dst = tmp_path / "dst"
    stats = await store.restore("s", dst)
    assert (stats["downloaded"], stats["requests"]) == (50, 1)
    assert read_tree(dst) == read_tree(src)


async def test_a_mostly_replaced_pack_is_repacked(store, tmp_path):
    src = tmp_path / "src"
    make_files(src, {f"f{i}": bytes([i]) * 100 for i in range(10)})
    await store.push("s", src)
    make_files(src, {"f0": b"new" * 10})  # 9 of 10 still in the pack: left alone
    assert (await store.push("s", src))["repacked"] == 0
    make_files(src, {f"f{i}": b"v3-%d" % i for i in range(1, 7)})  # 3 of 10 left: repacked
    stats = await store.push("s", src)
    assert stats["repacked"] == 3
    snap = manifest.load(store.objects, "s")
    stored = sum(snap.blobs.values())
    assert stored == sum(e["size"] for e in snap.files.values())  # no dead bytes kept
    assert blob_keys(store, "s") == referenced_blobs(store, "s")
    dst = tmp_path / "dst"
    await store.restore("s", dst)
    assert read_tree(dst) == read_tree(src)


async def test_touching_every_file_uploads_nothing(store, tmp_path):
    src = tmp_path / "src"
    make_files(src, {f"f{i}": os.urandom(64) for i in range(20)})
    await store.push("s", src)
    for i in range(20):
        os.utime(src / f"f{i}", ns=(10**18 + i, 10**18 + i))
    stats = await store.push("s", src)
    assert (stats["hashed"], stats["uploaded"], stats["repacked"]) == (20, 0, 0)


async def test_restoring_a_few_files_of_a_big_pack_reads_ranges(store, tmp_path):
    src = tmp_path / "src"
    make_files(src, {f"f{i:02d}": os.urandom(1000) for i in range(20)})
    await store.push("s", src)
    dst = tmp_path / "dst"
    await store.restore("s", dst)
    (dst / "f03").unlink()
    (dst / "f07").write_bytes(b"local edit")
    stats = await store.restore("s", dst)
    assert (stats["kept"], stats["downloaded"], stats["requests"]) == (18, 2, 2)
    assert read_tree(dst) == read_tree(src)


async def test_debris_is_swept_by_the_next_process(store_spec, tmp_path):
    src = tmp_path / "src"
    make_files(src, {"a": b"a"})
    first = WorkspaceStore.from_url(*store_spec)
    await first.push("s", src)
    orphan = first.objects.key("s", "blobs/" + "f" * 32)  # as a killed push leaves it
    first.objects.put(orphan, b"orphan")
    restarted = WorkspaceStore.from_url(*store_spec)
    stats = await restarted.push("s", src)
    assert (stats["manifest_written"], stats["removed_blobs"]) == (False, 1)
    assert blob_keys(restarted, "s") == referenced_blobs(restarted, "s")


async def test_two_store_objects_see_each_others_commits(store_spec):
    one, two = WorkspaceStore.from_url(*store_spec), WorkspaceStore.from_url(*store_spec)
    await one.write_file("s", "x", b"1")
    assert [f["path"] for f in await two.list("s")] == ["x"]
    await two.write_file("s", "y", b"2")
    assert [f["path"] for f in await one.list("s")] == ["x", "y"]  # the cached manifest is not trusted
    assert await one.read_file("s", "y") == b"2"


async def test_a_cancelled_push_keeps_the_session_locked_until_its_work_ends(store, tmp_path, monkeypatch):
    """Cancelling the caller (a client gone) cannot stop the thread doing the push, so
    the session lock must stay held until that thread is done."""
    src = tmp_path / "src"
    make_files(src, {"a": b"a"})
    started, release = asyncio.Event(), threading.Event()
    loop = asyncio.get_running_loop()
    real_push = snapshots.push

    def slow_push(*args, **kwargs):
        loop.call_soon_threadsafe(started.set)
        release.wait(10)
        return real_push(*args, **kwargs)

    monkeypatch.setattr(snapshots, "push", slow_push)
    first = asyncio.create_task(store.push("s", src))
    await started.wait()
    first.cancel()
    second = asyncio.create_task(store.write_file("s", "b", b"b"))
    await asyncio.sleep(0.2)
    assert not first.done() and not second.done()  # both wait for the thread
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await first
    await second
    assert [f["path"] for f in await store.list("s")] == ["a", "b"]


async def test_deep_tree_is_refused_by_push_and_removed_by_restore(store, tmp_path, few_fds):
    src = tmp_path / "src"
    make_files(src, {"a": b"a"})
    await store.push("s", src)
    make_deep(src, few_fds + 200)  # deeper than the open-file limit
    with pytest.raises(TooLarge) as info:
        await store.push("s", src)
    assert "ERA_WORKSPACE_MAX_DEPTH" in info.value.message
    assert [f["path"] for f in await store.list("s")] == ["a"]  # nothing committed
    # Restoring over what the kernel left behind removes the deep tree.
    await store.restore("s", src)
    assert read_tree(src) == {"a": b"a"}


async def test_wide_tree_over_the_entry_limit_is_refused_by_push(store_spec, tmp_path):
    store = WorkspaceStore.from_url(*store_spec, max_entries=20)
    src = tmp_path / "src"
    make_files(src, {"keep/a": b"a", "b": b"b"})
    await store.push("s", src)
    make_files(src, {f"keep/junk{i}": b"x" for i in range(30)})
    with pytest.raises(TooLarge) as info:
        await store.push("s", src)
    assert "ERA_WORKSPACE_MAX_ENTRIES" in info.value.message
    assert [f["path"] for f in await store.list("s")] == ["b", "keep/a"]  # nothing committed
    # Leftovers too many to compare: restore starts from an empty directory instead.
    stats = await store.restore("s", src)
    assert read_tree(src) == {"keep/a": b"a", "b": b"b"} and stats["downloaded"] == 2
