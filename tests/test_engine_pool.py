"""The warm pool, admission under the kernel limit, and culling, on real kernels.

Pooled kernels are used once (a kernel is never handed to a second user), take their
user's startup cells at claim time, and are replaced in the background; past
``ERA_MAX_KERNELS`` the least recently used idle kernel is shut down, and with none
idle the request gets 429; idle kernels and sessions past their max age are culled,
with ages read from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
from pathlib import Path

import pytest

from era_kernel.errors import Conflict, NotFound, TooManyKernels
from era_kernel.sessions import SessionManager
from era_kernel.engine.records import POOL_UID_BASE

from .conftest import both_provisioners, kernel_processes


def pool_key(engine: SessionManager) -> str:
    return f"python:{engine.settings['ERA_PROVISIONER']}"


@contextlib.asynccontextmanager
async def started_engine(settings):
    """An engine on these settings, shut down afterwards."""
    engine = SessionManager(settings)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown()


async def wait_pool_full(engine: SessionManager, timeout: float = 60) -> None:
    key = pool_key(engine)
    for _ in range(int(timeout / 0.05)):
        pool = engine.pool.stats()["pools"][key]
        if pool["ready"] == pool["target"]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"pool never filled: {engine.pool.stats()}")


@pytest.fixture
async def pooled(era_settings):
    engine = SessionManager(era_settings.replace(
        ERA_POOL_SIZE=2, ERA_POOL_KERNELS=f"python:{era_settings['ERA_PROVISIONER']}"))
    await engine.start()
    await wait_pool_full(engine)
    yield engine
    await engine.shutdown()


@both_provisioners
async def test_session_claims_a_warm_kernel_with_its_own_startup(pooled):
    engine = pooled
    claimed = engine.pool.stats()["claimed"]
    warm_dirs = {w.workdir.name for w in engine.pool.waiting()}
    doc = await engine.create({"env": {"GREETING": "hi"}, "data": {"n": 3}, "startup": "started = 'yes'"})
    sid = doc["id"]
    assert engine.pool.stats()["claimed"] == claimed + 1
    assert engine.workspace_dir(sid).name in warm_dirs  # the warm kernel's directory is the workspace
    await engine.write_file(sid, "in.txt", b"from the files API")
    r = await engine.run(sid, {"code": "import os, json\n"
                                       "print(os.getcwd(), os.environ['GREETING'], os.environ['ERA_SESSION_ID'], started,"
                                       " json.load(open('.session_data.json'))['n'], open('in.txt').read())\n"
                                       "open('out.txt', 'w').write('from the kernel')"})
    cwd = "/workspace" if engine.settings["ERA_PROVISIONER"] == "docker" else str(engine.workspace_dir(sid))
    assert r["exit_code"] == 0, r
    assert r["stdout"] == f"{cwd} hi {sid} yes 3 from the files API\n"
    assert r["execution_count"] == 1  # the warm-up cells were silent
    assert await engine.read_file(sid, "out.txt") == b"from the kernel"
    if os.getuid() == 0:
        record = await engine.store.get_session(sid)
        assert record["uid"] >= POOL_UID_BASE
    await wait_pool_full(engine)  # replaced in the background


@both_provisioners
async def test_a_pooled_kernel_is_never_handed_to_a_second_user(pooled):
    engine = pooled
    seen: list = []  # the kernels themselves: an id() is reused once its object is freed
    mark = secrets.token_hex(4)
    for _ in range(3):
        doc = await engine.create({})
        await engine.run(doc["id"], {"code": "1"})
        kernel = engine.kernels[doc["id"]]
        assert not any(kernel is k for k in seen)
        seen.append(kernel)
        r = await engine.run(doc["id"], {"code": f"import builtins\nprint(getattr(builtins, 'era_mark', None))\n"
                                                 f"builtins.era_mark = '{mark}'"})
        assert r["stdout"] == "None\n"  # nothing left by an earlier user
        await engine.delete(doc["id"])
        one_shot = await engine.execute({"code": "import builtins; print(getattr(builtins, 'era_mark', None))",
                                         "provisioner": engine.settings["ERA_PROVISIONER"]})
        assert one_shot["stdout"] == "None\n"
        await wait_pool_full(engine)
    assert not any(w.kernel is k for w in engine.pool.waiting() for k in seen)


@both_provisioners
async def test_one_shot_execute_uses_the_pool_and_leaves_nothing(pooled):
    engine = pooled
    claimed = engine.pool.stats()["claimed"]
    warm_dirs = [w.workdir for w in engine.pool.waiting()]
    r = await engine.execute({"code": "import os; print(open('data.csv').read(), len(os.listdir('.')))",
                              "files": {"data.csv": "a,b"}, "provisioner": engine.settings["ERA_PROVISIONER"]})
    assert r["stdout"] == "a,b 1\n" and r["exit_code"] == 0
    assert engine.pool.stats()["claimed"] == claimed + 1
    await engine.settle()
    used = [d for d in warm_dirs if not d.exists()]
    assert len(used) == 1  # the claimed kernel's directory is gone with it
    await wait_pool_full(engine)
    assert engine.slots.used == 2  # the one-shot kernel gave its slot back; only the pool holds any


async def test_sessions_with_setup_or_network_never_take_a_warm_kernel(pooled):
    engine = pooled
    claimed = engine.pool.stats()["claimed"]
    doc = await engine.create({"allowInternetAccess": True})
    assert engine.pool.stats()["claimed"] == claimed
    assert engine.workspace_dir(doc["id"]).name == doc["id"]


async def test_warm_directories_a_dead_process_left_are_removed_but_claimed_ones_stay(era_settings):
    settings = era_settings.replace(ERA_POOL_SIZE=1)
    first = SessionManager(settings)
    await first.start()
    await wait_pool_full(first)
    sid = (await first.create({}))["id"]
    await first.run(sid, {"code": "open('keep.txt', 'w').write('kept'); x = 1"})
    workspace = first.workspace_dir(sid)
    await first.shutdown()
    stray = settings.data_dir / "sessions" / "pool-0123456789abcdef"
    stray.mkdir()
    (stray / "left.txt").write_text("x")

    second = SessionManager(settings.replace(ERA_POOL_SIZE=0))
    await second.start()
    try:
        assert not stray.exists()
        r = await second.run(sid, {"code": "import os; print(open('keep.txt').read(), os.getcwd())"})
        assert r["stdout"] == f"kept {workspace}\n"  # a fresh kernel, in the same directory
        assert second.workspace_dir(sid) == workspace
    finally:
        await second.shutdown()


@both_provisioners
async def test_session_ids_never_reach_pooled_directories(era_settings):
    """A pooled kernel's directory (visible to its code as the cwd) lives under its own
    root: a session named after it gets a directory of its own, and a session whose id
    starts with "pool-" keeps its files across a restart."""
    settings = era_settings.replace(ERA_POOL_SIZE=1)
    async with started_engine(settings) as first:
        await wait_pool_full(first)
        victim = (await first.create({}))["id"]
        assert first.pool.stats()["claimed"] == 1
        await first.write_file(victim, "secret.txt", b"victim's")
        workdir = first.workspace_dir(victim)
        assert workdir.parent == settings.data_dir / "pool"
        if settings["ERA_PROVISIONER"] == "local":  # the kernel's code sees the directory's name
            cwd = (await first.run(victim, {"code": "import os; print(os.getcwd())"}))["stdout"].strip()
            assert cwd == str(workdir)
        for name in (workdir.name, f"pool-{workdir.name}"):
            thief = (await first.create({"id": name, "allowInternetAccess": True}))["id"]  # never pooled
            assert await first.list_files(thief) == []
            await first.delete(thief)
        assert await first.read_file(victim, "secret.txt") == b"victim's"
        mine = (await first.create({"id": "pool-mydata", "allowInternetAccess": True}))["id"]
        await first.write_file(mine, "mine.txt", b"kept")
    async with started_engine(settings.replace(ERA_POOL_SIZE=0)) as second:
        assert await second.read_file(mine, "mine.txt") == b"kept"
        assert await second.read_file(victim, "secret.txt") == b"victim's"
        r = await second.run(mine, {"code": "print(open('mine.txt').read())"})
        assert r["stdout"] == "kept\n", r


async def test_a_new_session_never_adopts_a_directory_already_on_disk(engine):
    debris = engine.settings.data_dir / "sessions" / "leftover"
    debris.mkdir()
    (debris / "old.txt").write_text("not yours")
    with pytest.raises(Conflict) as err:
        await engine.create({"id": "leftover"})
    assert err.value.field == "id"
    assert (debris / "old.txt").read_text() == "not yours", "the refused create removed nothing"
    assert await engine.list() == [] and engine.slots.used == 0


async def test_pool_uids_are_never_reused_across_restarts(era_settings):
    if os.getuid() != 0:
        pytest.skip("per-session uids exist only when the engine runs as root")
    settings = era_settings.replace(ERA_POOL_SIZE=1)
    uids = []
    for _ in range(2):
        engine = SessionManager(settings)
        await engine.start()
        await wait_pool_full(engine)
        doc = await engine.create({})
        uids.append((await engine.store.get_session(doc["id"]))["uid"])
        await engine.shutdown()  # cancels the claim's start, then stops its kernel: cleaned up all the same
        assert not [p for p in (settings.runtime_dir / "k").iterdir() if p.is_dir()], "kernel directories left"
    assert len(set(uids)) == 2 and all(u >= POOL_UID_BASE for u in uids)


# ---- admission ----------------------------------------------------------------------------
async def test_at_the_limit_the_least_recently_used_idle_kernel_is_culled(era_settings):
    async with started_engine(era_settings.replace(ERA_MAX_KERNELS=2)) as engine:
        a = (await engine.create({}))["id"]
        b = (await engine.create({}))["id"]
        await engine.run(a, {"code": "x = 'a'"})
        await engine.run(b, {"code": "x = 'b'"})
        await engine.run(a, {"code": "x"})  # b is now the least recently used
        c = (await engine.create({}))["id"]
        await engine.run(c, {"code": "1"})
        assert set(engine.kernels) == {a, c} and engine.culled["lru"] == 1
        r = await engine.run(b, {"code": "print(globals().get('x'))"})  # the session stays; a new kernel
        assert r["stdout"] == "None\n" and engine.culled["lru"] == 2
        assert len(engine.kernels) == 2 and engine.slots.used == 2


async def test_at_the_limit_with_every_kernel_busy_the_answer_is_429(era_settings):
    async with started_engine(era_settings.replace(ERA_MAX_KERNELS=1)) as engine:
        a = (await engine.create({}))["id"]
        busy = asyncio.create_task(engine.run(a, {"code": "import time; time.sleep(2); print('done')"}))
        await asyncio.sleep(0.5)
        with pytest.raises(TooManyKernels) as refused:
            await engine.create({})
        assert refused.value.retry_after  # Busy: the server answers 429 with Retry-After
        with pytest.raises(TooManyKernels):
            await engine.execute({"code": "1"})
        assert (await busy)["stdout"] == "done\n"  # the running code was never touched
        assert len(await engine.list()) == 1
        b = (await engine.create({}))["id"]  # idle now: a's kernel makes room
        assert (await engine.run(b, {"code": "print(2)"}))["stdout"] == "2\n"


async def test_the_pool_gives_its_slots_back_before_any_session_kernel_is_culled(era_settings):
    async with started_engine(era_settings.replace(ERA_MAX_KERNELS=3, ERA_POOL_SIZE=2)) as engine:
        a = (await engine.create({"allowInternetAccess": True}))["id"]  # never pooled: takes the free slot
        await engine.run(a, {"code": "1"})
        await wait_pool_full(engine)
        b = (await engine.create({"allowInternetAccess": True}))["id"]
        await engine.run(b, {"code": "1"})
        assert set(engine.kernels) == {a, b} and engine.culled["lru"] == 0
        assert len(engine.pool.waiting()) == 1 and engine.slots.used == 3


# ---- culling -------------------------------------------------------------------------------
async def test_idle_kernels_are_shut_down_and_the_session_stays(era_settings):
    async with started_engine(era_settings.replace(ERA_KERNEL_IDLE_TIMEOUT=1.0)) as engine:
        idle = (await engine.create({}))["id"]
        busy = (await engine.create({}))["id"]
        await engine.run(idle, {"code": "x = 1"})
        running = asyncio.create_task(engine.run(busy, {"code": "import time; time.sleep(2.5); print('ok')"}))
        await asyncio.sleep(1.5)
        culled = await engine.cull()
        assert culled["idle"] == [idle] and idle not in engine.kernels and busy in engine.kernels
        assert (await running)["stdout"] == "ok\n"
        doc = await engine.get(idle)
        assert doc["kernel"]["state"] == "none"
        r = await engine.run(idle, {"code": "print(globals().get('x'))"})
        assert r["stdout"] == "None\n" and engine.culled["idle"] == 1
        assert idle not in (await engine.cull())["idle"]  # it just ran (busy may be idle by now on a slow host)


async def test_sessions_past_their_max_age_are_deleted_with_their_files(era_settings):
    async with started_engine(era_settings.replace(ERA_SESSION_MAX_AGE=3600.0)) as engine:
        short = (await engine.create({"max_age": 1}))["id"]
        default = (await engine.create({}))["id"]
        await engine.write_file(short, "f.txt", b"x")
        workspace = engine.workspace_dir(short)
        await asyncio.sleep(1.2)
        culled = await engine.cull()
        assert culled["expired"] == [short] and engine.culled["max_age"] == 1
        with pytest.raises(NotFound):
            await engine.get(short)
        assert not workspace.exists()
        assert (await engine.get(default))["id"] == default


async def test_max_age_is_counted_from_the_store_across_restarts(era_settings):
    first = SessionManager(era_settings)
    await first.start()
    sid = (await first.create({"max_age": 1.5}))["id"]
    await first.shutdown()
    await asyncio.sleep(1.6)
    second = SessionManager(era_settings.replace(ERA_CULL_INTERVAL=0.2))
    await second.start()
    try:
        for _ in range(50):  # the background pass, not a direct call
            if second.culled["max_age"]:
                break
            await asyncio.sleep(0.1)
        with pytest.raises(NotFound):
            await second.get(sid)
    finally:
        await second.shutdown()


async def test_bad_max_age_is_refused_with_the_field_named(engine):
    from era_kernel.errors import BadRequest

    for bad in (-1, 0, "soon"):
        with pytest.raises(BadRequest) as err:
            await engine.create({"max_age": bad})
        assert err.value.field == "max_age"


async def test_burst_of_creates_never_exceeds_the_limit_with_the_pool_on(era_settings):
    """docs/security.md case 1 with the pool and LRU culling in play: pooled kernels count, and a
    culled kernel is gone before the kernel that replaces it starts."""
    limit = 3
    engine = SessionManager(era_settings.replace(ERA_MAX_KERNELS=limit, ERA_POOL_SIZE=2))
    await engine.start()
    peak = 0
    sampling = True

    def live_kernels() -> int:  # distinct kernel directories among running processes' command lines
        pattern = re.compile(re.escape(str(era_settings.runtime_dir / "k")) + r"/([^/\s]+)")
        names = set()
        for pid in kernel_processes(str(era_settings.runtime_dir)):
            try:
                names.update(pattern.findall(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()))
            except OSError:
                pass
        return len(names)

    async def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, await asyncio.to_thread(live_kernels))
            await asyncio.sleep(0.005)

    try:
        await wait_pool_full(engine)
        first = (await engine.create({}))["id"]
        await engine.run(first, {"code": "1"})
        sampler = asyncio.create_task(sample())
        results = await asyncio.gather(*(engine.create({}) for _ in range(30)), return_exceptions=True)
        created = [r["id"] for r in results if isinstance(r, dict)]
        refused = [r for r in results if isinstance(r, TooManyKernels)]
        assert len(created) + len(refused) == 30, [r for r in results if not isinstance(r, (dict, TooManyKernels))]
        assert created and refused and refused[0].retry_after
        for sid in created:  # every created session works
            assert (await engine.run(sid, {"code": "print('ok')"}))["stdout"] == "ok\n"
        sampling = False
        await sampler
        assert 2 <= peak <= limit, f"{peak} kernels at once against a limit of {limit}"  # 2: it sees them
        assert engine.slots.used <= limit
        assert len(await engine.list()) == 1 + len(created)
    finally:
        sampling = False
        await engine.shutdown()
    assert not kernel_processes(str(era_settings.runtime_dir))


async def test_create_run_delete_cycles_return_to_the_baseline(era_settings):
    """docs/security.md case 3, scaled down for CI (a bench-sized soak would belong in bench/;
there is none yet): after many
    pooled and cold create/run/delete cycles and one-shot runs, open files, kernel
    processes, IPC directories, workspaces and store rows are back where they started."""
    engine = SessionManager(era_settings.replace(ERA_POOL_SIZE=1, ERA_POOL_MAX=1))  # a fixed pool: the baseline holds
    await engine.start()

    def footprint() -> dict[str, int]:
        runtime = era_settings.runtime_dir
        return {"fds": len(os.listdir("/proc/self/fd")),
                "kernel_dirs": len(list((runtime / "k").iterdir())) if (runtime / "k").exists() else 0,
                "workspaces": len(list((era_settings.data_dir / "sessions").iterdir())),
                "scratch": len(list((era_settings.data_dir / "scratch").iterdir())),
                "kernels": len(kernel_processes(str(runtime)))}

    try:
        await wait_pool_full(engine)
        await engine.execute({"code": "1"})  # first use of lazily created resources
        await engine.settle()
        await wait_pool_full(engine)
        baseline = footprint()
        for i in range(12):
            sid = (await engine.create({"data": {"i": i}}))["id"]  # pooled when the pool has refilled
            r = await engine.run(sid, {"code": f"print({i})"})
            assert r["stdout"] == f"{i}\n"
            await engine.delete(sid)
            assert (await engine.execute({"code": "print('x')"}))["stdout"] == "x\n"
        # Pooled kernels were used (a create that finds the pool empty now waits for its next
        # kernel rather than missing; one-shot runs take a ready kernel or start their own).
        assert engine.pool.stats()["claimed"] >= 2
        await engine.settle()
        await wait_pool_full(engine)
        await asyncio.sleep(0.5)  # kernels stopped just now leave /proc
        after = footprint()
        assert after["kernel_dirs"] == baseline["kernel_dirs"] and after["workspaces"] == baseline["workspaces"]
        assert after["scratch"] == baseline["scratch"] == 0
        assert after["kernels"] == baseline["kernels"] > 0
        assert after["fds"] <= baseline["fds"] + 5, (baseline, after)
        assert await engine.store.list_sessions() == []
        assert engine.slots.used == 1 and not engine.kernels
    finally:
        await engine.shutdown()
    assert not kernel_processes(str(era_settings.runtime_dir))


def own_cgroups() -> set[str] | None:
    """Kernel directory names of this process's kernel cgroups; None without cgroups."""
    from era_kernel.provisioning import cgroups

    found = cgroups.support() if os.getuid() == 0 else None
    if not found:
        return None
    prefix = cgroups.group_name("")
    return {p.name[len(prefix):] for base in found.bases for p in base.iterdir() if p.name.startswith(prefix)}


