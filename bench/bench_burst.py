"""A burst of new sessions: N clients at once, each creating a session and running
``print(1)``; the time from its create request to the run's answer (issue 23, README's
Fast kernels table). Each configuration gets a fresh server (default settings, empty
data directory), as a new user would meet it.

    .venv/bin/python bench/bench_burst.py [--local 30] [--docker 10] [--cold 5] [--no-docker]

Each row's burst is run twice on the same server: first as a new server meets it (the
pool at ``ERA_POOL_SIZE``), then again once the pool has grown to the burst it saw
(``ERA_POOL_MAX``; "ready" is how many kernels were waiting when it began).

Rows, side by side: the local provisioner with the bubblewrap launcher and with the fork
launcher (``ERA_LOCAL_LAUNCHER``), and Docker. Also, per local launcher: a cold start
with the pool off (``ERA_POOL_SIZE=0``: create + first run, one client at a time), the
warm run round trip afterwards (the same kernel either way: nothing may be slower) and the
memory of an idle kernel (PSS from ``/proc/<pid>/smaps_rollup``, summed over the
kernel's processes; the fork launcher's zygote, whose pages the kernels share, apart).
The machine's load average is printed with the results: other work on it slows every row.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clients import CODE, Http  # noqa: E402
from contenders import EraServer  # noqa: E402
from measure import is_zygote, log, pct, pss_kib  # noqa: E402

WANT = "1\n"


async def one_client(port: int, sid: str, provisioner: str | None) -> float:
    http = Http(port)
    try:
        t0 = time.perf_counter()
        body = {"id": sid} if provisioner is None else {"id": sid, "provisioner": provisioner}
        status, answer = await http.request("POST", "/api/sessions", body, timeout=300)
        if status != 201:
            raise AssertionError(f"create: HTTP {status} {answer}")
        status, answer = await http.request("POST", f"/api/sessions/{sid}/run", {"code": CODE}, timeout=300)
        elapsed = time.perf_counter() - t0
        if status != 200 or answer.get("stdout") != WANT:
            raise AssertionError(f"run: HTTP {status} {answer}")
        return elapsed
    finally:
        http.close()


async def burst(port: int, clients: int, prefix: str, provisioner: str | None = None) -> list[float]:
    return list(await asyncio.gather(*(one_client(port, f"{prefix}{i}", provisioner) for i in range(clients))))


async def warm_runs(port: int, sid: str, count: int) -> list[float]:
    """Run round trips on a session whose kernel is up (nothing slower: the kernel is the same)."""
    http = Http(port)
    samples = []
    try:
        for _ in range(count):
            t0 = time.perf_counter()
            status, answer = await http.request("POST", f"/api/sessions/{sid}/run", {"code": CODE})
            samples.append(time.perf_counter() - t0)
            if status != 200 or answer.get("stdout") != WANT:
                raise AssertionError(f"run: HTTP {status} {answer}")
    finally:
        http.close()
    return samples[5:]


async def pool_ready(port: int, want: int, timeout: float = 90.0) -> int:
    """Wait until the server's pools hold ``want`` ready kernels (the pool grows after a
    burst: ERA_POOL_MAX); returns how many were ready when it stopped waiting."""
    http = Http(port)
    ready = 0
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, answer = await http.request("GET", "/api/resources/stats")
            ready = sum(p["ready"] for p in answer["pool"]["pools"].values()) if status == 200 else 0
            if ready >= want:
                break
            await asyncio.sleep(0.5)
    finally:
        http.close()
    return ready


async def second_burst(port: int, clients: int, prefix: str, row: dict[str, object],
                       provisioner: str | None = None) -> None:
    """The same burst again once the pool has grown to it (a server that has seen one)."""
    row["ready2"] = await pool_ready(port, clients)
    times = await burst(port, clients, prefix, provisioner)
    row.update(p50_2=pct(times, 50), max_2=max(times) * 1000)
    await delete_all(port, prefix, clients)


async def delete_all(port: int, prefix: str, count: int) -> None:
    http = Http(port)
    try:
        for i in range(count):
            await http.request("DELETE", f"/api/sessions/{prefix}{i}", timeout=120)
    finally:
        http.close()


# ---- memory ----------------------------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(entry))
    return out


def _tree(root: int, children: dict[int, list[int]]) -> list[int]:
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, ()))
    return found


def kernel_memory(server_pid: int) -> dict[str, float]:
    """PSS (MiB) per idle kernel: each direct child of the server (bubblewrap's launch
    chain, or the fork launcher's sandbox init, reparented... to the zygote) with its
    descendants. Under the fork launcher the kernels are the zygote's children."""
    children = _children()
    roots: list[int] = []
    zygote_pss = 0.0
    for child in children.get(server_pid, ()):
        if is_zygote(child):
            zygote_pss += pss_kib(child) / 1024
            roots += children.get(child, [])
        else:
            roots.append(child)
    per_kernel = [sum(pss_kib(p) for p in _tree(r, children)) / 1024 for r in roots]
    per_kernel = [m for m in per_kernel if m > 1]  # kernels, not a helper that just exited
    return {"kernels": len(per_kernel), "pss_mib": statistics.median(per_kernel) if per_kernel else float("nan"),
            "zygote_mib": zygote_pss}


# ---- one configuration -------------------------------------------------------------------------
EXTRA_ENV: dict[str, str] = {}  # --env: settings for every server of the run


async def local_row(launcher: str, clients: int, cold: int) -> dict[str, object]:
    row: dict[str, object] = {"name": f"local, {launcher} launcher"}
    server = EraServer(env={**EXTRA_ENV, "ERA_LOCAL_LAUNCHER": launcher})
    try:
        server.start(ready_timeout=120)
        await asyncio.sleep(3)  # the pool's first kernels
        times = await burst(server.port, clients, "b")
        row.update(p50=pct(times, 50), max=max(times) * 1000)
        await asyncio.sleep(2)
        row.update(kernel_memory(server.proc.pid))
        row["warm_p50"] = pct(await warm_runs(server.port, "b0", 40), 50)
        await delete_all(server.port, "b", clients)
        await second_burst(server.port, clients, "s", row)
    finally:
        server.stop()
    server = EraServer(env={**EXTRA_ENV, "ERA_LOCAL_LAUNCHER": launcher, "ERA_POOL_SIZE": "0"})
    try:
        server.start(ready_timeout=120)
        samples = []
        for i in range(cold + 1):
            samples.append(await one_client(server.port, f"c{i}", None))
        row["cold_p50"] = pct(samples[1:], 50)  # the first also starts the zygote
    finally:
        server.stop()
    return row


async def docker_row(clients: int) -> dict[str, object]:
    server = EraServer(env={**EXTRA_ENV, "ERA_PROVISIONER": "docker", "ERA_POOL_KERNELS": "python:docker"})
    try:
        server.start(ready_timeout=180)
        await asyncio.sleep(3)
        times = await burst(server.port, clients, "d")
        row: dict[str, object] = {"name": "docker", "p50": pct(times, 50), "max": max(times) * 1000}
        await delete_all(server.port, "d", clients)
        await second_burst(server.port, clients, "e", row)
    finally:
        server.stop()
    return row


def fmt(value: object, unit: str = "", decimals: int | None = None) -> str:
    if isinstance(value, float):
        if value != value:
            return "n/a"
        decimals = decimals if decimals is not None else 0 if value >= 10 else 1
        return f"{value:.{decimals}f}{unit}"
    return "n/a" if value is None else str(value)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--local", type=int, default=30, help="clients at once, local (default 30)")
    parser.add_argument("--docker", type=int, default=10, help="clients at once, Docker (default 10)")
    parser.add_argument("--cold", type=int, default=5, help="cold starts with the pool off (default 5)")
    parser.add_argument("--no-docker", action="store_true")
    parser.add_argument("--launchers", default="bwrap,fork")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="a setting for every server")
    args = parser.parse_args()
    EXTRA_ENV.update(item.split("=", 1) for item in args.env)
    rows = []
    for launcher in filter(None, args.launchers.split(",")):  # --launchers "": Docker only
        log(f"local, {launcher} launcher: {args.local} clients")
        rows.append(await local_row(launcher, args.local, args.cold))
    if not args.no_docker:
        log(f"docker: {args.docker} clients")
        rows.append(await docker_row(args.docker))
    load = os.getloadavg()
    settings = f" ({', '.join(args.env)})" if args.env else ""
    print(f"\nBurst{settings}: clients at once, each create + first print(1) (ms). cores {os.cpu_count()}, "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}\n")
    print("| configuration | clients | p50 | max | again, pool grown: p50 | max | ready | cold start, pool off (p50) | "
          "warm run (p50) | idle kernel PSS | zygote PSS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        clients = args.docker if row["name"] == "docker" else args.local
        print(f"| {row['name']} | {clients} | {fmt(row['p50'])} | {fmt(row['max'])} | {fmt(row.get('p50_2'))} | "
              f"{fmt(row.get('max_2'))} | {fmt(row.get('ready2'))} | {fmt(row.get('cold_p50'))} | "
              f"{fmt(row.get('warm_p50'))} | {fmt(row.get('pss_mib'), ' MiB', 1)} | "  # the goal is 15: a tenth tells
              f"{fmt(row.get('zygote_mib') or None, ' MiB')} |")


if __name__ == "__main__":
    asyncio.run(main())
