"""The Jupyter wire ERA's kernel clients use: jupyter_client's session minus date
parsing, and one ZeroMQ context for every kernel.

``Session.deserialize`` turns every ISO date in a message's header and parent header
into a ``datetime`` (``extract_dates``, dateutil parsing): two or more per message, about
0.85 ms of a ``print('x')`` run's ~6 messages, on the hot path of every run. ERA reads no
message date, so ``WireSession`` leaves them as the strings the kernel sent. Everything
else is jupyter_client's: HMAC signature check (and the replay guard), identities,
buffers, protocol adaptation, and the whole sending side.

jupyter_client gives each kernel two ZeroMQ contexts (its manager's, for the control
socket, and its client's), each with an I/O thread and a reaper thread, and each client a
heartbeat thread running an event loop of its own that pings the kernel every second:
five threads a kernel, started on the way of every kernel start, and with 100 kernels 500
threads taking the GIL in turn. ``kernel_context`` is one context for all of them (one
I/O thread serves every kernel's connections); ``SessionKernel`` starts no heartbeat
channel, since whether a kernel is alive is its manager's answer (the provisioner polls
the process or container), which is also what ``KernelClient.is_alive`` asks.
"""

from __future__ import annotations

import os
import threading
import typing as t
from hmac import compare_digest

from jupyter_client import AsyncKernelManager
from jupyter_client.adapter import adapt
from jupyter_client.session import Session
from traitlets import default

MIN_PARTS = 5  # [HMAC, header, parent_header, metadata, content, *buffers]
# Reconnect retries of a client socket: from 5 ms, backing off to ZeroMQ's default 100 ms
# (ready.py: a kernel binds its endpoints after the client has connected).
FIRST_RETRY_MS = 5
LAST_RETRY_MS = 100
# Sockets one context may hold (ZeroMQ's default is 1023): about nine a kernel (four
# channels, the control socket, two monitors and their pairs), for ERA_MAX_KERNELS and
# the Jupyter gateway's clients.
MAX_SOCKETS = 32768

_contexts: dict[tuple[int, int], t.Any] = {}
_contexts_lock = threading.Lock()


def kernel_context(max_message: int = 0) -> t.Any:
    """The ZeroMQ context (``zmq.asyncio.Context``) of every kernel manager and client of
    this process that refuses messages over ``max_message`` bytes (0: no limit). Sockets
    made from it retry a refused connect quickly. One per message limit, since that is a
    context-wide option (engines in one process may have different limits); one per
    process, since a ZeroMQ context does not survive a fork. Never terminated: sockets
    close with a linger of their own (channels 0, the control socket 100 ms), so nothing
    waits in it for a kernel that is gone."""
    import zmq
    import zmq.asyncio

    key = (os.getpid(), max_message)
    with _contexts_lock:
        context = _contexts.get(key)
        if context is None:
            context = zmq.asyncio.Context()
            context.set(zmq.MAX_SOCKETS, MAX_SOCKETS)
            if max_message:
                # A kernel sending one huge message (a 1 GiB display) must not make us
                # allocate it: ZeroMQ drops the connection past this size instead.
                context.setsockopt(zmq.MAXMSGSIZE, max_message)
            context.setsockopt(zmq.RECONNECT_IVL, FIRST_RETRY_MS)
            context.setsockopt(zmq.RECONNECT_IVL_MAX, LAST_RETRY_MS)
            _contexts[key] = context
        return context


class WireSession(Session):
    def deserialize(self, msg_list: list, content: bool = True, copy: bool = True) -> dict[str, t.Any]:
        """``Session.deserialize`` without ``extract_dates`` (same checks, same errors)."""
        if not copy:  # pyzmq did not copy the frames: copy the first parts
            msg_list = [bytes(m.bytes) for m in msg_list[:MIN_PARTS]] + list(msg_list[MIN_PARTS:])
        if self.auth is not None:  # signature checking stays on whenever the key is set
            signature = msg_list[0]
            if not signature:
                raise ValueError("Unsigned Message")
            if signature in self.digest_history:
                raise ValueError("Duplicate Signature: %r" % signature)
            if content:  # only store the signature when unpacking, not when peeking
                self._add_digest(signature)
            if not compare_digest(signature, self.sign(msg_list[1:5])):
                raise ValueError("Invalid Signature: %r" % signature)
        if len(msg_list) < MIN_PARTS:
            raise TypeError("malformed message, must have at least %i elements" % MIN_PARTS)
        header = self.unpack(msg_list[1])
        buffers = [memoryview(b) for b in msg_list[5:]]
        if buffers and buffers[0].shape is None:  # force a copy, as jupyter_client does (pyzmq #646)
            buffers = [memoryview(bytes(b.bytes)) for b in msg_list[5:]]
        message = {
            "header": header,
            "msg_id": header["msg_id"],
            "msg_type": header["msg_type"],
            "parent_header": self.unpack(msg_list[2]),
            "metadata": self.unpack(msg_list[3]),
            "content": self.unpack(msg_list[4]) if content else msg_list[4],
            "buffers": buffers,
        }
        return adapt(message)


class EraKernelManager(AsyncKernelManager):
    """jupyter_client's kernel manager whose session (and so every client it makes,
    ``client()`` clones it) is a ``WireSession``. The manager still loads the connection
    key into it at launch."""

    @default("session")
    def _session_default(self) -> Session:
        return WireSession(parent=self)
