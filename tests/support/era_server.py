"""A real ``python -m era_server`` process on loopback, in throwaway directories, with real
kernels: started, waited for, talked to over HTTP, and stopped. The one way tests and
benchmarks start the server.
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .loopback import stop_process, wait_answering
from era_kernel.workspaces.volumes import release_everything_under


class ServerProcess:
    """``python -m era_server --port PORT`` with its stderr (JSON log lines) kept in ``lines``.

    With port 0, the default, the server picks a free port and we read it from its
    "listening" log line, so nothing can take the port between choosing and binding; that
    line is logged at INFO. A fixed port (``loopback.free_port()``) is for callers that
    must reach the server before that line (the time to the first /health) or that log at
    WARNING (benchmarks: an INFO access line per request costs the server time).
    """

    def __init__(self, env: dict[str, str] | None = None, args: list[str] | None = None, port: int = 0,
                 log_level: str = "INFO") -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="era-srv-")
        # Short runtime dir: kernel IPC socket paths must fit in 107 bytes.
        self.runtime = tempfile.mkdtemp(prefix="e", dir="/tmp")
        # ``env`` wins, ERA_DATA_DIR included (a restarted server on the same data directory).
        # No stock of workspace volumes made ahead (each test server's would be ~0.5 CPU-seconds
        # of mkfs nobody uses; tests/test_workspace_volumes.py tests it, the benchmarks turn it on),
        # and a pool of two, not the default's twelve forked kernels (1.3 CPU-seconds a server;
        # tests/test_engine_pool.py tests the default, the benchmarks use it).
        self.env = {**os.environ, "ERA_DATA_DIR": str(Path(self.tmp.name) / "data"), "ERA_RUNTIME_DIR": self.runtime,
                    "ERA_LOG_LEVEL": log_level, "ERA_WORKSPACE_VOLUME_STOCK": "0", "ERA_POOL_SIZE": "2",
                    **(env or {})}
        for name in ("ERA_API_KEY", "ERA_ALLOWED_ORIGINS", "ERA_MAX_BODY"):
            if env is None or name not in env:
                self.env.pop(name, None)
        self.args = args or []
        self.requested_port = port
        self.port: int | None = port or None
        self.lines: list[str] = []
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.listen_s = self.ready_s = 0.0  # from process start to listening, to /health "ready"
        self._listening = threading.Event()
        self._reader: threading.Thread | None = None

    # ---- starting ---------------------------------------------------------------------------
    def launch(self) -> "ServerProcess":
        """Start the process and return at once."""
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "era_server", "--port", str(self.requested_port),
                                      *self.args], env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self._reader = threading.Thread(target=self._read_logs, daemon=True)
        self._reader.start()
        return self

    def start(self, wait_ready: bool = True, ready_timeout: float = 30) -> "ServerProcess":
        """Launch, wait until it listens and (by default) until /health says ready."""
        self.launch()
        try:
            self.wait_listening()
            if wait_ready:
                self.wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _read_logs(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if '"event": "listening"' in line:
                self.port = json.loads(line)["port"]
                self._listening.set()

    def wait_listening(self, timeout: float = 20) -> None:
        assert self.proc is not None
        if self.requested_port:
            # Tight polling: benchmarks time this (the goal is 100 ms).
            wait_answering(lambda: self.health() is not None, self.proc, timeout, "era_server", interval=0.002,
                           details=self.log_tail)
        elif not self._listening.wait(timeout):
            raise RuntimeError("server did not log 'listening':\n" + "\n".join(self.lines))
        self.listen_s = time.perf_counter() - self.started_at

    def wait_ready(self, timeout: float = 30) -> None:
        assert self.proc is not None
        wait_answering(lambda: (self.health() or {}).get("ready") is True, self.proc, timeout, "era_server (ready)",
                       interval=0.02, details=self.log_tail)
        self.ready_s = time.perf_counter() - self.started_at

    def health(self) -> dict | None:
        """/health's document, or None while nothing answers."""
        try:
            status, body = self.request("GET", "/health", timeout=2)
        except (OSError, http.client.HTTPException):
            return None
        return json.loads(body) if status == 200 else None

    # ---- talking to it ----------------------------------------------------------------------
    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_base(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def log_tail(self, count: int = 20) -> str:
        return "\n".join(self.lines[-count:])

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                timeout: float = 60) -> tuple[int, bytes]:
        status, _, data = self.request_full(method, path, body, headers, timeout)
        return status, data

    def request_full(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                     timeout: float = 60) -> tuple[int, http.client.HTTPMessage, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            if body is not None and not isinstance(body, (bytes, str)):
                body = json.dumps(body)
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.headers, response.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
             expect: int | None = 200, timeout: float = 60) -> Any:
        status, data = self.request(method, path, body, headers, timeout)
        if expect is not None:
            assert status == expect, (status, data[:2000])
        return json.loads(data)

    def descendants(self) -> set[int]:
        """Every process below the server (kernels, sandboxes), from /proc."""
        assert self.proc is not None
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
        found: set[int] = set()
        stack = [self.proc.pid]
        while stack:
            for child in children.get(stack.pop(), []):
                found.add(child)
                stack.append(child)
        return found

    # ---- stopping ---------------------------------------------------------------------------
    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40) -> int | None:
        """Signal the server and wait for it (killed after ``timeout``); its exit code."""
        if self.proc is None:
            return None
        code = stop_process(self.proc, sig, timeout)
        if self._reader is not None:
            self._reader.join(5)  # the last log lines (kernels holding stderr open could delay EOF)
        return code

    def cleanup(self) -> None:
        """Stop the server, kill whatever it left running, remove its directories."""
        left = self.descendants() if self.proc is not None and self.proc.poll() is None else set()
        self.stop()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass  # gone already, as it should be
        # Workspace volumes a killed server (or a later one on the same data directory,
        # still running) has mounted there: a mount point cannot be removed.
        release_everything_under(Path(self.tmp.name))
        self.tmp.cleanup()
        shutil.rmtree(self.runtime, ignore_errors=True)


_SHARED: dict[str, ServerProcess] = {}
MAIN_ENV = {"ERA_MAX_BODY": str(1024 * 1024)}  # small, so 413 and WebSocket 1009 are cheap to reach


def shared_server(name: str = "main", env: dict[str, str] | None = None) -> ServerProcess:
    """One server per name for the whole test run (starting one costs a second of a 2-core box)."""
    server = _SHARED.get(name)
    if server is None or (server.proc is not None and server.proc.poll() is not None):
        server = _SHARED[name] = ServerProcess(env=MAIN_ENV if env is None else env).start()
        atexit.register(server.cleanup)
    return server
