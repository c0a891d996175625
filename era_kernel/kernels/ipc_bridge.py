"""Run a TCP-only Jupyter kernel behind the IPC sockets ERA's provisioners hand out.

    python -m era_kernel.kernels.ipc_bridge CONNECTION_FILE -- KERNEL_ARGV...

ERA's kernels talk over ZeroMQ IPC sockets (no port is opened, and a kernel without
network still reaches the host). Deno's kernel only listens on TCP. This bridge reads
the IPC connection file, writes a TCP one on 127.0.0.1 with the same key (the
``{tcp_connection_file}`` placeholder in KERNEL_ARGV), starts the kernel as its child and
relays every channel between the two. The TCP side stays on the loopback of the
kernel's own network namespace (bubblewrap's ``--unshare-net``, Docker's network
``none``); with network access it is the host's loopback, where the HMAC key still
guards the kernel as it does any TCP Jupyter kernel.

Deno publishes part of a cell's output after its "idle" status; the bridge holds that
status back until the output has stopped (``IdleHold``).

When a cell fails and the kernel says only "Execution failed" (Deno does, for an import
that cannot load: an ``npm:`` package with no network), the bridge puts what the kernel
wrote to its stderr meanwhile into the reply and publishes it as the cell's error
(``Failures``), with the way to allow network when that was the cause.

Signals: SIGINT (Jupyter's "signal" interrupt) and SIGTERM are passed to the kernel. The
bridge exits with the kernel's exit status, so a kernel that exits mid-run is reported
with its own status.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import zmq

PLACEHOLDER = "{tcp_connection_file}"
CHANNELS = ("shell_port", "control_port", "stdin_port", "hb_port", "iopub_port")
LOOPBACK = "127.0.0.1"


def free_ports(count: int) -> list[int]:
    """Ports nobody listens on now (the kernel binds them a moment later, as jupyter_client does)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOOPBACK, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tcp_connection_info(ipc_info: dict[str, Any]) -> dict[str, Any]:
    info = {k: ipc_info[k] for k in ("key", "signature_scheme") if k in ipc_info}
    info.update(transport="tcp", ip=LOOPBACK, kernel_name=ipc_info.get("kernel_name", ""))
    info.update(zip(CHANNELS, free_ports(len(CHANNELS))))
    return info


def ipc_address(info: dict[str, Any], channel: str) -> str:
    # jupyter_client's convention for IPC: "<ip>-<port>" is a socket file path.
    return f"ipc://{info['ip']}-{info[channel]}"


