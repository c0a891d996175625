"""Replicas on one PostgreSQL store and one S3 workspace store (moto): what forwarding
costs, how long a dead replica's session takes to answer again, and how runs per second
grow with replicas.

    .venv/bin/python bench/bench_replicas.py [--runs 300] [--trials 10] [--seconds 8] [--ttl 3]

Everything on 127.0.0.1 (a throwaway PostgreSQL cluster, moto's S3 server, real
``era_server`` processes with the local provisioner, ERA_POOL_SIZE=0):

1. forwarding: two replicas, one session served by A. ``print(1)`` runs on keep-alive
   connections, alternating: straight to A, and to B (which forwards to A). p50/p90 of
   each, and the difference: what a balancer's wrong guess costs.
2. takeover: per trial, a third replica makes a persistent session with a file and runs
   once, and is SIGKILLed; a client then asks a survivor to run in the session until it
   answers. Reported: from the kill to the answer (p50/max), and from the moment the
   lease expired (read from the store before the kill) to the answer: the takeover
   itself (restore, kernel start, the run).
3. throughput: 1, 2 and 3 replicas, 12 sessions made round robin (each replica serves a
   share), 12 client threads running ``pass`` for --seconds, each request sent to the
   next replica in turn (as a round-robin balancer would: most are forwarded) and, apart,
   each to its session's owner (as a balancer hashing on the session id would).

Written to bench/results/replicas.json.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import http.client
import json
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from era_kernel.store.postgres import PostgresStore  # noqa: E402
from tests.support.era_server import ServerProcess  # noqa: E402
from tests.support.loopback import free_port  # noqa: E402
from tests.support.postgres import PostgresCluster, find_bin_dir  # noqa: E402
from tests.support.s3 import CREDENTIALS, moto_endpoint  # noqa: E402

BUCKET = "era-bench-replicas"


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


class Client:
    """One keep-alive connection to one server."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def call(self, method: str, path: str, body: object = None) -> tuple[int, dict]:
        self.conn.request(method, path, json.dumps(body) if body is not None else None,
                          {"Content-Type": "application/json"})
        response = self.conn.getresponse()
        data = response.read()
        try:
            return response.status, json.loads(data)
        except ValueError:
            return response.status, {"raw": data[:200].decode(errors="replace")}


def replica(env: dict[str, str], rid: str) -> ServerProcess:
    # WARNING: an INFO access line per request would cost the servers time; so a fixed port.
    return ServerProcess(env={**env, "ERA_REPLICA_ID": rid}, log_level="WARNING", port=free_port())


def start_all(servers: list[ServerProcess]) -> None:
    with concurrent.futures.ThreadPoolExecutor(len(servers)) as pool:
        list(pool.map(lambda s: s.start(ready_timeout=60), servers))


def forwarding(env: dict[str, str], runs: int) -> dict:
    a, b = replica(env, "fa"), replica(env, "fb")
    start_all([a, b])
    try:
        sid = a.json("POST", "/api/sessions", {"language": "python"}, expect=201)["id"]
        direct, forwarded = Client(a.port), Client(b.port)
        samples: dict[str, list[float]] = {"owner": [], "forwarded": []}
        for i in range(runs + 20):
            for name, client in (("owner", direct), ("forwarded", forwarded)) if i % 2 else \
                    (("forwarded", forwarded), ("owner", direct)):
                t0 = time.perf_counter()
                status, result = client.call("POST", f"/api/sessions/{sid}/run", {"code": "print(1)"})
                took = time.perf_counter() - t0
                assert status == 200 and result["stdout"] == "1\n", result
                if i >= 20:  # warm-up
                    samples[name].append(took * 1000)
        out = {name: {"p50_ms": round(pct(s, 50), 2), "p90_ms": round(pct(s, 90), 2), "n": len(s)}
               for name, s in samples.items()}
        out["overhead_p50_ms"] = round(out["forwarded"]["p50_ms"] - out["owner"]["p50_ms"], 2)
        return out
    finally:
        a.cleanup()
        b.cleanup()


async def lease_expires_in(url: str, sid: str) -> float:
    store = PostgresStore(url)
    await store.open()
    try:
        return (await store.get_leases([sid]))[sid]["expires_in"]
    finally:
        await store.close()


