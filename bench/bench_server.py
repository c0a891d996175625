"""Side-by-side latency of the server against its floor and its peer, in one run.

    .venv/bin/python bench/bench_server.py [--runs 200] [--no-gateway]

Rows (p50; the samples of all contenders are interleaved, one of each per round, so a
busy machine slows them alike and the ratios stay meaningful):
- REST run round trip (POST /run on a keep-alive connection) vs a raw jupyter_client
  execute (execute_request -> reply + idle, blocking client, TCP transport) on a local
  ipykernel launched with the SAME argv as ERA's local Python kernel
  (``languages.python_kernel_argv()``: same interpreter, same ipykernel flags), without
  our sandbox or server. So the ratio is our overhead alone. Goal: <= 1.3x. Split into
  the engine's share (``SessionManager.run`` in-process) and the server's.
- "raw default kernel vs raw ERA-argv kernel": the same raw client on a stock
  ``python3`` kernel (no ERA flags) against the ERA-argv one: what the kernel tuning saves.
- WebSocket run round trip (run -> done) vs Jupyter Kernel Gateway's WebSocket execute
  (execute_request -> reply + idle) on loopback, twice: the gateway running the same
  ERA-argv kernel (a temporary kernelspec on JUPYTER_PATH) -- the row the goal
  (<= 0.15x) is judged on -- and the gateway's default ``python3`` kernel (informative).
  Below them, the raw client against the same gateway row: the ratio the kernel alone,
  with no server in between, would score; when it is above 0.15x the goal is out of reach.
- First streamed byte after a print (SSE and WebSocket) vs the raw kernel's first
  stream message.
- Time to listen: process start to the first /health answer (goal 100 ms), and to ready.

Everything runs on loopback with real kernels; servers are started and stopped here.
Needs ``pip install jupyter-kernel-gateway`` for the gateway row.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Awaitable, Callable

from tornado.websocket import websocket_connect

CODE = "print('x')"
STREAM_CODE = "import time\nprint('first', flush=True)\ntime.sleep(0.02)"
Probe = Callable[[], Awaitable[float]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def p50(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def p90(samples: list[float]) -> float:
    return sorted(samples)[int(len(samples) * 0.9) - 1] * 1000


def http_health(port: int) -> dict | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/health")
        response = conn.getresponse()
        body = response.read()
        conn.close()
        return json.loads(body) if response.status == 200 else None
    except OSError:
        return None


# ---- our server ------------------------------------------------------------------------------
class EraServer:
    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="era-bench-")
        self.runtime = tempfile.mkdtemp(prefix="eb", dir="/tmp")
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.listen_s = self.ready_s = 0.0

    def start(self) -> "EraServer":
        env = dict(os.environ, ERA_DATA_DIR=self.tmp, ERA_RUNTIME_DIR=self.runtime, ERA_LOG_LEVEL="WARNING")
        env.pop("ERA_API_KEY", None)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "era_server", "--port", str(self.port)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        health = None
        while health is None:
            health = http_health(self.port)
            if health is None:
                time.sleep(0.001)
        self.listen_s = time.perf_counter() - t0
        while not health or not health["ready"]:
            time.sleep(0.005)
            health = http_health(self.port)
        self.ready_s = time.perf_counter() - t0
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        shutil.rmtree(self.tmp, ignore_errors=True)
        shutil.rmtree(self.runtime, ignore_errors=True)


def rest_probe(port: int, sid: str) -> Probe:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = json.dumps({"code": CODE})

    async def one() -> float:
        t0 = time.perf_counter()
        conn.request("POST", f"/api/sessions/{sid}/run", body, {"Content-Type": "application/json"})
        result = json.loads(conn.getresponse().read())
        elapsed = time.perf_counter() - t0
        assert result["stdout"] == "x\n", result
        return elapsed

    return one


def sse_first_probe(port: int, sid: str) -> Probe:
    """Request sent -> first `stdout` event, on a plain socket (no client library buffering)."""
    body = json.dumps({"code": STREAM_CODE}).encode()
    request = (f"POST /api/sessions/{sid}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body

    async def one() -> float:
        with socket.create_connection(("127.0.0.1", port)) as conn:
            t0 = time.perf_counter()
            conn.sendall(request)
            received, first = b"", float("nan")
            while b"event: done" not in received:  # to the end: runs on a session queue
                chunk = conn.recv(65536)
                if not chunk:
                    break
                received += chunk
                if first != first and b"event: stdout" in received:
                    first = time.perf_counter() - t0
            return first

    return one


async def ws_probes(port: int, sid: str) -> tuple[Probe, Probe]:
    conn = await websocket_connect(f"ws://127.0.0.1:{port}/api/sessions/{sid}/ws")
    await conn.read_message()  # hello

    async def run(code: str, want_first: bool) -> float:
        run_id = uuid.uuid4().hex
        t0 = time.perf_counter()
        first = None
        conn.write_message(json.dumps({"type": "run", "id": run_id, "code": code}))
        while True:  # to the end of the run even when timing the first byte: runs queue
            message = json.loads(await conn.read_message())
            if message.get("id") != run_id:
                continue
            if message["type"] == "stdout" and first is None:
                first = time.perf_counter() - t0
            if message["type"] == "done":
                return first if want_first and first is not None else time.perf_counter() - t0

    return (lambda: run(CODE, False)), (lambda: run(STREAM_CODE, True))


# ---- the floor: raw jupyter_client --------------------------------------------------------------
TUNED_KERNEL = "era-python-bench"  # a kernelspec running ERA's local Python kernel argv


def write_tuned_kernelspec(root: str) -> str:
    """``<root>/kernels/era-python-bench/kernel.json``: ERA's local Python kernel argv with
    jupyter_client's own provisioner (no sandbox). ``root`` works as a JUPYTER_PATH entry."""
    from era_kernel.languages import python_kernel_argv

    spec_dir = Path(root) / "kernels" / TUNED_KERNEL
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": python_kernel_argv(), "display_name": "Python 3 (ERA argv, bench)", "language": "python"}))
    return str(spec_dir.parent)


