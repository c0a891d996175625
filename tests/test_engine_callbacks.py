"""Completion callbacks on a real engine and real kernels, delivered to a real HTTP
receiver on 127.0.0.1: signatures, retries, the record of attempts, and the addresses a
callback may not point at (the allow-list is loopback here; nothing ever connects to
another address)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import os
import stat
import time

import pytest
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

from era_kernel.engine import SessionManager
from era_kernel.engine.callback_targets import AllowList
from era_kernel.engine.callbacks import SECRET_FILE, CallbackSender
from era_kernel.engine.tickets import RunTicket
from era_kernel import models
from era_kernel.errors import BadRequest

KEY = "test-callback-key"
WAIT = 60  # seconds: a kernel start on a loaded 2-core machine


def verify(key: bytes, headers, body: bytes, max_age: float = 300) -> bool:
    """The README's verification (Completion callbacks), word for word."""
    timestamp = headers["X-Era-Timestamp"]
    if abs(time.time() - int(timestamp)) > max_age:
        return False  # stale: possibly a replay
    expected = "sha256=" + hmac.new(key, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, headers["X-Era-Signature"])


class Receiver:
    """An HTTP endpoint that keeps every delivery and answers the statuses it is given
    in turn (200 once they run out)."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.deliveries: asyncio.Queue = asyncio.Queue()
        receiver = self

        class Hook(RequestHandler):
            def post(self) -> None:
                receiver.deliveries.put_nowait((dict(self.request.headers), self.request.body))
                self.set_status(receiver.statuses.pop(0) if receiver.statuses else 200)
                self.finish("ok")

        sockets = bind_sockets(0, "127.0.0.1")
        self.server = HTTPServer(Application([(r"/hook", Hook)]))
        self.server.add_sockets(sockets)
        self.url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}/hook"

    async def next(self) -> tuple[dict[str, str], bytes]:
        return await asyncio.wait_for(self.deliveries.get(), WAIT)

    async def close(self) -> None:
        self.server.stop()
        await self.server.close_all_connections()


@pytest.fixture
async def receiver():
    r = Receiver()
    yield r
    await r.close()


def loopback_settings(era_settings, **overrides):
    values = dict(ERA_CALLBACK_ALLOW="127.0.0.0/8", ERA_CALLBACK_SECRET=KEY, ERA_CALLBACK_BACKOFF=0.01,
                  ERA_CALLBACK_TIMEOUT=5.0)
    return era_settings.replace(**{**values, **overrides})


@pytest.fixture
async def engine(era_settings):
    manager = SessionManager(loopback_settings(era_settings))
    await manager.start()
    yield manager
    await manager.shutdown()


async def recorded_callback(engine, sid: str, run_id: str, attempts: int) -> dict:
    """The run's ``callback`` once it holds ``attempts`` attempts (written after each)."""
    deadline = time.monotonic() + 30
    while True:
        callback = (await engine.get_run(sid, run_id)).get("callback") or {}
        if len(callback.get("attempts", [])) >= attempts or time.monotonic() > deadline:
            return callback
        await asyncio.sleep(0.02)


async def test_a_finished_run_is_posted_signed_and_its_delivery_recorded(engine, session, receiver):
    answer = await engine.run(session, {"code": "print('hi from the run')", "background": True,
                                        "callback_url": receiver.url})
    headers, body = await receiver.next()
    assert verify(KEY.encode(), headers, body), "the signature verifies with the key"
    assert not verify(b"another key", headers, body)
    assert not verify(KEY.encode(), headers, body + b" "), "the body is what is signed"
    assert headers["Content-Type"] == "application/json" and headers["X-Era-Run-Id"] == answer["run_id"]
    doc = json.loads(body)
    assert doc["run_id"] == answer["run_id"] and doc["session_id"] == session
    assert doc["status"] == "completed" and doc["exit_code"] == 0 and doc["reason"] is None
    assert doc["stdout"] == "hi from the run\n" and doc["callback_url"] == receiver.url
    assert "callback" not in doc, "the body is the run's record, not the delivery's"

    callback = await recorded_callback(engine, session, answer["run_id"], 1)
    assert callback["url"] == receiver.url and callback["delivered"] is True
    [attempt] = callback["attempts"]
    assert attempt["status_code"] == 200 and attempt["duration_ms"] >= 0 and attempt["at"].endswith("Z")
    record = await engine.get_run(session, answer["run_id"])
    assert record["stdout"] == "hi from the run\n" and record["status"] == "completed", "no field lost"
    assert receiver.deliveries.empty(), "delivered once"