async def test_a_pool_kernel_still_starting_gives_its_slot_to_a_session(era_settings):
    """With one slot and the pool just starting its kernel, a session does not get a 429:
    the starting pool kernel is cancelled and stopped first, then the session's starts."""
    async with started_engine(era_settings.replace(ERA_MAX_KERNELS=1, ERA_POOL_SIZE=1)) as engine:
        for _ in range(100):  # the refill is under way, holding the only slot
            if engine.pool.stats()["pools"][pool_key(engine)]["starting"]:
                break
            await asyncio.sleep(0.01)
        assert engine.slots.used == 1 and not engine.pool.waiting()
        sid = (await engine.create({"allowInternetAccess": True}))["id"]  # never pooled
        assert (await engine.run(sid, {"code": "print('mine')"}))["stdout"] == "mine\n"
        assert engine.slots.used == 1 and not engine.pool.waiting()
        assert engine.pool.stats()["pools"][pool_key(engine)]["starting"] == 0
        live = {p.name.split(".")[0] for p in (era_settings.runtime_dir / "k").iterdir()}
        assert len(live) == 1  # the cancelled pool kernel left no IPC directory (nor .pid/.log) behind
        assert own_cgroups() in ({next(iter(live))}, None), "nor a cgroup (cancelled while making it)"


