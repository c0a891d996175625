"""The process supervisor that runs inside a session's sandbox (standard library only).

Started once per kernel by ``channel.py``, in the kernel's own sandbox (its namespaces
and cgroup locally, ``docker exec`` into its container on Docker), as the session's uid.
It spawns the session's commands, background processes and terminals there, so they
share the kernel's network, pid namespace, /tmp, workspace and limits. It is handed to
Python as ``-c`` source (containers do not have this package), so it imports nothing of
ours; its only argument is the seccomp program (hex) to load before anything runs, or
empty where the sandbox already applies one (Docker).

Protocol: JSON lines. The server writes requests on our stdin::

    {"op": "spawn", "id": N, "argv": [...], "cwd": str, "env": {...}, "pty": bool,
     "rows": R, "cols": C, "stdin": b64 | null, "keep_stdin": bool}
    {"op": "stdin", "id": N, "data": b64}     {"op": "eof", "id": N}
    {"op": "signal", "id": N, "sig": int}     {"op": "resize", "id": N, "rows": R, "cols": C}

and reads events on our stdout::

    {"ev": "started", "id": N, "pid": P}      {"ev": "out", "id": N, "s": "stdout"|"stderr", "d": b64}
    {"ev": "exit", "id": N, "code": C}        {"ev": "failed", "id": N, "error": str, "field": str, "code": C}

Every child leads its own session (and process group), so a signal or a timeout reaches
everything it started that stayed in its group. Once a child exits, what it left in its
pipes is read and sent, then ``exit``: output written later by a daemonised grandchild
is not waited for (as ``docker exec`` does not). Writes to stdout block when the server
reads slowly, which in turn slows the children: no buffer here grows without bound.
When our stdin closes (the server went away) every child's group is killed and we exit.
"""

import base64
import errno
import fcntl
import json
import os
import selectors
import signal
import struct
import subprocess
import sys
import termios

CHUNK = 64 * 1024


