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

Signals: SIGINT (Jupyter's "signal" interrupt) and SIGTERM are passed to the kernel. The
bridge exits with the kernel's exit status, so a kernel that exits mid-run is reported
with its own status.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
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


def relay(context: zmq.Context, ipc_info: dict[str, Any], tcp_info: dict[str, Any]) -> list[zmq.Socket]:
    """Bind the IPC side, connect the TCP side, and relay each channel in a daemon thread.

    ROUTER in front keeps each client's identity on the envelope; the kernel's replies
    carry it back. The shell and stdin relays share one identity towards the kernel,
    because a kernel sends ``input_request`` on stdin to the identity it saw on shell.
    """
    identity = os.urandom(8)
    sockets = []
    for channel in CHANNELS:
        if channel == "iopub_port":
            front, back = context.socket(zmq.XPUB), context.socket(zmq.XSUB)
        else:
            front, back = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
            if channel in ("shell_port", "stdin_port"):
                back.setsockopt(zmq.IDENTITY, identity)
        for sock in (front, back):
            sock.setsockopt(zmq.LINGER, 0)
        front.bind(ipc_address(ipc_info, channel))
        back.connect(f"tcp://{LOOPBACK}:{tcp_info[channel]}")
        sockets += [front, back]
        threading.Thread(target=_proxy, args=(front, back), name=f"relay-{channel}", daemon=True).start()
    return sockets


def _proxy(front: zmq.Socket, back: zmq.Socket) -> None:
    try:
        zmq.proxy(front, back)
    except zmq.ZMQError:
        pass  # the context was terminated: we are exiting


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
    relay(zmq.Context(), ipc_info, tcp_info)
    kernel = subprocess.Popen([a.replace(PLACEHOLDER, tcp_file) for a in kernel_argv])

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
    # Not sys.exit: terminating the ZeroMQ context would wait for the relay threads,
    # which block in zmq.proxy for as long as their sockets are open.
    os._exit(code)
