"""What the server adds to a run, and how soon it answers (the README's Server table).

    .venv/bin/python bench/bench_server.py [--runs 200] [--no-gateway]

Rows (p50; contenders interleaved round by round, so a busy machine slows them alike and
the ratios stay meaningful):
- REST run round trip (POST /run on a keep-alive connection) vs the floor: raw
  jupyter_client (execute -> reply + idle) on a local ipykernel with ERA's own argv
  (``languages.python_kernel_argv()``), no sandbox and no server, so the ratio is our
  overhead alone (goal <= 1.3x). Split into the engine's share (``SessionManager.run``
  in-process) and the server's.
- WebSocket run round trip (run -> done) vs Jupyter Kernel Gateway's WebSocket execute on
  the same kernel argv (goal <= 0.15x); below it, the floor against the same gateway: the
  ratio the kernel alone, with no server in between, would score.
- First streamed byte after a print, over SSE and the WebSocket, vs the raw kernel's first
  stream message.
- Process start to the first /health answer (goal 100 ms), beside the gateway's first answer.

Needs ``pip install jupyter-kernel-gateway`` for the gateway rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Awaitable, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clients import CODE, LOOPBACK, STREAM_CODE, EraSocket, Http, KgKernel, once  # noqa: E402
from contenders import SPEC, EraServer, Gateway, RawKernel, write_kernelspec  # noqa: E402
from measure import interleaved, pct  # noqa: E402

WANT = "1\n"  # CODE's output


def checked(out: str) -> None:
    if out != WANT:
        raise AssertionError(f"unexpected output {out!r}")


async def sse_first_byte(port: int, sid: str) -> float:
    """Request sent -> first `stdout` event, on a plain socket (no client library buffering)."""
    body = json.dumps({"code": STREAM_CODE}).encode()
    request = (f"POST /api/sessions/{sid}/stream HTTP/1.1\r\nHost: {LOOPBACK}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection((LOOPBACK, port)) as conn:
        t0 = time.perf_counter()
        conn.sendall(request)
        received, first = b"", float("nan")
        while b"event: done" not in received:  # to the end: runs queue on a session
            chunk = conn.recv(65536)
            if not chunk:
                break
            received += chunk
            if first != first and b"event: stdout" in received:
                first = time.perf_counter() - t0
        return first


async def engine_runner() -> tuple[Callable[[], Awaitable[float]], Callable[[], Awaitable[None]]]:
    """``SessionManager.run`` called in-process: splits the REST time into engine and server."""
    from era_kernel.config import Settings
    from era_kernel.sessions import SessionManager

    data, runtime = tempfile.mkdtemp(prefix="era-bench-"), tempfile.mkdtemp(prefix="eb", dir="/tmp")
    engine = SessionManager(Settings.from_env({}, data_dir=data, runtime_dir=runtime))
    await engine.start()
    await engine.create({"id": "bench"})

    async def run() -> float:
        t0 = time.perf_counter()
        checked((await engine.run("bench", {"code": CODE}))["stdout"])
        return time.perf_counter() - t0

    async def close() -> None:
        await engine.shutdown()
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(runtime, ignore_errors=True)

    return run, close


def row(name: str, ours: float, theirs: float | None, goal: str = "") -> str:
    ratio = f"{ours / theirs:.2f}x" if theirs else "-"
    theirs_text = f"{theirs:9.2f}" if theirs is not None else f"{'-':>9}"
    return f"| {name:<58} | {ours:9.2f} | {theirs_text} | {ratio:>7} | {goal:<8} |"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--stream-runs", type=int, default=30)
    parser.add_argument("--starts", type=int, default=3, help="server starts timed to the first /health")
    parser.add_argument("--no-gateway", action="store_true", help="skip Jupyter Kernel Gateway")
    args = parser.parse_args()

    listens = []
    for _ in range(args.starts):
        probe = EraServer().start()
        listens.append(probe.listen_s)
        probe.cleanup()

    scratch = Path(tempfile.mkdtemp(prefix="era-bench-server-"))
    server, raw, engine_close, gateway, closers = EraServer(), None, None, None, []
    try:
        server.start()
        raw = await RawKernel(write_kernelspec(scratch)).start()
        engine_run, engine_close = await engine_runner()
        http = Http(server.port)
        closers.append(http.close)
        status, _ = await http.request("POST", "/api/sessions", {"id": "bench"})
        assert status == 201, status
        era_ws = await EraSocket(server.port, "bench").connect()
        closers.append(era_ws.close)

        async def rest() -> dict[str, float]:
            t0 = time.perf_counter()
            status, body = await http.request("POST", "/api/sessions/bench/run", {"code": CODE})
            elapsed = time.perf_counter() - t0
            checked(body.get("stdout") if status == 200 else f"HTTP {status}")
            return {"rest": elapsed}

        async def raw_run() -> dict[str, float]:
            _, total, out = await raw.execute(CODE)
            checked(out)
            return {"raw": total}

        async def engine() -> dict[str, float]:
            return {"engine": await engine_run()}

        async def ws() -> dict[str, float]:
            return {"ws": (await era_ws.execute(CODE))[1]}

        steps = {"rest": rest, "raw": raw_run, "engine": engine, "ws": ws}
        if not args.no_gateway:
            gateway = await Gateway().launch()
            _, model = await once(gateway.port, "POST", "/api/kernels", {"name": SPEC})
            kg = await KgKernel(gateway.port, model["id"]).connect()
            closers.append(kg.close)

            async def gateway_run() -> dict[str, float]:
                _, total, out = await kg.execute(CODE)
                checked(out)
                return {"gateway": total}
            steps["gateway"] = gateway_run
        rt = await interleaved(steps, args.runs, args.warmup)

        async def sse_first() -> dict[str, float]:
            return {"sse": await sse_first_byte(server.port, "bench")}

        async def ws_first() -> dict[str, float]:
            return {"ws": (await era_ws.execute(STREAM_CODE))[0]}

        async def raw_first() -> dict[str, float]:
            return {"raw": (await raw.execute(STREAM_CODE))[0]}
        firsts = await interleaved({"sse": sse_first, "ws": ws_first, "raw": raw_first}, args.stream_runs, 3)
    finally:
        for close in closers:
            close()
        server.cleanup()
        if raw is not None:
            await raw.stop()
        if engine_close is not None:
            await engine_close()
        if gateway is not None:
            gateway.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    p50 = {name: pct(values, 50) for name, values in rt.items()}
    print(f"\nERA Kernel server bench: {args.runs} interleaved rounds of {CODE!r} after {args.warmup} warm-up; "
          f"p50 in ms\n")
    print(f"| {'measure':<58} | {'ours':>9} | {'reference':>9} | {'ratio':>7} | {'goal':<8} |")
    print(f"|{'-' * 60}|{'-' * 11}|{'-' * 11}|{'-' * 9}|{'-' * 10}|")
    print(row("REST run vs raw jupyter_client (same kernel argv)", p50["rest"], p50["raw"], "<= 1.3x"))
    print(row("  engine's share: engine.run vs raw", p50["engine"], p50["raw"]))
    print(row("  server's share: REST vs engine.run", p50["rest"], p50["engine"]))
    if gateway is not None:
        print(row("WebSocket run vs Kernel Gateway, same kernel", p50["ws"], p50["gateway"], "<= 0.15x"))
        # What the 0.15x goal leaves, next to what the kernel alone takes with no server at all.
        print(row("raw jupyter_client alone vs Kernel Gateway, same kernel", p50["raw"], p50["gateway"]))
    print(row("first streamed byte after print: SSE vs raw", pct(firsts["sse"], 50), pct(firsts["raw"], 50)))
    print(row("first streamed byte after print: WebSocket vs raw", pct(firsts["ws"], 50), pct(firsts["raw"], 50)))
    print(row("process start to first /health (vs gateway's first answer)", statistics.median(listens) * 1000,
              gateway.listen_s * 1000 if gateway else None, "<= 100"))


if __name__ == "__main__":
    asyncio.run(main())
