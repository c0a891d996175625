"""Resource stats, the detailed /health and Prometheus /metrics on a real server over
loopback, and kernel memory measured on real local and Docker kernels."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from era_server.routes import CONSOLE_ROUTE_LABEL, ROUTES
from tests.conftest import require_docker, short_tmpdir
from tests.support.era_server import ServerProcess

SESSIONS = ["metrics-a", "metrics-b"]
DETAIL = {"sessions", "kernels", "pool", "memory"}
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def server():
    """A server of its own (the session count is exact), with /health polled from the start."""
    srv = ServerProcess(env={})
    srv.start(wait_ready=False)
    srv.early = []  # every /health answer until the engine was ready
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, body = srv.request("GET", "/health")
        assert status == 200
        srv.early.append(json.loads(body))
        if srv.early[-1]["ready"]:
            break
        time.sleep(0.01)
    for sid in SESSIONS:
        srv.json("POST", "/api/sessions", {"id": sid, "language": "python"}, expect=201)
        assert srv.json("POST", f"/api/sessions/{sid}/run", {"code": "x = 6 * 7\nprint(x)"})["stdout"] == "42\n"
    yield srv
    srv.cleanup()


def scrape(server) -> dict:
    status, headers, body = server.request_full("GET", "/metrics")
    assert status == 200, body[:500]
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {family.name: family for family in text_string_to_metric_families(body.decode())}


def value(families: dict, family: str, sample: str | None = None, **labels) -> float:
    found = [s.value for s in families[family].samples
             if s.name == (sample or family) and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (family, sample, labels, families[family].samples)
    return found[0]


# ---- /health ------------------------------------------------------------------------------------


def test_health_before_ready_has_no_detail(server):
    not_ready = [doc for doc in server.early if not doc["ready"]]
    assert not_ready, "the engine was ready before the first /health answer"
    for doc in not_ready:
        assert doc["status"] == "ok" and doc["state"] == "starting"
        assert not DETAIL & set(doc), doc


def test_health_when_ready_has_aggregates_and_no_session_ids(server):
    status, body = server.request("GET", "/health")
    assert status == 200
    doc = json.loads(body)
    assert doc["ready"] is True and doc["state"] == "ready" and doc["uptime_s"] > 0 and doc["version"]
    assert DETAIL <= set(doc)
    assert doc["sessions"] == len(SESSIONS)
    # Pooled kernels are counted too, under "pooled", once the pool has refilled.
    assert sum(n for state, n in doc["kernels"].items() if state != "pooled") == len(SESSIONS)
    assert doc["kernels"].get("idle", 0) >= 1
    assert all(set(fill) == {"ready", "target"} for fill in doc["pool"].values())
    assert doc["memory"]["server_rss_bytes"] > 10 * MiB
    if doc["memory"]["kernels_bytes"] is not None:  # the engine measures its kernels
        assert doc["memory"]["kernels_bytes"] > 2 * 5 * MiB
    for sid in SESSIONS:
        assert sid.encode() not in body


# ---- /api/resources/stats -----------------------------------------------------------------------


def test_stats_lists_sessions_kernels_and_the_server(server):
    stats = server.json("GET", "/api/resources/stats")
    assert stats["sessions"] == len(SESSIONS)
    assert stats["live_kernels"] == len(SESSIONS) + sum(1 for k in stats["kernels"] if k["session_id"] is None)
    assert stats["server"]["uptime_s"] > 0 and stats["server"]["background_runs"] == 0
    if "kernels" in stats:  # the engine's per-kernel list (with memory)
        kernels = {k["session_id"]: k for k in stats["kernels"]}
        assert set(SESSIONS) <= set(kernels)
        for sid in SESSIONS:
            kernel = kernels[sid]
            assert kernel["language"] == "python" and kernel["provisioner"] == "local"
            assert kernel["state"] in ("idle", "busy") and kernel["idle_s"] >= 0
            assert 5 * MiB < kernel["memory_bytes"] < 1024 * MiB


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rindex(b")") + 2:].split()[1]), []).append(int(entry))
    found, stack = [], list(children.get(root, ()))
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, ()))
    return found


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def test_forked_kernels_memory_adds_up_to_what_they_take(server):
    """Forked kernels share the zygote's pages: their memory is PSS, which splits a shared
    page among the processes mapping it. RSS counted the zygote's pages whole in every
    kernel (2 pooled kernels showed 172 MB, 12 would show 1 GiB, for about 20 MiB each)."""
    zygotes = [pid for pid in _descendants(server.proc.pid) if b"era_kernel.provisioning.zygote" in _cmdline(pid)]
    if not zygotes:
        assert os.getuid() != 0 or os.environ.get("ERA_REQUIRE_SANDBOX") != "1", "root with a sandbox forks kernels"
        pytest.skip("kernels are not forked here (not root, or no sandbox)")
    stats = server.json("GET", "/api/resources/stats")
    kernels = [k for k in stats["kernels"] if k["provisioner"] == "local"]
    assert len(kernels) >= len(SESSIONS) and all(k["memory_bytes"] for k in kernels)
    reported = sum(k["memory_bytes"] for k in kernels)
    rss = sum(_rss(pid) for pid in _descendants(zygotes[0]))  # the kernels' trees: each child of the zygote
    assert all(5 * MiB < k["memory_bytes"] < 60 * MiB for k in kernels), kernels
    assert reported < 0.6 * rss, (reported, rss)
    assert stats["memory"]["kernels_bytes"] == reported + sum(k["memory_bytes"] or 0 for k in stats["kernels"]
                                                              if k["provisioner"] != "local")


# ---- /metrics -----------------------------------------------------------------------------------


def test_metrics_families_and_values(server):
    families = scrape(server)
    stats = server.json("GET", "/api/resources/stats")
    assert value(families, "era_ready") == 1
    assert value(families, "era_sessions") == len(SESSIONS)
    states = {s.labels["state"]: s.value for s in families["era_kernels"].samples}
    assert {"idle", "busy", "starting"} <= set(states)
    assert sum(n for state, n in states.items() if state != "pooled") == len(SESSIONS)
    # Pool kernels may start between the scrape and the stats call: ranges, not equality.
    slots_max = value(families, "era_kernel_slots_max")
    assert slots_max == stats["kernel_slots"]["max"] > 0
    assert len(SESSIONS) <= value(families, "era_kernel_slots_used") <= slots_max
    assert families["era_pool_ready"].type == "gauge" and families["era_pool_target"].type == "gauge"
    for name, fill in (stats["pool"].get("pools") or {}).items():
        target = value(families, "era_pool_target", pool=name)
        assert target == fill["target"] and 0 <= value(families, "era_pool_ready", pool=name) <= target
    for key in ("claimed", "misses"):
        if key in stats["pool"]:
            family = families[f"era_pool_{key}"]
            assert family.type == "counter" and value(families, f"era_pool_{key}", f"era_pool_{key}_total") >= 0
    if "culled" in stats:
        reasons = {s.labels["reason"] for s in families["era_kernels_culled"].samples}
        assert {"idle", "max_age", "lru"} <= reasons
    if "kernels" in stats or (stats.get("memory") or {}).get("kernels_bytes") is not None:
        assert value(families, "era_kernel_memory_bytes") > 2 * 5 * MiB
    assert 10 * MiB < value(families, "era_server_memory_bytes") < 4096 * MiB
    assert 0 < value(families, "era_uptime_seconds") < 3600


def test_http_counters_increment_and_are_labelled_by_route_template(server):
    route = "/api/sessions/{id}"
    labels = {"method": "GET", "route": route, "status": "200"}
    before = scrape(server)
    count = value(before, "era_http_requests", "era_http_requests_total", **labels) \
        if any(s.labels == labels for s in before["era_http_requests"].samples) else 0
    for sid in SESSIONS + SESSIONS:
        server.json("GET", f"/api/sessions/{sid}")
    server.request("GET", "/api/sessions/absent-session")
    server.request("GET", "/no/such/route")
    after = scrape(server)
    assert value(after, "era_http_requests", "era_http_requests_total", **labels) == count + 4
    assert value(after, "era_http_requests", "era_http_requests_total", method="GET", route=route, status="404") >= 1
    assert value(after, "era_http_requests", "era_http_requests_total", method="GET", route="unmatched",
                 status="404") >= 1
    assert value(after, "era_http_requests", "era_http_requests_total", method="POST",
                 route="/api/sessions/{id}/run", status="200") == len(SESSIONS)
    # The latency histogram: one count per request of the route, cumulative buckets ending at +Inf.
    count_total = value(after, "era_http_request_duration_seconds", "era_http_request_duration_seconds_count",
                        route=route)
    assert count_total >= 5
    buckets = [s for s in after["era_http_request_duration_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["route"] == route]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == count_total
    assert [b.value for b in buckets] == sorted(b.value for b in buckets)
    assert value(after, "era_http_request_duration_seconds", "era_http_request_duration_seconds_sum",
                 route=route) > 0


def test_no_session_id_in_any_label(server):
    templates = {r.template for r in ROUTES} | {"unmatched", CONSOLE_ROUTE_LABEL}
    for family in scrape(server).values():
        for sample in family.samples:
            for name, label in sample.labels.items():
                assert not any(sid in label for sid in [*SESSIONS, "absent-session"]), (sample,)
                if name == "route":
                    assert label in templates, sample


def test_metrics_answer_before_the_engine_is_ready():
    srv = ServerProcess(env={})
    try:
        srv.start(wait_ready=False)
        status, headers, body = srv.request_full("GET", "/metrics")
        assert status == 200
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        assert value(families, "era_ready") in (0, 1)
        if value(families, "era_ready") == 0:
            assert "era_sessions" not in families
        assert value(families, "era_server_memory_bytes") > 0
    finally:
        srv.cleanup()


# ---- kernel_memory_bytes on real kernels --------------------------------------------------------

UID = 100_000 + 4343 if os.getuid() == 0 else os.getuid()


@pytest.mark.parametrize("provisioner", ["local", "docker"])
async def test_kernel_memory_bytes_on_a_real_kernel(provisioner, tmp_path):
    if provisioner == "docker":
        require_docker()
    from era_kernel.kernel import SessionKernel
    from era_kernel.kernelspecs import EraKernelSpecManager
    from era_kernel.languages import get_language
    from era_kernel.resources import kernel_memory_bytes, process_rss_bytes
    from era_kernel.workspaces import Workspace

    runtime = short_tmpdir("erm")
    workspace = tmp_path / "ws"
    await Workspace(workspace).create(uid=UID)
    language = get_language("python")
    launch = {"workspace": str(workspace), "runtime_dir": str(runtime), "uid": UID, "allow_network": False,
              "env": {}, "readonly": []}
    cwd = "/workspace" if provisioner == "docker" else str(workspace)
    kernel = SessionKernel(EraKernelSpecManager(), language.kernelspec_name(provisioner), launch,
                           language.startup_cells(cwd, {}, None), start_timeout=60)
    await kernel.start()
    km = kernel.km
    try:
        before = await kernel_memory_bytes(kernel.km)
        assert before is not None and 5 * MiB < before < 1024 * MiB, before
        outcome = await kernel.execute("blob = bytearray(64 * 1024 * 1024)\nblob[::4096] = b'x' * len(blob[::4096])",
                                       timeout=60)
        assert outcome.status == "ok", outcome.collector.error
        after = await kernel_memory_bytes(kernel.km)
        assert after is not None and after > before + 48 * MiB and after < 1024 * MiB, (before, after)
    finally:
        await kernel.stop(now=True)
        shutil.rmtree(runtime, ignore_errors=True)
    assert await kernel_memory_bytes(km) is None  # stopped: unknown, not a stale number
    assert process_rss_bytes() > 10 * MiB
