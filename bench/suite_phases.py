"""Phases of bench_all.py that talk to one contender: ERA requests and pool refills, the
raw and Kernel Gateway start-execute-stop cycles, the load test and idle-kernel memory."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Awaitable, Callable

import psutil
from clients import CODE, Http, KgKernel, once
from contenders import SPEC, EraServer, Gateway, RawKernel, docker_client
from measure import TIMEOUT, is_zygote, log, pct, pss_kib, settle_cpu



def check_run(status: int, body: Any, want: str, ok: tuple[int, ...] = (200,)) -> None:
    if status not in ok or not isinstance(body, dict) or body.get("stdout") != want:
        raise AssertionError(f"HTTP {status}: {str(body)[:200]}")


async def limited(factories: list[Callable[[], Awaitable[Any]]], limit: int) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def one(factory: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await factory()

    return await asyncio.gather(*(one(f) for f in factories))


# ---- ERA requests ------------------------------------------------------------------------------
async def era_run(http: Http, sid: str, code: str = CODE, want: str = "1\n") -> float:
    t0 = time.perf_counter()
    status, body = await http.request("POST", f"/api/sessions/{sid}/run", {"code": code})
    elapsed = time.perf_counter() - t0
    check_run(status, body, want)
    return elapsed


async def era_create(http: Http, provisioner: str) -> str:
    status, doc = await http.request("POST", "/api/sessions", {"language": "python", "provisioner": provisioner})
    if status != 201:
        raise AssertionError(f"create: HTTP {status}: {str(doc)[:200]}")
    return doc["id"]


async def era_execute(http: Http, provisioner: str) -> float:
    t0 = time.perf_counter()
    status, body = await http.request("POST", "/api/execute", {"code": CODE, "language": "python",
                                                               "provisioner": provisioner})
    elapsed = time.perf_counter() - t0
    check_run(status, body, "1\n")
    return elapsed


async def era_first_output(http: Http, provisioner: str) -> float:
    t0 = time.perf_counter()
    sid = await era_create(http, provisioner)
    await era_run(http, sid)  # the REST reply carries the stdout
    elapsed = time.perf_counter() - t0
    await http.request("DELETE", f"/api/sessions/{sid}")
    return elapsed


def pool_filled(stats: Any) -> bool | None:
    """True/False when /api/resources/stats reports pools (ready vs target), None when it does not."""
    pool = stats.get("pool") if isinstance(stats, dict) else None
    if not isinstance(pool, dict) or not pool.get("size") or not isinstance(pool.get("pools"), dict):
        return None
    pools = [p for p in pool["pools"].values() if isinstance(p, dict)]
    return bool(pools) and all(p.get("ready", 0) >= p.get("target", pool["size"]) and not p.get("starting")
                               for p in pools)


async def wait_refill(http: Http, sleep_s: float, timeout: float = 90.0) -> str:
    """Wait until the server's pool is full again: polled from the stats, else a fixed sleep."""
    deadline = time.perf_counter() + timeout
    while True:
        status, stats = await http.request("GET", "/api/resources/stats")
        filled = pool_filled(stats) if status == 200 else None
        if filled is None:
            await asyncio.sleep(sleep_s)
            return f"slept {sleep_s:g} s (stats report no pool)"
        if filled:
            return "polled /api/resources/stats until every pool was at its target"
        if time.perf_counter() > deadline:
            return f"gave up waiting after {timeout:g} s"
        await asyncio.sleep(0.05)


# ---- raw and gateway cycles ------------------------------------------------------------------
async def raw_cycle(kernel_dirs: Path) -> dict[str, float]:
    """Start a kernel, execute print(1), shut it down: the floor of both cold figures."""
    kernel, t0 = RawKernel(kernel_dirs), time.perf_counter()
    try:
        await kernel.start()
        t1 = time.perf_counter()
        first, _, out = await kernel.execute(CODE)
        check_run(200, {"stdout": out}, "1\n")
    finally:
        await kernel.stop()
    return {"first_cold": t1 - t0 + first, "execute_cold": time.perf_counter() - t0}


