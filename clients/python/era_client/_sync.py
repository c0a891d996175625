"""The blocking client: ``Client``, its ``sessions``, a ``Session``, its ``files`` and a
background ``Run``. ``_async.py`` is the same surface with ``await``; both describe their
calls through ``_calls`` and send them through ``_transport``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import httpx
from websockets.sync.client import connect as ws_connect

from . import _calls as c
from . import errors
from ._transport import DROPPED, Call, RetryPolicy, SyncTransport
from .models import Display, Event, InputRequest, RunResult, RunState

DEFAULT_URL = "http://127.0.0.1:8787"


class Client:
    """``Client(base_url, api_key)``; both default to ``ERA_URL`` and ``ERA_API_KEY``."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 60.0,
                 max_retries: int = 3) -> None:
        base_url = base_url or os.environ.get("ERA_URL") or DEFAULT_URL
        api_key = api_key if api_key is not None else os.environ.get("ERA_API_KEY") or None
        self.transport = SyncTransport(base_url, api_key, timeout, RetryPolicy(max_retries=max_retries))
        self.sessions = Sessions(self)

    @property
    def base_url(self) -> str:
        return self.transport.base_url

    def call(self, call: Call) -> Any:
        return self.transport.call(call)

    def health(self) -> dict[str, Any]:
        return self.call(c.health())

    def execute(self, code: str, language: str = "python", *, timeout: float | None = None,
                env: dict[str, str] | None = None, files: dict[str, str] | None = None, **extra: Any) -> RunResult:
        """One-shot run in a fresh kernel, discarded afterwards. ``extra``: other fields of
        the request (``allowInternetAccess``, ``provisioner``)."""
        body = c.compact(code=code, language=language, timeout=timeout, env=env, files=files, **extra)
        return RunResult(self.call(c.execute(body, c.read_timeout(timeout, 30.0))))

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Sessions:
    def __init__(self, client: Client) -> None:
        self.client = client

    def create(self, language: str = "python", *, id: str | None = None, persistent: bool | None = None,
               metadata: dict[str, Any] | None = None, data: Any = None, setup: dict[str, Any] | None = None,
               default_timeout: float | None = None, allow_internet_access: bool | dict[str, Any] | None = None,
               env: dict[str, str] | None = None, delete_on_exit: bool = True, **extra: Any) -> "Session":
        """A new session. Used as a context manager it is deleted on exit unless
        ``delete_on_exit=False``."""
        body = c.create_body(language, id, persistent, metadata, data, setup, default_timeout,
                             allow_internet_access, env, extra)
        return Session(self.client, self.client.call(c.create(body)), delete_on_exit=delete_on_exit)

    def get(self, session_id: str) -> "Session":
        """An existing session (never deleted by its context manager)."""
        return Session(self.client, self.client.call(c.get(session_id)), delete_on_exit=False)

    def list(self) -> list[dict[str, Any]]:
        return self.client.call(c.list_sessions())["sessions"]


class Files:
    def __init__(self, session: "Session") -> None:
        self.session = session
        self.call = session.client.call
        self.sid = session.id

    def read(self, path: str) -> bytes:
        return self.call(c.read_file(self.sid, path))

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self.read(path).decode(encoding)

    def write(self, path: str, data: bytes | str) -> dict[str, Any]:
        return self.call(c.write_file(self.sid, path, data))

    def list(self) -> list[dict[str, Any]]:
        return self.call(c.list_files(self.sid))["files"]

    def delete(self, path: str) -> None:
        self.call(c.delete_file(self.sid, path))

    def upload_dir(self, local: str | os.PathLike[str], remote: str = "") -> list[str]:
        """Every file under ``local``, to the same relative paths under ``remote``."""
        written = []
        root = Path(local)
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            target = "/".join(filter(None, [remote.strip("/"), file.relative_to(root).as_posix()]))
            self.write(target, file.read_bytes())
            written.append(target)
        return written

    def download_dir(self, local: str | os.PathLike[str], remote: str = "") -> list[Path]:
        """Every workspace file under ``remote`` into ``local``, keeping relative paths."""
        prefix = remote.strip("/")
        root = Path(local).resolve()
        saved = []
        for entry in self.list():
            path = entry["path"]
            if prefix and not (path == prefix or path.startswith(prefix + "/")):
                continue
            relative = path[len(prefix):].lstrip("/") if prefix else path
            target = (root / relative).resolve()
            if root not in target.parents:
                raise errors.BadRequest(f"refusing to write {path!r} outside {root}")  # a hostile listing
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.read(path))
            saved.append(target)
        return saved


