"""Process start: bind the port and answer ``/health`` before anything heavy is imported.

Importing tornado alone takes ~150 ms on a small machine, and the engine (jupyter_client,
pydantic, the store) several hundred more. So ``main`` binds the listening socket with
the standard library first and starts ``EarlyResponder``, a thread that answers
``GET /health`` (``ready: false``) straight from the socket while the main thread
imports tornado. Any other request is not answered there: the accepted connection,
with its bytes still unread (we only peek), is handed to tornado once it is running,
and tornado's handlers then wait briefly for the engine (``handlers.base``).
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import sys
import threading
import time

HEALTH_PATH = b"/health"
PEEK_BYTES = 8192


def process_age_ms() -> float | None:
    """Milliseconds since this process was started by the OS (Linux), else None."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: starttime
        return max(0.0, (uptime - started) * 1000)
    except (OSError, ValueError, IndexError):
        return None


USAGE = """usage: era serve [--host HOST] [--port PORT] [--log-level LEVEL]

  --host HOST        address to bind (default: ERA_HOST, 127.0.0.1)
  --port PORT        port to bind, 0 for any free port (default: ERA_PORT, 8787)
  --log-level LEVEL  DEBUG, INFO, WARNING or ERROR (default: ERA_LOG_LEVEL, INFO)
"""


class UsageError(Exception):
    pass


def parse_args(argv: list[str] | None) -> dict[str, str]:
    """``--host``, ``--port``, ``--log-level`` (also ``--opt=value``); argparse costs ~10 ms
    of import and first-parse time, a tenth of the time /health has to start answering."""
    args = list(sys.argv[1:] if argv is None else argv)
    options = {"--host": "ERA_HOST", "--port": "ERA_PORT", "--log-level": "ERA_LOG_LEVEL"}
    found: dict[str, str] = {}
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            sys.stdout.write(USAGE)
            raise SystemExit(0)
        name, eq, value = arg.partition("=")
        if name not in options:
            raise UsageError(f"unknown argument {arg!r}")
        if not eq:
            if not args:
                raise UsageError(f"{name} needs a value")
            value = args.pop(0)
        found[options[name]] = value
    if "ERA_PORT" in found:
        if not found["ERA_PORT"].isdigit() or int(found["ERA_PORT"]) > 65535:
            raise UsageError(f"--port must be an integer from 0 to 65535, not {found['ERA_PORT']!r}")
        found["ERA_PORT"] = int(found["ERA_PORT"])  # type: ignore[assignment]
    return found


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; the host may be a name, IPv4 or IPv6 (``[::1]`` or ``::1``)."""
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if family == socket.AF_INET and host and not host[0].isdigit():
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.create_server((host, port), family=family, backlog=1024)
    sock.setblocking(False)
    return sock


class EarlyResponder(threading.Thread):
    """Answers /health on the bound socket until tornado takes the socket over."""

    def __init__(self, listener: socket.socket) -> None:
        super().__init__(name="era-early-health", daemon=True)
        self.listener = listener
        self.handoff: list[tuple[socket.socket, object]] = []
        self.answered = 0
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector = selectors.DefaultSelector()

    def stop(self) -> list[tuple[socket.socket, object]]:
        """Stop and return the accepted connections that tornado must serve."""
        self._wake_w.send(b"x")
        self.join()
        self._wake_r.close()
        self._wake_w.close()
        return self.handoff

    def run(self) -> None:
        sel = self._selector
        sel.register(self.listener, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "stop")
        try:
            while True:
                for key, _ in sel.select(timeout=1.0):
                    if key.data == "stop":
                        return
                    if key.data == "accept":
                        self._accept()
                    else:
                        self._serve(key.fileobj, key.data)
        finally:
            for key in list(sel.get_map().values()):
                if isinstance(key.data, tuple):  # undecided connections go to tornado
                    self.handoff.append((key.fileobj, key.data[1]))
            sel.close()

    def _accept(self) -> None:
        try:
            conn, addr = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        self._selector.register(conn, selectors.EVENT_READ, ("conn", addr))

    def _serve(self, conn: socket.socket, data: tuple) -> None:
        try:
            head = conn.recv(PEEK_BYTES, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            head = b""
        self._selector.unregister(conn)
        if not head:
            conn.close()
            return
        end = head.find(b"\r\n\r\n")
        request_line = head.split(b"\r\n", 1)[0].split(b" ")
        is_health = (end >= 0 and len(request_line) == 3 and request_line[0] in (b"GET", b"HEAD")
                     and request_line[1].split(b"?", 1)[0] == HEALTH_PATH)
        if not is_health:
            # Anything else (or a request not fully arrived yet) waits for tornado, bytes intact.
            self.handoff.append((conn, data[1]))
            return
        try:
            conn.setblocking(True)
            conn.settimeout(1.0)
            conn.recv(end + 4)  # consume exactly the request we answer
            body = b'{"status": "ok", "ready": false, "state": "starting"}'
            head_only = request_line[0] == b"HEAD"
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=UTF-8\r\n"
                         b"Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
                         b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
                         + (b"" if head_only else body))
            self.answered += 1
        except OSError:
            pass
        finally:
            conn.close()


def main(argv: list[str] | None = None) -> int:
    boot = {"main_started": time.monotonic(), "age_at_main_ms": process_age_ms()}
    try:
        overrides = parse_args(argv)
    except UsageError as exc:
        sys.stderr.write(f"{USAGE}\nerror: {exc}\n")
        return 2
    # Until the event loop installs its own handlers, a SIGTERM simply ends the process:
    # no kernel exists yet.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    from era_kernel.config import Settings

    try:
        settings = Settings.from_env()
    except ValueError as exc:
        sys.stderr.write(f'{{"level": "ERROR", "msg": "invalid setting: {exc}"}}\n')
        return 2
    if overrides:
        settings = settings.replace(**overrides)
    try:
        listener = bind(settings["ERA_HOST"], int(settings["ERA_PORT"]))
    except OSError as exc:
        sys.stderr.write('{"level": "ERROR", "msg": "cannot bind %s:%s: %s"}\n'
                         % (settings["ERA_HOST"], settings["ERA_PORT"], exc.strerror or exc))
        return 1
    boot["bound"] = time.monotonic()
    responder = EarlyResponder(listener)
    responder.start()
    try:
        from .app import serve  # tornado and the handlers: the slow part of starting

        return serve(settings, listener, responder, boot)
    except KeyboardInterrupt:
        return 0