async def kg_cycle(port: int, used: set[str] | None) -> dict[str, float]:
    """POST /api/kernels (or, with ``used``, take a prespawned kernel), WebSocket execute, DELETE."""
    http, t0 = Http(port), time.perf_counter()
    try:
        if used is None:
            status, model = await http.request("POST", "/api/kernels", {"name": SPEC})
            kernel_id = model["id"]
        else:
            status, models = await http.request("GET", "/api/kernels")
            kernel_id = next((m["id"] for m in models if m["id"] not in used), None)
            if kernel_id is None:
                raise RuntimeError("no prespawned kernel left")
            used.add(kernel_id)
        kernel = await KgKernel(port, kernel_id).connect()
        try:
            t1 = time.perf_counter()
            first, _, out = await kernel.execute(CODE)
            check_run(200, {"stdout": out}, "1\n")
        finally:
            kernel.close()
        status, _ = await http.request("DELETE", f"/api/kernels/{kernel_id}")
        if status != 204:
            raise AssertionError(f"DELETE kernel: HTTP {status}")
        suffix = "cold" if used is None else "pooled"
        return {f"first_{suffix}": t1 - t0 + first, f"execute_{suffix}": time.perf_counter() - t0}
    finally:
        http.close()


# ---- memory and load -------------------------------------------------------------------------
def kernel_trees(parent_pid: int) -> list[int]:
    """Children of ``parent_pid`` whose tree runs an ipykernel: one per kernel (bwrap
    included). The fork launcher's zygote is not a kernel: each of its children (a
    sandbox's init with its kernel) is one."""
    found = []
    for child in psutil.Process(parent_pid).children():
        try:
            if is_zygote(child.pid):
                found.extend(kernel_trees(child.pid))
                continue
            tree = [child, *child.children(recursive=True)]
            if any("ipykernel" in " ".join(p.cmdline()) for p in tree):
                found.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def tree_pss_bytes(pid: int) -> int | None:
    """Summed PSS (``measure.pss_kib``) of ``pid`` and its descendants, bytes; None when gone."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    return sum(pss_kib(proc.pid) for proc in procs) * 1024


def container_memory(owner_pid: int, limit: int) -> list[int]:
    """Memory of up to ``limit`` era containers launched by ``owner_pid``, as `docker stats` counts it
    (cgroup usage minus inactive file cache)."""
    client = docker_client()
    try:
        containers = client.containers.list(filters={"label": ["era.managed=1", f"era.owner={owner_pid}"]})
        values = []
        for container in containers[:limit]:
            try:
                stats = container.stats(stream=False, one_shot=True)
            except Exception:
                stats = container.stats(stream=False)
            mem = stats.get("memory_stats") or {}
            inner = mem.get("stats") or {}
            if "usage" in mem:
                values.append(mem["usage"] - inner.get("inactive_file", inner.get("total_inactive_file", 0)))
        return values
    finally:
        client.close()


def average_mib(sizes: list[int]) -> dict:
    if not sizes:
        raise RuntimeError("no idle kernel found to measure")
    return {"mib": sum(sizes) / len(sizes) / 2**20, "kernels": len(sizes)}


Issuer = Callable[[int, str], Awaitable[bool]]


async def load(make_issuer: Callable[[], tuple[Issuer, Callable[[], None]]], runs: int, concurrency: int) -> dict:
    """``runs`` runs from ``concurrency`` workers; run k goes to target k % targets and prints a unique token."""
    jobs, latencies, errors = deque(range(runs)), [], []

    async def worker() -> None:
        issue, close = make_issuer()
        try:
            while jobs:
                k = jobs.popleft()
                token = f"tok-{k}-{uuid.uuid4().hex[:10]}"
                t0 = time.perf_counter()
                try:
                    ok = await asyncio.wait_for(issue(k, token), TIMEOUT)
                    reason = "wrong status or stdout"
                except Exception as exc:
                    ok, reason = False, f"{type(exc).__name__}: {exc}"
                latencies.append(time.perf_counter() - t0)
                if not ok:
                    errors.append(reason)
        finally:
            close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"throughput": len(latencies) / wall, "p50": pct(latencies, 50), "p99": pct(latencies, 99),
            "errors": len(errors) + (runs - len(latencies)), "runs": runs, "wall_s": round(wall, 3),
            "first_error": errors[0][:200] if errors else None}


async def era_load_and_memory(out: dict, label: str, provisioner: str, server: EraServer, p: dict) -> None:
    """Fills out['memory'] and out['load'] for an ERA server; its sessions are deleted after."""
    sids: list[str] = []

    async def make() -> None:
        http = Http(server.port)
        try:
            sids.append(await era_create(http, provisioner))
            await era_run(http, sids[-1], "None", "")  # the kernel is up before the load starts
        finally:
            http.close()

    t0 = time.perf_counter()
    try:
        await limited([make] * p["load_sessions"], 8)
        log(f"{label}: {len(sids)} sessions up in {time.perf_counter() - t0:.1f} s")
        await settle_cpu(server.proc.pid, timeout=30)
        if provisioner == "local":
            trees = kernel_trees(server.proc.pid)
            sizes = [tree_pss_bytes(pid) or 0 for pid in trees]
        else:
            sizes = await asyncio.to_thread(container_memory, server.proc.pid, p["memory_kernels"] * 2)
        out["memory"] = average_mib(sizes)

        def issuer() -> tuple[Issuer, Callable[[], None]]:
            conn = Http(server.port)

            async def issue(k: int, token: str) -> bool:
                sid = sids[k % len(sids)]
                status, body = await conn.request("POST", f"/api/sessions/{sid}/run", {"code": f"print({token!r})"})
                return status == 200 and isinstance(body, dict) and body.get("stdout") == token + "\n"
            return issue, conn.close

        out["load"] = await load(issuer, p["load_runs"], p["load_concurrency"])
    finally:
        await limited([lambda sid=sid: once(server.port, "DELETE", f"/api/sessions/{sid}") for sid in sids], 8)


async def kg_load_and_memory(out: dict, gateway: Gateway, p: dict) -> None:
    """The same on Kernel Gateway: kernels, one WebSocket each."""
    kernels: list[KgKernel] = []

    async def make() -> None:
        status, model = await once(gateway.port, "POST", "/api/kernels", {"name": SPEC})
        kernel = await KgKernel(gateway.port, model["id"]).connect()
        kernels.append(kernel)
        await kernel.execute("None")

    try:
        await limited([make] * p["load_sessions"], 8)
        await settle_cpu(gateway.proc.pid, timeout=30)
        sizes = [tree_pss_bytes(pid) or 0 for pid in kernel_trees(gateway.proc.pid)]
        out["memory"] = average_mib(sizes)

        def issuer() -> tuple[Issuer, Callable[[], None]]:
            async def issue(k: int, token: str) -> bool:
                _, _, out = await kernels[k % len(kernels)].execute(f"print({token!r})")
                return out == token + "\n"
            return issue, lambda: None

        out["load"] = await load(issuer, p["load_runs"], p["load_concurrency"])
    finally:
        for kernel in kernels:
            kernel.close()
        await limited([lambda k=k: once(gateway.port, "DELETE", f"/api/kernels/{k.kernel_id}") for k in kernels], 8)


async def raw_memory(kernel_dirs: Path, n: int) -> dict:
    kernels = [RawKernel(kernel_dirs) for _ in range(n)]
    try:
        for kernel in kernels:
            await kernel.start()
        await settle_cpu(os.getpid(), timeout=20)
        sizes = [tree_pss_bytes(k.pid) or 0 for k in kernels]
        return average_mib(sizes)
    finally:
        for kernel in kernels:
            await kernel.stop()