async def test_stopping_a_cancelled_start_lets_it_finish_its_clean_up(era_settings):
    """shutdown() cancels a claim still starting (its startup cells running), then stops
    the session's kernel, which awaits that start. A second cancel would cut short the
    start's own clean-up (stopping its kernel), leaving the kernel's directory and cgroup."""
    engine = SessionManager(era_settings)
    cleaned = asyncio.Event()

    async def starting():
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.1)  # stopping the kernel it started
            cleaned.set()

    task = asyncio.ensure_future(starting())
    engine.table.reserve("s", engine.table.slots.acquire())
    engine.table.mark_starting("s", task)
    await asyncio.sleep(0)
    task.cancel()  # as shutdown() does
    await asyncio.sleep(0)
    await engine.table.stop("s")
    assert cleaned.is_set()


async def test_a_kernel_cut_off_between_runs_gives_its_slot_back(era_settings):
    """A kernel whose connection was cut between runs (a background display over the
    message limit) is dead: it used to keep its slot until its session's next run, so at
    the kernel limit every other request got 429. Admission now evicts it, and a culling
    pass frees the slot of one nobody needs."""
    settings = era_settings.replace(ERA_MAX_KERNELS=1, ERA_KERNEL_MESSAGE_LIMIT=1024**2,
                                    ERA_OUTPUT_LIMIT=256 * 1024)
    arm = ("import threading\nthreading.Timer(0.3, lambda: display({'text/plain': 'x' * 3_000_000}, raw=True))"
           ".start()\nprint('armed')")

    async def cut_off(engine: SessionManager, sid: str) -> None:
        assert (await engine.run(sid, {"code": arm}))["stdout"] == "armed\n"
        for _ in range(100):
            if engine.kernels[sid].state == "dead":
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the cut was not noticed")

    async with started_engine(settings) as engine:
        first = (await engine.create({}))["id"]
        await cut_off(engine, first)
        assert engine.slots.used == 1
        second = (await engine.create({}))["id"]  # the dead kernel's slot, not a 429
        assert (await engine.run(second, {"code": "print('mine')"}))["stdout"] == "mine\n"
        assert first not in engine.kernels and engine.slots.used == 1
        await cut_off(engine, second)
        culled = await engine.cull()
        assert culled["dead"] == [second] and engine.slots.used == 0 and not engine.kernels
        assert (await engine.run(first, {"code": "print('back')"}))["stdout"] == "back\n"
        assert engine.slots.used == 1