class Session:
    def __init__(self, client: Client, doc: dict[str, Any], delete_on_exit: bool = False) -> None:
        self.client = client
        self.info = doc
        self.id: str = doc["id"]
        self.delete_on_exit = delete_on_exit
        self.files = Files(self)

    @property
    def language(self) -> str:
        return self.info.get("language", "")

    def _default_timeout(self) -> float:
        return float(self.info.get("default_timeout") or 30.0)

    # ---- running --------------------------------------------------------------------------
    def run(self, code: str, *, timeout: float | None = None, env: dict[str, str] | None = None,
            on_stdout: Callable[[str], Any] | None = None, on_stderr: Callable[[str], Any] | None = None,
            on_display: Callable[[Display], Any] | None = None, on_error: Callable[[Event], Any] | None = None,
            on_input: Callable[[str], str] | None = None) -> RunResult:
        """Run code and wait for its result. With callbacks, output reaches them as the
        kernel emits it (over the session's WebSocket; ``on_input`` answers ``input()``).
        The server ends the run at ``timeout`` (exit code 124); if no answer comes even
        then, the run is interrupted and ``RunTimeout`` raised."""
        body = c.run_body(code, timeout, env)
        limit = c.read_timeout(timeout, self._default_timeout())
        if not any((on_stdout, on_stderr, on_display, on_error, on_input)):
            try:
                return RunResult(self.client.call(c.run(self.id, body, limit)))
            except httpx.TimeoutException as exc:
                self._give_up(exc, limit)
        return self._run_ws(body, limit, c.WsRun(body, on_stdout, on_stderr, on_display, on_error), on_input)

    def _give_up(self, exc: BaseException, limit: float) -> NoReturn:
        try:
            self.interrupt()  # the run must not go on using the session behind the caller's back
        finally:
            raise errors.RunTimeout(f"no answer from the server within {limit:g} s; the run was interrupted") from exc

    def _run_ws(self, body: dict[str, Any], limit: float, state: c.WsRun,
                on_input: Callable[[str], str] | None) -> RunResult:
        headers = {"Authorization": f"Bearer {self.client.transport.api_key}"} if self.client.transport.api_key else {}
        deadline = time.monotonic() + limit
        with ws_connect(c.ws_url(self.client.base_url, self.id), additional_headers=headers,
                        max_size=None, open_timeout=30) as ws:
            ws.send(json.dumps(state.request))
            while True:
                remaining = deadline - time.monotonic()
                try:
                    message = json.loads(ws.recv(timeout=max(0.0, remaining)))
                except TimeoutError as exc:
                    self._give_up(exc, limit)
                step = state.feed(message)
                if step is None:
                    continue
                kind, value = step
                if kind == "result":
                    return value
                if kind == "input":
                    assert isinstance(value, InputRequest)
                    if on_input is None:
                        raise errors.BadRequest("the code called input() but run() was given no on_input")
                    ws.send(json.dumps({"type": "input_reply", "value": on_input(value.prompt)}))

    def stream(self, code: str, *, timeout: float | None = None, env: dict[str, str] | None = None) -> Iterator[Event]:
        """The run's events as the kernel emits them (Stdout, Stderr, Display, Error, Done).
        A dropped connection is picked up again where it broke: no event lost or repeated."""
        where = c.Resume()
        return self._follow(where, first=("POST", f"{c.s(self.id)}/stream", c.run_body(code, timeout, env)))

    def _follow(self, where: c.Resume, first: tuple[str, str, Any] | None = None) -> Iterator[Event]:
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
                for doc in frames:
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
                time.sleep(wait)
            finally:
                frames.close()  # the response is released now, not when the generator is collected

    def start(self, code: str | None = None, *, timeout: float | None = None, env: dict[str, str] | None = None,
              callback_url: str | None = None) -> "Run":
        """A background run: answered at once; follow it with the ``Run``."""
        body = c.run_body(code, timeout, env, background=True, callback_url=callback_url)
        accepted = self.client.call(c.run(self.id, body))
        return Run(self, accepted["run_id"])

    def run_by_id(self, run_id: str) -> "Run":
        return Run(self, run_id)

    # ---- the session itself ---------------------------------------------------------------
    def refresh(self) -> dict[str, Any]:
        self.info = self.client.call(c.get(self.id))
        return self.info

    def patch(self, **fields: Any) -> dict[str, Any]:
        """Update ``metadata``, ``data``, ``default_timeout``, ``allowInternetAccess``,
        ``allowPublicAccess``, ``typecheck``, ``env``; the session document after it."""
        answer = self.client.call(c.patch(self.id, fields))
        self.info = answer.get("metadata", answer)  # ERA's {success, id, metadata: <document>, updated_at}
        return self.info

    def duplicate(self, id: str | None = None, delete_on_exit: bool = True) -> "Session":
        return Session(self.client, self.client.call(c.duplicate(self.id, id)), delete_on_exit=delete_on_exit)

    def interrupt(self) -> None:
        self.client.call(c.interrupt(self.id))

    def restart(self) -> None:
        self.client.call(c.restart(self.id))

    def history(self, limit: int = 100) -> list[dict[str, Any]]:
        return self.client.call(c.history(self.id, limit))["runs"]

    def notebook(self) -> dict[str, Any]:
        return self.client.call(c.notebook(self.id))

    def delete(self) -> None:
        self.client.call(c.delete(self.id))

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.delete_on_exit:
            try:
                self.delete()
            except errors.NotFound:
                pass  # deleted already

    def __repr__(self) -> str:
        return f"Session(id={self.id!r}, language={self.language!r})"


class Run:
    """A run the server keeps a record of: its status, its events from any offset, its result."""

    def __init__(self, session: Session, run_id: str) -> None:
        self.session = session
        self.id = run_id

    def status(self) -> RunState:
        return RunState(self.session.client.call(c.run_record(self.session.id, self.id)))

    def events(self, after: int = 0, *, wait: float = 0.0, limit: int = 1000) -> list[Event]:
        from .models import event_from

        doc = self.session.client.call(c.run_events(self.session.id, self.id, after, wait, limit))
        return [event_from(e) for e in doc["events"]]

    def stream(self, after: int = 0) -> Iterator[Event]:
        """Events after ``after``, then live ones until the run ends; resumes after drops."""
        return self.session._follow(c.Resume(self.id, after))

    def wait(self, timeout: float | None = None) -> RunResult:
        """Block until the run has ended; its result. ``RunTimeout`` (the run goes on) past ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        after = 0
        while True:
            state = self.status()
            if state.finished:
                return state.result
            remaining = c.RESULT_POLL_SECONDS if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise errors.RunTimeout(f"run {self.id} still {state.status} after {timeout:g} s")
            events = self.events(after, wait=min(c.RESULT_POLL_SECONDS, max(0.05, remaining)))
            if events and events[-1].seq is not None:
                after = events[-1].seq

    def cancel(self) -> RunState:
        return RunState(self.session.client.call(c.cancel_run(self.session.id, self.id)))

    def __repr__(self) -> str:
        return f"Run(id={self.id!r}, session={self.session.id!r})"
