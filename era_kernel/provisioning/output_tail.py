"""A local kernel's own stdout/stderr: a pipe the server drains, keeping a bounded tail.

A kernel writes to its stdout/stderr what ipykernel does not capture: start-up banners,
crashes, and anything its code writes to file descriptors 1 and 2 directly. Those used to
be a descriptor on a host log file, which the kernel could fill without bound
(docs/security.md, finding "Kernel output to a host file"). Now they are the write end
of a pipe; the server reads it continuously and keeps only the last ``TAIL_BYTES``, in
memory, for start-failure messages (``kernel_log``).

Who reads: one daemon thread for the whole process (``_Pump``) waits on every kernel's
pipe with a selector. Not the event loop: a Jupyter application may drive our provisioner
from a blocking ``KernelManager`` whose loop only runs during calls, and an undrained
pipe blocks the kernel once 64 KiB are in it. Only the pump thread registers,
unregisters and closes read ends (callers ask through a queue), so a descriptor number is
never reused while the selector still knows it.
"""

from __future__ import annotations

import os
import queue
import selectors
import threading

TAIL_BYTES = 64 * 1024
READ_CHUNK = 64 * 1024
DRAIN_CHUNKS = 16


class OutputTail:
    """One kernel launch's stdout/stderr pipe and its tail.

    The local provisioner makes one in ``pre_launch`` (``write_fd`` becomes the kernel's
    stdout and stderr), calls ``close_writer`` once the process is started, ``text`` when
    asked for ``kernel_log``, and ``close`` at cleanup.
    """

    def __init__(self, limit: int = TAIL_BYTES):
        self.limit = limit
        read_fd, self.write_fd = os.pipe()  # not inheritable: only Popen's dup2 gives it to the kernel
        os.set_blocking(read_fd, False)
        self._read_fd = read_fd
        self._buffer = bytearray()
        self._lock = threading.Lock()
        self._closed = False
        _pump().submit("add", self)

    def close_writer(self) -> None:
        """Called right after the launch (the child has its copy): end of file comes when
        the kernel and everything it started are gone."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def text(self, limit: int | None = None) -> str:
        """The last ``limit`` bytes written (all kept ones by default), drained first so a
        kernel that just died has its last words in it. Any thread; reads at most
        ``DRAIN_CHUNKS`` chunks, so a kernel still writing flat out cannot hold it."""
        with self._lock:
            if not self._closed:
                for _ in range(DRAIN_CHUNKS):
                    if not self._read_once():
                        break
            data = bytes(self._buffer[-(limit or self.limit):])
        return data.decode(errors="replace")

    def close(self) -> None:
        """Stop reading (the kernel is cleaned up); what was kept stays readable."""
        self.close_writer()
        _pump().submit("remove", self)

    # ---- the pump thread's side ------------------------------------------------------
    def _read_once(self) -> bool | None:
        """With the lock held: one read. True: got data; None: nothing now; False: end of file."""
        try:
            chunk = os.read(self._read_fd, READ_CHUNK)
        except BlockingIOError:
            return None
        except OSError:
            return False
        if not chunk:
            return False
        self._buffer += chunk
        if len(self._buffer) > self.limit:
            del self._buffer[:len(self._buffer) - self.limit]
        return True

    def _on_readable(self) -> bool:
        """The pump saw data or end of file: one read per turn (fair between kernels).
        False once there is nothing more to wait for."""
        with self._lock:
            return not self._closed and self._read_once() is not False

    def _close_reader(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._read_fd)


class _Pump:
    """The one thread that drains every kernel's pipe."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._selector = selectors.DefaultSelector()
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        threading.Thread(target=self._run, name="era-kernel-output", daemon=True).start()

    def submit(self, action: str, tail: OutputTail) -> None:
        self._requests.put((action, tail))
        try:
            os.write(self._wake_write, b"\0")
        except BlockingIOError:
            pass  # already woken

    def _run(self) -> None:
        while True:
            for key, _ in self._selector.select():
                tail = key.data
                if tail is None:
                    self._take_requests()
                elif not tail._on_readable():
                    self._drop(tail)

    def _take_requests(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                action, tail = self._requests.get_nowait()
            except queue.Empty:
                return
            if action == "add" and not tail._closed:
                self._selector.register(tail._read_fd, selectors.EVENT_READ, tail)
            elif action == "remove":
                self._drop(tail)

    def _drop(self, tail: OutputTail) -> None:
        if not tail._closed:
            try:
                self._selector.unregister(tail._read_fd)
            except (KeyError, ValueError):
                pass
            tail._close_reader()


_pump_lock = threading.Lock()
_the_pump: _Pump | None = None


def _pump() -> _Pump:
    global _the_pump
    with _pump_lock:
        if _the_pump is None or _the_pump.pid != os.getpid():  # a forked child has no thread
            _the_pump = _Pump()
        return _the_pump