@pytest.mark.parametrize("era_settings", ["docker"], indirect=True)  # local: tests/test_server_pool.py
async def test_a_burst_beyond_the_pool_waits_on_its_starts_in_order(era_settings):
    """Three creates at once on a Docker pool of one: each gets a pooled kernel (the ready
    one, then the next two the pool starts), none starts one of its own; the pool refills
    to the burst it saw."""
    settings = era_settings.replace(ERA_POOL_SIZE=1, ERA_POOL_MAX=3, ERA_POOL_STARTS=1,
                                    ERA_POOL_KERNELS=f"python:{era_settings['ERA_PROVISIONER']}")
    async with started_engine(settings) as engine:
        await wait_pool_full(engine)
        finished: list[str] = []

        async def create_and_run(i: int) -> None:
            sid = (await engine.create({"id": f"burst{i}"}))["id"]
            assert (await engine.run(sid, {"code": f"print({i})"}))["stdout"] == f"{i}\n"
            finished.append(sid)

        creates = []
        for i in range(3):  # in this order, one event-loop turn apart
            creates.append(asyncio.create_task(create_and_run(i)))
            await asyncio.sleep(0)
        await asyncio.gather(*creates)
        stats = engine.pool.stats()
        assert stats["claimed"] == 3 and stats["misses"] == 0 and stats["waited"] == 2, stats
        assert finished == ["burst0", "burst1", "burst2"]  # one start at a time: served in arrival order
        await wait_pool_full(engine)
        assert engine.pool.stats()["pools"][pool_key(engine)]["ready"] == 3
        assert engine.slots.used == 3 + 3


