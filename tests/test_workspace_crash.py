"""Crash safety of WorkspaceStore.push: a push SIGKILLed at any point leaves the store
holding the previous complete snapshot or the new one, never a mix and never a partial
object under its real name; the next push cleans the debris.

The push runs in a real subprocess that is really SIGKILLed: either by itself at a
precise point (half-way through writing the n-th object, or as the n-th S3 request goes
out), or by this process at whatever moment it reaches.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid

import pytest

import era_kernel
from era_kernel.workspaces import WorkspaceStore, fdtree, manifest

from .support.s3 import moto_endpoint

BUCKET = "era-crash"

CHILD = r"""
import asyncio, json, os, signal, sys, time
from era_kernel.workspaces import WorkspaceStore, fdtree, snapshots
from era_kernel.workspaces.objects import ObjectStore

args = json.loads(sys.argv[1])
mode, n = args["mode"], args.get("n", 0)
snapshots.PACK_FILES = 4           # many packs, so "mid-way" has many places to be
snapshots.SMALL_FILE = args["small_file"]
calls = [0]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "mid-write":            # file://: the n-th object write (-1: the manifest) stops half-way
    armed = [False]
    real_local_write = ObjectStore._local_write
    def local_write(self, key, fill):
        calls[0] += 1
        armed[0] = calls[0] == n or (n == -1 and key.endswith("/manifest.json"))
        return real_local_write(self, key, fill)
    real_write_all = fdtree.write_all
    def write_all(fd, data):
        if armed[0]:
            real_write_all(fd, bytes(data)[: len(data) // 2])
            die()
        return real_write_all(fd, data)
    ObjectStore._local_write = local_write
    fdtree.write_all = write_all
elif mode == "s3-call":            # s3://: die as the n-th request of one kind goes out
    import s3fs.core
    real_call = s3fs.core.S3FileSystem._call_s3
    async def call_s3(self, method, *a, **kw):
        if method == args["method"]:
            calls[0] += 1
            if calls[0] == n:
                die()
        return await real_call(self, method, *a, **kw)
    s3fs.core.S3FileSystem._call_s3 = call_s3
    from fsspec.asyn import sync_wrapper
    s3fs.core.S3FileSystem.call_s3 = sync_wrapper(call_s3)  # what S3File's multipart uses
elif mode == "external":           # report each pack stored and dawdle: the parent kills us
    real_put = ObjectStore.put
    def put(self, key, data):
        real_put(self, key, data)
        if "/blobs/" in key:
            print("pack", flush=True)
            time.sleep(0.05)
    ObjectStore.put = put

store = WorkspaceStore.from_url(args["url"], args["options"])
print(json.dumps(asyncio.run(store.push(args["sid"], args["dir"]))), flush=True)
"""

SMALL_FILE = 64 * 1024
V1 = {f"f{i:03d}.txt": f"v1 {i} ".encode() * (i + 1) for i in range(40)}
V1["big.bin"] = b"B1" * 150_000  # streamed (over SMALL_FILE)


def v2() -> dict:
    files = {k: v for k, v in V1.items() if not ("f030" <= k < "f035")}  # 5 deleted
    files.update({f"f{i:03d}.txt": f"v2 {i} ".encode() * (i + 3) for i in range(25)})  # 25 changed
    files.update({f"new/n{i}.txt": f"new {i}".encode() for i in range(5)})  # 5 added
    files["big.bin"] = b"B2" * (5 * 2**20)  # 10 MiB: a multipart upload on S3 (8 MiB parts)
    return files


V2 = v2()
CONTENTS = sorted({*V1.values(), *V2.values()}, key=len, reverse=True)


def is_whole_files(blob: bytes) -> bool:
    """True when ``blob`` is a concatenation of complete V1/V2 file contents, i.e. a
    complete pack (or a complete large file): a partial write would end mid-file."""
    reachable = {0}
    for position in range(len(blob) + 1):
        if position not in reachable:
            continue
        if position == len(blob):
            return True
        for content in CONTENTS:
            if blob.startswith(content, position):
                reachable.add(position + len(content))
    return False


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_endpoint(BUCKET) as endpoint:
        yield endpoint


def spec_for(backend, tmp_path, request):
    if backend == "file":
        return f"file://{tmp_path}/store", ""
    endpoint = request.getfixturevalue("s3_endpoint")
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}", json.dumps(options)


def write_tree(root, files: dict) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def set_tree(root, files: dict) -> None:
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel not in files:
                os.unlink(os.path.join(dirpath, name))
    write_tree(root, files)


def read_tree(root) -> dict:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


def child_env() -> dict:
    """The child imports this checkout's era_kernel even when it is not installed."""
    source_root = os.path.dirname(os.path.dirname(os.path.abspath(era_kernel.__file__)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source_root, os.environ.get("PYTHONPATH")]))}


