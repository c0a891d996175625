"""Server-level routes: health (open, answers before the engine is ready), usage
statistics and the OpenAPI document."""

from __future__ import annotations

import asyncio
import time

from ..apidoc import Op
from .base import BaseHandler


class HealthHandler(BaseHandler):
    API = {"get": Op("Liveness; `ready` tells whether the engine has started", response="Health", errors=())}

    async def admit(self) -> None:
        pass  # open (no API key) and never waits for the engine: that is what it reports on

    async def get(self) -> None:
        services = self.services
        self.send_json({
            "status": "ok",
            "ready": services.state == "ready",
            "state": services.state,
            "uptime_s": round(time.monotonic() - services.started, 3),
            "version": services.version,
        })


class StatsHandler(BaseHandler):
    API = {"get": Op("Counts and usage: sessions, live kernels, memory, pool", response="Stats", errors=())}

    async def get(self) -> None:
        stats = dict(await self.engine.stats())
        stats["server"] = {
            "uptime_s": round(time.monotonic() - self.services.started, 3),
            "websocket_clients": sum(len(hub.sockets) for hub in self.services.hubs.values()),
            "background_runs": len(self.services.tasks),
        }
        self.send_json(stats)


class OpenApiHandler(BaseHandler):
    API = {"get": Op("This API as an OpenAPI 3.1 document", response="OpenAPI", errors=())}

    async def get(self) -> None:
        if self.services.openapi is None:
            from ..app import ROUTES
            from ..openapi import build_openapi

            # Schema generation takes tens of ms of CPU: off the event loop, once.
            self.services.openapi = await asyncio.to_thread(build_openapi, ROUTES)
        self.send_json(self.services.openapi)
