"""The zygote: a long-lived process (root, like the server) that has imported what a
Python kernel imports (ipykernel, IPython, ZeroMQ, Tornado, jupyter_client) and holds no
thread, socket or ZeroMQ context, and forks one child per kernel (``forked.py`` makes
the child a sandboxed kernel). A kernel start then costs a fork and ipykernel's own
setup instead of a new interpreter importing everything (about 0.75 CPU-seconds here),
and the kernels share the zygote's pages copy-on-write.

One zygote per interpreter (``sys.executable`` of the server: the kernelspec argv the
fork launcher accepts names it), started by the server on the first fork launch
(``Zygote.shared``). It dies with the server (``PR_SET_PDEATHSIG``, and when its socket
closes); its kernels die with it.

Protocol, over a ``SOCK_SEQPACKET`` pair (one message a datagram): the server sends
``{"fork": true}`` with two descriptors attached, a memfd holding the JSON request
(``forked.become_kernel``'s fields; only the child reads it, so the zygote's memory,
which every later kernel inherits, never holds a session's data) and the kernel's
output; the zygote answers ``{"pid": <host pid>}`` with a pidfd of the child attached,
or ``{"error": ...}``; and, unasked, ``{"exit": pid, "status": code}`` when a child ends.
"""

from __future__ import annotations

import array
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from .forked import ENV_ROOM_VAR

log = logging.getLogger("era.provisioning.zygote")
MAX_MESSAGE = 1 << 20
# Bytes of padding on the zygote's command line: each forked kernel writes its own
# command line over it (forked.set_cmdline), so /proc/<pid>/cmdline names the kernel.
CMDLINE_ROOM = 4096
# Likewise for each kernel's environment (forked.set_environ); the pages a kernel writes
# become its own. Under the 64 KiB a session's commands take of it (commands/channel.py).
ENV_ROOM = 48 * 1024
PRELOAD = ("ipykernel.kernelapp", "ipykernel.ipkernel", "ipykernel.zmqshell", "ipykernel.iostream",
           "ipykernel.heartbeat", "ipykernel.comm", "IPython.core.interactiveshell", "IPython.core.completer",
           "IPython.core.history", "jupyter_client.session", "zmq", "zmq.eventloop.zmqstream", "tornado.ioloop",
           "asyncio", "sqlite3", "json", "hmac", "uuid", "traitlets", "ctypes", "resource", "fcntl",
           "era_kernel.provisioning.forked", "era_kernel.provisioning.prepared", "era_kernel.provisioning.seccomp",
           # what IPKernelApp.initialize imports (debugpy's pydevd is the most of it)
           "ipykernel.debugger", "IPython.core.debugger", "IPython.core.completerlib", "IPython.core.oinspect",
           "IPython.extensions.storemagic", "IPython.utils.wildcard", "pdb", "tornado.gen", "tornado.locks",
           "tornado.queues", "tornado.platform.asyncio", "http.server", "xmlrpc.client", "pydoc", "gzip",
           "unicodedata", "stringprep", "encodings.idna", "faulthandler", "sysconfig",
           # what a kernel imported after the fork, up to its first runs (IPython's logger:
           # its %logstart; runpy: ipykernel_launcher's): each import writes to pages of
           # the import system's that every kernel would otherwise copy
           "IPython.core.logger", "runpy")


# ---------------------------------------------------------------------------- the zygote process


def _serve(sock: socket.socket) -> None:
    from . import forked

    own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: set[int] = set()
    # poll, not select: the socket keeps the number it had in the server, which may be past
    # FD_SETSIZE (a server with some 60 kernels holds over 1024 descriptors).
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        ready = [fd for fd, _ in poller.poll()]
        if wake_r in ready:
            while True:
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    break
            while children:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                children.discard(pid)
                code = os.waitstatus_to_exitcode(status)
                try:  # never blocks: a report the server has not read room for is lost (status unknown)
                    sock.send(json.dumps({"exit": pid, "status": code}).encode(), socket.MSG_DONTWAIT)
                except OSError:
                    pass
        if sock.fileno() in ready:
            try:
                data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 4)
            except OSError:
                return
            if not data:
                return  # the server closed its end: it is gone
            try:
                if len(fds) != 2:
                    raise ValueError("a fork request carries the request and the output descriptors")
                pid = -1
                forked.unshare(forked.CLONE_NEWPID)  # our next child is pid 1 of a new namespace
                try:
                    pid = os.fork()
                finally:
                    if pid != 0:
                        forked.setns(own_pidns, forked.CLONE_NEWPID)  # and the ones after it are ours again
            except BaseException as exc:  # noqa: BLE001
                for fd in fds:
                    os.close(fd)
                sock.send(json.dumps({"error": f"fork failed: {exc}"}).encode())
                continue
            if pid == 0:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                forked.become_kernel(fds[0], fds[1])  # never returns
            children.add(pid)
            for fd in fds:
                os.close(fd)
            pidfd = os.pidfd_open(pid)
            try:
                socket.send_fds(sock, [json.dumps({"pid": pid}).encode()], [pidfd])
            finally:
                os.close(pidfd)