class Relay:
    """Relays every channel between the IPC side (clients) and the TCP side (the kernel).

    Deno's kernel answers on the connection a request came in on but drops the routing
    frames in front of ``<IDS|MSG>``, so a plain ROUTER/DEALER proxy would lose track of
    who asked. Instead each client gets its own connection to the kernel per channel,
    with the client's identity, and whatever comes back on it goes to that client.
    IOPub is a plain XPUB/XSUB pair (subscriptions up, broadcasts down). One thread,
    one poller.
    """

    def __init__(self, context: zmq.Context, ipc_info: dict[str, Any], tcp_info: dict[str, Any]):
        self.context = context
        self.tcp_info = tcp_info
        self.key = ipc_info.get("key", "").encode()
        self.failures = Failures()
        self.cells: dict[str, int] = {}  # execute_request id -> where the kernel's stderr was then
        self.errored: set[str] = set()  # requests the kernel published an error for
        self.poller = zmq.Poller()
        self.fronts: dict[zmq.Socket, str] = {}
        self.backs: dict[zmq.Socket, tuple[zmq.Socket, bytes]] = {}  # kernel side -> (front, client id)
        self.by_client: dict[tuple[str, bytes], zmq.Socket] = {}
        for channel in CHANNELS:
            front = self._socket(zmq.XPUB if channel == "iopub_port" else zmq.ROUTER)
            front.bind(ipc_address(ipc_info, channel))
            self.fronts[front] = channel
            self.poller.register(front, zmq.POLLIN)
        self.iopub_front = next(f for f, c in self.fronts.items() if c == "iopub_port")
        self.iopub_back = self._socket(zmq.XSUB)
        self.iopub_back.connect(self._tcp("iopub_port"))
        self.poller.register(self.iopub_back, zmq.POLLIN)
        self.held = IdleHold()

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        return sock

    def _tcp(self, channel: str) -> str:
        return f"tcp://{LOOPBACK}:{self.tcp_info[channel]}"

    def _kernel_side(self, front: zmq.Socket, channel: str, client: bytes) -> zmq.Socket:
        back = self.by_client.get((channel, client))
        if back is None:
            back = self._socket(zmq.DEALER)
            back.setsockopt(zmq.IDENTITY, client)
            back.connect(self._tcp(channel))
            self.by_client[(channel, client)] = back
            self.backs[back] = (front, client)
            self.poller.register(back, zmq.POLLIN)
        return back

    def run(self) -> None:
        try:
            while True:
                timeout = self.held.next_timeout()
                for sock, _ in self.poller.poll(timeout):
                    frames = sock.recv_multipart()
                    if sock is self.iopub_front:
                        self.iopub_back.send_multipart(frames)
                    elif sock is self.iopub_back:
                        self._note_error(frames)
                        for out in self.held.offer(frames):
                            self.iopub_front.send_multipart(out)
                    elif sock in self.fronts:
                        client, *message = frames
                        self._note_request(message)
                        self._kernel_side(sock, self.fronts[sock], client).send_multipart(message)
                    else:
                        front, client = self.backs[sock]
                        front.send_multipart([client, *self._explained(frames)])
                for out in self.held.due():
                    self.iopub_front.send_multipart(out)
        except zmq.ZMQError:
            pass  # sockets went away: we are exiting


    # ---- failures the kernel did not explain (Failures) ---------------------------------
    def _note_request(self, frames: list[bytes]) -> None:
        message = _parse(frames)
        if message and message["header"].get("msg_type") == "execute_request":
            self.cells[message["header"].get("msg_id", "")] = self.failures.mark()

    def _note_error(self, frames: list[bytes]) -> None:
        message = _parse(frames)
        if message and message["header"].get("msg_type") == "error":
            self.errored.add(message["parent"].get("msg_id", ""))

    def _explained(self, frames: list[bytes]) -> list[bytes]:
        """A reply as it came, or, for a failed cell the kernel said nothing about, one
        that says what it wrote to stderr (and the same published as the cell's error)."""
        message = _parse(frames)
        if not message or message["header"].get("msg_type") != "execute_reply":
            return frames
        request = message["parent"].get("msg_id", "")
        mark = self.cells.pop(request, None)
        published = request in self.errored
        self.errored.discard(request)
        content = message["content"]
        if content.get("status") != "error" or content.get("traceback") or mark is None:
            return frames
        error = self.failures.explain(content, self.failures.since(mark))
        if not published:
            header = dict(message["header"], msg_type="error", msg_id=uuid.uuid4().hex,
                          date=datetime.now(timezone.utc).isoformat())
            for out in self.held.offer(self._signed([b"error"], header, message["parent"], {}, error)):
                self.iopub_front.send_multipart(out)
        return self._signed(message["identities"], message["header"], message["parent"], message["metadata"],
                            dict(content, **error))

    def _signed(self, identities: list[bytes], *parts: dict) -> list[bytes]:
        bodies = [json.dumps(part).encode() for part in parts]
        signature = hmac.new(self.key, b"".join(bodies), hashlib.sha256).hexdigest().encode() if self.key else b""
        return [*identities, b"<IDS|MSG>", signature, *bodies]


class Failures:
    """The kernel's stderr, passed on unchanged and its recent part kept, to say why a
    cell failed when the kernel's reply does not (see the module's docstring)."""

    KEEP = 16384  # bytes of recent stderr
    ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
    NO_NETWORK = ("dns error", "failed to lookup address", "error sending request", "network is unreachable",
                  "connection refused", "tcp connect error")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.recent = bytearray()
        self.total = 0

    def read(self, pipe: Any) -> None:
        out = getattr(sys.stderr, "buffer", None)
        for chunk in iter(lambda: pipe.read1(65536), b""):
            if out is not None:
                try:
                    out.write(chunk)
                    out.flush()
                except (OSError, ValueError):  # our stderr is gone: keep draining, or the kernel blocks
                    out = None
            with self.lock:
                self.recent += chunk
                self.total += len(chunk)
                del self.recent[:-self.KEEP]

    def mark(self) -> int:
        with self.lock:
            return self.total

    def since(self, mark: int) -> str:
        with self.lock:
            fresh = self.recent[-min(self.total - mark, len(self.recent)):] if self.total > mark else b""
            return self.ANSI.sub("", bytes(fresh).decode(errors="replace"))

    def explain(self, content: dict[str, Any], stderr: str) -> dict[str, Any]:
        """Deno says "Execution failed" and, on stderr, only "Download <url>" for the
        imports it fetched when the download failed (the reason is not printed)."""
        said = str(content.get("evalue") or "")
        lines = [line.strip() for line in stderr.split("\nStack backtrace:")[0].splitlines() if line.strip()]
        downloads = [line.split(None, 1)[1] for line in lines if line.startswith("Download ") and " " in line]
        if downloads:
            reason = (f"{said or 'the cell failed'}: could not download {downloads[-1]} (npm:, jsr: and "
                      "remote imports are downloaded when a cell first runs them)")
        elif lines:
            reason = "\n".join(lines)
        else:
            reason = f"the kernel gave no reason{f' (it said: {said})' if said else ''}"
        if (downloads or any(h in reason.lower() for h in self.NO_NETWORK)) and not has_network():
            reason += ("\nThis session has no internet access. Create the session with "
                       "\"allowInternetAccess\": true to allow it.")
        return {"ename": str(content.get("ename") or "Error"), "evalue": reason, "traceback": reason.splitlines()}