async def test_a_failing_receiver_is_retried_and_every_attempt_recorded(engine, session, receiver):
    receiver.statuses = [500, 503]
    answer = await engine.run(session, {"code": "print('before'); 1/0", "background": True,
                                        "callback_url": receiver.url})
    deliveries = [await receiver.next() for _ in range(3)]
    bodies = {body for _, body in deliveries}
    assert len(bodies) == 1, "every attempt carries the same record"
    assert all(verify(KEY.encode(), headers, body) for headers, body in deliveries), "each attempt is signed"
    doc = json.loads(deliveries[0][1])
    assert doc["status"] == "failed" and doc["exit_code"] == 1 and doc["stdout"] == "before\n"
    assert doc["error"]["ename"] == "ZeroDivisionError"

    callback = await recorded_callback(engine, session, answer["run_id"], 3)
    assert [a.get("status_code") for a in callback["attempts"]] == [500, 503, 200]
    assert callback["delivered"] is True


async def test_a_4xx_ends_the_delivery_and_a_cancelled_run_has_its_callback(engine, session, receiver):
    receiver.statuses = [404]
    blocker = await engine.run(session, {"code": "import time; time.sleep(60)", "background": True})
    queued = await engine.run(session, {"code": "print('never')", "background": True, "callback_url": receiver.url})
    assert queued["status"] == "queued" and queued["position"] >= 1
    await engine.cancel_run(session, queued["run_id"])
    headers, body = await receiver.next()
    doc = json.loads(body)
    assert doc["status"] == "cancelled" and doc["reason"] == "cancelled by request"
    callback = await recorded_callback(engine, session, queued["run_id"], 1)
    assert [a["status_code"] for a in callback["attempts"]] == [404] and callback["delivered"] is False
    await asyncio.sleep(0.2)
    assert receiver.deliveries.empty(), "a 404 is not retried"
    await engine.cancel_run(session, blocker["run_id"])


async def test_bad_callback_urls_are_400_naming_the_field_and_queue_nothing(engine, session):
    cases = {
        "ftp://127.0.0.1/hook": "http:// or https://",
        "file:///etc/passwd": "http:// or https://",
        "http://10.0.0.1/hook": "10.0.0.1, which ERA_CALLBACK_ALLOW does not allow",
        "http://169.254.169.254/latest/meta-data/": "ERA_CALLBACK_ALLOW does not allow",
        "http://[::ffff:10.0.0.1]/hook": "ERA_CALLBACK_ALLOW does not allow",
        # A host name (not an address literal) the resolver turns into 10.0.0.1.
        "http://167772161/hook": "resolves to 10.0.0.1",
        "http://no-such-host.invalid/hook": "resolve",
    }
    for url, message in cases.items():
        with pytest.raises(BadRequest) as caught:
            await engine.run(session, {"code": "1", "background": True, "callback_url": url})
        assert caught.value.field == "callback_url" and message in caught.value.message, (url, caught.value.message)
    with pytest.raises(BadRequest) as caught:
        await engine.run(session, {"code": "1", "callback_url": "http://127.0.0.1:9/hook"})
    assert caught.value.field == "callback_url" and "background: true" in caught.value.message
    assert await engine.store.unfinished_runs() == [] and await engine.runs(session) == []


