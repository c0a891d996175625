"""Processes serving on a loopback port: pick a free port, wait until one answers, stop one."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from typing import Callable


def free_port() -> int:
    """A port nothing listens on now, for a process that must be told its port up front."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_answering(answers: Callable[[], bool], proc: subprocess.Popen, timeout: float, what: str,
                   interval: float = 0.05, details: Callable[[], str] = lambda: "") -> None:
    """Poll ``answers()`` (False or any exception: not yet) until it is true; raise if
    ``proc`` exits or ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if answers():
                return
        except Exception:  # refused, reset, a half-started server's odd answer: all "not yet"
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            state = f"exited with {proc.returncode}" if proc.poll() is not None else f"no answer in {timeout:g} s"
            raise RuntimeError(f"{what} did not start ({state}): {details()}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
    """Signal ``proc`` and wait for it; kill it if it is still there after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
