"""Every API call as data (``Call``), shared by the sync and async clients, plus the pieces
of a run's protocol that do not depend on how the I/O is done: the request bodies, the
WebSocket run dispatcher and the dedupe of resumed streams."""

from __future__ import annotations

import secrets
from typing import Any, Callable

from . import errors
from ._transport import Call, path_quote
from .models import Display, Event, RunResult, event_from

RUN_TIMEOUT_MARGIN = 15.0  # the server ends a run at its timeout; past this more, the client gives up and cancels
RESULT_POLL_SECONDS = 10.0  # long-poll per request while waiting for a background run


def compact(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def run_body(code: str | None, timeout: float | None, env: dict[str, str] | None, **extra: Any) -> dict[str, Any]:
    return compact(code=code, timeout=timeout, env=env, **extra)


def read_timeout(timeout: float | None, default: float) -> float:
    """How long to wait for a run's answer: its own timeout (or the session's) plus a margin."""
    return (timeout if timeout is not None else default) + RUN_TIMEOUT_MARGIN


def create_body(language: str, id: str | None, persistent: bool | None, metadata: Any, data: Any, setup: Any,
                default_timeout: float | None, allow_internet_access: bool | dict[str, Any] | None, env: Any,
                extra: dict[str, Any]) -> dict[str, Any]:
    return compact(language=language, id=id, persistent=persistent, metadata=metadata, data=data, setup=setup,
                   default_timeout=default_timeout, allowInternetAccess=allow_internet_access, env=env, **extra)


def s(sid: str) -> str:
    return f"/api/sessions/{path_quote(sid)}"


# ---- calls ------------------------------------------------------------------------------
def health() -> Call:
    return Call("GET", "/health")


def execute(body: dict[str, Any], read: float) -> Call:
    return Call("POST", "/api/execute", json=body, timeout=read)


def create(body: dict[str, Any]) -> Call:
    return Call("POST", "/api/sessions", json=body)


def list_sessions() -> Call:
    return Call("GET", "/api/sessions")


def get(sid: str) -> Call:
    return Call("GET", s(sid))


def patch(sid: str, body: dict[str, Any]) -> Call:
    return Call("PATCH", s(sid), json=body)


def delete(sid: str) -> Call:
    return Call("DELETE", s(sid))


def run(sid: str, body: dict[str, Any], read: float | None = None) -> Call:
    return Call("POST", f"{s(sid)}/run", json=body, timeout=read)


def duplicate(sid: str, new_id: str | None) -> Call:
    return Call("POST", f"{s(sid)}/duplicate", json=compact(id=new_id))


def interrupt(sid: str) -> Call:
    return Call("POST", f"{s(sid)}/interrupt")


def restart(sid: str) -> Call:
    return Call("POST", f"{s(sid)}/restart")


def history(sid: str, limit: int) -> Call:
    return Call("GET", f"{s(sid)}/runs", params={"limit": limit})


def notebook(sid: str) -> Call:
    return Call("GET", f"{s(sid)}/notebook")


def run_record(sid: str, run_id: str) -> Call:
    return Call("GET", f"{s(sid)}/runs/{path_quote(run_id)}")


def cancel_run(sid: str, run_id: str) -> Call:
    return Call("DELETE", f"{s(sid)}/runs/{path_quote(run_id)}")


def run_events(sid: str, run_id: str, after: int, wait: float, limit: int) -> Call:
    params = compact(after=after, wait=(wait or None), limit=limit)
    return Call("GET", f"{s(sid)}/runs/{path_quote(run_id)}/events", params=params, timeout=wait + 30.0)


def run_events_path(sid: str, run_id: str) -> str:
    return f"{s(sid)}/runs/{path_quote(run_id)}/events"


def list_files(sid: str) -> Call:
    return Call("GET", f"{s(sid)}/files")


def read_file(sid: str, path: str) -> Call:
    return Call("GET", f"{s(sid)}/files/{path_quote(path)}", expect="bytes")


def write_file(sid: str, path: str, data: bytes | str) -> Call:
    content = data.encode("utf-8") if isinstance(data, str) else data
    return Call("PUT", f"{s(sid)}/files/{path_quote(path)}", content=content,
                headers={"Content-Type": "application/octet-stream"})


def delete_file(sid: str, path: str) -> Call:
    return Call("DELETE", f"{s(sid)}/files/{path_quote(path)}")


# ---- the WebSocket run protocol ------------------------------------------------------------
def ws_url(base_url: str, sid: str) -> str:
    scheme, rest = base_url.split("://", 1)
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}{s(sid)}/ws"


class WsRun:
    """What a socket running one of our runs does with each message, I/O-free.

    ``feed(message)`` calls the callbacks and returns ``("input", InputRequest)`` when
    ``input()`` wants an answer (the caller asks ``on_input`` and sends the reply),
    ``("result", RunResult)`` at the end, ``("called", value)`` with what a callback
    returned (the async client awaits a coroutine), else None. Protocol errors for this
    run raise the mapped exception."""

    def __init__(self, body: dict[str, Any], on_stdout: Callable[[str], Any] | None,
                 on_stderr: Callable[[str], Any] | None, on_display: Callable[[Display], Any] | None,
                 on_error: Callable[[Event], Any] | None) -> None:
        self.client_id = "c" + secrets.token_hex(8)
        self.request = {"type": "run", "id": self.client_id, **body}
        self.on_stdout, self.on_stderr, self.on_display, self.on_error = on_stdout, on_stderr, on_display, on_error
        self.run_id: str | None = None
        self.last_seq = 0
        self.done = False

    def feed(self, message: dict[str, Any]) -> tuple[str, Any] | None:
        if message.get("id") != self.client_id:
            return None  # another run's event on the same session
        kind = message.get("type")
        self.run_id = message.get("run_id") or self.run_id
        if message.get("seq") is not None:
            self.last_seq = max(self.last_seq, int(message["seq"]))
        if kind == "result":
            return ("result", RunResult(message.get("result") or {}))
        if kind == "error" and "status_code" in message and "ename" not in message:
            raise errors.error_for(int(message["status_code"]), message)
        event = event_from(message)
        if kind == "stdout" and self.on_stdout:
            return ("called", self.on_stdout(message.get("content", "")))
        if kind == "stderr" and self.on_stderr:
            return ("called", self.on_stderr(message.get("content", "")))
        if kind == "display" and self.on_display:
            return ("called", self.on_display(event))  # type: ignore[arg-type]
        if kind == "error" and self.on_error:
            return ("called", self.on_error(event))
        if kind == "input_request":
            return ("input", event)
        if kind == "done":
            self.done = True
        return None


# What a run's stream carries (the server's /stream set): a stream resumed from the
# journal, which also keeps kernel status events, yields the same kinds.
STREAM_TYPES = frozenset({"setup", "stdout", "stderr", "display", "error", "done"})


class Resume:
    """Where a stream is: the run it follows and the last seq delivered, so a resumed
    stream neither repeats nor skips an event. It ends at the run's ``done``."""

    def __init__(self, run_id: str | None = None, after: int = 0) -> None:
        self.run_id = run_id
        self.last = after
        self.done = False

    def accept(self, doc: dict[str, Any]) -> Event | None:
        seq = doc.get("seq")
        if seq is not None:
            if seq <= self.last:
                return None  # already delivered before the connection dropped
            self.last = seq
        self.run_id = doc.get("run_id") or self.run_id
        if self.done or doc.get("type") not in STREAM_TYPES:
            return None
        event = event_from(doc)
        self.done = event.type == "done"
        return event
