"""Child processes of the wrapper kernels: their output as Jupyter stream messages.

Shared by ``go_kernel`` and ``bash_kernel``. A reader thread per pipe decodes UTF-8
incrementally (a character split across two reads is not mangled) and queues
``(stream name, item)``; the kernel's main thread sends them, so IOPub is written from
one thread only and an interrupt (KeyboardInterrupt in the main thread) lands while we
wait on the queue, never inside a send.

An item is text, ``EOF`` when the pipe closed, or a ``Mark`` when the reader met the
marker it was given (a long-lived child, bash, prints one after each cell): the marker
and the rest of its line never reach the output; that rest is the mark's payload.
"""

from __future__ import annotations

import codecs
import os
import queue
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import IO, Callable, Union

CHUNK = 65536
COALESCE = 0.005  # seconds: output arriving this close together goes out as one message
MAX_BATCH = 256 * 1024  # characters per stream message
MAX_WAIT = 0.05  # seconds: a steady trickle still goes out at least this often


class _Eof:
    def __repr__(self) -> str:
        return "EOF"


EOF = _Eof()


@dataclass(frozen=True)
class Mark:
    payload: str


Item = Union[str, _Eof, Mark]


def start_reader(pipe: IO[bytes], name: str, out: queue.Queue, marker: bytes | None = None) -> threading.Thread:
    def read() -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        fd = pipe.fileno()
        pending = b""
        in_mark: bytes | None = None  # bytes after a marker, until its newline
        while True:
            try:
                data = os.read(fd, CHUNK)
            except OSError:
                data = b""
            pending += data
            while pending:
                if in_mark is not None:
                    end = pending.find(b"\n")
                    if end < 0:
                        in_mark, pending = in_mark + pending, b""
                        break
                    out.put((name, Mark((in_mark + pending[:end]).decode(errors="replace"))))
                    in_mark, pending = None, pending[end + 1:]
                    continue
                at = pending.find(marker) if marker else -1
                if at >= 0:
                    text, pending, in_mark = pending[:at], pending[at + len(marker):], b""
                elif marker and data:
                    # Hold back a tail that could be the start of a marker.
                    keep = next((k for k in range(min(len(marker) - 1, len(pending)), 0, -1)
                                 if marker.startswith(pending[-k:])), 0)
                    text, pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
                else:
                    text, pending = pending, b""
                decoded = decoder.decode(text)
                if decoded:
                    out.put((name, decoded))
                if at < 0:
                    break
            if not data:
                rest = decoder.decode(b"", final=True)
                if rest:
                    out.put((name, rest))
                out.put((name, EOF))
                return

    thread = threading.Thread(target=read, name=f"era-{name}-reader", daemon=True)
    thread.start()
    return thread


def kill_group(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the child's whole process group (it was started in a session of its own)."""
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def relay(out: queue.Queue, emit: Callable[[str, str], None], done: Callable[[str, Item], bool]) -> None:
    """Send queued text with ``emit(stream, text)`` until ``done(stream, item)`` is true.

    Consecutive pieces of one stream that arrive within ``COALESCE`` seconds go out as
    one message (a chatty program is not a message per write); order across streams
    is kept.
    """
    stream: str | None = None
    parts: list[str] = []
    size = 0
    first = 0.0

    def flush() -> None:
        nonlocal parts, size
        if parts and stream is not None:
            emit(stream, "".join(parts))
        parts, size = [], 0

    while True:
        try:
            name, item = out.get(timeout=COALESCE if parts else None)
        except queue.Empty:
            flush()
            continue
        if done(name, item):
            flush()
            return
        if not isinstance(item, str):
            continue
        if name != stream or size >= MAX_BATCH or (parts and time.monotonic() - first > MAX_WAIT):
            flush()
            stream = name
        if not parts:
            first = time.monotonic()
        parts.append(item)
        size += len(item)
