"""One process of a session, as the server tracks it: its identity, state, and the
bounded ring of its output that ``GET .../processes/{pid}/output?after=N`` and the
streams read.

Output is kept as events ``{seq, stream, data}`` numbered from 1; past ``limit``
characters the oldest are dropped (a reader asking for a seq no longer held is told
``dropped``), so a process printing without end costs the server a fixed amount. Live
listeners (SSE streams, WebSockets, a terminal) get every chunk as it comes.
"""

from __future__ import annotations

import asyncio
import codecs
import time
from collections import deque
from typing import Any, Callable

from ..engine.results import utc_now

Listener = Callable[[dict[str, Any]], None]


class Process:
    def __init__(self, key: int, argv: list[str], kind: str, limit: int) -> None:
        self.key = key  # the supervisor's id for it
        self.argv = argv
        self.kind = kind  # command | background | terminal
        self.pid: int | None = None  # in the sandbox's pid namespace (the kernel's)
        self.started = utc_now()
        self.began = time.perf_counter()
        self.state = "starting"  # starting | running | exited | killed | failed
        self.exit_code: int | None = None
        self.reason: str | None = None  # why it ended when it did not exit by itself
        self.ended_at: str | None = None
        self.limit = limit
        self.journal_id: str | None = None  # where its record and output are kept (history.py)
        self.events: deque[dict[str, Any]] = deque()
        self.held = 0  # characters in self.events
        self.seq = 0
        self.listeners: list[Listener] = []
        self.started_event = asyncio.Event()
        self.done = asyncio.Event()
        self.changed = asyncio.Event()  # set on every new event, for long-polls
        self._decoders = {name: codecs.getincrementaldecoder("utf-8")(errors="replace") for name in ("stdout", "stderr")}

    @property
    def running(self) -> bool:
        return self.state in ("starting", "running")

    def duration_ms(self) -> float:
        return round((time.perf_counter() - self.began) * 1000, 3)

    # ---- fed by the service ------------------------------------------------------------------
    def output(self, stream: str, raw: bytes) -> None:
        for listener in list(self.listeners):
            listener({"type": "raw", "stream": stream, "data": raw})  # terminals want the bytes
        text = self._decoders[stream].decode(raw)
        if text:
            self._append({"type": stream, "content": text})

    def started_as(self, pid: int) -> None:
        self.pid, self.state, self.began = pid, "running", time.perf_counter()
        for listener in list(self.listeners):  # before any of its output: same turn of the loop
            listener({"type": "start", "pid": pid})
        self.started_event.set()

    def ended(self, state: str, exit_code: int | None, reason: str | None = None) -> None:
        if not self.running:
            return
        for name, decoder in self._decoders.items():
            tail = decoder.decode(b"", final=True)
            if tail:
                self._append({"type": name, "content": tail})
        self.state, self.exit_code, self.reason, self.ended_at = state, exit_code, reason, utc_now()
        self._append({"type": "exit", "exit_code": exit_code, "state": state, "reason": reason,
                      "duration_ms": self.duration_ms()})
        self.started_event.set()
        self.done.set()

    def _append(self, event: dict[str, Any]) -> None:
        self.seq += 1
        event = {**event, "seq": self.seq, "pid": self.pid}
        self.events.append(event)
        self.held += len(event.get("content", ""))
        while self.held > self.limit and len(self.events) > 1:
            self.held -= len(self.events.popleft().get("content", ""))
        for listener in list(self.listeners):
            listener(event)
        self.changed.set()
        self.changed = asyncio.Event()

    # ---- read by handlers --------------------------------------------------------------------
    def read(self, after: int, limit: int = 1000) -> dict[str, Any]:
        first = self.events[0]["seq"] if self.events else self.seq + 1
        out = [e for e in self.events if e["seq"] > after][:limit]
        return {"pid": self.pid, "state": self.state, "exit_code": self.exit_code, "events": out,
                "next": out[-1]["seq"] if out else max(after, first - 1),
                "dropped": after + 1 < first}  # some events after `after` are no longer held

    def document(self) -> dict[str, Any]:
        return {"pid": self.pid, "cmd": self.argv, "kind": self.kind, "started": self.started, "state": self.state,
                "exit_code": self.exit_code, "ended": self.ended_at, "reason": self.reason,
                "output_seq": self.seq}
