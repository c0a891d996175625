"""Replay for the Jupyter channels WebSocket (server/jupyter.py): what a kernel sends while
no client is connected to it is kept, bounded, for the next connection with the same
Jupyter client session id, so a client that reconnects during a long cell still shows
the cell's output and learns that it finished.

The semantics are jupyter_server's for its own kernels (``ZMQChannelsWebsocketConnection``
with ``MappingKernelManager.start_buffering`` / ``get_buffer``):

- buffering starts only when the kernel's last channels socket closes, under that
  socket's session key: the ``session_id`` query parameter JupyterLab and
  jupyter_server's GatewayClient put on the channels URL (without one, nothing could
  ever claim the buffer, so nothing is kept);
- the next socket opened on the kernel ends it, whatever its key: with the same key it
  receives the buffered messages first, in order, then the live ones; with another key
  (or none) the buffer is discarded;
- what is buffered is what the closed socket would have received: every IOPub message,
  and the shell/control/stdin replies to its own requests (the reconnected socket
  inherits those requests, so a reply still to come reaches it too).

jupyter_server keeps an unbounded list; ours is bounded by ``MAX_MESSAGES`` and
``ERA_GATEWAY_REPLAY_MAX_BYTES`` and drops the OLDEST messages first rather than
stopping: the end of a long cell (its last output, its ``execute_reply`` and the
``status: idle`` that lets the client mark it finished) is what a returning client
needs most. Output is dropped before protocol bookkeeping (replies and status messages,
a few small ones per request): without those JupyterLab would show the cell running
forever. A client that lost messages is told so by a stderr stream message in the
cell, as jupyter_server does when it rate-limits IOPub.
"""

from __future__ import annotations

import logging
import uuid
import weakref
from collections import OrderedDict, deque
from datetime import datetime, timezone
from typing import Any, Callable, Optional

from era_kernel.errors import EraError

log = logging.getLogger("era.server.jupyter")

MAX_MESSAGES = 10_000  # beside the byte bound: each message also costs its frame's and tuple's overhead
MAX_SESSION_KEY = 1024  # a Jupyter session id is a UUID; a longer key is not one, and is not kept

Frame = Any  # str (a JSON text frame) or bytes (a binary frame)
Item = tuple[int, str, Frame, dict]  # sequence number, channel, frame, the message's parent header
# (channel, msg, the socket's tracked requests) -> the frame to send, or None when not this socket's
Outgoing = Callable[[str, dict[str, Any], "OrderedDict[str, None]"], Optional[Frame]]


class ReplayBuffer:
    """Encoded frames kept in arrival order, bounded by count and bytes (oldest dropped
    first, output before bookkeeping). Also the queue a reconnected socket drains while
    live messages keep arriving behind the replayed ones."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        # Two queues so that dropping the oldest output is O(1) even behind a long run of
        # replies and statuses; the sequence number merges them back in arrival order.
        self._output: deque[Item] = deque()
        self._bookkeeping: deque[Item] = deque()
        self._seq = 0
        self.size = 0
        self.dropped = 0  # messages dropped since the last notice
        self._dropped_parent: dict = {}  # the parent of the newest dropped one: where the notice shows

    def __len__(self) -> int:
        return len(self._output) + len(self._bookkeeping)

    def append(self, channel: str, frame: Frame, msg: dict[str, Any]) -> None:
        size = len(frame)  # JSON frames are ASCII (json.dumps escapes the rest): characters are bytes
        parent = msg.get("parent_header") or {}
        if size > self.max_bytes:  # it cannot fit even alone: drop it, not everything else
            self._note_drop(parent)
            return
        while len(self) and (len(self) >= self.max_messages or self.size + size > self.max_bytes):
            self._evict()
        bookkeeping = channel != "iopub" or msg.get("msg_type") == "status"
        self._seq += 1
        (self._bookkeeping if bookkeeping else self._output).append((self._seq, channel, frame, parent))
        self.size += size

    def _evict(self) -> None:
        queue = self._output or self._bookkeeping
        _, _, frame, parent = queue.popleft()
        self.size -= len(frame)
        self._note_drop(parent)

    def _note_drop(self, parent: dict) -> None:
        if self.dropped == 0:
            log.warning("Jupyter replay buffer full (%d messages, %d bytes): dropping the oldest messages",
                        len(self), self.size)
        self.dropped += 1
        self._dropped_parent = parent

    def popleft(self) -> Item:
        """The oldest message kept (IndexError when empty)."""
        output, bookkeeping = self._output, self._bookkeeping
        queue = output if output and (not bookkeeping or output[0][0] < bookkeeping[0][0]) else bookkeeping
        item = queue.popleft()
        self.size -= len(item[2])
        return item

    def take_notice(self) -> dict[str, Any] | None:
        """The stderr message telling the client what was dropped since the last notice
        (None when nothing was), shown in the cell whose output went missing last."""
        if not self.dropped:
            return None
        count, self.dropped = self.dropped, 0
        header = {"msg_id": uuid.uuid4().hex, "msg_type": "stream", "username": "era", "session": "era-gateway",
                  "date": datetime.now(timezone.utc).isoformat(), "version": "5.3"}
        text = (f"[ERA] {count} message(s) of this kernel were dropped while no client was connected: "
                f"the replay keeps the newest {self.max_bytes} bytes (ERA_GATEWAY_REPLAY_MAX_BYTES) and "
                f"{self.max_messages} messages.\n")
        return {"header": header, "msg_id": header["msg_id"], "msg_type": "stream",
                "parent_header": self._dropped_parent, "metadata": {}, "content": {"name": "stderr", "text": text}}


class Parked:
    """A kernel's messages kept for the socket that closed last, until the next one opens."""

    def __init__(self, key: str, requests: "OrderedDict[str, None]", buffer: ReplayBuffer) -> None:
        self.key = key
        self.requests = requests
        self.buffer = buffer
        self.kernel: Any = None
        self.remove_listener: Callable[[], None] = lambda: None


