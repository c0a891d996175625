"""What a command costs beside a cell (the README's Commands table).

    .venv/bin/python bench/bench_commands.py [--runs 200] [--keys 200] [--provisioner local|docker]

Rows, one server, one session, its kernel already up:
- Round trip of ``POST .../commands {"cmd": ["true"]}`` against ``POST .../run`` of a cell
  that does nothing (``pass``), interleaved round by round on one keep-alive connection;
  p50 and p90, and their ratio.
- Keystroke echo over the terminal WebSocket: one byte sent (binary frame), time until
  the pty's echo of it comes back; p50 and p90.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clients import Http, once  # noqa: E402
from contenders import EraServer  # noqa: E402
from measure import interleaved, log, pct  # noqa: E402
from tornado.websocket import websocket_connect  # noqa: E402

SID = "bench-commands"


async def round_trips(port: int, runs: int) -> dict[str, list[float]]:
    http = Http(port)

    async def command() -> dict[str, float]:
        t0 = time.perf_counter()
        status, body = await http.request("POST", f"/api/sessions/{SID}/commands", {"cmd": ["true"]})
        assert status == 200 and body["exit_code"] == 0, body
        return {"command": time.perf_counter() - t0}

    async def cell() -> dict[str, float]:
        t0 = time.perf_counter()
        status, body = await http.request("POST", f"/api/sessions/{SID}/run", {"code": "pass"})
        assert status == 200 and body["exit_code"] == 0, body
        return {"cell": time.perf_counter() - t0}

    try:
        return await interleaved({"command": command, "cell": cell}, runs, warmup=20)
    finally:
        http.close()


async def keystrokes(port: int, count: int) -> list[float]:
    conn = await websocket_connect(f"ws://127.0.0.1:{port}/api/sessions/{SID}/terminal")
    try:
        # A shell that echoes what is typed and nothing else: `cat` in raw mode would too,
        # but the line discipline's own echo is what a user waits for at a prompt.
        conn.write_message(b"stty -icanon; PS1=; cat >/dev/null\r", binary=True)
        await asyncio.sleep(1.0)
        while True:  # drain the prompt and the command's echo
            try:
                await asyncio.wait_for(conn.read_message(), 0.3)
            except asyncio.TimeoutError:
                break
        samples = []
        for i in range(count + 10):
            key = bytes([ord("a") + i % 26])
            t0 = time.perf_counter()
            conn.write_message(key, binary=True)
            got = b""
            while key not in got:
                message = await asyncio.wait_for(conn.read_message(), 10)
                got += message if isinstance(message, bytes) else message.encode()
            if i >= 10:
                samples.append(time.perf_counter() - t0)
        return samples
    finally:
        conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--keys", type=int, default=200)
    parser.add_argument("--provisioner", default="local", choices=("local", "docker"))
    args = parser.parse_args()
    server = EraServer(env={"ERA_POOL_SIZE": "0"})
    server.start()
    try:
        port = server.port
        status, body = await once(port, "POST", "/api/sessions", {"id": SID, "provisioner": args.provisioner})
        assert status == 201, body
        await once(port, "POST", f"/api/sessions/{SID}/run", {"code": "pass"})  # the kernel is up
        log(f"round trips ({args.runs} each, interleaved)")
        samples = await round_trips(port, args.runs)
        log(f"keystroke echo ({args.keys})")
        keys = await keystrokes(port, args.keys)
        rows = {
            "command `true` round trip (ms)": (pct(samples["command"], 50), pct(samples["command"], 90)),
            "empty cell round trip (ms)": (pct(samples["cell"], 50), pct(samples["cell"], 90)),
            "terminal keystroke echo (ms)": (pct(keys, 50), pct(keys, 90)),
        }
        ratio = pct(samples["command"], 50) / pct(samples["cell"], 50)
        print(json.dumps({"provisioner": args.provisioner, "rows": rows, "command_vs_cell_p50": round(ratio, 2)}))
        print(f"\n| {args.provisioner} | p50 | p90 |\n| --- | --- | --- |")
        for name, (p50, p90) in rows.items():
            print(f"| {name} | {p50:.2f} | {p90:.2f} |")
        print(f"| command / cell, p50 | {ratio:.2f}x | |")
    finally:
        server.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
