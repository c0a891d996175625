"""Collecting one run's output: nbformat v4 outputs, stdout/stderr text, and the cap.

Every IOPub message of the run goes through ``OutputCollector.add``, which returns the
event to stream (or None) and keeps the nbformat-shaped outputs. Past the per-run cap,
output is counted but dropped and ``truncated`` is set, so memory stays bounded however
much the code prints.
"""

from __future__ import annotations

import json
from typing import Any


def format_duration(seconds: float) -> str:
    """Go-style duration strings as ERA returns them: ``15.3ms``, ``1.204s``."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f}µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f}ms"
    if seconds < 60:
        return f"{seconds:.3f}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.3f}s"


class OutputCollector:
    def __init__(self, limit: int):
        self.limit = limit
        self.size = 0
        self.truncated = False
        self.outputs: list[dict[str, Any]] = []
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.error: dict[str, Any] | None = None
        self.execution_count: int | None = None

    def _admit(self, cost: int) -> bool:
        if self.size + cost > self.limit:
            self.truncated = True
            self.size = self.limit
            return False
        self.size += cost
        return True

    def add(self, msg_type: str, content: dict[str, Any]) -> dict[str, Any] | None:
        """Record one IOPub message; return the stream event for it, if any."""
        if msg_type == "stream":
            return self._stream(content.get("name", "stdout"), content.get("text", ""))
        if msg_type in ("display_data", "execute_result", "update_display_data"):
            data = content.get("data", {})
            metadata = content.get("metadata", {})
            if not self._admit(len(json.dumps(data)) + len(json.dumps(metadata))):
                return None
            if msg_type == "execute_result":
                self.execution_count = content.get("execution_count")
                out = {"output_type": "execute_result", "execution_count": self.execution_count,
                       "data": data, "metadata": metadata}
            else:
                out = {"output_type": "display_data", "data": data, "metadata": metadata}
            display_id = content.get("transient", {}).get("display_id")
            if msg_type == "update_display_data":
                for i, existing in enumerate(self.outputs):
                    if existing.get("_display_id") == display_id:
                        self.outputs[i] = dict(out, _display_id=display_id)
            else:
                self.outputs.append(dict(out, _display_id=display_id) if display_id else out)
            return {"type": "display", "data": data, "metadata": metadata}
        if msg_type == "error":
            tb = [line for line in content.get("traceback", [])]
            self.error = {"ename": content.get("ename", ""), "evalue": content.get("evalue", ""), "traceback": tb}
            if self._admit(sum(len(line) for line in tb) + 64):
                self.outputs.append(dict(self.error, output_type="error"))
            return dict(self.error, type="error")
        if msg_type == "clear_output":
            self.outputs = [o for o in self.outputs if o["output_type"] == "error"]
            return None
        if msg_type == "execute_input":
            self.execution_count = content.get("execution_count", self.execution_count)
        return None

    def _stream(self, name: str, text: str) -> dict[str, Any] | None:
        if not text:
            return None
        room = self.limit - self.size
        if len(text) > room:
            self.truncated = True
            text = text[:max(room, 0)]
            if not text:
                return None
        self.size += len(text)
        (self.stderr if name == "stderr" else self.stdout).append(text)
        last = self.outputs[-1] if self.outputs else None
        if last and last["output_type"] == "stream" and last["name"] == name:
            last["text"] += text
        else:
            self.outputs.append({"output_type": "stream", "name": name, "text": text})
        return {"type": name, "content": text}

    def note(self, name: str, text: str) -> dict[str, Any]:
        """Add an engine message (e.g. a timeout notice) to stderr, bypassing the cap."""
        self.stderr.append(text)
        self.outputs.append({"output_type": "stream", "name": name, "text": text})
        return {"type": name, "content": text}

    def nbformat_outputs(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in o.items() if not k.startswith("_")} for o in self.outputs]
