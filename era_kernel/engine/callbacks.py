"""Completion callbacks: when a background run that carries a ``callback_url`` ends
(completed, failed, cancelled or interrupted), its record is POSTed there, signed, with
retries, and every attempt is written on the run's record.

The body is the run's record as ``GET .../runs/{run_id}`` answers it (without the
``callback`` field this service keeps there). Headers::

    Content-Type: application/json
    X-Era-Run-Id: <run id>
    X-Era-Timestamp: <unix seconds of this attempt>
    X-Era-Signature: sha256=<hex HMAC-SHA256(key, timestamp + "." + raw body)>

The timestamp is inside the signed bytes, so a receiver that refuses old timestamps
cannot be replayed an old delivery (README: Completion callbacks). The key is
``ERA_CALLBACK_SECRET``; else ``ERA_API_KEY`` (the server's one key: whoever holds it
can verify); else a random one made at first start in ``$ERA_DATA_DIR/callback-secret``
(mode 0600), kept across restarts.

Attempts: at most ``ERA_CALLBACK_ATTEMPTS``, each bounded by ``ERA_CALLBACK_TIMEOUT``,
``ERA_CALLBACK_BACKOFF`` seconds apart and doubling, with jitter. A 2xx answer is
delivered; 408, 429, 5xx and network errors are retried; any other answer (a 4xx, a
redirect, which is never followed) and an address the allow-list refuses end it. The
run record's ``callback`` is ``{url, attempts: [{at, status_code | error,
duration_ms}], delivered}``.

Deliveries are at least once (an answer lost on the way is retried): receivers dedupe
by run id. A server stopping cancels the deliveries still pending; they are not resumed
at the next start.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import random
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tornado.httpclient import HTTPRequest
from tornado.simple_httpclient import SimpleAsyncHTTPClient

from .callback_targets import AllowList, CheckedResolver, TargetDenied, check_url
from .results import utc_now

if TYPE_CHECKING:
    from ..config import Settings
    from ..store.base import MetadataStore
    from .tickets import RunTicket

log = logging.getLogger("era.callbacks")

SECRET_FILE = "callback-secret"
CONCURRENCY = 16  # deliveries in flight at once; the others wait their turn, not in tornado's queue
MAX_RETRY_AFTER = 300.0  # seconds: the most of a receiver's Retry-After that is honoured
RETRY_STATUSES = frozenset({408, 429})  # 4xx that mean "later", not "never"
SIGN_IN_THREAD = 256 * 1024  # bodies above this are signed off the event loop

DELIVERED, RETRY, GIVE_UP = "delivered", "retry", "give up"


def signature(key: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Era-Signature`` value: what a receiver recomputes to verify a delivery."""
    mac = hmac.new(key, timestamp.encode() + b".", hashlib.sha256)
    mac.update(body)
    return "sha256=" + mac.hexdigest()