def test_forked_pools_run_two_starts_per_core_others_one(era_settings):
    """A forked kernel's start is half waiting, a new interpreter's (bubblewrap, Docker)
    all CPU: the pools run twice as many starts at once when all their kernels fork."""
    from era_kernel.engine.pool import default_starts

    forked = SessionManager(era_settings.replace(ERA_POOL_SIZE=2, ERA_POOL_KERNELS="python:local"))
    mixed = SessionManager(era_settings.replace(ERA_POOL_SIZE=2, ERA_POOL_KERNELS="python:local,python:docker"))
    bwrap = SessionManager(era_settings.replace(ERA_POOL_SIZE=2, ERA_POOL_KERNELS="python:local",
                                                ERA_LOCAL_LAUNCHER="bwrap"))
    fixed = SessionManager(era_settings.replace(ERA_POOL_SIZE=2, ERA_POOL_STARTS=3))
    if os.getuid() == 0:
        assert forked.pool.starts == default_starts(2) == max(2, 2 * len(os.sched_getaffinity(0)))
    assert mixed.pool.starts == bwrap.pool.starts == default_starts(1)
    assert fixed.pool.starts == 3
    # With nobody waiting (refills behind served sessions), one per core whatever the kernels.
    assert forked.pool.refill_starts == mixed.pool.refill_starts == default_starts(1)
    assert fixed.pool.refill_starts == 3