def run_child(spec, sid, src, mode, **extra) -> subprocess.CompletedProcess:
    args = {"url": spec[0], "options": spec[1], "sid": sid, "dir": str(src), "mode": mode,
            "small_file": SMALL_FILE, **extra}
    return subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, timeout=120,
                          env=child_env())


def run_child_and_kill(spec, sid, src, after_batches: int) -> int:
    args = {"url": spec[0], "options": spec[1], "sid": sid, "dir": str(src), "mode": "external",
            "small_file": SMALL_FILE}
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], stdout=subprocess.PIPE, env=child_env())
    try:
        for _ in range(after_batches):
            assert child.stdout.readline() == b"pack\n"
        child.send_signal(signal.SIGKILL)
        return child.wait(timeout=60)
    finally:
        child.stdout.close()
        if child.poll() is None:
            child.kill()
            child.wait()


async def check_store_after_crash(spec, sid, tmp_path) -> str:
    """The store holds V1 or V2 exactly, and every object under its real name is whole."""
    store = WorkspaceStore.from_url(*spec)  # a restarted server: nothing cached
    dst = tmp_path / f"restored-{uuid.uuid4().hex[:6]}"
    await store.restore(sid, dst)
    state = read_tree(dst)
    assert state in (V1, V2), sorted(set(state.items()) ^ set(V1.items()))[:5]
    objects = store.objects
    for key in objects.find(objects.key(sid)):
        name = key.rsplit("/", 1)[-1]
        if fdtree.is_temp_name(name):
            continue  # a temporary name is not a real name: the next push collects it
        data = objects.get(key)
        if name == manifest.MANIFEST:
            manifest.decode(data)
        else:
            assert is_whole_files(data), f"partial object {key}"
    return "old" if state == V1 else "new"


async def check_recovery(spec, sid, src, tmp_path) -> None:
    store = WorkspaceStore.from_url(*spec)
    await store.push(sid, src)
    dst = tmp_path / "after-recovery"
    await store.restore(sid, dst)
    assert read_tree(dst) == V2
    strip = store.objects.fs._strip_protocol
    wanted = {strip(store.objects.key(sid, blob)) for blob in manifest.load(store.objects, sid).blobs}
    wanted.add(strip(store.objects.key(sid, manifest.MANIFEST)))
    assert {strip(k) for k in store.objects.find(store.objects.key(sid))} == wanted  # no debris left


async def prepare(spec, sid, tmp_path):
    src = tmp_path / "src"
    write_tree(src, V1)
    await WorkspaceStore.from_url(*spec).push(sid, src)
    set_tree(src, V2)
    return src


# The push walks big.bin first (streamed, object write 1), then stores packs of 4 small
# files (about 10), then the manifest: cut each kind of write in half.
@pytest.mark.parametrize("nth_write", [1, 2, 6, -1], ids=["big-stream", "first-pack", "middle-pack", "manifest"])
async def test_file_push_killed_half_way_through_a_write(tmp_path, request, nth_write):
    spec = spec_for("file", tmp_path, request)
    src = await prepare(spec, "s", tmp_path)
    done = await asyncio.to_thread(run_child, spec, "s", src, "mid-write", n=nth_write)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert await check_store_after_crash(spec, "s", tmp_path) == "old"
    await check_recovery(spec, "s", src, tmp_path)


@pytest.mark.parametrize("method, nth, expected", [
    ("put_object", 1, "old"),
    ("put_object", 5, "old"),
    ("upload_part", 2, "old"),           # the big file's multipart upload, never completed
    ("complete_multipart_upload", 1, "old"),
    ("delete_objects", 1, "new"),        # after the manifest: garbage collection
])
async def test_s3_push_killed_as_a_request_goes_out(tmp_path, request, method, nth, expected):
    spec = spec_for("s3", tmp_path, request)
    src = await prepare(spec, "s", tmp_path)
    done = await asyncio.to_thread(run_child, spec, "s", src, "s3-call", method=method, n=nth)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert await check_store_after_crash(spec, "s", tmp_path) == expected
    await check_recovery(spec, "s", src, tmp_path)


@pytest.mark.parametrize("backend", ["file", "s3"])
@pytest.mark.parametrize("after_batches", [1, 3])
async def test_push_killed_from_outside(tmp_path, request, backend, after_batches):
    spec = spec_for(backend, tmp_path, request)
    src = await prepare(spec, "s", tmp_path)
    code = await asyncio.to_thread(run_child_and_kill, spec, "s", src, after_batches)
    assert code == -signal.SIGKILL
    assert await check_store_after_crash(spec, "s", tmp_path) in ("old", "new")
    await check_recovery(spec, "s", src, tmp_path)
