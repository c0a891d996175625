"""Prometheus metrics: HTTP request counts and latencies, counted where each request is
logged, and the engine's stats turned into metric families once per scrape.

Labels never carry a session id: the route label is the route's template from the table
(``/api/sessions/{id}/run``), unknown paths are ``unmatched``, and unusual methods are
``other``, so the number of series stays bounded whatever clients send.
``prometheus_client`` is imported by ``render`` only, never on the request path.
"""

from __future__ import annotations

import bisect
from typing import Any

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
UNMATCHED = "unmatched"


class HttpMetrics:
    """Counters of one Application; ``observe`` runs from tornado's ``log_function``."""

    def __init__(self, route_of: dict[type, str]) -> None:
        self.route_of = route_of  # handler class -> route template
        self.requests: dict[tuple[str, str, str], int] = {}  # (method, route, status) -> count
        self.latency: dict[str, list[float]] = {}  # route -> [per-bucket counts..., +Inf count, sum]

    def observe(self, handler: Any) -> None:
        request = handler.request
        route = self.route_of.get(type(handler), UNMATCHED)
        method = request.method if request.method in METHODS else "other"
        key = (method, route, str(handler.get_status()))
        self.requests[key] = self.requests.get(key, 0) + 1
        seconds = request.request_time()
        row = self.latency.get(route)
        if row is None:
            row = self.latency[route] = [0.0] * (len(BUCKETS) + 2)
        row[bisect.bisect_left(BUCKETS, seconds)] += 1  # le is inclusive
        row[-1] += seconds


def _gauge(name: str, doc: str, value: float | None, GaugeMetricFamily: Any) -> list:
    return [] if value is None else [GaugeMetricFamily(name, doc, value=value)]


def collect(stats: dict[str, Any] | None, http: HttpMetrics | None, server: dict[str, Any]) -> list:
    """Metric families from ``SessionManager.stats()`` (None before the engine is ready),
    the HTTP counters and ``server`` (``ready``, ``uptime_s``, ``rss_bytes``)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    out: list = [
        GaugeMetricFamily("era_ready", "1 when the engine has started and serves requests",
                          value=1 if server["ready"] else 0),
        GaugeMetricFamily("era_uptime_seconds", "seconds since the server process started serving",
                          value=server["uptime_s"]),
        GaugeMetricFamily("era_server_memory_bytes", "resident memory of the server process (engine included)",
                          value=server["rss_bytes"]),
    ]
    if stats is not None:
        out += _engine_families(stats, CounterMetricFamily, GaugeMetricFamily)
    if http is not None:
        requests = CounterMetricFamily("era_http_requests", "HTTP requests answered",
                                       labels=["method", "route", "status"])
        for (method, route, status), count in sorted(http.requests.items()):
            requests.add_metric([method, route, status], count)
        latency = HistogramMetricFamily("era_http_request_duration_seconds",
                                        "time to answer an HTTP request (WebSockets: to the upgrade)",
                                        labels=["route"])
        for route, row in sorted(http.latency.items()):
            cumulative, buckets = 0.0, []
            for bound, count in zip([*map(str, BUCKETS), "+Inf"], row[:-1]):
                cumulative += count
                buckets.append((bound, cumulative))
            latency.add_metric([route], buckets, row[-1])
        out += [requests, latency]
    return out


def _engine_families(stats: dict[str, Any], CounterMetricFamily: Any, GaugeMetricFamily: Any) -> list:
    out: list = _gauge("era_sessions", "sessions in the store", stats.get("sessions"), GaugeMetricFamily)
    out += _gauge("era_live_kernels", "kernels running or starting", stats.get("live_kernels"), GaugeMetricFamily)
    kernels = GaugeMetricFamily("era_kernels", "live kernels by state", labels=["state"])
    states = {"idle": 0, "busy": 0, "starting": 0, **(stats.get("kernel_states") or {})}
    for state, count in sorted(states.items()):
        kernels.add_metric([str(state)], count)
    out.append(kernels)
    slots = stats.get("kernel_slots") or {}
    out += _gauge("era_kernel_slots_used", "kernel slots in use", slots.get("used"), GaugeMetricFamily)
    out += _gauge("era_kernel_slots_max", "kernel slots available in all (ERA_MAX_KERNELS)", slots.get("max"),
                  GaugeMetricFamily)
    pool = stats.get("pool") or {}
    pools = pool.get("pools") or {}
    families = {name: GaugeMetricFamily(f"era_pool_{name}", doc, labels=["pool"]) for name, doc in (
        ("ready", "pre-started kernels waiting to be claimed"),
        ("starting", "pre-started kernels still starting"),
        ("target", "kernels the pool keeps ready"))}
    for pool_name, fill in sorted(pools.items()):
        for name, family in families.items():
            if isinstance(fill, dict) and fill.get(name) is not None:
                family.add_metric([str(pool_name)], fill[name])
    out += families.values()
    for name, doc in (("claimed", "sessions that got a pre-started kernel"),
                      ("misses", "sessions that found no pre-started kernel and started one")):
        if pool.get(name) is not None:
            out.append(CounterMetricFamily(f"era_pool_{name}", doc, value=pool[name]))
    culled = stats.get("culled")
    if culled is not None:
        family = CounterMetricFamily("era_kernels_culled", "kernels stopped by the culler", labels=["reason"])
        for reason, count in sorted(culled.items()):
            family.add_metric([str(reason)], count)
        out.append(family)
    memory = stats.get("memory") or {}
    kernels_bytes = memory.get("kernels_bytes")
    if kernels_bytes is None and stats.get("kernels") is not None:
        known = [k.get("memory_bytes") for k in stats["kernels"] if k.get("memory_bytes") is not None]
        kernels_bytes = sum(known) if known else None
    out += _gauge("era_kernel_memory_bytes", "memory of all live kernels (process-tree RSS or container cgroup)",
                  kernels_bytes, GaugeMetricFamily)
    return out


def render(stats: dict[str, Any] | None, http: HttpMetrics | None, server: dict[str, Any]) -> bytes:
    """The text exposition format 0.0.4 of a registry built for this scrape only."""
    from prometheus_client import CollectorRegistry, generate_latest

    class _Scrape:
        def collect(self):
            return collect(stats, http, server)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Scrape())
    return generate_latest(registry)


def content_type() -> str:
    from prometheus_client import exposition

    # 0.26 made CONTENT_TYPE_LATEST the 1.0.0 format; what generate_latest writes here is 0.0.4.
    return getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST)
