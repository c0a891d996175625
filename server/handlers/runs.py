"""Runs: JSON result (``/run``, ``/api/execute``) and Server-Sent Events (``/stream``).

All three go through the same engine call; only the framing differs. A client that
disconnects does not stop its run: the run finishes, is recorded and logged.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from era_kernel.errors import EraError
from tornado.iostream import StreamClosedError

from ..apidoc import Op
from ..errors import NotReady, http_status
from ..logs import log_run
from .base import BaseHandler, dumps

SSE_EVENTS = frozenset({"setup", "stdout", "stderr", "display", "error", "done"})
KEEPALIVE_SECONDS = 15.0  # a comment line keeps proxies from closing a quiet stream
_END = object()
_GONE = object()


class ExecuteHandler(BaseHandler):
    API = {"post": Op("One-shot run in a fresh kernel", body="ExecuteRequest", response="RunResult",
                      errors=(400, 413, 422, 429, 503))}

    async def post(self) -> None:
        result = await self.engine.execute(self.json_body())
        log_run(None, result, "execute")
        self.send_json(result)


class RunHandler(BaseHandler):
    SESSION_ROUTE = True
    API = {"post": Op("Run code in the session's kernel", body="RunRequest", response="RunResult",
                      errors=(400, 404, 409, 413, 429, 503),
                      description="Without `code`, runs the session's stored program (`PUT .../code`).")}

    async def post(self, sid: str) -> None:
        result = await self.engine.run(sid, self.json_body())
        log_run(sid, result, "rest")
        self.send_json(result)


def sse_frame(event: dict[str, Any]) -> str:
    # json.dumps never emits a raw newline, so one data line per event is enough.
    return f"event: {event['type']}\ndata: {dumps(event)}\n\n"


class StreamHandler(BaseHandler):
    SESSION_ROUTE = True
    API = {"post": Op("Run code, streaming output as Server-Sent Events", body="RunRequest", response="sse",
                      errors=(400, 404, 409, 413, 429, 503),
                      description="Events: `stdout`/`stderr` {type, content}, `display` {type, data, metadata}, "
                                  "`error` {type, ename, evalue, traceback}, and last `done` {type, exit_code, "
                                  "duration, duration_ms, timed_out, truncated}. Each is flushed as the kernel "
                                  "emits it. Errors found before the run starts are ordinary JSON errors.")}

    _queue: asyncio.Queue | None = None

    async def post(self, sid: str) -> None:
        body = self.json_body()
        queue: asyncio.Queue = asyncio.Queue()
        self._queue = queue
        started = time.monotonic()
        # The run belongs to the server, not to this connection: it survives a disconnect.
        run = self.services.spawn(self._run(sid, body, queue))
        streaming = False
        done_sent = False
        while True:
            try:
                first = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
            except asyncio.TimeoutError:
                first = None
            items = [first] if first is not None else []
            while not queue.empty():
                items.append(queue.get_nowait())
            frames: list[str] = []
            end = gone = False
            for item in items:
                if item is _GONE:
                    gone = True
                elif item is _END:
                    end = True
                elif item.get("type") in SSE_EVENTS:
                    frames.append(sse_frame(item))
                    done_sent = done_sent or item["type"] == "done"
            if gone:
                return
            if end:
                error = run.exception() if not run.cancelled() else NotReady("the server is shutting down")
                if error is not None and not streaming:
                    raise error  # nothing sent yet: an ordinary JSON error
                frames.extend(self._closing_frames(run, error, done_sent, started))
            elif first is None:
                frames.append(": keepalive\n\n")
            if not streaming:
                # Any activity (the run's first event, even one not forwarded) or a quiet
                # spell starts the stream: validation is over by then.
                self._start_stream()
                streaming = True
            if not await self._send("".join(frames)):
                return
            if end:
                self.finish()
                return

    async def _run(self, sid: str, body: Any, queue: asyncio.Queue) -> dict[str, Any]:
        try:
            result = await self.engine.run(sid, body, on_event=queue.put_nowait)
            log_run(sid, result, "sse")
            return result
        finally:
            queue.put_nowait(_END)

    def _closing_frames(self, run: asyncio.Task, error: BaseException | None, done_sent: bool,
                        started: float) -> list[str]:
        """After the run: an error event if the engine failed mid-stream, and a `done` if none came."""
        from era_kernel.kernel.outputs import format_duration

        frames = []
        if error is not None:
            message = error.message if isinstance(error, EraError) else "internal server error"
            status = http_status(error)
            frames.append(sse_frame({"type": "error", "ename": type(error).__name__, "evalue": message,
                                     "traceback": [], "status_code": status}))
        if not done_sent:
            elapsed = time.monotonic() - started
            result = run.result() if error is None else {}
            frames.append(sse_frame({"type": "done", "exit_code": result.get("exit_code", 1),
                                     "duration": result.get("duration", format_duration(elapsed)),
                                     "duration_ms": result.get("duration_ms", round(elapsed * 1000, 3))}))
        return frames

    def _start_stream(self) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache, no-store")
        self.set_header("X-Accel-Buffering", "no")  # tell reverse proxies not to buffer
        stream = getattr(self.request.connection, "stream", None)
        if stream is not None:
            stream.set_nodelay(True)  # small frames go out now, not after Nagle's 40 ms

    async def _send(self, text: str) -> bool:
        try:
            if text:
                self.write(text)
            await self.flush()
            return True
        except StreamClosedError:
            return False

    def on_connection_close(self) -> None:
        if self._queue is not None:
            self._queue.put_nowait(_GONE)
