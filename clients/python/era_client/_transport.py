"""HTTP for both clients: one description of each call (``Call``), one retry policy, one
error mapping and one SSE parser; ``SyncTransport`` and ``AsyncTransport`` only differ
in whether they await.

Retries: a 429 or 503 means the server did not take the request (queue full, starting,
stopping), so every method is retried, after ``Retry-After`` when the server sends one
and with doubling backoff otherwise. A connection refused never reached the server
either. Anything else is not retried here: a run must not be submitted twice.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator
from urllib.parse import quote

import httpx

from . import errors

DEFAULT_TIMEOUT = 60.0
RETRY_STATUSES = frozenset({429, 503})


def path_quote(path: str) -> str:
    """A workspace path in a URL: each segment escaped, the slashes kept."""
    return quote(path.lstrip("/"), safe="/")


@dataclass
class Call:
    method: str
    path: str
    json: Any = None
    content: bytes | None = None
    params: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    expect: str = "json"  # json | bytes
    timeout: float | None = None  # read timeout for this call (a run: its own timeout plus a margin)


@dataclass
class RetryPolicy:
    max_retries: int = 3
    backoff: float = 0.5  # first wait without Retry-After; doubles, with jitter
    max_wait: float = 30.0  # a longer Retry-After is not waited for: the error is raised

    def wait_for(self, attempt: int, retry_after: float | None) -> float | None:
        """Seconds to wait before retry ``attempt`` (1-based), or None to give up."""
        if attempt > self.max_retries:
            return None
        if retry_after is not None:
            return retry_after if retry_after <= self.max_wait else None
        return min(self.max_wait, self.backoff * 2 ** (attempt - 1)) * (0.75 + random.random() / 2)


def retry_after(response: httpx.Response) -> float | None:
    raw = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None  # an HTTP date: rare from this server; fall back to backoff


def raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    raise errors.error_for(response.status_code, body, retry_after(response))


def decode(call: Call, response: httpx.Response) -> Any:
    raise_for(response)
    if call.expect == "bytes":
        return response.content
    return response.json() if response.content else None


def _request_args(call: Call, timeout: httpx.Timeout) -> dict[str, Any]:
    args: dict[str, Any] = {"params": call.params, "headers": call.headers}
    if call.json is not None:
        args["json"] = call.json
    if call.content is not None:
        args["content"] = call.content
    if call.timeout is not None:
        args["timeout"] = httpx.Timeout(timeout.connect or 10.0, read=call.timeout)
    return args


def _auth_headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": "era-client-python"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


class SSEParser:
    """Server-Sent Events, line by line: yields ``(id, event, data)`` per blank-line frame."""

    def __init__(self) -> None:
        self.id: str | None = None
        self.event = "message"
        self.data: list[str] = []

    def feed(self, line: str) -> tuple[str | None, str, str] | None:
        if line == "":
            if not self.data:
                self.event = "message"
                return None
            frame = (self.id, self.event, "\n".join(self.data))
            self.event, self.data = "message", []
            return frame
        if line.startswith(":"):
            return None  # keepalive comment
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self.data.append(value)
        elif name == "event":
            self.event = value
        elif name == "id":
            self.id = value
        return None


def sse_event(frame: tuple[str | None, str, str]) -> dict[str, Any]:
    event_id, kind, data = frame
    doc = json.loads(data)
    doc.setdefault("type", kind)
    if doc.get("seq") is None and event_id and event_id.isdigit():
        doc["seq"] = int(event_id)
    return doc


# Errors that mean the connection broke, not that the server answered.
DROPPED = (httpx.TransportError,)


class SyncTransport:
    def __init__(self, base_url: str, api_key: str | None, timeout: float, retry: RetryPolicy,
                 http: httpx.Client | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.retry = retry
        self.timeout = httpx.Timeout(timeout, connect=10.0)
        self.http = http or httpx.Client(base_url=self.base_url, headers=_auth_headers(api_key), timeout=self.timeout)

    def close(self) -> None:
        self.http.close()

    def send(self, call: Call) -> httpx.Response:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self.http.request(call.method, call.path, **_request_args(call, self.timeout))
            except httpx.ConnectError as exc:
                wait = self.retry.wait_for(attempt, None)
                if wait is None:
                    raise errors.ConnectionLost(f"cannot reach {self.base_url}: {exc}") from exc
                time.sleep(wait)
                continue
            if response.status_code in RETRY_STATUSES:
                wait = self.retry.wait_for(attempt, retry_after(response))
                if wait is not None:
                    time.sleep(wait)
                    continue
            return response

    def call(self, call: Call) -> Any:
        return decode(call, self.send(call))

    def sse(self, method: str, path: str, json_body: Any = None, headers: dict[str, str] | None = None,
            on_open: Any = None) -> Iterator[dict[str, Any]]:
        """The events of an SSE answer; ``on_open(response)`` sees its headers first.
        Errors before the stream starts are raised as the mapped exception."""
        attempt = 0
        while True:
            attempt += 1
            with self.http.stream(method, path, json=json_body, headers=headers or {},
                                  timeout=httpx.Timeout(self.timeout.connect or 10.0, read=None)) as response:
                if response.status_code in RETRY_STATUSES:
                    wait = self.retry.wait_for(attempt, retry_after(response))
                    if wait is not None:
                        response.read()
                        time.sleep(wait)
                        continue
                if response.status_code >= 400:
                    response.read()
                    raise_for(response)
                if on_open is not None:
                    on_open(response)
                parser = SSEParser()
                for line in response.iter_lines():
                    frame = parser.feed(line)
                    if frame is not None:
                        yield sse_event(frame)
                return


class AsyncTransport:
    def __init__(self, base_url: str, api_key: str | None, timeout: float, retry: RetryPolicy,
                 http: httpx.AsyncClient | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.retry = retry
        self.timeout = httpx.Timeout(timeout, connect=10.0)
        self.http = http or httpx.AsyncClient(base_url=self.base_url, headers=_auth_headers(api_key),
                                              timeout=self.timeout)

    async def close(self) -> None:
        await self.http.aclose()

    async def send(self, call: Call) -> httpx.Response:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self.http.request(call.method, call.path, **_request_args(call, self.timeout))
            except httpx.ConnectError as exc:
                wait = self.retry.wait_for(attempt, None)
                if wait is None:
                    raise errors.ConnectionLost(f"cannot reach {self.base_url}: {exc}") from exc
                await asyncio.sleep(wait)
                continue
            if response.status_code in RETRY_STATUSES:
                wait = self.retry.wait_for(attempt, retry_after(response))
                if wait is not None:
                    await asyncio.sleep(wait)
                    continue
            return response

    async def call(self, call: Call) -> Any:
        return decode(call, await self.send(call))

    async def sse(self, method: str, path: str, json_body: Any = None, headers: dict[str, str] | None = None,
                  on_open: Any = None) -> AsyncIterator[dict[str, Any]]:
        attempt = 0
        while True:
            attempt += 1
            async with self.http.stream(method, path, json=json_body, headers=headers or {},
                                        timeout=httpx.Timeout(self.timeout.connect or 10.0, read=None)) as response:
                if response.status_code in RETRY_STATUSES:
                    wait = self.retry.wait_for(attempt, retry_after(response))
                    if wait is not None:
                        await response.aread()
                        await asyncio.sleep(wait)
                        continue
                if response.status_code >= 400:
                    await response.aread()
                    raise_for(response)
                if on_open is not None:
                    on_open(response)
                parser = SSEParser()
                async for line in response.aiter_lines():
                    frame = parser.feed(line)
                    if frame is not None:
                        yield sse_event(frame)
                return
