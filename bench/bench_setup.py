"""Package setup benchmark: first setups, the second-session cache hit, and restores.

    .venv/bin/python bench/bench_setup.py [--provisioner local|docker] [--hits 20] [--restores 5] [--s3]

Measured from ``SetupManager.start`` to the ``completed`` status callback, the way a
client sees ``setup_status`` change:
- first setup of pip [requests] and of npm [lodash] (real registries; fresh data
  directory and store, so these are builds: download, install, seal, archive, upload);
- a second session with the same spec on the same host (goal: <= 1 s to completed);
- restore of the lodash environment on a "fresh host" (empty data directory, same
  store): one archive GET, unpack, publish. With ``--s3`` also from moto's S3 server
  on 127.0.0.1 (separate process), the archive copied there from the file store.

npm setup needs node in the image, so with ``--provisioner docker`` the npm rows run
on local. Not a test: it prints a table and exits 0 either way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from era_kernel.config import Settings
from era_kernel.setup import SetupManager
from era_kernel.setup.cache import archive_key
from era_kernel.workspaces import WorkspaceStore

UID = 100_000 + 777
CACHE_HIT_GOAL = 1.0


async def timed_setup(setups: SetupManager, spec: dict, provisioner: str, sid: str) -> tuple[float, dict]:
    done: dict = {}
    started = time.perf_counter()

    def status(state: str, result: dict | None) -> None:
        if state in ("completed", "failed"):
            done.update(state=state, result=result, at=time.perf_counter())

    await setups.start(sid, "python", provisioner, UID, setups.normalize(spec), None, status)
    await setups.wait(sid, 900)
    if done.get("state") != "completed":
        raise RuntimeError(f"setup {spec} failed: {(done.get('result') or {}).get('error')}")
    return done["at"] - started, done["result"]


def host(work: Path, name: str) -> Settings:
    return Settings.from_env({}, data_dir=str(work / name), runtime_dir=str(work / "rt"))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--provisioner", choices=["local", "docker"], default="local")
    parser.add_argument("--hits", type=int, default=20, help="second-session cache hits to time")
    parser.add_argument("--restores", type=int, default=5, help="restores on fresh hosts to time")
    parser.add_argument("--s3", action="store_true", help="also restore from moto's S3 server on loopback")
    args = parser.parse_args()
    rows: list[tuple] = []
    with tempfile.TemporaryDirectory(prefix="ebs-", dir="/tmp") as tmp:
        work = Path(tmp)
        store = WorkspaceStore.from_url(f"file://{work}/store")
        builder = SetupManager(host(work, "host-a"), store)
        pip_spec, npm_spec = {"pip": ["requests"]}, {"npm": ["lodash"]}

        seconds, result = await timed_setup(builder, pip_spec, args.provisioner, "first-pip")
        manifest = builder.cache.manifest(result["env"]) or {}
        rows.append(("first setup pip [requests]", args.provisioner, "file", [seconds],
                     f"{manifest.get('files')} files, {manifest.get('bytes', 0) / 1e6:.1f} MB"))
        seconds, result = await timed_setup(builder, npm_spec, "local", "first-npm")
        lodash_key = result["env"]
        manifest = builder.cache.manifest(lodash_key) or {}
        archive = len(await store.get_archive(archive_key(lodash_key)))
        rows.append(("first setup npm [lodash]", "local", "file", [seconds],
                     f"{manifest.get('files')} files, {manifest.get('bytes', 0) / 1e6:.1f} MB, "
                     f"archive {archive / 1e6:.2f} MB"))

        hits = []
        for i in range(args.hits):
            seconds, result = await timed_setup(builder, pip_spec, args.provisioner, f"hit-{i}")
            assert result["source"] == "cache", result
            hits.append(seconds)
        rows.append(("second session, same spec", args.provisioner, "local dir", hits,
                     f"goal <= {CACHE_HIT_GOAL:g} s: {'met' if max(hits) <= CACHE_HIT_GOAL else 'MISSED'}"))
        await builder.shutdown()

        stores = [("file", store)]
        moto = None
        if args.s3:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            import boto3
            from bench_workspace import MotoProcess

            moto = MotoProcess().__enter__()
            boto3.client("s3", endpoint_url=moto.endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                         region_name="us-east-1").create_bucket(Bucket="era-bench")
            s3 = WorkspaceStore.from_url("s3://era-bench/workspaces", json.dumps(moto.options()))
            await s3.put_archive(archive_key(lodash_key), await store.get_archive(archive_key(lodash_key)))
            stores.append(("s3 (moto)", s3))
        try:
            for name, backend in stores:
                samples = []
                for i in range(args.restores):
                    fresh = SetupManager(host(work, f"fresh-{name[:2]}-{i}"), backend)
                    seconds, result = await timed_setup(fresh, npm_spec, "local", f"restore-{i}")
                    assert result["source"] == "store", result
                    samples.append(seconds)
                    await fresh.shutdown()
                    shutil.rmtree(fresh.settings.data_dir, ignore_errors=True)
                rows.append(("restore lodash env from store", "local", name, samples, "fresh host: one GET + unpack"))
        finally:
            if moto is not None:
                moto.__exit__(None, None, None)
    print_table(rows)


def print_table(rows: list[tuple]) -> None:
    print(f"{'measurement':<32} {'prov.':<7} {'store':<10} {'n':>3} {'p50':>9} {'max':>9}  note")
    for what, provisioner, store, samples, note in rows:
        p50, worst = statistics.median(samples), max(samples)
        print(f"{what:<32} {provisioner:<7} {store:<10} {len(samples):>3} {fmt(p50):>9} {fmt(worst):>9}  {note}")


def fmt(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


if __name__ == "__main__":
    asyncio.run(main())