def test_the_automatic_pool_keeps_twelve_forked_kernels_within_the_limit_and_memory(era_settings):
    """``ERA_POOL_SIZE=auto`` (the default): forked kernels are cheap to keep (about 12 MiB, 17 on Python 3.11)
    and a burst is answered by the kernels started before it, so such pools keep 12; pools
    of new interpreters keep 4; never more than half the kernel limit or what the free
    memory holds beyond the pool's reserve, nor fewer than 2."""
    from era_kernel.engine.pool import MEMORY_RESERVE, auto_pool_size

    def plenty() -> int:
        return 64 * 1024**3

    assert auto_pool_size(True, 100, memory=plenty) == 12
    assert auto_pool_size(False, 100, memory=plenty) == 4
    assert auto_pool_size(False, 100, memory=lambda: MEMORY_RESERVE // 2) == 2
    assert auto_pool_size(True, 10, memory=plenty) == 5  # half the kernel limit
    assert auto_pool_size(True, 100, kernel_bytes=100, memory=lambda: MEMORY_RESERVE + 700) == 7
    assert auto_pool_size(True, 100, memory=lambda: MEMORY_RESERVE // 2) == 2  # short of memory: the floor
    assert auto_pool_size(True, 100, memory=lambda: None) == 12  # memory unknown

    auto = era_settings.replace(ERA_POOL_SIZE="auto", ERA_POOL_KERNELS="python:local")
    forked = SessionManager(auto)
    bwrap = SessionManager(auto.replace(ERA_LOCAL_LAUNCHER="bwrap"))
    docker = SessionManager(auto.replace(ERA_POOL_KERNELS="python:docker"))
    assert bwrap.pool.size == docker.pool.size == auto_pool_size(False, auto["ERA_MAX_KERNELS"])
    if forked.launcher.pools_fork(forked.pool.keys):
        assert forked.pool.size == auto_pool_size(True, auto["ERA_MAX_KERNELS"])
    fixed = SessionManager(auto.replace(ERA_POOL_SIZE=3))
    assert fixed.pool.size == 3


def test_era_doctor_says_what_the_pool_keeps_ready(era_settings):
    from era_kernel.doctor import _pool
    from era_kernel.engine.launcher import pools_fork
    from era_kernel.engine.pool import auto_pool_size

    auto = era_settings.replace(ERA_POOL_SIZE="auto", ERA_POOL_KERNELS="python:local")
    name, status, detail = _pool(auto)
    size = auto_pool_size(pools_fork(auto, [("python", "local")]), auto["ERA_MAX_KERNELS"])
    assert (name, status) == ("pool", "OK") and detail.startswith(f"{size} kernels kept ready per pool (python:local")
    assert "ERA_POOL_SIZE=auto" in detail
    bwrap = auto_pool_size(False, auto["ERA_MAX_KERNELS"])
    assert _pool(auto.replace(ERA_LOCAL_LAUNCHER="bwrap"))[2].startswith(f"{bwrap} kernels kept ready")
    assert _pool(auto.replace(ERA_POOL_SIZE=5))[2] == "5 kernels kept ready per pool (python:local; ERA_POOL_SIZE=5)"
    assert _pool(auto.replace(ERA_POOL_SIZE=0))[2].startswith("off")
    assert _pool(auto.replace(ERA_POOL_KERNELS="python:nowhere"))[1] == "FAIL"
