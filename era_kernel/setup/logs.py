"""Setup output: splitting a byte stream into log lines, keeping a bounded tail, and
picking the tool's own error message out of a failed step's output."""

from __future__ import annotations

import re
from collections import deque

MAX_LINE_CHARS = 2000
TAIL_LINES = 200
TAIL_CHARS = 64 * 1024
ERROR_LINES = 8

# Lines a tool prints when it explains a failure: pip's "ERROR: ...", npm's "npm error"
# (npm >= 10) or "npm ERR!", go's and git's "fatal:"/"go: ...: ...", a shell's complaint.
_ERROR_LINE = re.compile(r"^(ERROR\b|error\b|npm (error|ERR!)|fatal\b|go: |bash: |E: |\S+: line \d+: )", re.IGNORECASE)
_NOISE = re.compile(r"(A complete log of this run can be found in|^npm (error|ERR!)\s*$)")


class LineSplitter:
    """Turns chunks of bytes into lines; ``\\r`` ends a line too (progress bars)."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[str]:
        data = (self._buf + chunk).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *lines, self._buf = data.split(b"\n")
        if len(self._buf) > 4 * MAX_LINE_CHARS:  # a "line" that never ends: cut it
            lines.append(self._buf)
            self._buf = b""
        return [_clean(line) for line in lines if line.strip()]

    def flush(self) -> list[str]:
        rest, self._buf = self._buf, b""
        return [_clean(rest)] if rest.strip() else []


def _clean(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace").rstrip()
    return text if len(text) <= MAX_LINE_CHARS else text[:MAX_LINE_CHARS] + " [...]"


class LogTail:
    """The last lines of a setup, bounded in lines and characters."""

    def __init__(self, max_lines: int = TAIL_LINES, max_chars: int = TAIL_CHARS):
        self._lines: deque[str] = deque()
        self._chars = 0
        self._max_lines = max_lines
        self._max_chars = max_chars

    def add(self, line: str) -> None:
        self._lines.append(line)
        self._chars += len(line) + 1
        while self._lines and (len(self._lines) > self._max_lines or self._chars > self._max_chars):
            self._chars -= len(self._lines.popleft()) + 1

    def lines(self) -> list[str]:
        return list(self._lines)

    def text(self) -> str:
        return "\n".join(self._lines)


def error_message(title: str, exit_code: int, output: list[str]) -> str:
    """``<step> failed (exit N): <what the tool said>``: its error lines when it marked
    them, else the last lines it printed."""
    lines = [line.strip() for line in output if line.strip() and not _NOISE.search(line)]
    errors = [line for line in lines if _ERROR_LINE.match(line)]
    said = (errors or lines)[-ERROR_LINES:]
    detail = "\n".join(said) if said else "(no output)"
    return f"{title} failed (exit {exit_code}):\n{detail}"