def takeover(env: dict[str, str], url: str, trials: int) -> dict:
    survivors = [replica(env, "s1"), replica(env, "s2")]
    start_all(survivors)
    total, after_expiry = [], []
    try:
        for n in range(trials):
            victim = replica(env, f"v{n}").start(ready_timeout=60)
            sid = victim.json("POST", "/api/sessions", {"language": "python", "persistent": True}, expect=201)["id"]
            ran = victim.json("POST", f"/api/sessions/{sid}/run",
                              {"code": "open('kept.txt', 'w').write('kept')\nprint('made')"})
            assert ran["stdout"] == "made\n", ran
            left = asyncio.run(lease_expires_in(url, sid))
            os.kill(victim.proc.pid, signal.SIGKILL)
            killed = time.perf_counter()
            victim.proc.wait(10)
            client = Client(survivors[n % 2].port)
            while True:
                status, result = client.call("POST", f"/api/sessions/{sid}/run", {"code": "print(open('kept.txt').read())"})
                if status == 200:
                    break
                assert status == 503, (status, result)
                time.sleep(0.05)
            took = time.perf_counter() - killed
            assert result["stdout"] == "kept\n", result
            total.append(took)
            after_expiry.append(took - left)
            victim.cleanup()
            print(f"  trial {n + 1}: answered {took:.2f} s after SIGKILL, {took - left:.2f} s after lease expiry",
                  flush=True)
    finally:
        for s in survivors:
            s.cleanup()
    return {"ttl_s": float(env["ERA_LEASE_TTL"]), "trials": trials,
            "after_kill_s": {"p50": round(pct(total, 50), 2), "max": round(max(total), 2)},
            "after_expiry_s": {"p50": round(pct(after_expiry, 50), 2), "max": round(max(after_expiry), 2)}}


def throughput(env: dict[str, str], count: int, seconds: float, sessions: int = 12) -> dict:
    servers = [replica(env, f"t{count}-{n}") for n in range(count)]
    start_all(servers)
    try:
        owners = {}
        for n in range(sessions):
            doc = servers[n % count].json("POST", "/api/sessions", {"language": "python"}, expect=201)
            owners[doc["id"]] = n % count
        for sid, owner in owners.items():  # every kernel up before the clock starts
            servers[owner].json("POST", f"/api/sessions/{sid}/run", {"code": "pass"})
        out = {}
        for mode in ("round_robin", "to_owner"):
            counts, errors = [0] * sessions, [0] * sessions
            until = time.perf_counter() + seconds

            def work(k: int, sid: str) -> None:
                clients = [Client(s.port) for s in servers]
                turn = k
                while time.perf_counter() < until:
                    target = owners[sid] if mode == "to_owner" else turn % count
                    turn += 1
                    status, _ = clients[target].call("POST", f"/api/sessions/{sid}/run", {"code": "pass"})
                    counts[k] += 1
                    errors[k] += status != 200

            threads = [threading.Thread(target=work, args=(k, sid)) for k, sid in enumerate(owners)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            out[mode] = {"runs_per_s": round(sum(counts) / seconds, 1), "errors": sum(errors)}
        return out
    finally:
        for s in servers:
            s.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--ttl", type=float, default=3.0)
    args = parser.parse_args()
    bin_dir = find_bin_dir()
    if bin_dir is None:
        sys.exit("PostgreSQL's server binaries are needed (apt-get install postgresql)")
    cluster = PostgresCluster(bin_dir).start()
    results: dict = {"cpus": os.cpu_count(), "load_at_start": os.getloadavg(), "lease_ttl_s": args.ttl}
    try:
        with moto_endpoint(BUCKET) as endpoint:
            options = {**CREDENTIALS, "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}

            def env() -> tuple[dict[str, str], str]:
                _, url = cluster.new_schema()
                return {"ERA_STORE_URL": url, "ERA_WORKSPACE_URL": f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}",
                        "ERA_WORKSPACE_OPTIONS": json.dumps(options), "ERA_POOL_SIZE": "0",
                        "ERA_LEASE_TTL": str(args.ttl), "ERA_REPLICA_HEARTBEAT": "0.5"}, url

            print("forwarding overhead ...", flush=True)
            results["forwarding"] = forwarding(env()[0], args.runs)
            print(json.dumps(results["forwarding"]), flush=True)
            print("takeover after SIGKILL ...", flush=True)
            results["takeover"] = takeover(*env(), args.trials)
            print(json.dumps(results["takeover"]), flush=True)
            results["throughput"] = {}
            for count in (1, 2, 3):
                print(f"throughput, {count} replica(s) ...", flush=True)
                results["throughput"][count] = throughput(env()[0], count, args.seconds)
                print(json.dumps(results["throughput"][count]), flush=True)
    finally:
        cluster.stop()
    results["load_at_end"] = os.getloadavg()
    out = ROOT / "bench" / "results" / "replicas.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
