"""Runs: JSON result (``/run``, ``/api/execute``), Server-Sent Events (``/stream``), and
runs as records (``/runs/{run_id}``: status, cancel, and the journal of its events).

All three ways of running go through the same engine call; only the framing differs. A
client that disconnects does not stop its run: the run finishes, is recorded and logged,
and its events stay in the journal, so the client can read them again from any offset
(``/runs/{run_id}/events?after=N``, or as SSE with ``Last-Event-ID``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from era_kernel.errors import BadRequest, EraError

from ..apidoc import Op
from ..tenancy import check_run
from ..errors import NotReady, http_status
from ..logs import log_run
from .base import BaseHandler
from .sse import END, GONE, KEEPALIVE_SECONDS, SseHandler, sse_frame

SSE_EVENTS = frozenset({"setup", "stdout", "stderr", "display", "error", "done"})


class ExecuteHandler(BaseHandler):
    API = {"post": Op("One-shot run in a fresh kernel", body="ExecuteRequest", response="RunResult",
                      errors=(400, 413, 422, 429, 503))}

    async def post(self) -> None:
        body = self.json_body()
        await check_run(self.services, self.tenant, None)
        result = await self.engine.execute(body)
        log_run(None, result, "execute")
        self.send_json(result)


class RunHandler(BaseHandler):
    SESSION_ROUTE = True
    API = {"post": Op("Run code in the session's kernel", body="RunRequest", response="RunResult",
                      also=((202, "RunAccepted"),),
                      errors=(400, 404, 409, 413, 429, 503),
                      description="Without `code`, runs the session's stored program (`PUT .../code`). With "
                                  "`\"background\": true` the answer is 202 at once, `{run_id, status, position}` "
                                  "(RunAccepted): follow it with GET .../runs/{run_id} and .../events; past "
                                  "ERA_RUN_QUEUE_MAX waiting runs, 429 with Retry-After.")}

    async def post(self, sid: str) -> None:
        body = self.json_body()
        await check_run(self.services, self.tenant, sid)
        result = await self.engine.run(sid, body)
        if isinstance(body, dict) and body.get("background") is True:
            self.send_json(result, status=202)  # accepted: {run_id, status, position}
            return
        log_run(sid, result, "rest")
        self.send_json(result)


class StreamHandler(SseHandler):
    SESSION_ROUTE = True
    API = {"post": Op("Run code, streaming output as Server-Sent Events", body="RunRequest", response="sse",
                      errors=(400, 404, 409, 413, 429, 503),
                      description="Events: `stdout`/`stderr` {type, content}, `display` {type, data, metadata}, "
                                  "`error` {type, ename, evalue, traceback}, and last `done` {type, exit_code, "
                                  "duration, duration_ms, timed_out, truncated}. Each is flushed as the kernel "
                                  "emits it, with `id:` = its journal seq. Errors found before the run starts are "
                                  "ordinary JSON errors. The `X-Era-Run-Id` header names the run: a client that "
                                  "lost the stream resumes with GET .../runs/{run_id}/events and `Last-Event-ID`.")}

    _queue: asyncio.Queue | None = None

    async def post(self, sid: str) -> None:
        from era_kernel.engine.results import new_run_id  # loaded with the engine

        body = self.json_body()
        await check_run(self.services, self.tenant, sid)  # an ordinary JSON 429, before the stream
        queue: asyncio.Queue = asyncio.Queue()
        self._queue = queue
        started = time.monotonic()
        run_id = new_run_id()
        # The run belongs to the server, not to this connection: it survives a disconnect.
        run = self.services.spawn(self._run(sid, body, queue, run_id))
        done_sent = False

        def frame(item: dict[str, Any]) -> str | None:
            nonlocal done_sent
            if item.get("type") not in SSE_EVENTS:
                return None  # still activity: it starts the stream (validation is over by then)
            done_sent = done_sent or item["type"] == "done"
            return sse_frame(item)

        await self.relay(queue, run, frame, lambda error: self._closing_frames(run, error, done_sent, started),
                         NotReady("the server is shutting down"), run_id)

    async def _run(self, sid: str, body: Any, queue: asyncio.Queue, run_id: str) -> dict[str, Any]:
        try:
            if isinstance(body, dict) and body.get("background"):
                raise BadRequest("a stream follows its run: send 'background' to /run, not /stream",
                                 field="background")
            result = await self.engine.run(sid, body, on_event=queue.put_nowait, run_id=run_id, fresh_id=True,
                                           source="sse")
            log_run(sid, result, "sse")
            return result
        finally:
            queue.put_nowait(END)

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

    def on_connection_close(self) -> None:
        if self._queue is not None:
            self._queue.put_nowait(GONE)


# ---- runs as records ----------------------------------------------------------------------
RUN_ERRORS = (400, 401, 404, 503)
FINISHED = frozenset({"completed", "failed", "cancelled", "interrupted"})  # engine/tickets.py, not imported here
MAX_WAIT_SECONDS = 60.0


class RunRecordHandler(BaseHandler):
    SESSION_ROUTE = True
    API = {"get": Op("A run's record: status, timestamps, reason; its result once it ended", response="RunState",
                     errors=RUN_ERRORS,
                     description="`status` is queued, running, completed, failed, cancelled or interrupted (with "
                                 "`reason`). Once ended, the record holds the same result document a "
                                 "synchronous run answers."),
           "delete": Op("Cancel the run: a queued run is dropped, a running one interrupted", response="RunState",
                        errors=RUN_ERRORS,
                        description="A finished run is left as it is. Disconnecting never cancels a run; this does.")}

    async def get(self, sid: str, run_id: str) -> None:
        self.send_json(await self.engine.get_run(sid, run_id))

    async def delete(self, sid: str, run_id: str) -> None:
        self.send_json(await self.engine.cancel_run(sid, run_id))


class RunEventsHandler(SseHandler):
    SESSION_ROUTE = True
    API = {"get": Op("The run's journal: its events after an offset, as JSON or a Server-Sent Events stream",
                     response="RunEvents", errors=RUN_ERRORS,
                     query={"after": "return events with seq greater than this (default 0; for SSE the "
                                     "Last-Event-ID header wins)",
                            "wait": "seconds (up to 60) to wait for an event when there is none yet (long-poll)",
                            "limit": "most events to return, 1-10000 (default 1000)"},
                     description="With `Accept: text/event-stream` the answer is a stream: every event after "
                                 "`after`, then the live ones, each with `id:` = its seq, ending once the run "
                                 "has ended. Nothing is lost or doubled across reconnects.")}

    _closed = False

    async def get(self, sid: str, run_id: str) -> None:
        limit = self.int_query("limit", 1000, 1, 10_000)
        wait = self._wait()
        stream = "text/event-stream" in self.request.headers.get("Accept", "")
        after = self._after(stream)
        if stream:
            await self.engine.get_run(sid, run_id)  # 404 as JSON, before the stream starts
            await self._follow(sid, run_id, after)
            return
        events = await self.engine.run_events(sid, run_id, after, limit=limit, wait=wait)
        record = await self.engine.get_run(sid, run_id)
        self.send_json({"session_id": sid, "run_id": run_id, "status": record["status"], "events": events,
                        "last_seq": events[-1]["seq"] if events else after})

    def _after(self, stream: bool) -> int:
        last_event_id = self.request.headers.get("Last-Event-ID") if stream else None
        if last_event_id is not None:
            if not last_event_id.strip().isdigit():
                raise BadRequest("header 'Last-Event-ID' must be an event seq (a non-negative integer)",
                                 field="Last-Event-ID")
            return int(last_event_id)
        return self.int_query("after", 0, 0, 2**62) or 0

    def _wait(self) -> float:
        raw = self.query("wait")
        if raw is None:
            return 0.0
        try:
            wait = float(raw)
        except ValueError:
            wait = -1.0
        if not 0 <= wait <= MAX_WAIT_SECONDS:
            raise BadRequest(f"query parameter 'wait' must be a number of seconds from 0 to {MAX_WAIT_SECONDS:g}",
                             field="wait")
        return wait

    async def _follow(self, sid: str, run_id: str, after: int) -> None:
        """Replay from ``after``, then live, until the run has ended and every event of it
        was sent."""
        self.start_stream(run_id)
        if not await self.send_frames(""):
            return
        saw_done = False
        while not self._closed:
            events = await self.engine.run_events(sid, run_id, after, limit=1000,
                                                  wait=0.2 if saw_done else KEEPALIVE_SECONDS)
            if events:
                after = events[-1]["seq"]
                saw_done = saw_done or any(e.get("type") == "done" for e in events)
                if not await self.send_frames("".join(sse_frame(e) for e in events)):
                    return
                if len(events) == 1000:
                    continue  # more are waiting
            record = await self.engine.get_run(sid, run_id)
            if record["status"] in FINISHED:
                # The final record is written after the run's last events (runner), so
                # one more read finds any that came with it.
                rest = await self.engine.run_events(sid, run_id, after, limit=10_000)
                await self.send_frames("".join(sse_frame(e) for e in rest))
                break
            if not events and not await self.send_frames(": keepalive\n\n"):
                return
        if not self._closed:
            self.finish()

    def on_connection_close(self) -> None:
        self._closed = True