class CallbackSender:
    """Registered on ``RunQueue.on_finished``; ``start`` before the queue recovers (runs
    ended by the restart have callbacks too), ``stop`` before the store closes."""

    def __init__(self, settings: "Settings", store: "MetadataStore") -> None:
        self.settings = settings
        self.store = store
        # Parsed now: a typo in ERA_CALLBACK_ALLOW fails the engine's construction, not a run.
        self.allow = AllowList.parse(settings["ERA_CALLBACK_ALLOW"])
        self._key: bytes | None = None
        self._client: SimpleAsyncHTTPClient | None = None
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self._tasks: set[asyncio.Task] = set()

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        self._key = await self._signing_key()
        # Our own client (force_instance), never the shared one: its resolver is the
        # allow-list's, and closing it at stop touches nobody else's requests.
        self._client = SimpleAsyncHTTPClient(force_instance=True, max_clients=CONCURRENCY,
                                             resolver=CheckedResolver(allow=self.allow))

    async def stop(self) -> None:
        """Cancel pending deliveries (their attempts so far stay recorded) and close."""
        client, self._client = self._client, None  # runs ending from now on send nothing
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if client is not None:
            client.close()

    async def _signing_key(self) -> bytes:
        secret = self.settings["ERA_CALLBACK_SECRET"] or self.settings["ERA_API_KEY"]
        if not secret:
            secret = await asyncio.to_thread(_stored_secret, self.settings.data_dir / SECRET_FILE)
        return secret.encode()

    # ---- submission ---------------------------------------------------------------------------
    async def check(self, url: str) -> None:
        """BadRequest (field ``callback_url``) unless every address of the URL's host is
        allowed; called before the run is queued."""
        await check_url(self.allow, url)

    # ---- delivery ------------------------------------------------------------------------------
    def run_finished(self, ticket: "RunTicket", result: dict[str, Any]) -> None:
        """``RunQueue.on_finished``: on the event loop, so it only starts a task."""
        url = ticket.extra.get("callback_url")
        if not url:
            return
        if self._client is None:
            log.warning("run %s ended while callbacks are stopped: its callback is not sent", ticket.run_id)
            return
        task = asyncio.create_task(self._deliver(ticket.session_id, ticket.run_id, url),
                                   name=f"era-callback-{ticket.run_id}")
        self._tasks.add(task)
        task.add_done_callback(self._delivery_done)

    def _delivery_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a callback delivery failed: %r", task.exception())

    async def _deliver(self, session_id: str, run_id: str, url: str) -> None:
        # The finished record was queued before on_finished ran, and the store applies
        # calls in order: this read sees it.
        doc = await self.store.get_run(session_id, run_id)
        if doc is None:
            return  # the session was deleted meanwhile
        doc.pop("callback", None)
        body = await asyncio.to_thread(_encode, doc)  # up to ERA_OUTPUT_LIMIT of output: not on the loop
        state: dict[str, Any] = {"url": url, "attempts": [], "delivered": False}
        most = max(1, self.settings["ERA_CALLBACK_ATTEMPTS"])
        for number in range(1, most + 1):
            async with self._slots:
                attempt, verdict, retry_after = await self._attempt(url, run_id, body)
            state["attempts"].append(attempt)
            state["delivered"] = verdict == DELIVERED
            await self._record(session_id, run_id, state)
            if verdict != RETRY or number == most:
                break
            await asyncio.sleep(self._delay(number, retry_after))
        where = url.split("?", 1)[0]  # a query may carry the receiver's token: not in the logs
        if state["delivered"]:
            log.info("run %s: callback delivered to %s (attempt %d)", run_id, where, len(state["attempts"]))
        else:
            log.warning("run %s: callback to %s not delivered after %d attempt(s): %s", run_id, where,
                        len(state["attempts"]), state["attempts"][-1])

    async def _attempt(self, url: str, run_id: str, body: bytes) -> tuple[dict[str, Any], str, float | None]:
        """One POST: its record, the verdict, and the receiver's Retry-After (seconds)."""
        assert self._client is not None and self._key is not None
        timestamp = str(int(time.time()))  # fresh each attempt: a receiver may refuse stale ones
        signed = await _off_loop(len(body), signature, self._key, timestamp, body)
        timeout = self.settings["ERA_CALLBACK_TIMEOUT"]
        request = HTTPRequest(
            url, method="POST", body=body, connect_timeout=timeout, request_timeout=timeout,
            follow_redirects=False,  # a redirect could point anywhere; the receiver's URL is the one checked
            streaming_callback=lambda chunk: None,  # the answer's body is not needed: never buffered
            user_agent="era-kernel-callbacks",
            headers={"Content-Type": "application/json", "X-Era-Run-Id": run_id,
                     "X-Era-Timestamp": timestamp, "X-Era-Signature": signed})
        attempt: dict[str, Any] = {"at": utc_now()}
        started = time.monotonic()
        retry_after = None
        try:
            response = await self._client.fetch(request, raise_error=False)
        except TargetDenied as exc:
            attempt["error"], verdict = str(exc), GIVE_UP
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # refused, reset, timed out, TLS, DNS: maybe better later
            attempt["error"], verdict = f"{type(exc).__name__}: {exc}"[:300], RETRY
        else:
            attempt["status_code"] = code = response.code
            if 200 <= code < 300:
                verdict = DELIVERED
            elif code in RETRY_STATUSES or code >= 500:
                verdict = RETRY
                retry_after = _retry_after(response.headers.get("Retry-After"))
            else:
                verdict = GIVE_UP
        attempt["duration_ms"] = round((time.monotonic() - started) * 1000, 3)
        return attempt, verdict, retry_after

    def _delay(self, number: int, retry_after: float | None) -> float:
        """Seconds before attempt ``number + 1``: the backoff doubled per attempt, times a
        jitter of 0.5-1.5 (receivers that failed together are not hit together again),
        or the receiver's own Retry-After when it asks for longer."""
        delay = self.settings["ERA_CALLBACK_BACKOFF"] * 2 ** (number - 1) * random.uniform(0.5, 1.5)
        return max(delay, retry_after or 0.0)

    async def _record(self, session_id: str, run_id: str, state: dict[str, Any]) -> None:
        """The attempts so far onto the run's record, every other field as stored. After
        the run's end nothing else writes its record, so read-then-write loses nothing."""
        try:
            doc = await self.store.get_run(session_id, run_id)
            if doc is None:
                return  # the session (and its runs) was deleted: nothing to record on
            doc["callback"] = {**state, "attempts": list(state["attempts"])}  # put_run may encode it later
            await self.store.put_run(session_id, doc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the delivery goes on; only its record is missing
            log.error("run %s: its callback attempts could not be recorded: %s", run_id, exc)


def _encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


async def _off_loop(size: int, func, *args):
    """``func(*args)`` in a thread when ``size`` says it is big (hashing a 10 MiB body
    takes tens of milliseconds), inline otherwise."""
    if size > SIGN_IN_THREAD:
        return await asyncio.to_thread(func, *args)
    return func(*args)


def _retry_after(value: str | None) -> float | None:
    """A Retry-After in seconds (the HTTP-date form is not honoured), at most MAX_RETRY_AFTER."""
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None
    if seconds is None or not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _stored_secret(path: Path) -> str:
    """The generated key, made on first use: O_EXCL so two processes on one data
    directory never overwrite each other's, mode 0600 from the start."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        secret = path.read_text().strip()
        if not secret:
            raise RuntimeError(f"{path} is empty: delete it (a new key is made) or set ERA_CALLBACK_SECRET") from None
        return secret
    secret = secrets.token_hex(32)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
        f.flush()
        os.fsync(f.fileno())
    log.info("made the callback signing key %s (ERA_CALLBACK_SECRET overrides it)", path)
    return secret
