"""Three tenants on one server, one of them at its limit: are the others starved?

    .venv/bin/python bench/bench_tenants.py [--seconds 10] [--hog-threads 4]

One server (local provisioner), three keys made with ``era keys``: ``a`` and ``b``
without limits, ``hog`` with ``--runs-per-minute 60``. Each has a session with a warm
kernel. Phase "alone": ``a`` and ``b`` each run ``pass`` back to back on a keep-alive
connection for ``--seconds``. Phase "hog": the same while ``hog`` sends runs as fast as
``--hog-threads`` connections allow (past its first 60 in the minute, each is a 429).
Reported per tenant: runs per second, p50 and p99 latency (ms); for ``hog``, requests
per second and how many were 200 and 429. Written to bench/results/tenants.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from contenders import EraServer  # noqa: E402
from measure import pct  # noqa: E402

ADMIN = "bench-tenants-admin"


def make_key(server: EraServer, name: str, *limits: str) -> str:
    done = subprocess.run([sys.executable, "-m", "era_kernel.cli", "keys", "create", "--name", name, *limits],
                          env=server.env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def loop(port: int, key: str, sid: str, until: float, out: dict) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    body = json.dumps({"code": "pass"})
    while time.perf_counter() < until:
        t0 = time.perf_counter()
        conn.request("POST", f"/api/sessions/{sid}/run", body, headers)
        response = conn.getresponse()
        response.read()
        out.setdefault(response.status, []).append(time.perf_counter() - t0)
    conn.close()


def phase(server: EraServer, tenants: dict[str, tuple[str, str]], seconds: float, hog_threads: int) -> dict:
    until = time.perf_counter() + seconds
    results: dict[str, list[dict]] = {}
    threads = []
    for name, (key, sid) in tenants.items():
        for _ in range(hog_threads if name == "hog" else 1):
            out: dict = {}
            results.setdefault(name, []).append(out)
            threads.append(threading.Thread(target=loop, args=(server.port, key, sid, until, out)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = {}
    for name, outs in results.items():
        merged: dict[int, list[float]] = {}
        for out in outs:
            for status, times in out.items():
                merged.setdefault(status, []).extend(times)
        ok = sorted(merged.get(200, []))
        report[name] = {"runs_per_s": round(len(ok) / seconds, 1),
                        "p50_ms": round(pct(ok, 50), 2) if ok else None,
                        "p99_ms": round(pct(ok, 99), 2) if ok else None,
                        "requests_per_s": round(sum(len(v) for v in merged.values()) / seconds, 1),
                        "by_status": {str(k): len(v) for k, v in sorted(merged.items())}}
    return report


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--hog-threads", type=int, default=4)
    args = parser.parse_args()
    server = EraServer(env={"ERA_API_KEY": ADMIN, "ERA_PROVISIONER": "local"}).start()
    try:
        tenants = {}
        for name, limits in (("a", ()), ("b", ()), ("hog", ("--runs-per-minute", "60"))):
            key = make_key(server, name, *limits)
            headers = {"Authorization": f"Bearer {key}"}
            server.json("POST", "/api/sessions", {"id": f"bench-{name}"}, headers, expect=201)
            if name != "hog":  # the hog's one warm-up run would take one of its 60
                server.json("POST", f"/api/sessions/bench-{name}/run", {"code": "pass"}, headers)
            tenants[name] = (key, f"bench-{name}")
        server.json("POST", "/api/sessions/bench-hog/run", {"code": "pass"}, {"Authorization": f"Bearer {ADMIN}"})
        alone = phase(server, {k: v for k, v in tenants.items() if k != "hog"}, args.seconds, args.hog_threads)
        hog = phase(server, tenants, args.seconds, args.hog_threads)
        result = {"seconds": args.seconds, "hog_threads": args.hog_threads, "alone": alone, "with_hog": hog}
        print(json.dumps(result, indent=2))
        out = Path(__file__).resolve().parent / "results" / "tenants.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
