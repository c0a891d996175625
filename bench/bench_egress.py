"""Egress proxy overhead: a 10 MB download from a test server allowed by policy, direct
and through the proxy.

    sudo .venv/bin/python bench/bench_egress.py [--mb 10] [--repeat 3] [--rounds 8]

The "internet" is a network namespace made here (tests/support/egress_net.py: a server
on a 203.0.113.x documentation address over a veth pair; names from a DNS server of
ours): nothing leaves the machine. One era server (local provisioner), two Python
sessions, each downloading with urllib inside a run, timed inside the kernel:

- ``direct``: ``allowInternetAccess: true`` with ``ERA_EGRESS_LOCAL=host`` (the local
  session shares the host's network; by default ``true`` goes through the proxy too):
  straight to the address;
- ``proxy_name``: a policy ``{"allow": ["files.example.org"]}``: through the proxy,
  which resolves the name (our DNS server on loopback), checks it and relays;
- ``proxy_address``: the same session, the URL by address (policy ``203.0.113.0/24``
  too): the relay without the DNS lookup;
- ``proxy_https``: the name over HTTPS (CONNECT, SNI checked), against ``direct_https``.

Reported per case: median and best seconds, MB/s, and the overhead over direct.
Written to bench/results/egress.json. Needs root (network namespaces, setns).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.egress_net import Internet, Resolver  # noqa: E402
from tests.support.era_server import ServerProcess  # noqa: E402
from tests.support.loopback import free_port  # noqa: E402

DOWNLOAD = """
import ssl, time, urllib.request
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
times = []
for _ in range({repeat} + 1):
    t0 = time.perf_counter()
    with urllib.request.urlopen({url!r}, timeout=60, context=ctx) as r:
        size = 0
        while chunk := r.read(1 << 20):
            size += len(chunk)
    assert size == {size}, size
    times.append(time.perf_counter() - t0)
print(times[1:])  # the first pays for imports and the first connection's setup
"""


def download(server: ServerProcess, sid: str, url: str, size: int, repeat: int) -> list[float]:
    result = server.json("POST", f"/api/sessions/{sid}/run",
                         {"code": DOWNLOAD.format(url=url, size=size, repeat=repeat), "timeout": 600})
    if result["exit_code"] != 0:
        raise RuntimeError(f"{url}: {result}")
    return json.loads(result["stdout"])


def summary(times: list[float], size: int) -> dict:
    median = statistics.median(times)
    return {"median_s": round(median, 4), "best_s": round(min(times), 4),
            "mb_per_s": round(size / 1e6 / median, 1), "samples": len(times)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=10)
    parser.add_argument("--repeat", type=int, default=3, help="downloads per case per round")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_egress needs root (network namespaces, setns)", file=sys.stderr)
        return 2
    size = int(args.mb * 1e6)
    internet = Internet().start()
    resolver = Resolver({"files.example.org": internet.address})
    server = None
    try:
        server = ServerProcess(env={"ERA_EGRESS_RESOLVER": resolver.address, "ERA_EGRESS_LOCAL": "host"},
                               log_level="WARNING",
                               port=free_port()).start()
        server.json("POST", "/api/sessions", {"id": "bench-direct", "allowInternetAccess": True}, expect=201)
        server.json("POST", "/api/sessions", {"id": "bench-proxy", "allowInternetAccess": {
            "allow": ["files.example.org", f"{internet.address}/32"]}}, expect=201)
        cases = {
            "direct": ("bench-direct", f"http://{internet.address}/blob/{size}"),
            "proxy_name": ("bench-proxy", f"http://files.example.org/blob/{size}"),
            "proxy_address": ("bench-proxy", f"http://{internet.address}/blob/{size}"),
            "direct_https": ("bench-direct", f"https://{internet.address}/blob/{size}"),
            "proxy_https": ("bench-proxy", f"https://files.example.org/blob/{size}"),
        }
        report: dict = {"bytes": size, "load_before": os.getloadavg(), "cpus": os.cpu_count(), "cases": {}}
        # Round robin, a few downloads per case each round: the machine's load (shared
        # cores) falls on every case alike rather than on whichever ran during a spike.
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, (sid, url) in cases.items():
                times[name] += download(server, sid, url, size, args.repeat)
        for name in cases:
            report["cases"][name] = summary(times[name], size)
            print(name, report["cases"][name], flush=True)
        for name, base in (("proxy_name", "direct"), ("proxy_address", "direct"), ("proxy_https", "direct_https")):
            case = report["cases"][name]
            case["overhead_ms"] = round((case["median_s"] - report["cases"][base]["median_s"]) * 1000, 1)
        report["load_after"] = os.getloadavg()
        out = ROOT / "bench" / "results" / "egress.json"
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
    finally:
        if server is not None:
            server.cleanup()
        resolver.close()
        internet.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
