"""Sockets inside another process's network namespace, made without moving the server.

A session's sandbox has a network namespace of its own (bubblewrap's ``--unshare-net``,
Docker's network ``none``): a loopback and nothing else. To reach a port inside it, or to
offer the session an address of ours, the server makes the socket *in* that namespace:
a short-lived thread enters it with ``setns(CLONE_NEWNET)`` (a thread's network
namespace is its own; the rest of the process, the event loop included, never moves),
creates the socket, and goes back. A socket keeps the namespace it was created in for
its whole life, so the event loop then connects, binds, reads and writes it as any
other. The session gets no route out of this: the only socket in its namespace that
leads to the server is the one the server made there.

Entering a namespace needs CAP_SYS_ADMIN over it: the server must run as root (and, for
Docker, see the engine's processes: the same pid namespace as dockerd). A new thread per
socket costs tens of microseconds; it also means a thread that failed to go back (it
cannot, as root, but still) takes its namespace with it when it ends, never into a pool.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import threading

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


def make_socket(ns_path: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """Blocking, in a thread of its own: a non-blocking socket created inside the network
    namespace ``ns_path`` (e.g. ``/proc/<pid>/ns/net``)."""
    box: dict[str, object] = {}

    def work() -> None:
        try:
            target = os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            box["error"] = NamespaceError(exc.errno, f"cannot open the sandbox's network namespace: {exc.strerror}")
            return
        try:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target)
                try:
                    sock = socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
                finally:
                    _setns(own)  # the thread ends next anyway; going back keeps it honest
                box["sock"] = sock
            finally:
                os.close(own)
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc
        finally:
            os.close(target)

    thread = threading.Thread(target=work, name="era-netns", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["sock"]  # type: ignore[return-value]


async def connect(ns_path: str, port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> socket.socket:
    """A TCP connection to ``host:port`` as seen from inside the namespace ``ns_path``,
    connected and non-blocking, for the event loop. ConnectionRefusedError when nothing
    listens there; TimeoutError past ``timeout``; NamespaceError when it cannot be entered."""
    sock = await asyncio.to_thread(make_socket, ns_path)
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
    sock = await asyncio.to_thread(make_socket, ns_path)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock
