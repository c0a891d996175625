"""The asyncio client: the surface of ``_sync.py`` with ``await`` (``AsyncClient``,
``AsyncSession``, ``AsyncFiles``, ``AsyncRun``). ``stream`` is an async iterator; callbacks
may be plain functions or coroutines."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, NoReturn

import httpx
from websockets.asyncio.client import connect as ws_connect

from . import _calls as c
from . import errors
from ._sync import DEFAULT_URL
from ._transport import DROPPED, AsyncTransport, Call, RetryPolicy
from .models import Display, Event, InputRequest, RunResult, RunState, event_from


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class AsyncClient:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 60.0,
                 max_retries: int = 3) -> None:
        base_url = base_url or os.environ.get("ERA_URL") or DEFAULT_URL
        api_key = api_key if api_key is not None else os.environ.get("ERA_API_KEY") or None
        self.transport = AsyncTransport(base_url, api_key, timeout, RetryPolicy(max_retries=max_retries))
        self.sessions = AsyncSessions(self)

    @property
    def base_url(self) -> str:
        return self.transport.base_url

    async def call(self, call: Call) -> Any:
        return await self.transport.call(call)

    async def health(self) -> dict[str, Any]:
        return await self.call(c.health())

    async def execute(self, code: str, language: str = "python", *, timeout: float | None = None,
                      env: dict[str, str] | None = None, files: dict[str, str] | None = None,
                      **extra: Any) -> RunResult:
        body = c.compact(code=code, language=language, timeout=timeout, env=env, files=files, **extra)
        return RunResult(await self.call(c.execute(body, c.read_timeout(timeout, 30.0))))

    async def close(self) -> None:
        await self.transport.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class AsyncSessions:
    def __init__(self, client: AsyncClient) -> None:
        self.client = client

    async def create(self, language: str = "python", *, id: str | None = None, persistent: bool | None = None,
                     metadata: dict[str, Any] | None = None, data: Any = None, setup: dict[str, Any] | None = None,
                     default_timeout: float | None = None, allow_internet_access: bool | dict[str, Any] | None = None,
                     env: dict[str, str] | None = None, delete_on_exit: bool = True, **extra: Any) -> "AsyncSession":
        body = c.create_body(language, id, persistent, metadata, data, setup, default_timeout,
                             allow_internet_access, env, extra)
        return AsyncSession(self.client, await self.client.call(c.create(body)), delete_on_exit=delete_on_exit)

    async def get(self, session_id: str) -> "AsyncSession":
        return AsyncSession(self.client, await self.client.call(c.get(session_id)), delete_on_exit=False)

    async def list(self) -> list[dict[str, Any]]:
        return (await self.client.call(c.list_sessions()))["sessions"]


class AsyncFiles:
    def __init__(self, session: "AsyncSession") -> None:
        self.call = session.client.call
        self.sid = session.id

    async def read(self, path: str) -> bytes:
        return await self.call(c.read_file(self.sid, path))

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return (await self.read(path)).decode(encoding)

    async def write(self, path: str, data: bytes | str) -> dict[str, Any]:
        return await self.call(c.write_file(self.sid, path, data))

    async def list(self) -> list[dict[str, Any]]:
        return (await self.call(c.list_files(self.sid)))["files"]

    async def delete(self, path: str) -> None:
        await self.call(c.delete_file(self.sid, path))

    async def upload_dir(self, local: str | os.PathLike[str], remote: str = "") -> list[str]:
        written = []
        root = Path(local)
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            target = "/".join(filter(None, [remote.strip("/"), file.relative_to(root).as_posix()]))
            await self.write(target, file.read_bytes())
            written.append(target)
        return written

    async def download_dir(self, local: str | os.PathLike[str], remote: str = "") -> list[Path]:
        prefix = remote.strip("/")
        root = Path(local).resolve()
        saved = []
        for entry in await self.list():
            path = entry["path"]
            if prefix and not (path == prefix or path.startswith(prefix + "/")):
                continue
            relative = path[len(prefix):].lstrip("/") if prefix else path
            target = (root / relative).resolve()
            if root not in target.parents:
                raise errors.BadRequest(f"refusing to write {path!r} outside {root}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(await self.read(path))
            saved.append(target)
        return saved


class AsyncSession:
    def __init__(self, client: AsyncClient, doc: dict[str, Any], delete_on_exit: bool = False) -> None:
        self.client = client
        self.info = doc
        self.id: str = doc["id"]
        self.delete_on_exit = delete_on_exit
        self.files = AsyncFiles(self)

    @property
    def language(self) -> str:
        return self.info.get("language", "")

    def _default_timeout(self) -> float:
        return float(self.info.get("default_timeout") or 30.0)

    async def run(self, code: str, *, timeout: float | None = None, env: dict[str, str] | None = None,
                  on_stdout: Callable[[str], Any] | None = None, on_stderr: Callable[[str], Any] | None = None,
                  on_display: Callable[[Display], Any] | None = None, on_error: Callable[[Event], Any] | None = None,
                  on_input: Callable[[str], Any] | None = None) -> RunResult:
        body = c.run_body(code, timeout, env)
        limit = c.read_timeout(timeout, self._default_timeout())
        if not any((on_stdout, on_stderr, on_display, on_error, on_input)):
            try:
                return RunResult(await self.client.call(c.run(self.id, body, limit)))
            except httpx.TimeoutException as exc:
                await self._give_up(exc, limit)
        return await self._run_ws(body, limit, c.WsRun(body, on_stdout, on_stderr, on_display, on_error), on_input)

    async def _give_up(self, exc: BaseException, limit: float) -> NoReturn:
        try:
            await self.interrupt()
        finally:
            raise errors.RunTimeout(f"no answer from the server within {limit:g} s; the run was interrupted") from exc

    async def _run_ws(self, body: dict[str, Any], limit: float, state: c.WsRun,
                      on_input: Callable[[str], Any] | None) -> RunResult:
        key = self.client.transport.api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        deadline = time.monotonic() + limit
        async with ws_connect(c.ws_url(self.client.base_url, self.id), additional_headers=headers,
                              max_size=None, open_timeout=30) as ws:
            await ws.send(json.dumps(state.request))
            while True:
                try:
                    raw = await asyncio.wait_for(ws.recv(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError as exc:
                    await self._give_up(exc, limit)
                step = state.feed(json.loads(raw))
                if step is None:
                    continue
                kind, value = step
                if kind == "called":
                    await _maybe_await(value)  # callbacks may be coroutines
                elif kind == "result":
                    return value
                elif kind == "input":
                    assert isinstance(value, InputRequest)
                    if on_input is None:
                        raise errors.BadRequest("the code called input() but run() was given no on_input")
                    reply = await _maybe_await(on_input(value.prompt))
                    await ws.send(json.dumps({"type": "input_reply", "value": reply}))

    def stream(self, code: str, *, timeout: float | None = None,
               env: dict[str, str] | None = None) -> AsyncIterator[Event]:
        return self._follow(c.Resume(), first=("POST", f"{c.s(self.id)}/stream", c.run_body(code, timeout, env)))

    async def _follow(self, where: c.Resume, first: tuple[str, str, Any] | None = None) -> AsyncIterator[Event]:
        transport = self.client.transport
        failures = 0
        while not where.done:
            if first is not None and where.run_id is None:
                method, path, body = first
                headers = None
            else:
                method, path, body = "GET", c.run_events_path(self.id, where.run_id or ""), None
                headers = {"Accept": "text/event-stream", "Last-Event-ID": str(where.last)}

            def opened(response: Any) -> None:
                where.run_id = response.headers.get("X-Era-Run-Id") or where.run_id

            frames = transport.sse(method, path, body, headers, on_open=opened)
            try:
                async for doc in frames:
                    event = where.accept(doc)
                    if event is not None:
                        failures = 0
                        yield event
                    if where.done:
                        return
                return  # the server ended the stream: the run is over
            except DROPPED as exc:
                failures += 1
                wait = transport.retry.wait_for(failures, None)
                if where.run_id is None or wait is None:
                    raise errors.ConnectionLost(f"the stream broke and could not be resumed: {exc}") from exc
                await asyncio.sleep(wait)
            finally:
                await frames.aclose()  # the response is released now, not when the generator is collected

    async def start(self, code: str | None = None, *, timeout: float | None = None,
                    env: dict[str, str] | None = None, callback_url: str | None = None) -> "AsyncRun":
        body = c.run_body(code, timeout, env, background=True, callback_url=callback_url)
        accepted = await self.client.call(c.run(self.id, body))
        return AsyncRun(self, accepted["run_id"])

    def run_by_id(self, run_id: str) -> "AsyncRun":
        return AsyncRun(self, run_id)

    async def refresh(self) -> dict[str, Any]:
        self.info = await self.client.call(c.get(self.id))
        return self.info

    async def patch(self, **fields: Any) -> dict[str, Any]:
        answer = await self.client.call(c.patch(self.id, fields))
        self.info = answer.get("metadata", answer)  # ERA's {success, id, metadata: <document>, updated_at}
        return self.info

    async def duplicate(self, id: str | None = None, delete_on_exit: bool = True) -> "AsyncSession":
        return AsyncSession(self.client, await self.client.call(c.duplicate(self.id, id)),
                            delete_on_exit=delete_on_exit)

    async def interrupt(self) -> None:
        await self.client.call(c.interrupt(self.id))

    async def restart(self) -> None:
        await self.client.call(c.restart(self.id))

    async def history(self, limit: int = 100) -> list[dict[str, Any]]:
        return (await self.client.call(c.history(self.id, limit)))["runs"]

    async def notebook(self) -> dict[str, Any]:
        return await self.client.call(c.notebook(self.id))

    async def delete(self) -> None:
        await self.client.call(c.delete(self.id))

    async def __aenter__(self) -> "AsyncSession":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.delete_on_exit:
            try:
                await self.delete()
            except errors.NotFound:
                pass

    def __repr__(self) -> str:
        return f"AsyncSession(id={self.id!r}, language={self.language!r})"


class AsyncRun:
    def __init__(self, session: AsyncSession, run_id: str) -> None:
        self.session = session
        self.id = run_id

    async def status(self) -> RunState:
        return RunState(await self.session.client.call(c.run_record(self.session.id, self.id)))

    async def events(self, after: int = 0, *, wait: float = 0.0, limit: int = 1000) -> list[Event]:
        doc = await self.session.client.call(c.run_events(self.session.id, self.id, after, wait, limit))
        return [event_from(e) for e in doc["events"]]

    def stream(self, after: int = 0) -> AsyncIterator[Event]:
        return self.session._follow(c.Resume(self.id, after))

    async def wait(self, timeout: float | None = None) -> RunResult:
        deadline = None if timeout is None else time.monotonic() + timeout
        after = 0
        while True:
            state = await self.status()
            if state.finished:
                return state.result
            remaining = c.RESULT_POLL_SECONDS if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise errors.RunTimeout(f"run {self.id} still {state.status} after {timeout:g} s")
            events = await self.events(after, wait=min(c.RESULT_POLL_SECONDS, max(0.05, remaining)))
            if events and events[-1].seq is not None:
                after = events[-1].seq

    async def cancel(self) -> RunState:
        return RunState(await self.session.client.call(c.cancel_run(self.session.id, self.id)))
