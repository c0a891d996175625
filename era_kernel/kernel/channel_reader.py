"""Reads a kernel channel's ZeroMQ socket straight from the event loop.

pyzmq's asyncio socket pays per message: a future, ``EVENTS`` queries and scheduled
callbacks, then a loop turn to resume the awaiting task. A run's five or six messages
made that a visible share of ERA's overhead over a raw client. ``ChannelReader`` watches
the socket's notification fd for the kernel's life; each wake reads what is queued (up
to a batch, see below) and hands each message to a plain callback, in order, on the loop.

The fd is ZeroMQ's edge signal, not the data: it can be consumed by any operation on
the socket, sends included. So the owner calls ``poke()`` after sending on the socket
(and the run's liveness poll pokes too), which drains on the next loop turn whatever
arrived meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import zmq

log = logging.getLogger("era.kernel")

Handler = Callable[[list[bytes]], None]
# Per turn of the loop, at most this many messages or bytes: a flooding kernel shares the
# loop with every other session (pyzmq's asyncio socket took one message per turn).
BATCH_MESSAGES = 64
BATCH_BYTES = 1 << 20


class ChannelReader:
    def __init__(self, socket: zmq.Socket, on_frames: Handler, name: str):
        # A blocking-API view of the same socket: NOBLOCK receives return data, not futures.
        self._socket = zmq.Socket.shadow(socket.underlying)
        self._on_frames = on_frames
        self.name = name
        self._loop = asyncio.get_running_loop()
        self._fd = self._socket.getsockopt(zmq.FD)
        self._poke_pending = False
        self._closed = False
        self._loop.add_reader(self._fd, self._drain)
        self.poke()  # whatever arrived before the reader existed

    def poke(self) -> None:
        """Drain on the next loop turn. Called after a send on this socket."""
        if not self._poke_pending and not self._closed:
            self._poke_pending = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._poke_pending = False
        socket = self._socket
        budget = BATCH_BYTES
        for _ in range(BATCH_MESSAGES):
            if self._closed:
                return
            if budget <= 0:
                break
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:  # the socket was closed under us
                log.debug("reader %s: %s", self.name, exc)
                self.close()
                return
            budget -= sum(map(len, frames))
            try:
                self._on_frames(frames)
            except Exception:  # one bad message never stops the channel
                log.exception("handling a %s message failed", self.name)
        self.poke()  # more may be queued: read on after the loop's other work

    def close(self) -> None:
        """Stop reading; the socket itself belongs to the kernel client. Safe to call twice."""
        if not self._closed:
            self._closed = True
            try:
                self._loop.remove_reader(self._fd)
            except Exception:  # the loop may already be closed at interpreter exit
                pass
