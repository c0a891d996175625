"""A Bash kernel: one long-lived bash per kernel, stdout and stderr kept apart.

    python -m era_kernel.kernels.bash_kernel -f CONNECTION_FILE

bash reads commands from a pipe (no terminal: programs see what they would under
``bash script.sh``). Each cell is written to a file and sourced, with stdin from
/dev/null, then a marker line with ``$?`` is printed on stdout and on stderr; the
readers cut the output there. So variables, functions, ``cd`` and ``export`` persist
from cell to cell, and stderr stays stderr (the PyPI ``bash_kernel`` runs bash on a
terminal, where the two streams merge, and restarts bash with an exit status of 0 when
a cell calls ``exit``).

A cell's exit status is that of its last command, as for a script: non-zero is an
error with ename ``SystemExit`` and evalue the status. ``exit n`` (or ``set -e`` and a
failing command) ends that bash with status n; the kernel then starts a new one with
the old one's exported variables, functions and working directory (saved by an EXIT
trap), so the session carries on. An interrupt ends the running command and the cell
the same way.
"""

from __future__ import annotations

import os
import queue
import secrets
import shutil
import signal
import subprocess
import tempfile
from typing import Any

from ipykernel.kernelapp import IPKernelApp
from ipykernel.kernelbase import Kernel

from ._children import EOF, Mark, kill_group, relay, start_reader


class BashKernel(Kernel):
    implementation = "era-bash"
    implementation_version = "1.0"
    language = "bash"
    language_version = ""
    language_info = {"name": "bash", "mimetype": "text/x-sh", "file_extension": ".sh", "codemirror_mode": "shell",
                     "pygments_lexer": "bash"}
    banner = "Bash (ERA)"

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.scratch = tempfile.mkdtemp(prefix="era-bash-")
        self.cell_file = os.path.join(self.scratch, "cell.sh")
        self.state_file = os.path.join(self.scratch, "state.sh")
        self.marker = f"\x1eERA-{secrets.token_hex(8)}:"
        self.bash: subprocess.Popen | None = None
        self.out: queue.Queue = queue.Queue()
        self._start_bash()

    # ---- the bash process ------------------------------------------------------------
    def _start_bash(self) -> None:
        self.out = queue.Queue()
        self.bash = subprocess.Popen(
            [shutil.which("bash") or "/bin/bash", "--noprofile", "--norc"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: an interrupt reaches every child
            preexec_fn=_default_sigint)
        for pipe, name in ((self.bash.stdout, "stdout"), (self.bash.stderr, "stderr")):
            start_reader(pipe, name, self.out, marker=self.marker.encode())
        state = _quote(self.state_file)
        # On its way out, bash leaves what the next one should start with.
        self._send(f"__era_save_state() {{ {{ declare -px; declare -f; printf 'cd %q\\n' \"$PWD\"; }} > {state} "
                   f"2>/dev/null; }}\ntrap __era_save_state EXIT\n"
                   f"[ -f {state} ] && . {state} >/dev/null 2>&1\n")

    def _send(self, text: str) -> None:
        assert self.bash is not None and self.bash.stdin is not None
        self.bash.stdin.write(text.encode())
        self.bash.stdin.flush()

    # ---- execution -------------------------------------------------------------------
    def do_execute(self, code: str, silent: bool, store_history: bool = True, user_expressions: Any = None,
                   allow_stdin: bool = False, **kwargs: Any) -> dict[str, Any]:
        self.silent = silent
        if not code.strip():
            return self._ok()
        assert self.bash is not None
        try:
            with open(self.cell_file, "w") as fh:
                fh.write(code if code.endswith("\n") else code + "\n")
        except OSError as exc:  # a full /tmp
            return self._error(type(exc).__name__, str(exc))
        mark = _quote(self.marker)
        try:
            self._send(f". {_quote(self.cell_file)} </dev/null\n"
                       f"printf '%s%d\\n' {mark} \"$?\"; printf '%s\\n' {mark} >&2\n")
        except BrokenPipeError:
            pass  # bash is gone already: the readers report EOF below
        marks: dict[str, str] = {}

        def done(stream: str, item: Any) -> bool:
            if isinstance(item, Mark) or item is EOF:
                marks.setdefault(stream, item.payload if isinstance(item, Mark) else "")
            return len(marks) == 2

        try:
            relay(self.out, self._stream, done)
        except KeyboardInterrupt:
            kill_group(self.bash, signal.SIGINT)  # bash exits too (non-interactive), saving its state
            status = self._restart_after_exit()
            return self._error("KeyboardInterrupt", f"interrupted (bash exited with status {status})")
        if self.bash.poll() is not None or not marks.get("stdout"):
            status = self._restart_after_exit()
            return self._ok() if status == 0 else self._error("SystemExit", str(status))
        status = int(marks["stdout"]) if marks["stdout"].isdigit() else 1
        return self._ok() if status == 0 else self._error("SystemExit", str(status))

    def _restart_after_exit(self) -> int:
        """Reap the bash that ended (``exit n``), start the next one; return n."""
        assert self.bash is not None
        try:
            status = self.bash.wait(timeout=5)
        except subprocess.TimeoutExpired:
            kill_group(self.bash)
            status = self.bash.wait()
        kill_group(self.bash)  # what it left running in its group goes with it
        for pipe in (self.bash.stdin, self.bash.stdout, self.bash.stderr):
            try:
                pipe.close()
            except OSError:
                pass
        self._start_bash()
        return status if status >= 0 else 128 - status

    # ---- replies -----------------------------------------------------------------------
    def _stream(self, name: str, text: str) -> None:
        if not self.silent:
            self.send_response(self.iopub_socket, "stream", {"name": name, "text": text})

    def _ok(self) -> dict[str, Any]:
        return {"status": "ok", "execution_count": self.execution_count, "payload": [], "user_expressions": {}}

    def _error(self, ename: str, evalue: str) -> dict[str, Any]:
        content = {"ename": ename, "evalue": evalue, "traceback": [f"{ename}: {evalue}"]}
        if not self.silent:
            self.send_response(self.iopub_socket, "error", content)
        return {"status": "error", "execution_count": self.execution_count, **content}

    def do_shutdown(self, restart: bool) -> dict[str, Any]:
        if self.bash is not None:
            kill_group(self.bash)
        shutil.rmtree(self.scratch, ignore_errors=True)
        return {"status": "ok", "restart": restart}


def _quote(text: str) -> str:
    """Single-quoted for bash: nothing inside is expanded."""
    return "'" + text.replace("'", "'\\''") + "'"


def _default_sigint() -> None:
    # The kernel ignores SIGINT outside message handlers, and an ignored signal stays
    # ignored across exec (bash could not even trap it): give bash the default back.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


if __name__ == "__main__":
    IPKernelApp.launch_instance(kernel_class=BashKernel)
