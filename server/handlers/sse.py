"""Server-Sent Events: the framing every stream shares (``/stream``, a run's events,
``POST .../commands?stream=true``, a process's output), and the relay from a producer's
queue to the client for the streams whose producer is a task of the server's.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from tornado.iostream import StreamClosedError

from .base import BaseHandler, dumps

KEEPALIVE_SECONDS = 15.0  # a comment line keeps proxies from closing a quiet stream
END = object()  # the producer put its last item
GONE = object()  # the client went away (on_connection_close)


def sse_frame(event: dict[str, Any]) -> str:
    # json.dumps never emits a raw newline, so one data line per event is enough. The
    # id is the event's journal seq: a client that reconnects sends it as Last-Event-ID.
    seq = event.get("seq")
    head = f"id: {seq}\n" if seq is not None else ""
    return f"{head}event: {event['type']}\ndata: {dumps(event)}\n\n"


class SseHandler(BaseHandler):
    """Framing shared by the streams: headers, writes that notice a gone client."""

    def start_stream(self, run_id: str | None = None) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache, no-store")
        self.set_header("X-Accel-Buffering", "no")  # tell reverse proxies not to buffer
        if run_id is not None:
            self.set_header("X-Era-Run-Id", run_id)  # where to resume: GET .../runs/{run_id}/events
        stream = getattr(self.request.connection, "stream", None)
        if stream is not None:
            stream.set_nodelay(True)  # small frames go out now, not after Nagle's 40 ms

    async def send_frames(self, text: str) -> bool:
        try:
            if text:
                self.write(text)
            await self.flush()
            return True
        except StreamClosedError:
            return False

    async def relay(self, queue: asyncio.Queue, task: asyncio.Task, frame: Callable[[Any], str | None],
                    closing: Callable[[BaseException | None], list[str]], shutting_down: BaseException,
                    run_id: str | None = None) -> None:
        """Send what ``task`` puts on ``queue`` (``frame`` turns an item into a frame, or
        None to leave it out) until it puts ``END``, then ``closing(error)``'s frames.

        The stream starts at the first item or quiet spell, so an error the task raises
        before anything was sent is an ordinary JSON error; later, ``closing`` frames it.
        ``GONE`` on the queue ends the relay silently (the task carries on: it belongs to
        the server). A quiet stream gets a keepalive comment every KEEPALIVE_SECONDS."""
        streaming = False
        while True:
            try:
                first = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
            except asyncio.TimeoutError:
                first = None
            items = [first] if first is not None else []
            while not queue.empty():
                items.append(queue.get_nowait())
            if any(item is GONE for item in items):
                return
            end = any(item is END for item in items)
            frames = [text for item in items if item is not END and (text := frame(item)) is not None]
            if end:
                error = task.exception() if not task.cancelled() else shutting_down
                if error is not None and not streaming:
                    raise error  # nothing sent yet: an ordinary JSON error
                frames.extend(closing(error))
            elif first is None:
                frames.append(": keepalive\n\n")
            if not streaming:
                self.start_stream(run_id)
                streaming = True
            if not await self.send_frames("".join(frames)):
                return
            if end:
                self.finish()
                return