def has_network() -> bool:
    """Whether this network namespace has an interface besides loopback (a sandbox or a
    container without network has only lo)."""
    try:
        with open("/proc/net/dev") as fh:
            names = {line.split(":", 1)[0].strip() for line in fh.readlines()[2:] if ":" in line}
    except OSError:
        return True  # cannot tell: say nothing about network
    return bool(names - {"lo"})


class IdleHold:
    """Holds a request's "idle" status until the kernel has been quiet on it for a moment.

    Deno's kernel (2.x) publishes some of a cell's output a few milliseconds *after*
    the idle status, and clients stop collecting at idle, so the tail of the output was
    lost. Messages are forwarded as they come; only idle waits, until no message of
    the same request came for ``QUIET`` seconds (at most ``LIMIT``). Frames are passed
    on untouched (their signatures stay valid); only the header is read.
    """

    QUIET = 0.03
    LIMIT = 2.0

    def __init__(self) -> None:
        self.waiting: dict[str, tuple[list[bytes], float, float]] = {}  # request id -> idle, quiet until, limit

    def offer(self, frames: list[bytes]) -> list[list[bytes]]:
        parent, is_idle = _parent_and_idle(frames)
        now = time.monotonic()
        if is_idle and parent:
            self.waiting[parent] = (frames, now + self.QUIET, now + self.LIMIT)
            return []
        if parent in self.waiting:
            idle, _, limit = self.waiting[parent]
            self.waiting[parent] = (idle, now + self.QUIET, limit)
        return [frames]

    def next_timeout(self) -> int | None:
        """Milliseconds until the next held idle is due (poll's timeout), or None."""
        if not self.waiting:
            return None
        soonest = min(min(quiet, limit) for _, quiet, limit in self.waiting.values())
        return max(0, int((soonest - time.monotonic()) * 1000) + 1)

    def due(self) -> list[list[bytes]]:
        now = time.monotonic()
        ready = [p for p, (_, quiet, limit) in self.waiting.items() if min(quiet, limit) <= now]
        return [self.waiting.pop(p)[0] for p in ready]


def _parent_and_idle(frames: list[bytes]) -> tuple[str | None, bool]:
    try:
        at = frames.index(b"<IDS|MSG>")
        header, parent, content = (json.loads(frames[at + i]) for i in (2, 3, 5))
    except (ValueError, IndexError):
        return None, False
    is_idle = header.get("msg_type") == "status" and content.get("execution_state") == "idle"
    return parent.get("msg_id") if isinstance(parent, dict) else None, is_idle


def _parse(frames: list[bytes]) -> dict[str, Any] | None:
    try:
        at = frames.index(b"<IDS|MSG>")
        header, parent, metadata, content = (json.loads(frames[at + i]) for i in (2, 3, 4, 5))
    except (ValueError, IndexError):
        return None
    if not all(isinstance(part, dict) for part in (header, parent, metadata, content)):
        return None
    return {"identities": frames[:at], "header": header, "parent": parent, "metadata": metadata, "content": content,
            "buffers": frames[at + 6:]}


def _die_with_parent() -> None:
    # Started outside ERA's sandboxes (a plain Jupyter), the kernel must not outlive
    # a bridge that was killed: PR_SET_PDEATHSIG, as the sandboxes' pid namespaces do.
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    connection_file, kernel_argv = argv[0], argv[2:]
    with open(connection_file) as fh:
        ipc_info = json.load(fh)
    if ipc_info.get("transport") != "ipc":
        # Already TCP: nothing to bridge.
        return subprocess.call([a.replace(PLACEHOLDER, connection_file) for a in kernel_argv])
    tcp_info = tcp_connection_info(ipc_info)
    private = tempfile.mkdtemp(prefix="era-bridge-")  # 0700: the key stays ours
    tcp_file = os.path.join(private, "connection.json")
    fd = os.open(tcp_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(tcp_info, fh)
    relay = Relay(zmq.Context(), ipc_info, tcp_info)
    threading.Thread(target=relay.run, name="era-relay", daemon=True).start()
    kernel = subprocess.Popen([a.replace(PLACEHOLDER, tcp_file) for a in kernel_argv], preexec_fn=_die_with_parent,
                              stderr=subprocess.PIPE)
    threading.Thread(target=relay.failures.read, args=(kernel.stderr,), name="era-stderr", daemon=True).start()

    def forward(signum: int, _frame: Any) -> None:
        if kernel.poll() is None:
            kernel.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        while True:
            try:
                status = kernel.wait()
                break
            except InterruptedError:
                continue
    finally:
        try:
            os.unlink(tcp_file)
            os.rmdir(private)
        except OSError:
            pass
    return status if status >= 0 else 128 - status  # killed by a signal: shell convention


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Not sys.exit: terminating the ZeroMQ context would wait for the relay thread,
    # which blocks in poll for as long as its sockets are open.
    os._exit(code)
