"""Shared pieces of the server tests (no tests here): a real ``python -m era_server``
process on a random loopback port with real kernels, and small HTTP helpers.
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


class ServerProcess:
    """``python -m era_server --port 0``; the port is read from its "listening" log line."""

    def __init__(self, env: dict[str, str] | None = None, args: list[str] | None = None) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="era-srv-")
        # Short runtime dir: kernel IPC socket paths must fit in 107 bytes.
        self.runtime = tempfile.mkdtemp(prefix="e", dir="/tmp")
        self.env = dict(os.environ, ERA_DATA_DIR=str(Path(self.tmp.name) / "data"), ERA_RUNTIME_DIR=self.runtime,
                        ERA_LOG_LEVEL="INFO", **(env or {}))
        for name in ("ERA_API_KEY", "ERA_ALLOWED_ORIGINS", "ERA_MAX_BODY"):
            if env is None or name not in env:
                self.env.pop(name, None)
        self.args = args or []
        self.lines: list[str] = []
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self._listening = threading.Event()

    def start(self, wait_ready: bool = True) -> "ServerProcess":
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "era_server", "--port", "0", *self.args],
                                     env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read_logs, daemon=True).start()
        if not self._listening.wait(20):
            self.stop()
            raise RuntimeError("server did not log 'listening':\n" + "\n".join(self.lines))
        if wait_ready:
            self.wait_ready()
        return self

    def _read_logs(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if '"event": "listening"' in line:
                self.port = json.loads(line)["port"]
                self._listening.set()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, body = self.request("GET", "/health")
            if status == 200 and json.loads(body)["ready"]:
                return
            time.sleep(0.05)
        raise RuntimeError("server not ready:\n" + "\n".join(self.lines[-20:]))

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

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def cleanup(self) -> None:
        self.stop()
        self.tmp.cleanup()
        subprocess.run(["rm", "-rf", self.runtime], check=False)


def assert_error_shape(status: int, body: bytes, expected: int | tuple[int, ...] | None = None) -> dict:
    """The one error shape: {"error": sentence, "status_code": status, "field"?}, no traceback."""
    assert b"Traceback" not in body and b'File "' not in body, body[:500]
    doc = json.loads(body)
    assert isinstance(doc, dict), doc
    assert set(doc) <= {"error", "status_code", "field"}, doc
    assert isinstance(doc["error"], str) and doc["error"], doc
    assert doc["status_code"] == status, (status, doc)
    if expected is not None:
        allowed = expected if isinstance(expected, tuple) else (expected,)
        assert status in allowed, (status, doc)
    assert status < 500 or status == 503, (status, doc)
    return doc


def sample_path(template: str, session_id: str = "absent-session", file_path: str = "f.txt") -> str:
    return template.replace("{id}", session_id).replace("{path}", file_path)



_SHARED: dict[str, ServerProcess] = {}
MAIN_ENV = {"ERA_MAX_BODY": str(1024 * 1024)}  # small, so 413 and WebSocket 1009 are cheap to reach


def shared_server(name: str = "main", env: dict[str, str] | None = None) -> ServerProcess:
    """One server per name for the whole test run (starting one costs a second of a 2-core box)."""
    server = _SHARED.get(name)
    if server is None or (server.proc is not None and server.proc.poll() is not None):
        server = _SHARED[name] = ServerProcess(env=MAIN_ENV if env is None else env).start()
        atexit.register(server.cleanup)
    return server
