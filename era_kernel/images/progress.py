"""A plain-text progress bar for image builds, written to stderr.

A build is a list of weighted stages (debootstrap, import, install script, commit); each
stage reports a fraction from 0 to 1 and a short detail line. On a terminal the bar is
redrawn in place; otherwise (logs, CI) one line is written per stage change and per 10 %
step, so build logs stay readable. Log lines (``--verbose``) go through :meth:`line`.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from typing import TextIO


class BuildProgress:
    def __init__(self, stages: list[tuple[str, float]], stream: TextIO | None = None, *, enabled: bool = True):
        total = sum(weight for _, weight in stages) or 1.0
        self._stages = [(name, weight / total) for name, weight in stages]
        self._index = {name: i for i, (name, _) in enumerate(self._stages)}
        self._stream = stream if stream is not None else sys.stderr
        self._enabled = enabled
        self._tty = enabled and hasattr(self._stream, "isatty") and self._stream.isatty()
        self._lock = threading.Lock()  # docker log streams and subprocess readers may report from threads
        self._current = ""
        self._fraction = 0.0
        self._last_step = -1
        self._last_draw = 0.0
        self._started = time.monotonic()

    def percent(self) -> float:
        if self._current not in self._index:
            return 0.0
        i = self._index[self._current]
        done = sum(weight for _, weight in self._stages[:i])
        return 100.0 * (done + self._stages[i][1] * self._fraction)

    def update(self, stage: str, fraction: float, detail: str = "") -> None:
        if not self._enabled:
            return
        with self._lock:
            changed = stage != self._current
            self._current = stage
            self._fraction = min(max(fraction, 0.0), 1.0)
            pct = self.percent()
            if self._tty:
                now = time.monotonic()
                if changed or now - self._last_draw > 0.1 or fraction >= 1.0:
                    self._last_draw = now
                    self._draw(pct, stage, detail)
            else:
                step = int(pct // 10)
                if changed or step != self._last_step:
                    self._last_step = step
                    self._stream.write(f"[{pct:5.1f}%] {stage}: {detail}\n".rstrip() + "\n")
                    self._stream.flush()

    def line(self, text: str) -> None:
        """Print a log line above the bar (verbose builds)."""
        if not self._enabled:
            return
        with self._lock:
            if self._tty:
                self._stream.write("\r\033[K")
            self._stream.write(text.rstrip("\n") + "\n")
            self._stream.flush()

    def finish(self, message: str) -> None:
        if not self._enabled:
            return
        elapsed = time.monotonic() - self._started
        with self._lock:
            if self._tty:
                self._stream.write("\r\033[K")
            self._stream.write(f"{message} ({elapsed:.1f} s)\n")
            self._stream.flush()

    def _draw(self, pct: float, stage: str, detail: str) -> None:
        columns = shutil.get_terminal_size((80, 20)).columns
        width = 30
        filled = int(width * pct / 100)
        head = f"\r[{'#' * filled}{'-' * (width - filled)}] {pct:5.1f}% {stage}"
        text = f"{head}: {detail}" if detail else head
        self._stream.write(text[: max(columns - 1, 20)] + "\033[K")
        self._stream.flush()
