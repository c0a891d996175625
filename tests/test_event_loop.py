"""Nothing blocks the event loop: a representative flow on both provisioners fails on
any callback that holds the loop over 100 ms (``LoopWatch``).

One request blocking the loop stalls every other session's output and every /health
probe. File work, Docker API calls, directory setup for a kernel launch, kernelspec
reads and store calls all belong in threads; this watches the whole engine do a day's
work: create (cold and pooled), run, files, duplicate, restart, interrupt, one-shot
runs, stats, culling, delete.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback


from era_kernel.engine import SessionManager

from .conftest import both_provisioners

SLOW = 0.1  # seconds: asyncio's default is 0.1 too


class LoopWatch:
    """Fails what holds the loop's thread for more than ``SLOW``: a callback that takes
    that long makes a 20 ms heartbeat late, and a watchdog thread then samples the loop
    thread's stack, so a failure names the blocking call.

    Not asyncio's debug mode: its slow-callback warning is the same measure, but debug
    mode records a traceback at every future's creation, which itself stalls busy code
    (jupyter_client's readiness polling) past 100 ms. A heartbeat late only because the
    whole process was not scheduled (two cores, kernels starting) is no stall: the loop
    catches up at once, so a stall counts when the heartbeat is still late 20 ms later
    and the thread is not waiting in its selector.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.stalls, self._beat = loop, [], time.monotonic()
        self._thread_id = threading.get_ident()
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "LoopWatch":
        self._heartbeat()
        self._watcher.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._watcher.join()

    def _heartbeat(self) -> None:
        self._beat = time.monotonic()
        if not self._stop.is_set():
            self.loop.call_later(0.02, self._heartbeat)

    def _stack(self) -> list[str] | None:
        frame = sys._current_frames().get(self._thread_id)
        if frame is None or frame.f_code.co_name in ("select", "poll", "_run_once"):
            return None  # waiting for events: not blocked
        return [line for line in traceback.format_stack(frame) if "/asyncio/" not in line]

    def _watch(self) -> None:
        reported = None
        while not self._stop.wait(0.02):
            beat = self._beat
            if time.monotonic() - beat <= SLOW or beat == reported:
                continue
            time.sleep(0.02)
            stack = self._stack()
            if self._beat == beat and stack is not None:  # still late, and busy
                reported = beat
                late = time.monotonic() - beat
                ours = [line for line in stack if "<frozen" not in line][-10:]  # imports show as frozen frames
                self.stalls.append(f"loop blocked {late * 1000:.0f} ms in:\n" + "".join(ours))


@both_provisioners
async def test_a_days_work_never_blocks_the_loop_for_100_ms(era_settings):
    settings = era_settings.replace(ERA_POOL_SIZE=1, ERA_POOL_KERNELS=f"python:{era_settings['ERA_PROVISIONER']}")
    engine = SessionManager(settings)
    await engine.start()  # imports and the first store open are start-up, not the watched flow
    try:
        for _ in range(600):
            if engine.pool.stats()["pools"][f"python:{settings['ERA_PROVISIONER']}"]["ready"]:
                break
            await asyncio.sleep(0.1)
        await engine.execute({"code": "1"})  # the first run of each path warms Python's own caches

        with LoopWatch(asyncio.get_running_loop()) as watch:
            pooled = (await engine.create({"data": {"n": 1}}))["id"]
            cold = (await engine.create({"allowInternetAccess": True, "env": {"GREETING": "hi"}}))["id"]
            for sid in (pooled, cold):
                r = await engine.run(sid, {"code": "import json; print(json.load(open('.session_data.json')))"})
                assert r["exit_code"] == 0, r
            await engine.write_file(pooled, "dir/in.txt", b"x" * 1_000_000)
            assert len(await engine.read_file(pooled, "dir/in.txt")) == 1_000_000
            assert [f["path"] for f in await engine.list_files(pooled)]
            copy = (await engine.duplicate(pooled, {}))["id"]
            await engine.restart(cold)
            started = asyncio.Event()  # the interrupt must find the cell running, not its kernel starting
            run = asyncio.ensure_future(engine.run(
                cold, {"code": "import time; print('sleeping', flush=True); time.sleep(30)", "timeout": 60},
                on_event=lambda e: e.get("type") == "stdout" and started.set()))
            await asyncio.wait_for(started.wait(), 60)
            await engine.interrupt(cold)
            assert (await run)["exit_code"] == 1
            assert (await engine.execute({"code": "print(6 * 7)"}))["stdout"] == "42\n"
            await engine.stats()
            await engine.cull()
            await engine.notebook(pooled)
            for sid in (pooled, cold, copy):
                await engine.delete(sid)
            await engine.settle()
        assert not watch.stalls, "\n---\n".join(watch.stalls)
    finally:
        await engine.shutdown()