async def test_an_address_refused_at_delivery_is_never_connected_to(engine, session, receiver):
    """What the allow-list refuses when the delivery resolves the host (its DNS answer
    changed since submission, say) is not connected to, and not retried."""
    refusing = CallbackSender(engine.settings.replace(ERA_CALLBACK_ALLOW="10.0.0.0/8"), engine.store)
    await refusing.start()
    try:
        request = models.parse(models.RunRequest, {"code": "1", "background": True})
        ticket = RunTicket("run_refused", session, request, background=True, status="completed",
                           extra={"callback_url": receiver.url})
        await engine.store.put_run(session, ticket.record())
        refusing.run_finished(ticket, {})
        callback = await recorded_callback(engine, session, "run_refused", 1)
    finally:
        await refusing.stop()
    [attempt] = callback["attempts"]
    assert "127.0.0.1, which ERA_CALLBACK_ALLOW does not allow" in attempt["error"]
    assert callback["delivered"] is False and receiver.deliveries.empty()


async def test_a_run_cut_off_by_a_restart_has_its_callback_after_the_start(era_settings, receiver):
    settings = loopback_settings(era_settings)
    first = SessionManager(settings)
    await first.start()
    try:
        sid = (await first.create({"id": "cut"}))["id"]
        request = models.parse(models.RunRequest, {"code": "1", "background": True})
        ticket = RunTicket("run_cut", sid, request, background=True, status="running",
                           extra={"callback_url": receiver.url})
        await first.store.put_run(sid, ticket.record())  # as a process killed mid-run leaves it
    finally:
        await first.shutdown()
    second = SessionManager(settings)
    await second.start()
    try:
        headers, body = await receiver.next()
        doc = json.loads(body)
        assert verify(KEY.encode(), headers, body)
        assert doc["run_id"] == "run_cut" and doc["status"] == "interrupted" and doc["reason"] == "server restarted"
        assert (await recorded_callback(second, sid, "run_cut", 1))["delivered"] is True
    finally:
        await second.shutdown()


async def test_the_generated_key_is_private_and_kept_across_restarts(era_settings):
    settings = loopback_settings(era_settings, ERA_CALLBACK_SECRET="")
    keys = []
    for _ in range(2):
        sender = CallbackSender(settings, store=None)
        await sender.start()
        keys.append(sender._key)
        await sender.stop()
    path = settings.data_dir / SECRET_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert keys[0] == keys[1] == path.read_text().strip().encode() and len(keys[0]) == 64
    with_api_key = CallbackSender(settings.replace(ERA_API_KEY="the-api-key"), store=None)
    await with_api_key.start()
    assert with_api_key._key == b"the-api-key", "without a dedicated secret, the API key signs"
    await with_api_key.stop()


async def test_the_default_allow_list_admits_public_addresses_only():
    public = AllowList.parse("public")
    for address in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"):
        assert public.allows_address(ipaddress.ip_address(address)), address
    for address in ("127.0.0.1", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
                    "0.0.0.0", "224.0.0.1", "255.255.255.255", "240.0.0.1", "::1", "::", "fe80::1", "fc00::1",
                    "ff02::1", "::ffff:10.0.0.1", "::ffff:127.0.0.1", "64:ff9b::a00:1", "2002:a00:1::1"):
        assert not public.allows_address(ipaddress.ip_address(address)), address
    assert AllowList.parse("none") == AllowList()
    loopback = AllowList.parse("127.0.0.0/8, hooks.internal.")
    assert loopback.allows_address(ipaddress.ip_address("::ffff:127.0.0.1")) and loopback.allows_host("HOOKS.internal")
    assert not loopback.allows_address(ipaddress.ip_address("8.8.8.8"))
    for bad in ("10.0.0.0/33", "not a host", "http://x"):
        with pytest.raises(ValueError):
            AllowList.parse(bad)