def _preload() -> None:
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def _warm_up() -> None:
    """Fill the caches traitlets builds on an application's first command line (its
    argument parser's trait tables: about 40 ms a kernel otherwise), and parse the
    kernelspec's command line once for every kernel (``prepared.prepare_command_line``).

    Then put a cell through IPython's input transformers, as every kernel does with its
    first cell (the protocol fixes, ``exec_lines``) and a user's: that compiles
    ``tokenize``'s and IPython's regular expressions (``re``'s cache, ``tokenize._compile``),
    which each kernel otherwise compiled for itself (measured: 16-20 ms of a forked
    kernel's ~115 ms of initialisation, profiled). Last, rehearse a whole kernel start
    (``prepared.rehearse_kernel_start``)."""
    from .prepared import prepare_command_line, rehearse_kernel_start

    try:
        from ..languages import PYTHON_FIXES_CELL, PYTHON_KERNEL_FIXES, PYTHON_KERNEL_TUNING

        tail = [*PYTHON_KERNEL_TUNING, *PYTHON_KERNEL_FIXES]  # the kernelspec's (kernelspecs/)
        prepare_command_line(tail)
        from IPython.core.inputtransformer2 import TransformerManager

        TransformerManager().transform_cell(PYTHON_FIXES_CELL)
        TransformerManager().transform_cell("%time print(1)\n!true\nx?\n")  # magics, shell escapes, help
    except Exception:  # noqa: BLE001 - an optimisation only
        return
    try:
        rehearse_kernel_start(tail)
    except Exception as exc:  # noqa: BLE001 - an optimisation only, but one the server's log should show
        sys.stderr.write(f"zygote: rehearsing a kernel's start failed ({exc}); kernels start colder\n")


def main() -> None:
    """``python -m era_kernel.provisioning.zygote <socket fd> <server pid> <padding>`` (the
    padding: room for each kernel's command line, CMDLINE_ROOM)."""
    fd, server = int(sys.argv[1]), int(sys.argv[2])
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the server
    if os.getppid() != server:
        os._exit(1)  # it died before that took effect
    _preload()
    _warm_up()
    from . import forked

    forked.prepare()
    from .prepared import immortalize_heap, prepare_module_files

    prepare_module_files()  # last: after every import
    if threading.active_count() != 1:
        sys.stderr.write(f"zygote: preloading started threads: {threading.enumerate()}\n")
        os._exit(1)
    import gc

    gc.collect()
    immortalize_heap()  # last: nothing is freed after it
    gc.freeze()  # the preloaded objects stay out of later collections: their pages stay shared
    sock = socket.socket(fileno=fd)
    sock.send(b'{"ready": true}')
    _serve(sock)


# ---------------------------------------------------------------------------- the server's side


class ZygoteFailed(RuntimeError):
    pass