def load_seccomp(program):
    """Install the sandbox's seccomp filter on this process (and so every child) with
    no_new_privs set, as bubblewrap's ``--seccomp`` does for the kernel."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buf = ctypes.create_string_buffer(program, len(program))
    prog = SockFprog(len(program) // 8, ctypes.addressof(buf))
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


def send(event):
    data = (json.dumps(event, separators=(",", ":")) + "\n").encode()
    view = memoryview(data)
    while view:  # blocking: a slow reader slows us, and so the children
        view = view[os.write(1, view):]


class Child:
    def __init__(self, pid_id, proc, fds, stdin_fd, master):
        self.id = pid_id
        self.proc = proc
        self.fds = fds  # fd -> stream name, still open
        self.stdin_fd = stdin_fd  # our end of its stdin (the pty master for a terminal)
        self.pending = bytearray()  # stdin not yet written
        self.close_stdin = False
        self.master = master


class Supervisor:
    def __init__(self):
        self.sel = selectors.DefaultSelector()
        self.children = {}  # id -> Child
        self.by_fd = {}  # fd -> (Child, stream name)
        self.inbuf = bytearray()
        self.wake_r, wake_w = os.pipe()
        for fd in (self.wake_r, wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd is written
        os.set_blocking(0, False)
        self.sel.register(0, selectors.EVENT_READ, "stdin")
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")

    # ---- requests ------------------------------------------------------------------------
    def handle(self, req):
        op, cid = req.get("op"), req.get("id")
        if op == "spawn":
            self.spawn(req)
            return
        child = self.children.get(cid)
        if child is None:
            return
        if op == "stdin":
            child.pending += base64.b64decode(req.get("data") or "")
            self.want_write(child)
        elif op == "eof":
            child.close_stdin = True
            self.want_write(child)
        elif op == "signal":
            try:
                os.killpg(child.proc.pid, int(req["sig"]))
            except (ProcessLookupError, PermissionError):
                pass
        elif op == "resize" and child.master is not None:
            winsize(child.master, req.get("rows", 24), req.get("cols", 80))

    def spawn(self, req):
        cid, use_pty = req["id"], bool(req.get("pty"))
        master = None
        env = dict(os.environ)  # the kernel's environment (the server started us with it)
        env.update(req.get("env") or {})
        req["env"] = env
        try:
            if use_pty:
                master, slave = os.openpty()
                winsize(master, req.get("rows", 24), req.get("cols", 80))
                try:
                    proc = subprocess.Popen(req["argv"], cwd=req.get("cwd"), env=req.get("env"), stdin=slave,
                                            stdout=slave, stderr=slave, start_new_session=True,
                                            preexec_fn=controlling_tty)
                finally:
                    os.close(slave)
                fds = {master: "stdout"}
                stdin_fd = master
            else:
                # Our own pipes, not Popen's file objects: every end here is a plain fd we close.
                pipes = [os.pipe() for _ in range(3)]
                try:
                    proc = subprocess.Popen(req["argv"], cwd=req.get("cwd"), env=req.get("env"), stdin=pipes[0][0],
                                            stdout=pipes[1][1], stderr=pipes[2][1], start_new_session=True)
                except OSError:
                    for fd in (*pipes[0], *pipes[1], *pipes[2]):
                        os.close(fd)
                    raise
                for fd in (pipes[0][0], pipes[1][1], pipes[2][1]):
                    os.close(fd)  # the child's ends
                fds = {pipes[1][0]: "stdout", pipes[2][0]: "stderr"}
                stdin_fd = pipes[0][1]
        except OSError as exc:
            if master is not None:
                os.close(master)
            cwd = req.get("cwd")
            field = "cwd" if cwd and getattr(exc, "filename", None) == cwd else "cmd"
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            send({"ev": "failed", "id": cid, "field": field, "code": code, "error": exc.strerror or str(exc)})
            return
        child = Child(cid, proc, fds, stdin_fd, master)
        self.children[cid] = child
        for fd, name in fds.items():
            os.set_blocking(fd, False)
            self.by_fd[fd] = (child, name)
            self.sel.register(fd, selectors.EVENT_READ, "child")
        if not use_pty:
            os.set_blocking(stdin_fd, False)
        send({"ev": "started", "id": cid, "pid": proc.pid})
        if req.get("stdin"):
            child.pending += base64.b64decode(req["stdin"])
        if not req.get("keep_stdin") and not use_pty:
            child.close_stdin = True
        self.want_write(child)

    # ---- stdin of children ------------------------------------------------------------------
    def want_write(self, child):
        """Write what is pending; watch the fd for room only while something still is."""
        self.flush_stdin(child)
        fd = child.stdin_fd
        if fd is None:
            return
        events = (selectors.EVENT_WRITE if child.pending else 0) | (selectors.EVENT_READ if fd in self.by_fd else 0)
        key = self.sel.get_map().get(fd)
        if key is None and events:
            self.sel.register(fd, events, "child")
        elif key is not None and events and events != key.events:
            self.sel.modify(fd, events, "child")
        elif key is not None and not events:
            self.sel.unregister(fd)

    def flush_stdin(self, child):
        if child.stdin_fd is None:
            child.pending.clear()
            return
        try:
            while child.pending:
                n = os.write(child.stdin_fd, child.pending[:CHUNK])
                del child.pending[:n]
        except BlockingIOError:
            return
        except OSError:  # it closed its stdin, or exited
            child.pending.clear()
            child.close_stdin = child.master is None
        if child.close_stdin and not child.pending and child.master is None:
            self.close_stdin_fd(child)

    def close_stdin_fd(self, child):
        if child.stdin_fd in self.sel.get_map():
            self.sel.unregister(child.stdin_fd)
        os.close(child.stdin_fd)
        child.stdin_fd = None

    # ---- output and exits -----------------------------------------------------------------
    def read(self, fd, drain=False):
        child, name = self.by_fd[fd]
        while True:
            try:
                data = os.read(fd, CHUNK)
            except BlockingIOError:
                return
            except OSError as exc:  # EIO: a pty whose every slave closed
                if exc.errno != errno.EIO:
                    raise
                data = b""
            if not data:
                self.close_fd(fd)
                return
            send({"ev": "out", "id": child.id, "s": name, "d": base64.b64encode(data).decode()})
            if not drain:
                return

    def close_fd(self, fd):
        child, _ = self.by_fd.pop(fd)
        child.fds.pop(fd, None)
        if fd in self.sel.get_map():
            self.sel.unregister(fd)
        if fd == child.stdin_fd:  # a terminal's master: its input and output
            child.stdin_fd = None
        os.close(fd)

    def reap(self):
        for child in list(self.children.values()):
            code = child.proc.poll()
            if code is None:
                continue
            for fd in list(child.fds):  # what it wrote before it exited, then the exit
                self.read(fd, drain=True)
                if fd in child.fds:
                    self.close_fd(fd)
            if child.stdin_fd is not None and child.master is None:
                self.close_stdin_fd(child)
            del self.children[child.id]
            send({"ev": "exit", "id": child.id, "code": 128 - code if code < 0 else code})

    def run(self):
        while True:
            for key, mask in self.sel.select():
                if key.data == "stdin":
                    if not self.read_requests():
                        return
                elif key.data == "wake":
                    try:
                        while os.read(self.wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                else:
                    if mask & selectors.EVENT_WRITE:
                        child = next((c for c in self.children.values() if c.stdin_fd == key.fd), None)
                        if child is not None:
                            self.want_write(child)
                    if mask & selectors.EVENT_READ and key.fd in self.by_fd:
                        self.read(key.fd)
            self.reap()

    def read_requests(self):
        try:
            data = os.read(0, CHUNK)
        except BlockingIOError:
            return True
        if not data:
            return False
        self.inbuf += data
        while b"\n" in self.inbuf:
            line, _, rest = bytes(self.inbuf).partition(b"\n")
            self.inbuf = bytearray(rest)
            if line.strip():
                self.handle(json.loads(line))
        return True

    def kill_all(self):
        for child in self.children.values():
            try:
                os.killpg(child.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def winsize(fd, rows, cols):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", int(rows), int(cols), 0, 0))


def controlling_tty():
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # the pty (its stdin) becomes the new session's terminal


def main():
    if len(sys.argv) > 1 and sys.argv[1]:
        load_seccomp(bytes.fromhex(sys.argv[1]))
    if len(sys.argv) > 2 and sys.argv[2]:
        # The kernel's environment, for the processes we start. It came as an argument, not
        # as our own environment: the root steps before us (nsenter, setpriv) ran with
        # the server's fixed one, since the kernel's is the session's to change.
        os.environ.clear()
        os.environ.update(json.loads(bytes.fromhex(sys.argv[2]).decode()))
    supervisor = Supervisor()
    try:
        supervisor.run()
    finally:
        supervisor.kill_all()


if __name__ == "__main__":
    main()
