"""The route table: every route's template, handler and whether it needs the API key.

OpenAPI, the metrics' route labels, the auth test and the error-shape test all walk
``ROUTES``, so a new route cannot skip them. Templates use ``{id}`` (a session id),
``{run_id}``, ``{schedule_id}``, ``{path}`` (a file path, may contain ``/``) and ``{name}``
(a kernelspec), ``{pid}`` (a process in a session), ``{namespace}``/``{database}``/``{bucket}``
(storage names) and ``{key}`` (a storage key, may contain ``/``). Each handler is
given ``services`` and its route's ``auth`` through ``initialize``; ``RouteHandler.check_key``
enforces it, for HTTP and WebSocket routes alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tornado.web import RequestHandler

from .handlers.base import NotFoundHandler
from .handlers.console import CONSOLE_DIR, ConsoleHandler
from .handlers.commands import (CommandsHandler, ProcessesHandler, ProcessHandler, ProcessOutputHandler,
                                ProcessSignalHandler, ProcessStdinHandler, ProcessStreamHandler, TerminalSocket)
from .handlers.files import FileHandler, FilesHandler
from .handlers.proxy import HostHandler, ProxyHandler, ProxyRootHandler
from .handlers.meta import HealthHandler, MetricsHandler, OpenApiHandler, ReplicasHandler, StatsHandler
from .handlers.runs import ExecuteHandler, RunEventsHandler, RunHandler, RunRecordHandler, StreamHandler
from .handlers.storage import (D1ExecHandler, D1QueryHandler, KvHandler, KvListHandler, R2Handler, R2ListHandler,
                               ResourcesHandler)
from .handlers.schedules import ScheduleHandler, SchedulesHandler
from .handlers.vm import VmHandler, VmListHandler, VmRunHandler, VmsHandler, VmStopHandler
from .handlers.sessions import (CodeHandler, DuplicateHandler, InterruptHandler, NotebookHandler,
                                RestartHandler, RunsHandler, SessionEventsHandler, SessionHandler, SessionsHandler)
from .jupyter import (KernelChannels, KernelHandler, KernelInterruptHandler, KernelRestartHandler, KernelsHandler,
                      KernelSpecHandler, KernelSpecsHandler)
from .mcp_routes import McpHandler, McpV1Handler
from .services import Services
from .ws import SessionSocket


@dataclass(frozen=True)
class Route:
    template: str
    handler: type[RequestHandler]
    auth: bool = True  # needs the API key when the server has one


ROUTES: list[Route] = [
    Route("/health", HealthHandler, auth=False),  # what probes read: open, answers before the engine is ready
    Route("/metrics", MetricsHandler),  # outside /api, but it names sessions' counts and load: keyed
    Route("/api/openapi.json", OpenApiHandler),
    Route("/api/resources/stats", StatsHandler),
    # ERA's storage proxy (handlers/storage.py): what era_storage in a session calls.
    Route("/api/resources/list", ResourcesHandler),
    Route("/api/storage/kv/{namespace}", KvListHandler),
    Route("/api/storage/kv/{namespace}/{key}", KvHandler),
    Route("/api/storage/d1/{database}/query", D1QueryHandler),
    Route("/api/storage/d1/{database}/exec", D1ExecHandler),
    Route("/api/storage/r2/{bucket}", R2ListHandler),
    Route("/api/storage/r2/{bucket}/{key}", R2Handler),
    Route("/api/replicas", ReplicasHandler),
    Route("/api/execute", ExecuteHandler),
    Route("/api/sessions", SessionsHandler),
    Route("/api/sessions/{id}", SessionHandler),
    Route("/api/sessions/{id}/run", RunHandler),
    Route("/api/sessions/{id}/stream", StreamHandler),
    Route("/api/sessions/{id}/ws", SessionSocket),
    Route("/api/sessions/{id}/duplicate", DuplicateHandler),
    Route("/api/sessions/{id}/code", CodeHandler),
    Route("/api/sessions/{id}/runs", RunsHandler),
    Route("/api/sessions/{id}/runs/{run_id}", RunRecordHandler),
    Route("/api/sessions/{id}/runs/{run_id}/events", RunEventsHandler),
    Route("/api/sessions/{id}/events", SessionEventsHandler),
    Route("/api/sessions/{id}/schedules", SchedulesHandler),
    Route("/api/sessions/{id}/schedules/{schedule_id}", ScheduleHandler),
    Route("/api/sessions/{id}/notebook", NotebookHandler),
    Route("/api/sessions/{id}/interrupt", InterruptHandler),
    Route("/api/sessions/{id}/restart", RestartHandler),
    Route("/api/sessions/{id}/files", FilesHandler),
    Route("/api/sessions/{id}/files/{path}", FileHandler),
    # Commands, background processes and terminals (handlers/commands.py).
    Route("/api/sessions/{id}/commands", CommandsHandler),
    Route("/api/sessions/{id}/processes", ProcessesHandler),
    Route("/api/sessions/{id}/processes/{pid}", ProcessHandler),
    Route("/api/sessions/{id}/processes/{pid}/output", ProcessOutputHandler),
    Route("/api/sessions/{id}/processes/{pid}/stream", ProcessStreamHandler),
    Route("/api/sessions/{id}/processes/{pid}/stdin", ProcessStdinHandler),
    Route("/api/sessions/{id}/processes/{pid}/signal", ProcessSignalHandler),
    Route("/api/sessions/{id}/terminal", TerminalSocket),
    # A session's ports from outside (handlers/proxy.py). Keyed unless the session allows
    # public access; without the key such a session answers ERA's 403, not 401.
    Route("/api/sessions/{id}/host", HostHandler),
    Route("/proxy/{id}/{port}", ProxyRootHandler),
    Route("/proxy/{id}/{port}/{proxy_path}", ProxyHandler),
    # ERA's local-agent routes (handlers/vm.py): a VM is a session.
    Route("/api/vm", VmsHandler),
    Route("/api/vms", VmListHandler),
    Route("/api/vm/{id}", VmHandler),
    Route("/api/vm/{id}/run", VmRunHandler),
    Route("/api/vm/{id}/stop", VmStopHandler),
    # Jupyter kernel gateway (server/jupyter.py): a kernel id is a session id.
    Route("/api/kernelspecs", KernelSpecsHandler),
    Route("/api/kernelspecs/{name}", KernelSpecHandler),
    Route("/api/kernels", KernelsHandler),
    Route("/api/kernels/{id}", KernelHandler),
    Route("/api/kernels/{id}/interrupt", KernelInterruptHandler),
    Route("/api/kernels/{id}/restart", KernelRestartHandler),
    Route("/api/kernels/{id}/channels", KernelChannels),
    # MCP (server/mcp_routes.py): the SDK's streamable HTTP, and ERA's own JSON-RPC endpoint.
    Route("/mcp", McpHandler),
    Route("/mcp/v1", McpV1Handler),
]

# Paths no route matches (JSON 404s; not part of the API, so not in ROUTES). Under /api/
# the key comes first, so a client without it cannot probe which routes exist; anywhere
# else the 404 is plain.
UNKNOWN_API = Route("/api/{rest}", NotFoundHandler)
# The web console's static files (handlers/console.py): a page, not part of the API, so
# not in ROUTES (nor OpenAPI); open, as every API call the page makes needs the key.
CONSOLE_ROUTE_LABEL = "/console"  # its requests' route label in the metrics
CONSOLE_ROUTES: list[tuple[str, type[RequestHandler], dict[str, Any]]] = [
    (r"/()", ConsoleHandler, {"path": str(CONSOLE_DIR), "default_filename": "index.html"}),
    (r"/console/(.+)", ConsoleHandler, {"path": str(CONSOLE_DIR)}),
]
UNKNOWN = Route("", NotFoundHandler, auth=False)

PARAM_PATTERNS = {"id": "([^/]+)", "run_id": "([^/]+)", "schedule_id": "([^/]+)", "path": "(.+)", "name": "([^/]+)",
                  "pid": "([^/]+)", "rest": "(.*)", "port": "([^/]+)", "proxy_path": "(.*)",
                  "namespace": "([^/]+)", "database": "([^/]+)", "bucket": "([^/]+)", "key": "(.+)"}


def route_pattern(template: str) -> str:
    """``/api/sessions/{id}`` -> ``/api/sessions/([^/]+)`` (tornado anchors the end itself)."""
    return re.sub(r"\{(\w+)\}", lambda m: PARAM_PATTERNS[m.group(1)], template)


def handler_args(services: Services, route: Route) -> dict[str, Any]:
    return {"services": services, "auth": route.auth}


def make_routes(services: Services) -> list[tuple[str, type[RequestHandler], dict[str, Any]]]:
    return [*CONSOLE_ROUTES, *((route_pattern(route.template), route.handler, handler_args(services, route))
                               for route in [*ROUTES, UNKNOWN_API])]