class Zygote:
    """The server's handle on one zygote. Blocking methods: callers run them in a thread."""

    _shared: dict[str, "Zygote"] = {}
    _shared_lock = threading.Lock()

    def __init__(self, python: str = sys.executable):
        self.python = python
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # Read once at interpreter start, so the zygote's own: what every kernel gets (local.kernel_env).
        env = {ENV_ROOM_VAR: " " * ENV_ROOM, "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONUNBUFFERED": "1", "MALLOC_ARENA_MAX": "2",
               "LANG": os.environ.get("LANG", "C.UTF-8"),
               # debugpy warns once at import about frozen modules: in the zygote it would reach no kernel's log
               "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
        self._started = time.monotonic()
        try:
            self.process = subprocess.Popen(
                [python, "-m", "era_kernel.provisioning.zygote", str(theirs.fileno()), str(os.getpid()),
                 " " * CMDLINE_ROOM],
                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL, close_fds=True,
                # `-m` puts the working directory first on sys.path, and the server's may be
                # writable by anybody: a module there would run as root in the zygote.
                cwd="/")
        finally:
            theirs.close()
        self._lock = threading.Lock()
        self._ready = False
        self.exits: dict[int, int] = {}

    def wait_ready(self) -> None:
        """Blocking: until the zygote has imported everything (once; later calls return)."""
        with self._lock:
            self._wait_ready()

    def _wait_ready(self) -> None:
        if self._ready:
            return
        self.sock.settimeout(60)
        try:
            hello = self.sock.recv(MAX_MESSAGE)
        except OSError as exc:
            raise ZygoteFailed(f"the fork launcher's zygote did not start: {exc}") from None
        if not hello:
            raise ZygoteFailed(f"the fork launcher's zygote did not start (exit status {self.process.wait()})")
        self.sock.settimeout(None)  # blocking from now on: a zygote that dies closes its end
        self._ready = True
        log.info("fork launcher: zygote %s ready in %.2f s", self.process.pid, time.monotonic() - self._started)

    @classmethod
    def shared(cls, python: str = sys.executable) -> "Zygote":
        """The zygote of ``python``, started (or restarted, if it died) here. Call it on the
        server's long-lived thread (the event loop's): the zygote's death signal is armed
        for the thread that started it, and a worker thread may end before the server."""
        with cls._shared_lock:
            found = cls._shared.get(python)
            if found is None or found.process.poll() is not None:
                found = cls._shared[python] = cls(python)
            return found

    def fork(self, request: dict, output_fd: int) -> tuple[int, int]:
        """Blocking: a new kernel process; returns (host pid, pidfd)."""
        # The request travels in a memfd the child reads: the zygote's own memory, which every
        # later kernel inherits, never holds a byte of another session's (its environment).
        memfd = os.memfd_create("era-fork-request", os.MFD_CLOEXEC)
        try:
            os.write(memfd, json.dumps(request).encode())
            with self._lock:
                self._wait_ready()
                socket.send_fds(self.sock, [b'{"fork": true}'], [memfd, output_fd])
                return self._answer()
        finally:
            os.close(memfd)

    def _answer(self) -> tuple[int, int]:
        """The zygote's answer to a fork (exit reports that come first are kept)."""
        while True:
            data, fds, _, _ = socket.recv_fds(self.sock, MAX_MESSAGE, 1)
            if not data:
                raise ZygoteFailed("the fork launcher's zygote is gone")
            answer = json.loads(data)
            if "exit" in answer:
                self.exits[answer["exit"]] = answer["status"]
                continue
            if "error" in answer:
                raise ZygoteFailed(answer["error"])
            return answer["pid"], fds[0]

    def drain(self) -> None:
        """Read the exit reports that arrived (non-blocking; skipped while a fork is asked)."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            while _readable(self.sock.fileno(), 0):
                try:
                    data = self.sock.recv(MAX_MESSAGE, socket.MSG_DONTWAIT)
                except OSError:
                    return
                if not data:
                    return
                answer = json.loads(data)
                if "exit" in answer:
                    self.exits[answer["exit"]] = answer["status"]
        finally:
            self._lock.release()


def _readable(fd: int, timeout: float) -> bool:
    """Is ``fd`` readable within ``timeout`` seconds? ``poll``, not ``select``: the server
    holds well over FD_SETSIZE (1024) descriptors with some 60 forked kernels, and
    ``select`` refuses any descriptor numbered past it."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


class ForkedProcess:
    """A forked kernel as jupyter_client's LocalProvisioner uses a ``Popen``: ``pid`` (the
    sandbox's init, whose end ends the sandbox), ``poll``, ``wait``, ``send_signal``,
    ``kill``, ``terminate``. Signals go through a pidfd: never to a reused pid."""

    stdin = stdout = stderr = None

    def __init__(self, zygote: Zygote, pid: int, pidfd: int):
        self.zygote, self.pid, self.pidfd = zygote, pid, pidfd
        self.returncode: int | None = None

    def _ended(self, timeout: float = 0) -> bool:
        if self.pidfd < 0:
            return True
        return _readable(self.pidfd, timeout)

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        if not self._ended():
            return None
        # Ended: the status comes from the zygote, which reaps it (a moment later).
        for _ in range(20):
            self.zygote.drain()
            if self.pid in self.zygote.exits:
                self.returncode = self.zygote.exits.pop(self.pid)
                break
            time.sleep(0.002)
        else:
            self.returncode = -signal.SIGKILL
        self.close()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise subprocess.TimeoutExpired("forked kernel", timeout)
            self._ended(min(remaining, 0.1) if remaining is not None else 0.1)
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, signum: int) -> None:
        if self.returncode is not None or self.pidfd < 0:
            return
        signal.pidfd_send_signal(self.pidfd, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kernel_pid(self) -> int | None:
        """The kernel's own process: pid 2 of the sandbox's namespace, a child of init."""
        try:
            children = open(f"/proc/{self.pid}/task/{self.pid}/children").read().split()
        except OSError:
            return None
        for child in children:
            try:
                for line in open(f"/proc/{child}/status"):
                    if line.startswith("NSpid:") and line.split()[-1] == "2":
                        return int(child)
            except OSError:
                continue
        return None

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


if __name__ == "__main__":
    main()