def raw_probes(kernel_dirs: list[str] | None = None,
               kernel_name: str = "python3") -> tuple[Probe, Probe, Callable[[], None]]:
    """The blocking client: the fastest plain jupyter_client round trip (reply + idle)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    ksm = KernelSpecManager(kernel_dirs=kernel_dirs) if kernel_dirs else KernelSpecManager()
    km = KernelManager(kernel_name=kernel_name, kernel_spec_manager=ksm)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)

    def run(code: str, want_first: bool) -> float:
        t0 = time.perf_counter()
        msg_id = kc.execute(code)
        first = None
        while True:  # iopub first (output as it comes, then idle), then the reply, already queued
            msg = kc.get_iopub_msg(timeout=30)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream" and first is None:
                first = time.perf_counter() - t0
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        while kc.get_shell_msg(timeout=30)["parent_header"].get("msg_id") != msg_id:
            pass
        return first if want_first and first is not None else time.perf_counter() - t0

    async def round_trip() -> float:
        return run(CODE, False)

    async def first_byte() -> float:
        return run(STREAM_CODE, True)

    def close() -> None:
        kc.stop_channels()
        km.shutdown_kernel(now=True)

    return round_trip, first_byte, close


async def engine_probe() -> tuple[Probe, Callable[[], Awaitable[None]]]:
    """``SessionManager.run`` called directly: splits REST time into engine and server."""
    from era_kernel.config import Settings
    from era_kernel.sessions import SessionManager

    data, runtime = tempfile.mkdtemp(prefix="era-bench-"), tempfile.mkdtemp(prefix="eb", dir="/tmp")
    engine = SessionManager(Settings.from_env({}, data_dir=data, runtime_dir=runtime))
    await engine.start()
    await engine.create({"id": "bench"})

    async def one() -> float:
        t0 = time.perf_counter()
        await engine.run("bench", {"code": CODE})
        return time.perf_counter() - t0

    async def close() -> None:
        await engine.shutdown()
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(runtime, ignore_errors=True)

    return one, close


# ---- the peer: Jupyter Kernel Gateway ----------------------------------------------------------
class KernelGateway:
    """One gateway process; ``start`` opens a kernel of each name asked for, one probe each."""

    def __init__(self) -> None:
        exe = shutil.which("jupyter-kernelgateway", path=str(Path(sys.executable).parent)) or \
            shutil.which("jupyter-kernelgateway")
        if exe is None:
            raise RuntimeError("jupyter-kernel-gateway is not installed (pip install jupyter-kernel-gateway)")
        self.exe = exe
        self.port = free_port()
        self.tmp = tempfile.mkdtemp(prefix="jkg-")
        self.proc: subprocess.Popen | None = None
        self.listen_s = 0.0

    async def start(self, kernel_names: list[str]) -> list[Probe]:
        # The ERA-argv kernelspec goes on JUPYTER_PATH, beside the default python3.
        jupyter_path = os.pathsep.join(filter(None, [str(Path(write_tuned_kernelspec(self.tmp)).parent),
                                                     os.environ.get("JUPYTER_PATH")]))
        env = dict(os.environ, JUPYTER_RUNTIME_DIR=self.tmp, JUPYTER_DATA_DIR=self.tmp, JUPYTER_PATH=jupyter_path)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([self.exe, "--KernelGatewayApp.ip=127.0.0.1",
                                      f"--KernelGatewayApp.port={self.port}", "--KernelGatewayApp.log_level=ERROR"],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/api")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.01)
        self.listen_s = time.perf_counter() - t0
        return [await self._probe(name) for name in kernel_names]

    async def _probe(self, kernel_name: str) -> Probe:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("POST", "/api/kernels", json.dumps({"name": kernel_name}))
        response = conn.getresponse()
        kernel = json.loads(response.read())
        assert response.status == 201, kernel
        kernel_id = kernel["id"]
        ws = await websocket_connect(f"ws://127.0.0.1:{self.port}/api/kernels/{kernel_id}/channels")
        session = uuid.uuid4().hex

        async def one() -> float:
            msg_id = uuid.uuid4().hex
            message = {"header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "bench",
                                  "session": session, "version": "5.3", "date": ""},
                       "parent_header": {}, "metadata": {}, "channel": "shell",
                       "content": {"code": CODE, "silent": False, "store_history": True,
                                   "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}}
            t0 = time.perf_counter()
            ws.write_message(json.dumps(message))
            replied = idle = False
            while not (replied and idle):
                msg = json.loads(await ws.read_message())
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                if msg["msg_type"] == "execute_reply":
                    replied = True
                elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    idle = True
            return time.perf_counter() - t0

        return one

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


async def interleaved(probes: dict[str, Probe], rounds: int, warmup: int) -> dict[str, list[float]]:
    """One sample of each probe per round, in rotating order; warm-up rounds dropped."""
    samples: dict[str, list[float]] = {name: [] for name in probes}
    names = list(probes)
    for i in range(warmup + rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            value = await probes[name]()
            if i >= warmup:
                samples[name].append(value)
    return samples


# ---- the table ---------------------------------------------------------------------------------
def row(name: str, ours: float, theirs: float | None, goal: str = "") -> str:
    ratio = f"{ours / theirs:.2f}x" if theirs else "-"
    theirs_text = f"{theirs:9.2f}" if theirs is not None else f"{'-':>9}"
    return f"| {name:<48} | {ours:9.2f} | {theirs_text} | {ratio:>7} | {goal:<8} |"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--stream-runs", type=int, default=30)
    parser.add_argument("--starts", type=int, default=3, help="cold starts timed for 'time to listen'")
    parser.add_argument("--no-gateway", action="store_true", help="skip Jupyter Kernel Gateway")
    args = parser.parse_args()

    listens, readies = [], []
    for _ in range(args.starts):
        probe = EraServer().start()
        listens.append(probe.listen_s)
        readies.append(probe.ready_s)
        probe.stop()

    server = EraServer().start()
    gateway = None if args.no_gateway else KernelGateway()
    spec_root = tempfile.mkdtemp(prefix="era-bench-spec-")
    raw_rt, raw_first, raw_close = raw_probes([write_tuned_kernelspec(spec_root)], TUNED_KERNEL)
    stock_rt, _, stock_close = raw_probes()
    engine_rt, engine_close = await engine_probe()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/api/sessions", json.dumps({"id": "bench"}))
        assert conn.getresponse().status == 201
        conn.close()
        ws_rt, ws_first = await ws_probes(server.port, "bench")
        probes = {"rest": rest_probe(server.port, "bench"), "raw": raw_rt, "engine": engine_rt, "ws": ws_rt,
                  "raw_stock": stock_rt}
        if gateway is not None:
            probes["gateway_era"], probes["gateway"] = await gateway.start([TUNED_KERNEL, "python3"])
        rt = await interleaved(probes, args.runs, args.warmup)
        firsts = await interleaved({"sse": sse_first_probe(server.port, "bench"), "ws": ws_first,
                                    "raw": raw_first}, args.stream_runs, 3)
    finally:
        server.stop()
        raw_close()
        stock_close()
        shutil.rmtree(spec_root, ignore_errors=True)
        await engine_close()
        if gateway is not None:
            gateway.stop()

    print(f"\nERA Kernel server bench: {args.runs} interleaved rounds of {CODE!r} after {args.warmup} warm-up; "
          f"p50 in ms\n")
    print(f"| {'measure':<48} | {'ours':>9} | {'reference':>9} | {'ratio':>7} | {'goal':<8} |")
    print(f"|{'-' * 50}|{'-' * 11}|{'-' * 11}|{'-' * 9}|{'-' * 10}|")
    print(row("REST run vs raw jupyter_client", p50(rt["rest"]), p50(rt["raw"]), "<= 1.3x"))
    print(row("  engine's share: engine.run vs raw", p50(rt["engine"]), p50(rt["raw"])))
    print(row("  server's share: REST vs engine.run", p50(rt["rest"]), p50(rt["engine"])))
    print(row("raw default kernel vs raw ERA-argv kernel", p50(rt["raw_stock"]), p50(rt["raw"])))
    print(row("WebSocket run vs raw jupyter_client", p50(rt["ws"]), p50(rt["raw"])))
    if gateway is not None:
        print(row("WebSocket run vs Kernel Gateway, same kernel", p50(rt["ws"]), p50(rt["gateway_era"]),
                  "<= 0.15x"))
        print(row("WebSocket run vs Kernel Gateway, default kernel", p50(rt["ws"]), p50(rt["gateway"])))
        # What the 0.15x goal leaves, next to what the kernel alone takes with no server at all.
        print(row("  raw client alone vs Gateway, same kernel", p50(rt["raw"]), p50(rt["gateway_era"])))
    print(row("first byte after print: SSE vs raw", p50(firsts["sse"]), p50(firsts["raw"])))
    print(row("first byte after print: WebSocket vs raw", p50(firsts["ws"]), p50(firsts["raw"])))
    print(row("time to first /health (vs gateway's /api)", statistics.median(listens) * 1000,
              gateway.listen_s * 1000 if gateway else None, "<= 100"))
    print(row("time to ready (engine started)", statistics.median(readies) * 1000, None))
    print("\np90 ms: " + ", ".join(f"{name} {p90(values):.2f}" for name, values in rt.items()))


if __name__ == "__main__":
    asyncio.run(main())
