"""What durable runs cost and what they keep (the README's Durable runs table).

    .venv/bin/python bench/bench_runs.py [--runs 300] [--events 20000] [--trials 50]

Rows:
- Warm run round trip, REST (POST /run) and WebSocket (run -> done), with the run journal
  on and off (``ERA_RUN_JOURNAL``): two servers, interleaved round by round, p50 and the
  ratio (goal: REST within 5%).
- Replay throughput: a late subscriber reading a finished run's journal from seq 0, as
  JSON pages (``GET .../runs/{id}/events?limit=10000``) and as one SSE stream; events/s.
- Restart to first queued run: a server holding a running run and queued ones is killed
  (SIGKILL) and started again on the same data; seconds from the new process's start to
  the first queued run running, beside the process's time to /health "ready".
- Events lost to a SIGKILL: a WebSocket client follows a run printing as fast as it can;
  the server is killed at a random moment and restarted; lost = events the client got
  live (they carry their seq) that are not in the journal after the restart. Max and
  p50 over ``--trials``, and the largest window they span in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clients import CODE, LOOPBACK, EraSocket, Http, once  # noqa: E402
from contenders import EraServer  # noqa: E402
from measure import interleaved, log, pct  # noqa: E402
from tornado.websocket import websocket_connect  # noqa: E402

SID = "bench-runs"


_KILLED: list[EraServer] = []  # their directories hold the data the next process uses: removed at the end


def restarted(old: EraServer, env: dict[str, str] | None = None) -> EraServer:
    """A new server process on the old one's data and runtime directories (not started)."""
    new = EraServer(env=env)
    new.env.update(ERA_DATA_DIR=old.env["ERA_DATA_DIR"], ERA_RUNTIME_DIR=old.env["ERA_RUNTIME_DIR"])
    _KILLED.append(old)
    return new


def cleanup(server: EraServer) -> None:
    server.cleanup()
    while _KILLED:
        _KILLED.pop().cleanup()


def kill(server: EraServer) -> None:
    """SIGKILL the server and what it started (a crash leaves kernels; the next start must
    not depend on them)."""
    left = server.descendants()
    server.stop(signal.SIGKILL)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


async def wait_status(port: int, run_id: str, wanted: set[str], poll: float = 0.005) -> dict:
    http = Http(port)
    try:
        while True:
            status, record = await http.request("GET", f"/api/sessions/{SID}/runs/{run_id}")
            if status == 200 and record["status"] in wanted:
                return record
            await asyncio.sleep(poll)
    finally:
        http.close()


# ---- journal overhead -----------------------------------------------------------------------
async def overhead(runs: int) -> list[str]:
    servers = {"on": EraServer(), "off": EraServer(env={"ERA_RUN_JOURNAL": "0"})}
    try:
        for server in servers.values():
            server.start()
            await once(server.port, "POST", "/api/sessions", {"id": SID})
        https = {name: Http(s.port) for name, s in servers.items()}
        sockets = {name: await EraSocket(s.port, SID).connect() for name, s in servers.items()}

        def rest(name):
            async def step():
                t = time.perf_counter()
                status, body = await https[name].request("POST", f"/api/sessions/{SID}/run", {"code": CODE})
                assert status == 200 and body["stdout"] == "1\n", body
                return {("rest", name): time.perf_counter() - t}
            return step

        def ws(name):
            async def step():
                _, total = await sockets[name].execute(CODE)
                return {("ws", name): total}
            return step

        steps = {**{("rest", n): rest(n) for n in servers}, **{("ws", n): ws(n) for n in servers}}
        samples = await interleaved(steps, runs, warmup=20)
        for s in sockets.values():
            s.close()
        rows = []
        for kind, label in (("rest", "REST run round trip"), ("ws", "WebSocket run round trip")):
            on, off = pct(samples[(kind, "on")], 50), pct(samples[(kind, "off")], 50)
            goal = "within 5%" if kind == "rest" else ""
            rows.append(f"| {label}, journal on vs off (p50) | {on:.2f} ms vs {off:.2f} ms | "
                        f"{(on / off - 1) * 100:+.1f}% | {goal} |")
        return rows
    finally:
        for server in servers.values():
            server.cleanup()


# ---- replay --------------------------------------------------------------------------------
async def replay(events: int) -> list[str]:
    server = EraServer().start()
    try:
        await once(server.port, "POST", "/api/sessions", {"id": SID})
        code = f"for i in range({events}):\n    print(i, flush=True)"
        status, run = await once(server.port, "POST", f"/api/sessions/{SID}/run", {"code": code, "timeout": 600})
        assert status == 200, run
        run_id = run["run_id"]
        http = Http(server.port)
        t = time.perf_counter()
        after, got = 0, 0
        while True:
            status, page = await http.request("GET", f"/api/sessions/{SID}/runs/{run_id}/events?after={after}"
                                                     "&limit=10000")
            if not page["events"]:
                break
            got += len(page["events"])
            after = page["last_seq"]
        json_s = time.perf_counter() - t
        http.close()

        reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
        t = time.perf_counter()
        writer.write(f"GET /api/sessions/{SID}/runs/{run_id}/events HTTP/1.0\r\n"
                     "Accept: text/event-stream\r\n\r\n".encode())
        data = await reader.read(-1)
        sse_s = time.perf_counter() - t
        writer.close()
        frames = data.count(b"\nid: ") + data.startswith(b"id: ")
        return [f"| Replay of a finished run, JSON pages of 10,000 ({got:,} events) | {got / json_s:,.0f} events/s "
                f"| {json_s * 1000:.0f} ms | |",
                f"| Replay of a finished run, one SSE stream ({frames:,} events) | {frames / sse_s:,.0f} events/s "
                f"| {sse_s * 1000:.0f} ms | |"]
    finally:
        server.cleanup()


