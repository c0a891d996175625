"""The clients the benchmarks time: keep-alive HTTP (ERA's REST API and the gateway's),
ERA's run WebSocket, and a Kernel Gateway channels WebSocket. Each returns when the run
is over, with the time to its first output and its total."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from tornado.websocket import websocket_connect

from measure import TIMEOUT

LOOPBACK = "127.0.0.1"
CODE = "print(1)"  # what every round trip runs; its output is checked
STREAM_CODE = "import time\nprint('first', flush=True)\ntime.sleep(0.02)"  # output that comes before the end


class Http:
    """Keep-alive HTTP/1.1 with JSON bodies over asyncio streams (one request at a time):
    one client for ERA and the gateway, light enough that twenty drive the load test."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: Any = None, timeout: float = TIMEOUT) -> tuple[int, Any]:
        try:
            return await asyncio.wait_for(self._request(method, path, body), timeout)
        except BaseException:
            self.close()  # a half-read response leaves the connection unusable
            raise

    async def _request(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(LOOPBACK, self.port)
        assert self.reader is not None
        data = b"" if body is None else json.dumps(body).encode()
        self.writer.write(f"{method} {path} HTTP/1.1\r\nHost: {LOOPBACK}:{self.port}\r\n"
                          f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head[1:] if ":" in line)}
        if status in (204, 304) or method == "HEAD":
            payload = b""
        elif "content-length" in headers:
            payload = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            payload = b""
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                payload += (await self.reader.readexactly(size + 2))[:-2]
            await self.reader.readuntil(b"\r\n")
        else:
            payload = await self.reader.read()
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close":
            self.close()
        try:
            return status, json.loads(payload) if payload else None
        except ValueError:
            return status, payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def once(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One request on its own connection (setup and teardown, never timed)."""
    http = Http(port)
    try:
        return await http.request(method, path, body)
    finally:
        http.close()


class EraSocket:
    """ERA's ``/api/sessions/{id}/ws``: run -> output messages -> done."""

    def __init__(self, port: int, session_id: str) -> None:
        self.url = f"ws://{LOOPBACK}:{port}/api/sessions/{session_id}/ws"
        self.ws = None

    async def connect(self) -> "EraSocket":
        self.ws = await websocket_connect(self.url)
        await self.ws.read_message()  # hello
        return self

    async def execute(self, code: str) -> tuple[float, float]:
        """(seconds to the first stdout message, to done). Read to the end even when timing
        the first byte: runs queue on a session."""
        run_id = uuid.uuid4().hex
        t0 = time.perf_counter()
        first = float("nan")
        self.ws.write_message(json.dumps({"type": "run", "id": run_id, "code": code}))
        while True:
            raw = await self.ws.read_message()
            if raw is None:
                raise ConnectionError("ERA WebSocket closed")
            message = json.loads(raw)
            if message.get("id") != run_id:
                continue
            if message["type"] == "stdout" and first != first:
                first = time.perf_counter() - t0
            if message["type"] == "done":
                return first, time.perf_counter() - t0

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()


class KgKernel:
    """One WebSocket on the gateway's ``/api/kernels/{id}/channels``; runs multiplexed by msg_id."""

    def __init__(self, port: int, kernel_id: str) -> None:
        self.port, self.kernel_id = port, kernel_id
        self.session = uuid.uuid4().hex
        self.pending: dict[str, asyncio.Queue] = {}
        self.ws = None
        self.reader: asyncio.Task | None = None

    async def connect(self) -> "KgKernel":
        self.ws = await websocket_connect(f"ws://{LOOPBACK}:{self.port}/api/kernels/{self.kernel_id}/channels")
        self.reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        while True:
            raw = await self.ws.read_message()
            if raw is None:
                for queue in self.pending.values():
                    queue.put_nowait(None)
                return
            msg = json.loads(raw)
            queue = self.pending.get((msg.get("parent_header") or {}).get("msg_id"))
            if queue is not None:
                queue.put_nowait(msg)

    async def execute(self, code: str) -> tuple[float, float, str]:
        """(seconds to the first stream message, to reply + idle, stdout)."""
        msg_id = uuid.uuid4().hex
        queue = self.pending[msg_id] = asyncio.Queue()
        message = {"header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "bench",
                              "session": self.session, "version": "5.3", "date": ""},
                   "parent_header": {}, "metadata": {}, "channel": "shell",
                   "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                               "allow_stdin": False, "stop_on_error": True}}
        t0 = time.perf_counter()
        first, out, replied, idle = float("nan"), [], False, False
        try:
            self.ws.write_message(json.dumps(message))
            while not (replied and idle):
                msg = await asyncio.wait_for(queue.get(), TIMEOUT)
                if msg is None:
                    raise ConnectionError("gateway WebSocket closed")
                kind = msg["msg_type"]
                if kind == "stream":
                    if first != first:
                        first = time.perf_counter() - t0
                    out.append(msg["content"]["text"])
                elif kind == "execute_reply":
                    replied = True
                elif kind == "status" and msg["content"]["execution_state"] == "idle":
                    idle = True
            return first, time.perf_counter() - t0, "".join(out)
        finally:
            del self.pending[msg_id]

    def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        if self.ws is not None:
            self.ws.close()
