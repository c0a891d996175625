"""The Jupyter wire session ERA's kernel clients use: jupyter_client's, minus date parsing.

``Session.deserialize`` turns every ISO date in a message's header and parent header
into a ``datetime`` (``extract_dates``, dateutil parsing): two or more per message, about
0.85 ms of a ``print('x')`` run's ~6 messages, on the hot path of every run. ERA reads no
message date, so ``WireSession`` leaves them as the strings the kernel sent. Everything
else is jupyter_client's: HMAC signature check (and the replay guard), identities,
buffers, protocol adaptation, and the whole sending side.
"""

from __future__ import annotations

import typing as t
from hmac import compare_digest

from jupyter_client import AsyncKernelManager
from jupyter_client.adapter import adapt
from jupyter_client.session import Session
from traitlets import default

MIN_PARTS = 5  # [HMAC, header, parent_header, metadata, content, *buffers]


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