# ---- restarts -----------------------------------------------------------------------------
async def restart_to_queued(trials: int) -> list[str]:
    latencies, readies = [], []
    server = EraServer().start()
    try:
        await once(server.port, "POST", "/api/sessions", {"id": SID})
        for _ in range(trials):
            _, running = await once(server.port, "POST", f"/api/sessions/{SID}/run",
                                    {"code": "import time; time.sleep(60)", "background": True})
            _, queued = await once(server.port, "POST", f"/api/sessions/{SID}/run",
                                   {"code": "print('after the restart')", "background": True})
            await wait_status(server.port, running["run_id"], {"running"})
            kill(server)
            server = restarted(server)
            server.launch()
            server.wait_listening()
            record = await wait_status(server.port, queued["run_id"], {"running", "completed"})
            latencies.append(time.perf_counter() - server.started_at)
            server.wait_ready()
            readies.append(server.ready_s)
            assert record["status"] in ("running", "completed")
        return [f"| Restart (SIGKILL) to the first queued run running, process start to it (p50 of {trials}) | "
                f"{pct(latencies, 50):.0f} ms | /health ready at {pct(readies, 50):.0f} ms | |"]
    finally:
        cleanup(server)


async def follow(port: int, run_id: str, seen: list[tuple[int, float]], started: asyncio.Event) -> None:
    ws = await websocket_connect(f"ws://{LOOPBACK}:{port}/api/sessions/{SID}/ws?run_id={run_id}&after=0")
    try:
        while True:
            raw = await ws.read_message()
            if raw is None:
                return
            message = json.loads(raw)
            if message.get("run_id") == run_id and "seq" in message:
                seen.append((message["seq"], time.perf_counter()))
                started.set()
    finally:
        ws.close()


async def sigkill_losses(trials: int, rng: random.Random) -> list[str]:
    losses, windows, rates = [], [], []
    server = EraServer().start()
    code = "import time\ni = 0\nwhile True:\n    i += 1\n    print(i, flush=True)\n    time.sleep(0.0005)"
    try:
        await once(server.port, "POST", "/api/sessions", {"id": SID})
        for trial in range(trials):
            _, run = await once(server.port, "POST", f"/api/sessions/{SID}/run",
                                {"code": code, "background": True, "timeout": 600})
            seen: list[tuple[int, float]] = []  # (seq, when it arrived)
            started = asyncio.Event()
            follower = asyncio.create_task(follow(server.port, run["run_id"], seen, started))
            await asyncio.wait_for(started.wait(), 60)
            await asyncio.sleep(rng.uniform(0.05, 1.0))
            kill(server)
            await asyncio.wait_for(follower, 10)
            server = restarted(server)
            server.start()
            http = Http(server.port)
            after = last_kept = max(0, seen[0][0] - 1)
            while True:  # the run's journal as the restarted server has it
                _, page = await http.request("GET", f"/api/sessions/{SID}/runs/{run['run_id']}/events"
                                                    f"?after={after}&limit=10000")
                if not page["events"]:
                    break
                after = last_kept = page["last_seq"]
            http.close()
            lost = [(s, t) for s, t in seen if s > last_kept]
            losses.append(len(lost))
            # How long before the kill the first lost event reached the client: the window.
            windows.append((seen[-1][1] - lost[0][1]) * 1000 if lost else 0.0)
            rates.append(len(seen) / max(1e-3, seen[-1][1] - seen[0][1]))
            log(f"trial {trial + 1}/{trials}: {len(seen)} events seen live, {len(lost)} not in the journal, "
                f"{windows[-1]:.1f} ms")
        return [f"| Events seen live but lost to a SIGKILL at a random moment, {trials} trials | max {max(losses)}, "
                f"p50 {sorted(losses)[len(losses) // 2]} | spanning at most {max(windows):.0f} ms (p50 "
                f"{sorted(windows)[len(windows) // 2]:.0f} ms) of a run sending {statistics.median(rates):,.0f} "
                "events/s | the last group-commit window (20 ms) and its write |"]
    finally:
        cleanup(server)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--restarts", type=int, default=10)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rows = ["| Measure | Result | Detail | Goal |", "| --- | --- | --- | --- |"]
    log("journal overhead")
    rows += await overhead(args.runs)
    log("replay throughput")
    rows += await replay(args.events)
    log("restart to first queued run")
    rows += await restart_to_queued(args.restarts)
    log("events lost after SIGKILL")
    rows += await sigkill_losses(args.trials, random.Random(args.seed))
    print("\n".join(rows))


if __name__ == "__main__":
    asyncio.run(main())
