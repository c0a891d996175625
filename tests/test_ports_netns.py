"""``era_kernel.ports.netns`` against a real network namespace the test makes
(``unshare --net``, as root): a connection made inside it reaches what listens there and
nothing of the host's, a listener bound inside it is what code in the namespace reaches,
and the server's own threads never change namespace."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys

import pytest

from era_kernel.ports import netns

pytestmark = pytest.mark.skipif(os.getuid() != 0 or shutil.which("unshare") is None,
                                reason="entering a network namespace needs root (and unshare to make one)")

# Inside a fresh namespace: bring up lo, listen on 127.0.0.1:PORT, echo one line per connection.
ECHO = """
import socket, sys, subprocess
subprocess.run(['ip', 'link', 'set', 'lo', 'up'], check=False)
s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()
print('ready', flush=True)
while True:
    c, _ = s.accept()
    try:
        c.sendall(b'inside ' + c.recv(100))
    except OSError:
        pass
    c.close()
"""


@pytest.fixture
def namespace():
    """(path of a new network namespace, the port its echo server listens on)."""
    port = 18765
    proc = subprocess.Popen(["unshare", "--net", sys.executable, "-c", ECHO, str(port)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield f"/proc/{proc.pid}/ns/net", port
    finally:
        proc.kill()
        proc.wait()


async def test_a_connection_made_inside_reaches_what_listens_there_only(namespace):
    path, port = namespace
    assert not netns.same_namespace_as_ours(path) and netns.same_namespace_as_ours("/proc/self/ns/net")
    loop = asyncio.get_running_loop()
    sock = await netns.connect(path, port)
    try:
        await loop.sock_sendall(sock, b"hello")
        assert await loop.sock_recv(sock, 100) == b"inside hello"
    finally:
        sock.close()
    with pytest.raises(ConnectionRefusedError):  # nothing else listens in there
        await netns.connect(path, port + 1)
    with pytest.raises(OSError):  # and the namespace's port is not the host's
        socket.create_connection(("127.0.0.1", port), 1).close()


async def test_a_listener_bound_inside_is_what_code_inside_reaches(namespace):
    path, _ = namespace
    loop = asyncio.get_running_loop()
    listener = await netns.listen(path)
    port = listener.getsockname()[1]
    try:
        pid = path.split("/")[2]
        client = await asyncio.create_subprocess_exec(
            "nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-c",
            f"import socket; s = socket.create_connection(('127.0.0.1', {port}), 5); s.sendall(b'ping'); "
            "print(s.recv(100).decode())", stdout=asyncio.subprocess.PIPE)
        conn, _ = await asyncio.wait_for(loop.sock_accept(listener), 10)
        with conn:
            conn.setblocking(False)
            assert await loop.sock_recv(conn, 100) == b"ping"
            await loop.sock_sendall(conn, b"pong from the server")
        out, _ = await client.communicate()
        assert out.decode().strip() == "pong from the server"
    finally:
        listener.close()
    with pytest.raises(OSError):  # bound in there, not on the host
        socket.create_connection(("127.0.0.1", port), 1).close()


async def test_the_servers_threads_stay_in_their_namespace(namespace):
    path, port = namespace
    ours = os.readlink("/proc/thread-self/ns/net")
    for _ in range(5):
        (await netns.connect(path, port)).close()
    assert os.readlink("/proc/thread-self/ns/net") == ours
    seen = await asyncio.gather(*(asyncio.to_thread(os.readlink, "/proc/thread-self/ns/net") for _ in range(8)))
    assert set(seen) == {ours}
    # The one thread that enters namespaces is back in ours between sockets.
    import threading

    workers = [t for t in threading.enumerate() if t.name == "era-netns"]
    assert workers and all(os.readlink(f"/proc/self/task/{t.native_id}/ns/net") == ours for t in workers)
    with pytest.raises(netns.NamespaceError):
        netns.make_socket("/proc/999999999/ns/net")
