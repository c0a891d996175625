"""Typed views of what the server answers: run results, run records and stream events.

Each keeps the server's document as ``raw``, so a field this package does not model yet
is still there for the caller.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any


def _bundle_png(bundle: dict[str, Any]) -> bytes | None:
    value = bundle.get("image/png")
    if isinstance(value, list):  # nbformat allows multi-line strings as lists
        value = "".join(value)
    return base64.b64decode(value) if isinstance(value, str) else None


def _bundle_text(bundle: dict[str, Any], mime: str) -> str | None:
    value = bundle.get(mime)
    if isinstance(value, list):
        value = "".join(value)
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class RunError:
    ename: str
    evalue: str
    traceback: list[str]

    def __str__(self) -> str:
        return f"{self.ename}: {self.evalue}"


@dataclass(frozen=True)
class RunResult:
    """A finished run (``POST .../run``, ``/api/execute``, or an ended run's record).

    ``text`` is the value of the cell's last expression as plain text (None when there is
    none); ``png``/``html``/``json`` come from the first rich output that has that type;
    ``data`` is the session's data after the run, as the API names it."""

    raw: dict[str, Any]

    @property
    def exit_code(self) -> int:
        return int(self.raw.get("exit_code", 1))

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def stdout(self) -> str:
        return self.raw.get("stdout") or ""

    @property
    def stderr(self) -> str:
        return self.raw.get("stderr") or ""

    @property
    def outputs(self) -> list[dict[str, Any]]:
        return list(self.raw.get("outputs") or [])

    @property
    def error(self) -> RunError | None:
        err = self.raw.get("error")
        if not err:
            return None
        return RunError(err.get("ename", ""), err.get("evalue", ""), list(err.get("traceback") or []))

    @property
    def data(self) -> Any:
        return self.raw.get("data")

    @property
    def run_id(self) -> str | None:
        return self.raw.get("run_id")

    @property
    def timed_out(self) -> bool:
        return bool(self.raw.get("timed_out"))

    @property
    def truncated(self) -> bool:
        return bool(self.raw.get("truncated"))

    @property
    def duration_ms(self) -> float | None:
        return self.raw.get("duration_ms")

    @property
    def execution_count(self) -> int | None:
        return self.raw.get("execution_count")

    @property
    def bundles(self) -> list[dict[str, Any]]:
        """The mime bundles of every display and execute result, in order."""
        return [o.get("data") or {} for o in self.outputs if o.get("output_type") in ("display_data", "execute_result")]

    @property
    def text(self) -> str | None:
        for output in self.outputs:
            if output.get("output_type") == "execute_result":
                return _bundle_text(output.get("data") or {}, "text/plain")
        return None

    def _first(self, pick: Any) -> Any:
        for bundle in self.bundles:
            value = pick(bundle)
            if value is not None:
                return value
        return None

    @property
    def png(self) -> bytes | None:
        return self._first(_bundle_png)

    @property
    def html(self) -> str | None:
        return self._first(lambda b: _bundle_text(b, "text/html"))

    @property
    def json(self) -> Any:
        return self._first(lambda b: b.get("application/json"))

    def __repr__(self) -> str:
        return f"RunResult(exit_code={self.exit_code}, stdout={self.stdout[:60]!r}, error={self.error})"


@dataclass(frozen=True)
class RunState:
    """A run's record (``GET .../runs/{run_id}``): status, and its result once ended."""

    raw: dict[str, Any]

    @property
    def run_id(self) -> str:
        return self.raw["run_id"]

    @property
    def status(self) -> str:
        return self.raw.get("status", "")

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed", "cancelled", "interrupted")

    @property
    def reason(self) -> str | None:
        return self.raw.get("reason")

    @property
    def result(self) -> RunResult:
        return RunResult(self.raw)


# ---- stream events -----------------------------------------------------------------------
@dataclass(frozen=True)
class Event:
    """One event of a run, as the SSE stream, the journal and the WebSocket frame it."""

    type: str
    seq: int | None
    run_id: str | None
    raw: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class Stdout(Event):
    content: str = ""


@dataclass(frozen=True)
class Stderr(Event):
    content: str = ""


@dataclass(frozen=True)
class Display(Event):
    data: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def png(self) -> bytes | None:
        return _bundle_png(self.data)

    @property
    def text(self) -> str | None:
        return _bundle_text(self.data, "text/plain")


@dataclass(frozen=True)
class Error(Event):
    ename: str = ""
    evalue: str = ""
    traceback: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Done(Event):
    exit_code: int = 0
    duration_ms: float | None = None
    timed_out: bool = False
    truncated: bool = False


@dataclass(frozen=True)
class InputRequest(Event):
    prompt: str = ""
    password: bool = False


def event_from(doc: dict[str, Any]) -> Event:
    kind = doc.get("type", "")
    base = {"type": kind, "seq": doc.get("seq"), "run_id": doc.get("run_id"), "raw": doc}
    if kind == "stdout":
        return Stdout(**base, content=doc.get("content", ""))
    if kind == "stderr":
        return Stderr(**base, content=doc.get("content", ""))
    if kind == "display":
        return Display(**base, data=doc.get("data") or {}, metadata=doc.get("metadata") or {})
    if kind == "error":
        return Error(**base, ename=doc.get("ename", ""), evalue=doc.get("evalue", ""),
                     traceback=list(doc.get("traceback") or []))
    if kind == "done":
        return Done(**base, exit_code=int(doc.get("exit_code", 1)), duration_ms=doc.get("duration_ms"),
                    timed_out=bool(doc.get("timed_out")), truncated=bool(doc.get("truncated")))
    if kind == "input_request":
        return InputRequest(**base, prompt=doc.get("prompt", ""), password=bool(doc.get("password")))
    return Event(**base)
