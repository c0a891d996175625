"""Server-level routes: health (open, answers before the engine is ready), usage
statistics, Prometheus metrics and the OpenAPI document."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Any

from ..apidoc import Op
from ..services import Services
from .base import BaseHandler

log = logging.getLogger("era.server")

# /health is a liveness probe first: it waits this long for a fresh detail, then answers
# with the last one computed (or none yet). The detail needs worker threads (a process
# table scan, a store count), and during a burst of kernel starts every thread is busy
# launching: waiting for one made /health take seconds (docs/security.md case 2).
HEALTH_DETAIL_WAIT = 0.5
HEALTH_DETAIL_TIMEOUT = 10.0  # a computation still running past this is given up (logged)
_health_details: "weakref.WeakKeyDictionary[Services, asyncio.Future]" = weakref.WeakKeyDictionary()
_last_details: "weakref.WeakKeyDictionary[Services, dict[str, Any]]" = weakref.WeakKeyDictionary()


def health_detail(stats: dict[str, Any]) -> dict[str, Any]:
    """The aggregate part of the stats, for the open /health: counts only, no session ids."""
    from era_kernel.resources import process_rss_bytes

    pools = (stats.get("pool") or {}).get("pools") or {}
    memory = stats.get("memory") or {}
    kernels_bytes = memory.get("kernels_bytes")
    if kernels_bytes is None and stats.get("kernels") is not None:
        known = [k.get("memory_bytes") for k in stats["kernels"] if k.get("memory_bytes") is not None]
        kernels_bytes = sum(known) if known else None
    return {
        "sessions": stats.get("sessions"),
        "kernels": {str(state): int(n) for state, n in (stats.get("kernel_states") or {}).items()},
        "pool": {str(name): {"ready": fill.get("ready", 0), "target": fill.get("target", 0)}
                 for name, fill in pools.items() if isinstance(fill, dict)},
        "memory": {"server_rss_bytes": memory.get("server_rss_bytes") or process_rss_bytes(),
                   "kernels_bytes": kernels_bytes},
    }


async def _fresh_health_detail(services: Services) -> dict[str, Any]:
    return health_detail(await services.engine.stats())


async def _kept_health_detail(services: Services) -> dict[str, Any]:
    detail = await asyncio.wait_for(_fresh_health_detail(services), HEALTH_DETAIL_TIMEOUT)
    _last_details[services] = detail
    return detail


def _retrieved(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("health detail unavailable: %s", type(future.exception()).__name__, extra={"event": "error"})


async def shared_health_detail(services: Services) -> dict[str, Any] | None:
    """The detail; probes arriving while one is computed share it (an open route must not
    multiply engine work by its request rate). When it takes longer than
    ``HEALTH_DETAIL_WAIT``, the last one computed (None before the first)."""
    future = _health_details.get(services)
    if future is None or future.done():
        future = _health_details[services] = asyncio.ensure_future(_kept_health_detail(services))
        future.add_done_callback(_retrieved)  # retrieved (and logged) even if nobody waits
    try:
        return await asyncio.wait_for(asyncio.shield(future), HEALTH_DETAIL_WAIT)
    except Exception:
        return _last_details.get(services)


class HealthHandler(BaseHandler):
    API = {"get": Op("Liveness; `ready` tells whether the engine has started", response="Health", errors=(),
                     description="Open (no API key). Once the engine is ready it adds aggregate counts: "
                                 "sessions, live kernels by state, pool fill per pool, and memory (server RSS, "
                                 "all kernels); never session ids. Before that only the liveness fields.")}

    async def admit(self) -> None:
        pass  # never refused and never waits for the engine: that is what it reports on (the key: routes.py)

    async def get(self) -> None:
        services = self.services
        doc: dict[str, Any] = {
            "status": "ok",
            "ready": services.state == "ready",
            "state": services.state,
            "uptime_s": round(time.monotonic() - services.started, 3),
            "version": services.version,
        }
        if doc["ready"] and services.engine is not None:
            detail = await shared_health_detail(services)
            if detail is not None:
                doc.update(detail)
        self.send_json(doc)


class StatsHandler(BaseHandler):
    API = {"get": Op("Counts and usage: sessions, live kernels, memory, pool; ERA's storage registry stats",
                     response="Stats", errors=())}

    async def get(self) -> None:
        stats = dict(await self.engine.stats(self.owner_filter))
        # ERA's storage registry stats ({total, by_type, by_namespace, total_size}): same document.

        stats.update(await self.engine.storage.registry.stats(self.tenant.owner))
        stats["server"] = {
            "uptime_s": round(time.monotonic() - self.services.started, 3),
            "websocket_clients": sum(len(hub.sockets) for hub in self.services.hubs.values()),
            "background_runs": len(self.services.tasks),
        }
        self.send_json(stats)


class ReplicasHandler(BaseHandler):
    ADMIN_ONLY = True
    API = {"get": Op("The servers sharing this store: ids, addresses, capacity, heartbeats", response="ReplicaList",
                     errors=(403,),
                     description="Every server registered in the metadata store's replica registry, first "
                                 "registered first, with the id of the one that answered. A server registers when "
                                 "it starts, renews its heartbeat every `ERA_REPLICA_HEARTBEAT` seconds and leaves "
                                 "when it stops cleanly; one that died keeps an ageing heartbeat.")}

    async def get(self) -> None:
        self.send_json(await self.engine.replicas())


class MetricsHandler(BaseHandler):
    ADMIN_ONLY = True
    API = {"get": Op("Prometheus metrics (text format 0.0.4)", response="text", errors=(403,),
                     description="Sessions, kernels by state, kernel slots, pool fill, culls, kernel and server "
                                 "memory, uptime, and HTTP requests by method, route template and status with "
                                 "their latency. Needs the API key when one is set; answers before the engine "
                                 "is ready (`era_ready 0`, without the engine's metrics).")}

    WAITS_FOR_ENGINE = False  # before the engine is ready it answers era_ready 0

    async def get(self) -> None:
        from era_kernel.resources import process_rss_bytes

        from ..metrics import content_type, render

        services = self.services
        ready = services.state == "ready" and services.engine is not None
        stats = await services.engine.stats() if ready else None
        server = {"ready": ready, "uptime_s": round(time.monotonic() - services.started, 3),
                  "rss_bytes": ((stats or {}).get("memory") or {}).get("server_rss_bytes") or process_rss_bytes()}
        body = render(stats, self.application.settings.get("era_http_metrics"), server)
        self.set_header("Content-Type", content_type())
        self.finish(body)


class OpenApiHandler(BaseHandler):
    API = {"get": Op("This API as an OpenAPI 3.1 document", response="OpenAPI", errors=())}

    async def get(self) -> None:
        if self.services.openapi is None:
            from ..openapi import build_openapi

            # Schema generation takes tens of ms of CPU: off the event loop, once. The route
            # table comes through the application (importing routes.py here would be a circle).
            routes = self.application.settings["era_routes"]
            self.services.openapi = await asyncio.to_thread(build_openapi, routes)
        self.send_json(self.services.openapi)
