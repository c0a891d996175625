"""Every measured figure side by side, in one run: raw jupyter_client (the floor), Jupyter
Kernel Gateway (the peer), ERA with the local provisioner and ERA with the Docker provisioner.

    .venv/bin/python bench/bench_all.py [--quick] [--no-docker] [--no-gateway] [--out DIR]

Prints a markdown table and writes DIR/benchmark.md, DIR/benchmark.json (the same figures,
machine info, parameters) and DIR/benchmark.png (grouped bars); DIR is bench/results by
default. A default run takes about 5 minutes on 2 cores, --quick about 1.5 (a smoke run).

Phases; everything on 127.0.0.1, every server and kernel started here is stopped here:
1. warm round trips of print(1), one sample of each contender per round in rotating order
   (measure.interleaved): raw execute -> reply + idle; Kernel Gateway WebSocket execute;
   ERA REST /run on a keep-alive connection and ERA WebSocket run -> done.
2. cold starts, interleaved per round, on ERA servers with ERA_POOL_SIZE=0: /api/execute and
   session create -> first output. Raw: start, execute, shut down; Kernel Gateway: POST
   /api/kernels, WebSocket execute, DELETE.
3. pooled, interleaved, on ERA servers with ERA_POOL_SIZE=2 (ERA_POOL_KERNELS python or
   python:docker); after each pooled sample the bench waits until the pool has refilled.
   Kernel Gateway: --prespawn_count kernels, taken from GET /api/kernels (its POST never
   draws from them, and it does not refill them).
4. memory, then load, one contender at a time: S sessions (kernels) started and run once,
   their idle PSS (summed over each kernel's process tree) or container memory, then R runs, C in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Awaitable, Callable, Hashable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil  # noqa: E402
from clients import CODE, EraSocket, Http, KgKernel, once  # noqa: E402
from contenders import SPEC, EraServer, Gateway, RawKernel, docker_client, write_kernelspec  # noqa: E402
from measure import TIMEOUT, interleaved, log, pct  # noqa: E402
from suite_phases import (check_run, era_create, era_execute, era_first_output, era_load_and_memory,  # noqa: E402
                          era_run, kg_cycle, kg_load_and_memory, raw_cycle, raw_memory, wait_refill)
from suite_report import verdicts, write_json, write_markdown, write_png  # noqa: E402

DOCKER_SOCKET = "/run/era-docker.sock"
POOL_SIZE = 2
ERA = {"era-local": "local", "era-docker": "docker"}
CONTENDERS = (("raw", "raw jupyter_client"), ("kg", "Kernel Gateway"), ("era-local", "ERA local"),
              ("era-docker", "ERA Docker"))
# key, label, unit, the samples it is computed from and how
FIGURES = (
    ("warm_p50", "warm run round trip p50", "ms", "warm", 50),
    ("warm_p90", "warm run round trip p90", "ms", "warm", 90),
    ("ws_p50", "WebSocket run round trip p50", "ms", "ws", 50),
    ("execute_cold_p50", "/api/execute cold p50", "ms", "execute_cold", 50),
    ("execute_pooled_p50", "/api/execute pooled p50", "ms", "execute_pooled", 50),
    ("create_first_cold_p50", "session create → first output, cold p50", "ms", "first_cold", 50),
    ("create_first_pooled_p50", "session create → first output, pooled p50", "ms", "first_pooled", 50),
    ("load_throughput", "load: throughput", "runs/s", "load", "throughput"),
    ("load_p50", "load: run latency p50", "ms", "load", "p50"),
    ("load_p99", "load: run latency p99", "ms", "load", "p99"),
    ("load_errors", "load: errors", "count", "load", "errors"),
    ("idle_kernel_mib", "memory per idle kernel", "MiB", "memory", "mib"),
)
GOALS = {"execute_pooled_p50": {"era-local": 25, "era-docker": 40},
         "create_first_pooled_p50": {"era-local": 50, "era-docker": 50},
         "load_p99": {"era-local": 250, "era-docker": 250}, "load_errors": {"era-local": 0, "era-docker": 0}}
QUICK = dict(mode="quick", warm_rounds=40, warm_warmup=5, cold_rounds=3, pooled_rounds=3, round_warmup=0,
             load_sessions=10, load_runs=100, load_concurrency=10, memory_kernels=3)
DEFAULT = dict(mode="default", warm_rounds=200, warm_warmup=20, cold_rounds=10, pooled_rounds=10, round_warmup=1,
               load_sessions=50, load_runs=1000, load_concurrency=20, memory_kernels=5)


class Tally:
    """Samples (seconds) and direct values per (sample key, contender); failures alike."""

    def __init__(self) -> None:
        self.samples: dict[tuple[str, str], list[float]] = {}
        self.values: dict[tuple[str, str], dict[str, float]] = {}
        self.failed: dict[tuple[str, str], str] = {}

    def add(self, key: str, who: str, seconds: float) -> None:
        self.samples.setdefault((key, who), []).append(seconds)

    def fail(self, who: str, keys: tuple[str, ...], exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}"[:300]
        for key in keys:
            self.failed.setdefault((key, who), message)
        log(f"{who} {'/'.join(keys)} failed: {message}")

    def broken(self, who: str, keys: tuple[str, ...]) -> bool:
        return any((key, who) in self.failed for key in keys)

    async def rounds(self, steps: list[tuple[str, tuple[str, ...], Callable[[], Awaitable[dict[str, float]]]]],
                     n: int, warmup: int) -> None:
        """``measure.interleaved`` over (contender, its sample keys, step); a step returns
        {sample key: seconds}, and one that fails is recorded and sits out the rest."""
        def as_samples(who: str, step: Callable[[], Awaitable[dict[str, float]]]):
            async def one() -> dict[Hashable, float]:
                return {(key, who): seconds for key, seconds in (await step()).items()}
            return one

        live = {(who, keys): as_samples(who, step) for who, keys, step in steps if not self.broken(who, keys)}
        got = await interleaved(live, n, warmup, on_error=lambda name, exc: self.fail(*name, exc))
        for key, values in got.items():
            self.samples.setdefault(key, []).extend(values)


# ---- the run ---------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu_count": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "platform": platform.platform(),
            "python": platform.python_version(), "ipykernel": version("ipykernel"),
            "jupyter_client": version("jupyter_client"), "kernel_gateway": version("jupyter-kernel-gateway"),
            "tornado": version("tornado"), "era_kernel": version("era-kernel"), "git_commit": commit,
            "local_sandbox": "bwrap" if shutil.which("bwrap") else "none"}


def build_results(tally: Tally, params: dict, machine: dict, notes: list[str], skipped: dict[str, str],
                  wall_s: float = 0.0, phases: dict | None = None) -> dict[str, Any]:
    contenders = [{"key": k, "label": label if k != "kg" else f"{label} {machine.get('kernel_gateway') or ''}".strip()}
                  for k, label in CONTENDERS]
    figures = []
    for key, label, unit, source, how in FIGURES:
        values: dict[str, float | None] = {}
        failed: dict[str, str] = {}
        counts: dict[str, int] = {}
        for who, _ in CONTENDERS:
            # Kernel Gateway's only run path is its WebSocket: one set of samples for both rows.
            src = "warm" if (who == "kg" and source == "ws") else source
            if who in skipped:
                values[who] = None
                continue
            if (src, who) in tally.failed:
                failed[who] = tally.failed[(src, who)]
            if isinstance(how, int):
                samples = tally.samples.get((src, who))
                values[who] = pct(samples, how) if samples else None
                counts[who] = len(samples or [])
            else:
                got = tally.values.get((src, who))
                values[who] = float(got[how]) if got and got.get(how) is not None else None
        figures.append({"key": key, "label": label, "unit": unit, "values": values, "failed": failed,
                        "goal": GOALS.get(key, {}), "samples": counts})
        figures[-1]["verdict"] = verdicts(figures[-1], {c["key"]: c["label"] for c in contenders})
    return {"title": "ERA Kernel: every figure side by side", "machine": machine, "params": params,
            "contenders": contenders, "figures": figures, "notes": notes, "skipped": skipped,
            "load_detail": {who: tally.values.get(("load", who)) for who, _ in CONTENDERS},
            "memory_detail": {who: tally.values.get(("memory", who)) for who, _ in CONTENDERS},
            "wall_s": round(wall_s, 1), "phases_s": phases or {}}


def write_all(results: dict[str, Any], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    text = write_markdown(results, out / "benchmark.md")
    write_json(results, out / "benchmark.json")
    write_png(results, out / "benchmark.png")
    return text


async def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    p = dict(QUICK if args.quick else DEFAULT, refill_sleep_s=args.refill_sleep, code=CODE, pool_size=POOL_SIZE)
    tally, skipped, phases, cleanup = Tally(), {}, {}, []
    refills: dict[str, Counter] = {}
    if args.no_gateway:
        skipped["kg"] = "--no-gateway"
    if args.no_docker:
        skipped["era-docker"] = "--no-docker"
    else:
        if "DOCKER_HOST" not in os.environ and os.path.exists(DOCKER_SOCKET):
            os.environ["DOCKER_HOST"] = f"unix://{DOCKER_SOCKET}"
        try:
            client = docker_client()
            client.ping()
            client.close()
        except Exception as exc:
            skipped["era-docker"] = f"Docker engine unreachable ({type(exc).__name__})"
    scratch = Path(tempfile.mkdtemp(prefix="era-bench-all-"))
    kernel_dirs = write_kernelspec(scratch)
    t_start = clock = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        phases[name] = round(now - clock, 1)
        clock = now

    try:
        log("starting contenders")
        raw = RawKernel(kernel_dirs)
        cleanup.append(raw.stop)
        await raw.start()
        servers: dict[str, tuple[EraServer, EraServer]] = {}
        for who, provisioner in ERA.items():
            if who in skipped:
                continue
            cold = EraServer({"ERA_POOL_SIZE": "0", "ERA_PROVISIONER": provisioner})
            pooled = EraServer({"ERA_POOL_SIZE": str(POOL_SIZE), "ERA_PROVISIONER": provisioner,
                                "ERA_POOL_KERNELS": "python" if provisioner == "local" else "python:docker"})
            cleanup += [cold.cleanup, pooled.cleanup]
            try:
                cold.start(ready_timeout=120)
                pooled.start(ready_timeout=120)
                servers[who] = (cold, pooled)
            except Exception as exc:
                skipped[who] = f"server failed to start: {exc}"[:300]
        gateways: tuple[Gateway, Gateway] | None = None
        if "kg" not in skipped:
            try:
                # A few spare: the gateway does not replace prespawned kernels, and one that
                # is slow to boot or dies would otherwise fail the whole pooled row.
                gateways = (Gateway(), Gateway(prespawn=p["pooled_rounds"] + p["round_warmup"] + 3))
                cleanup += [g.stop for g in gateways]
                await asyncio.gather(*(g.launch() for g in gateways))
            except Exception as exc:
                skipped["kg"], gateways = f"Kernel Gateway failed to start: {exc}"[:300], None
        phase("start")

        log("phase 1: warm round trips")
        steps: list = []

        async def raw_warm() -> dict[str, float]:
            _, total, out = await raw.execute(CODE)
            check_run(200, {"stdout": out}, "1\n")
            return {"warm": total}
        steps.append(("raw", ("warm",), raw_warm))
        if gateways:
            try:
                _, model = await once(gateways[0].port, "POST", "/api/kernels", {"name": SPEC})
                kg_kernel = await asyncio.wait_for(KgKernel(gateways[0].port, model["id"]).connect(), TIMEOUT)
                cleanup.append(kg_kernel.close)
            except Exception as exc:
                tally.fail("kg", ("warm",), exc)
            else:
                async def kg_warm() -> dict[str, float]:
                    _, total, out = await kg_kernel.execute(CODE)
                    check_run(200, {"stdout": out}, "1\n")
                    return {"warm": total}
                steps.append(("kg", ("warm",), kg_warm))
        for who, (cold, _) in servers.items():
            http = Http(cold.port)
            try:
                sid = await era_create(http, ERA[who])
                era_socket = await asyncio.wait_for(EraSocket(cold.port, sid).connect(), TIMEOUT)
                cleanup.append(era_socket.close)
            except Exception as exc:
                tally.fail(who, ("warm", "ws"), exc)
                continue

            async def era_warm(h: Http = http, s: str = sid) -> dict[str, float]:
                return {"warm": await era_run(h, s)}

            async def era_ws(ws: EraSocket = era_socket) -> dict[str, float]:
                return {"ws": (await ws.execute(CODE))[1]}
            steps += [(who, ("warm",), era_warm), (who, ("ws",), era_ws)]
        await tally.rounds(steps, p["warm_rounds"], p["warm_warmup"])
        phase("warm")

        log("phase 2: cold starts")
        steps = [("raw", ("first_cold", "execute_cold"), lambda: raw_cycle(kernel_dirs))]
        if gateways:
            steps.append(("kg", ("first_cold", "execute_cold"), lambda: kg_cycle(gateways[0].port, None)))
        for who, (cold, _) in servers.items():
            http = Http(cold.port)

            async def cold_execute(h: Http = http, prov: str = ERA[who]) -> dict[str, float]:
                return {"execute_cold": await era_execute(h, prov)}

            async def cold_first(h: Http = http, prov: str = ERA[who]) -> dict[str, float]:
                return {"first_cold": await era_first_output(h, prov)}
            steps += [(who, ("execute_cold",), cold_execute), (who, ("first_cold",), cold_first)]
        await tally.rounds(steps, p["cold_rounds"], p["round_warmup"])
        phase("cold")

        log("phase 3: pooled")
        steps = []
        if gateways:
            used: set[str] = set()
            steps.append(("kg", ("first_pooled", "execute_pooled"), lambda: kg_cycle(gateways[1].port, used)))
        for who, (_, pooled) in servers.items():
            http = Http(pooled.port)
            refills[who] = Counter([await wait_refill(http, p["refill_sleep_s"])])

            async def pooled_execute(h: Http = http, prov: str = ERA[who], w: str = who) -> dict[str, float]:
                elapsed = await era_execute(h, prov)
                refills[w][await wait_refill(h, p["refill_sleep_s"])] += 1
                return {"execute_pooled": elapsed}

            async def pooled_first(h: Http = http, prov: str = ERA[who], w: str = who) -> dict[str, float]:
                elapsed = await era_first_output(h, prov)
                refills[w][await wait_refill(h, p["refill_sleep_s"])] += 1
                return {"first_pooled": elapsed}
            steps += [(who, ("execute_pooled",), pooled_execute), (who, ("first_pooled",), pooled_first)]
        await tally.rounds(steps, p["pooled_rounds"], p["round_warmup"])
        for _, pooled in servers.values():
            pooled.cleanup()
        if gateways:
            gateways[1].stop()
        phase("pooled")

        log("phase 4: load and memory")
        try:
            tally.values[("memory", "raw")] = await raw_memory(kernel_dirs, p["memory_kernels"])
        except Exception as exc:
            tally.fail("raw", ("memory",), exc)
        jobs = [(who, lambda out, w=who, c=cold: era_load_and_memory(out, w, ERA[w], c, p))
                for who, (cold, _) in servers.items()]
        if gateways:
            jobs.append(("kg", lambda out: kg_load_and_memory(out, gateways[0], p)))
        for who, job in jobs:
            got: dict[str, Any] = {}
            try:
                await job(got)
            except Exception as exc:
                tally.fail(who, tuple(k for k in ("memory", "load") if k not in got), exc)
            for key, value in got.items():
                tally.values[(key, who)] = value
            phase(f"load {who}")
    finally:
        log("stopping contenders")
        for stop in reversed(cleanup):
            try:
                result = stop()
                if asyncio.iscoroutine(result):
                    await result
            except Exception as exc:
                log(f"cleanup: {type(exc).__name__}: {exc}")
        shutil.rmtree(scratch, ignore_errors=True)

    notes = [
        "raw jupyter_client: AsyncKernelManager + AsyncKernelClient over IPC, kernel argv = "
        "era_kernel.languages.python_kernel_argv() with no provisioner and no sandbox. Warm: execute → reply + idle. "
        "Cold /api/execute: start + wait_for_ready + execute + shutdown_kernel(now=True); cold create → first "
        "output: start + execute until the stream message.",
        "Kernel Gateway: `python -m kernel_gateway` (jupyter-websocket), every kernel forced to the same argv. "
        "It has no REST run: both round-trip rows are its WebSocket execute (execute → reply + idle), one set of "
        "samples. /api/execute = POST /api/kernels + WebSocket execute + DELETE; create → first output = the "
        "same cycle up to the stream message. Pooled: --KernelGatewayApp.prespawn_count, the client takes a "
        "kernel from GET /api/kernels (POST never draws from prespawned kernels; they are not replenished).",
        f"ERA: `python -m era_server`, cold servers ERA_POOL_SIZE=0, pooled servers ERA_POOL_SIZE={POOL_SIZE} "
        "with ERA_POOL_KERNELS=python (local) or python:docker (Docker); local kernels run under "
        f"{machine_info()['local_sandbox']}. REST runs on a keep-alive connection; WebSocket: run → done.",
        *(f"pool refill before each pooled ERA sample, {who}: "
          + "; ".join(f"{method} ({n}×)" for method, n in c.items()) for who, c in refills.items()),
        f"load: {p['load_sessions']} sessions (Kernel Gateway: kernels, one WebSocket each), {p['load_runs']} runs "
        f"({p['load_runs'] // p['load_sessions']} per session), {p['load_concurrency']} in flight; each run prints "
        "a unique token, and a non-200, an exception or stdout other than exactly that token is an error.",
        "memory: idle kernels after one run, PSS summed over each kernel's process tree (shared pages split among "
        "their sharers: the fork launcher's kernels share their zygote's; ERA local counts its sandbox's processes), "
        "averaged; ERA Docker: the container's cgroup memory minus inactive file cache, as "
        "`docker stats` shows it. Counts: " + ", ".join(
            f"{who} {v['kernels']}" for who, v in ((w, tally.values.get(("memory", w))) for w, _ in CONTENDERS) if v),
        f"samples: warm {p['warm_rounds']} rounds after {p['warm_warmup']} warm-up, cold {p['cold_rounds']} and "
        f"pooled {p['pooled_rounds']} rounds after {p['round_warmup']} warm-up; contenders interleaved per round.",
        *(f"{who} skipped: {why}" for who, why in skipped.items()),
    ]
    return build_results(tally, p, machine_info(), notes, skipped, time.perf_counter() - t_start, phases)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples: a smoke run of about 2 minutes")
    parser.add_argument("--no-docker", action="store_true", help="skip ERA with the Docker provisioner")
    parser.add_argument("--no-gateway", action="store_true", help="skip Jupyter Kernel Gateway")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="where benchmark.md/.json/.png go (default bench/results)")
    parser.add_argument("--refill-sleep", type=float, default=1.5,
                        help="seconds to sleep for a pool refill when the stats report no pool counts")
    args = parser.parse_args()
    results = asyncio.run(run_suite(args))
    print(write_all(results, args.out))
    log(f"wrote {args.out}/benchmark.md, benchmark.json, benchmark.png in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