class GatewayReplay:
    """The parked buffers of one server, by kernel (session) id. It follows the engine's
    lifecycle itself (``engine.watch``): a replaced kernel is followed, and a deleted
    session's or a culled kernel's buffer is dropped, so none outlives what it is for."""

    def __init__(self, services: Any, outgoing: Outgoing) -> None:
        self.services = services
        self.outgoing = outgoing
        self.max_bytes = int(services.settings["ERA_GATEWAY_REPLAY_MAX_BYTES"])
        self.parked: dict[str, Parked] = {}
        services.engine.watch(self._on_lifecycle)  # lives as long as the engine: no unwatch needed

    def park(self, sid: str, key: str | None, kernel: Any, requests: "OrderedDict[str, None]",
             unsent: ReplayBuffer | None = None) -> None:
        """The kernel's last socket closed: keep what it would have received. ``unsent``:
        what that socket had not yet replayed, kept in front of what comes next."""
        self.discard(sid, "superseded")
        if not key or len(key) > MAX_SESSION_KEY or self.max_bytes <= 0:
            return
        parked = Parked(key, requests, unsent or ReplayBuffer(MAX_MESSAGES, self.max_bytes))
        self.parked[sid] = parked
        self._attach(parked, kernel)
        log.info("no Jupyter client connected: buffering the kernel's messages for its session key",
                 extra={"session_id": sid})

    def claim(self, sid: str, key: str | None) -> Parked | None:
        """A socket opens on the kernel: buffering ends. Its buffer when the key matches;
        otherwise the buffer is discarded (jupyter_server's ``get_buffer``)."""
        parked = self.parked.get(sid)
        if parked is None:
            return None
        if key != parked.key:
            self.discard(sid, "another client session connected")
            return None
        del self.parked[sid]
        parked.remove_listener()
        log.info("replaying %d buffered Jupyter messages", len(parked.buffer), extra={"session_id": sid})
        return parked

    def discard(self, sid: str, why: str) -> None:
        parked = self.parked.pop(sid, None)
        if parked is not None:
            parked.remove_listener()
            log.info("discarding %d buffered Jupyter messages (%s)", len(parked.buffer), why,
                     extra={"session_id": sid})

    def _attach(self, parked: Parked, kernel: Any) -> None:
        parked.remove_listener()
        parked.kernel = kernel
        if kernel is None:
            parked.remove_listener = lambda: None
            return
        outgoing, requests, buffer = self.outgoing, parked.requests, parked.buffer

        def on_message(channel: str, msg: dict[str, Any]) -> None:
            frame = outgoing(channel, msg, requests)
            if frame is not None:
                buffer.append(channel, frame, msg)

        parked.remove_listener = kernel.add_listener(on_message)

    # ---- engine lifecycle (sync, on the loop) ----------------------------------------------
    def _on_lifecycle(self, event: Any) -> None:
        from era_kernel.engine.events import KernelCulled, KernelReplaced, SessionDeleted

        sid = event.session_id
        if sid not in self.parked:
            return
        if isinstance(event, SessionDeleted):
            self.discard(sid, "kernel deleted")
        elif isinstance(event, KernelCulled) and event.reason != "dead":
            # Shut down for idleness or for room (jupyter_server drops a buffer with its kernel).
            # A dead kernel's buffer stays: its last output says why it died.
            self.discard(sid, f"kernel culled: {event.reason}")
        elif isinstance(event, KernelReplaced):
            self.services.spawn(self._follow(sid, self.parked[sid]))

    async def _follow(self, sid: str, parked: Parked) -> None:
        try:
            kernel = await self.services.engine.jupyter_kernel(sid, start=False)
        except EraError:
            return
        if self.parked.get(sid) is parked and kernel is not parked.kernel:
            self._attach(parked, kernel)


_registries: "weakref.WeakKeyDictionary[Any, GatewayReplay]" = weakref.WeakKeyDictionary()


def replay_for(services: Any, outgoing: Outgoing) -> GatewayReplay:
    """The server's registry, made on first use (the engine is ready by then: sockets open
    only after ``wait_ready``). Kept beside ``Services`` rather than in it: it is this
    module's state alone."""
    registry = _registries.get(services)
    if registry is None:
        registry = _registries[services] = GatewayReplay(services, outgoing)
    return registry
