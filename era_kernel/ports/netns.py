"""Sockets inside another process's network namespace, made without moving the server.

A session's sandbox has a network namespace of its own (bubblewrap's ``--unshare-net``,
Docker's network ``none``): a loopback and nothing else. To reach a port inside it, or to
offer the session an address of ours, the server makes the socket *in* that namespace:
a dedicated thread enters it with ``setns(CLONE_NEWNET)`` (a thread's network
namespace is its own; the rest of the process, the event loop included, never moves),
creates the socket, and goes back. A socket keeps the namespace it was created in for
its whole life, so the event loop then connects, binds, reads and writes it as any
other. The session gets no route out of this: the only socket in its namespace that
leads to the server is the one the server made there.

Entering a namespace needs CAP_SYS_ADMIN over it: the server must run as root (and, for
Docker, see the engine's processes: the same pid namespace as dockerd). One dedicated
thread does it for every socket (``_Worker``), never a thread of a pool.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import os
import queue
import socket
import threading
from typing import Any

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class NamespaceError(OSError):
    """The namespace could not be entered (gone, or no privilege)."""


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NamespaceError(err, f"setns: {os.strerror(err)}")


def namespace_id(path: str) -> tuple[int, int]:
    """Blocking: ``(st_dev, st_ino)`` of a namespace file: equal ids are the same namespace."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def same_namespace_as_ours(path: str) -> bool:
    """Blocking: is ``path`` (``/proc/<pid>/ns/net``) the server's own network namespace?"""
    return namespace_id(path) == namespace_id("/proc/self/ns/net")


class _Worker:
    """One thread of the server that makes every such socket: it enters the namespace,
    creates the socket and goes back (two ``setns`` calls, microseconds; a new thread per
    socket cost a few hundred). Should it ever fail to go back, it reports that, closes
    the socket and ends, taking the wrong namespace with it; the next request starts a
    fresh worker. No other thread of the process ever changes namespace."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.alive = True
        threading.Thread(target=self._loop, name="era-netns", daemon=True).start()

    def _loop(self) -> None:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        while True:
            path, family, kind, future = self.jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                future.set_exception(NamespaceError(exc.errno, f"cannot open the sandbox's network namespace: "
                                                               f"{exc.strerror}"))
                continue
            try:
                _setns(target)  # on failure nothing changed
            except BaseException as exc:
                os.close(target)
                future.set_exception(exc)
                continue
            os.close(target)
            made: Any = None
            try:
                made = socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            except BaseException as exc:
                made = exc
            try:
                _setns(own)
            except BaseException as exc:
                self.alive = False  # stuck in the sandbox's namespace: this thread must go
                if isinstance(made, socket.socket):
                    made.close()
                future.set_exception(NamespaceError(getattr(exc, "errno", 0), "could not leave the namespace"))
                self._fail_pending()
                return
            if isinstance(made, BaseException):
                future.set_exception(made)
            else:
                future.set_result(made)

    def _fail_pending(self) -> None:
        while True:
            try:
                *_, future = self.jobs.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(NamespaceError(0, "the namespace worker ended; retry"))


_worker: _Worker | None = None
_worker_lock = threading.Lock()


def _submit(ns_path: str, family: int, kind: int) -> concurrent.futures.Future:
    global _worker
    with _worker_lock:
        if _worker is None or not _worker.alive:
            _worker = _Worker()
        future: concurrent.futures.Future = concurrent.futures.Future()
        _worker.jobs.put((ns_path, family, kind, future))
    return future


def make_socket(ns_path: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """Blocking: a non-blocking socket created inside the network namespace ``ns_path``
    (e.g. ``/proc/<pid>/ns/net``)."""
    return _submit(ns_path, family, kind).result()


async def socket_in(ns_path: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """``make_socket`` for the event loop (no thread of the loop's pool waits for it)."""
    future = _submit(ns_path, family, kind)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        future.add_done_callback(lambda f: f.cancelled() or f.exception() or f.result().close())
        raise


async def connect(ns_path: str, port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> socket.socket:
    """A TCP connection to ``host:port`` as seen from inside the namespace ``ns_path``,
    connected and non-blocking, for the event loop. ConnectionRefusedError when nothing
    listens there; TimeoutError past ``timeout``; NamespaceError when it cannot be entered."""
    sock = await socket_in(ns_path)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # relayed small frames must not wait (Nagle)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), timeout)
    except BaseException:
        sock.close()
        raise
    return sock


async def listen(ns_path: str, port: int = 0, host: str = "127.0.0.1", backlog: int = 128) -> socket.socket:
    """A listening socket bound to ``host:port`` inside the namespace ``ns_path`` (port 0:
    any free one; ``getsockname()`` says which). Accept from the event loop as usual
    (``loop.sock_accept``, ``tornado.netutil.add_accept_handler``): each accepted
    connection is a peer inside the sandbox talking to the server."""
    sock = await socket_in(ns_path)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock
