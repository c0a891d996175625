"""The tornado Application and the server's lifecycle (start, serve, shut down).

The routes are ``routes.ROUTES``; this module only builds the Application from them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream
from tornado.web import Application, RequestHandler

from .handlers.proxy import ProxyHostHandler, proxy_host_pattern
from .logs import log, log_request, setup_logging
from .metrics import HttpMetrics
from .handlers.console import ConsoleHandler
from .routes import CONSOLE_ROUTE_LABEL, ROUTES, UNKNOWN, handler_args, make_routes
from .services import Services

SHUTDOWN_TIMEOUT_SECONDS = 30.0
WS_PING_SECONDS = 30.0


def make_app(services: Services) -> Application:
    # Counted where each request is logged; labelled by route template, never by path.
    http_metrics = HttpMetrics({**{route.handler: route.template for route in ROUTES},
                                ConsoleHandler: CONSOLE_ROUTE_LABEL})

    def log_function(handler: RequestHandler) -> None:
        log_request(handler)
        http_metrics.observe(handler)

    app = Application(
        make_routes(services),
        default_handler_class=UNKNOWN.handler,
        default_handler_args=handler_args(services, UNKNOWN),
        log_function=log_function,
        era_http_metrics=http_metrics,
        era_routes=ROUTES,  # for the OpenAPI document (handlers/meta.py)
        websocket_max_message_size=services.max_body,  # larger frames: close code 1009
        websocket_ping_interval=WS_PING_SECONDS,
        websocket_ping_timeout=WS_PING_SECONDS,
        compress_response=False,
        serve_traceback=False,
    )
    # The host form of /proxy (ERA_PROXY_HOST): every path of a session port's own host
    # name goes to that port, none to the API (tornado tries host rules before the rest).
    host_pattern = proxy_host_pattern(services.settings["ERA_PROXY_HOST"])
    if host_pattern is not None:
        app.add_handlers(host_pattern.pattern, [(r"/.*", ProxyHostHandler, handler_args(services, UNKNOWN))])
    return app


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(settings: Any, listener: socket.socket, responder: Any, boot: dict[str, Any]) -> int:
    """Run until SIGTERM/SIGINT. ``listener`` is bound and ``responder`` answering /health."""
    setup_logging(settings["ERA_LOG_LEVEL"], settings["ERA_API_KEY"])
    if not settings["ERA_API_KEY"] and not is_loopback(settings["ERA_HOST"]):
        log.warning("!!! NO API KEY: the server is bound to %s, reachable from other hosts, and anyone "
                    "who can reach it can run code. Set ERA_API_KEY or bind 127.0.0.1. !!!",
                    settings["ERA_HOST"], extra={"event": "insecure"})
    try:
        import uvloop  # libuv's event loop: less overhead per loop turn, and a run takes ~20 turns
    except ImportError:
        uvloop = None
    try:
        if uvloop is not None:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(_serve(settings, listener, responder, boot))
        return asyncio.run(_serve(settings, listener, responder, boot))
    except KeyboardInterrupt:
        return 0


# Threads for the blocking work asyncio.to_thread hands off (workspace volumes: mkfs, loop
# devices, mounts; kernel directories; fork requests to the zygote). The default pool is
# min(32, cores + 4): 6 threads on 2 cores, and a burst of 30 session starts queued on it
# (a start's steps wait on the kernel or a subprocess more than they compute). Threads are
# made only as needed. Measured: 30 creates at once, p50 -12%.
BLOCKING_THREADS = 48


async def _serve(settings: Any, listener: socket.socket, responder: Any, boot: dict[str, Any]) -> int:
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(BLOCKING_THREADS, thread_name_prefix="era-io"))
    services = Services(settings)
    services.address = listening_address(listener)
    server = HTTPServer(make_app(services), max_body_size=services.drain_limit, idle_connection_timeout=300)
    handoff = responder.stop()
    server.add_sockets([listener])
    for conn, address in handoff:  # requests that arrived before tornado: served now, bytes intact
        server.handle_stream(IOStream(conn, max_buffer_size=server.max_buffer_size), address)
    _log_listening(listener, responder, boot)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    starting = asyncio.ensure_future(services.start_engine())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if starting.done() and starting.exception() is not None:
        services.state = "failed"
        log.error("the engine failed to start; exiting", exc_info=starting.exception(), extra={"event": "failed"})
        exit_code = 1
    else:
        await stopping
    await _shutdown(services, server, starting)
    return exit_code


async def _shutdown(services: Services, server: HTTPServer, starting: asyncio.Future) -> None:
    """Stop accepting, stop kernels (which ends running code), let answers go out, close."""
    t0 = time.monotonic()
    log.info("shutting down", extra={"event": "shutdown"})
    services.state = "stopping"
    server.stop()
    for hub in list(services.hubs.values()):
        hub.close_sockets(1001, "server shutting down")
    for sockets in list(services.channels.values()):
        for channel_socket in list(sockets):
            channel_socket.close(1001, "server shutting down")
    if not starting.done():
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
    try:
        await asyncio.wait_for(services.shutdown_engine(), SHUTDOWN_TIMEOUT_SECONDS)
    except Exception:
        log.exception("engine shutdown failed", extra={"event": "error"})
    # Runs cut short by the shutdown still answer their callers; give them a moment.
    deadline = time.monotonic() + 2.0
    while services.tasks and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)
    try:
        await asyncio.wait_for(server.close_all_connections(), 5.0)
    except asyncio.TimeoutError:
        pass
    log.info("stopped", extra={"event": "stopped", "duration_ms": round((time.monotonic() - t0) * 1000, 1)})


def listening_address(listener: socket.socket) -> str:
    """The URL this server is reached at, as other replicas see it: a wildcard bind is
    named by the host's name."""
    host, port = listener.getsockname()[:2]
    if ipaddress.ip_address(host).is_unspecified:
        host = socket.gethostname()
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _log_listening(listener: socket.socket, responder: Any, boot: dict[str, Any]) -> None:
    host, port = listener.getsockname()[:2]
    now = time.monotonic()
    age_at_main = boot.get("age_at_main_ms")

    def since_process_start(moment: float) -> float | None:
        if age_at_main is None:
            return None
        return round(age_at_main + (moment - boot["main_started"]) * 1000, 1)

    log.info("listening on %s:%s", host, port, extra={
        "event": "listening", "host": host, "port": port,
        "bound_ms": since_process_start(boot["bound"]),  # /health answers from here on
        "tornado_ms": since_process_start(now),
        "bound_after_main_ms": round((boot["bound"] - boot["main_started"]) * 1000, 1),
        "early_health_answers": responder.answered,
    })
