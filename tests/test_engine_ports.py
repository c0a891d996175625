"""``engine.ports`` on both provisioners: a listener the server binds inside a session's
sandbox network is what code in the session reaches at 127.0.0.1 (the primitive an
address like ERA_STORAGE_URL is made from); a connection the other way reaches the
session's own server (tests/test_server_proxy.py: the session still reaches nothing else)."""

from __future__ import annotations

import asyncio

from .conftest import both_provisioners

pytestmark = both_provisioners


async def test_a_listener_inside_the_sandbox_and_a_connection_into_it(engine):
    sid = (await engine.create({"language": "python"}))["id"]
    loop = asyncio.get_running_loop()
    listener = await engine.ports.listen(sid)
    port = listener.getsockname()[1]
    try:
        code = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), 5)\n"
                "s.sendall(b'from the session')\nprint(s.recv(100).decode())")
        run = asyncio.ensure_future(engine.run(sid, {"code": code, "timeout": 30}))
        conn, _ = await asyncio.wait_for(loop.sock_accept(listener), 20)
        with conn:
            conn.setblocking(False)
            assert await loop.sock_recv(conn, 100) == b"from the session"
            await loop.sock_sendall(conn, b"answered by the server")
        result = await run
        assert (result["exit_code"], result["stdout"]) == (0, "answered by the server\n"), result
    finally:
        listener.close()
    # The other way: a server in the session, reached by the engine, not by the host.
    serve = ("import socket, threading\nsrv = socket.socket(); srv.bind(('127.0.0.1', 7000)); srv.listen()\n"
             "threading.Thread(target=lambda: srv.accept()[0].sendall(b'hi from inside'), daemon=True).start()")
    assert (await engine.run(sid, {"code": serve, "timeout": 30}))["exit_code"] == 0
    sock = await engine.ports.connect(sid, 7000)
    try:
        assert await loop.sock_recv(sock, 100) == b"hi from inside"
    finally:
        sock.close()
