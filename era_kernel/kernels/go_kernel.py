"""A Go kernel: each cell is a whole ``package main`` program, built and run.

    python -m era_kernel.kernels.go_kernel -f CONNECTION_FILE

Each cell is written to ``main.go`` in a private module directory, built with
``go build`` (the build cache makes an unchanged import set cheap), and the binary runs
in the kernel's working directory with the kernel's environment, its stdout and stderr
streamed as they come. The binary is run directly rather than through ``go run``,
which would turn every non-zero exit into 1.

What a run reports (``era_kernel.languages`` maps it to an exit code):
- exit status 0: ok;
- exit status n (``os.Exit(n)``): an error with ename ``SystemExit`` and evalue ``n``;
- a panic (status 2 and Go's panic report on stderr): ename ``panic``, exit code 1 as
  for an uncaught exception in any language;
- a build failure: ename ``CompileError``; a missing module with no module proxy
  reachable says so (modules are fetched at build time: ``GOFLAGS=-mod=mod``). With
  ``GOPROXY=off`` and a ``GOMODCACHE`` (a session's setup), modules resolve from that
  cache alone.

Nothing persists between cells except files and the environment. Lines at the top of
a cell that start with ``%`` are directives to the kernel, with JSON arguments (the
engine's startup and per-run cells use them, and so can anyone):
``%cd "<dir>"``, ``%env {"NAME": "value" | null}``, ``%env_push {...}`` (set, remembering
the old values) and ``%env_pop`` (restore them). Variables set with ``os.Setenv`` live
only as long as one run; these persist for the kernel's life and reach every program.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import tempfile
from typing import Any

from ipykernel.kernelapp import IPKernelApp
from ipykernel.kernelbase import Kernel

from ._children import EOF, kill_group, relay, start_reader

_PACKAGE_CLAUSE = re.compile(r"^\s*package\s+\w+", re.MULTILINE)
_PANIC = re.compile(r"^panic: (.*)$", re.MULTILINE)
_NO_PROXY_HINTS = ("proxy.golang.org", "dial tcp", "lookup ", "GOPROXY=off", "GOFLAGS=-mod=mod", "network is unreachable")
_STDERR_TAIL = 8192  # characters of a program's stderr kept to recognise a panic


class GoKernel(Kernel):
    implementation = "era-go"
    implementation_version = "1.0"
    language = "go"
    language_version = ""
    language_info = {"name": "go", "mimetype": "text/x-go", "file_extension": ".go", "codemirror_mode": "go",
                     "pygments_lexer": "go"}
    banner = "Go (ERA): each cell is a package main program"

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.go = shutil.which("go") or "go"
        self.build_dir = tempfile.mkdtemp(prefix="era-go-", dir=self._executable_dir())
        self.env_stack: list[dict[str, str | None]] = []
        self.module_ready = False
        _default_go_env(self.build_dir)

    def _executable_dir(self) -> str | None:
        """Where a built program may run: /tmp, unless it is mounted noexec (Docker's
        tmpfs is), then the kernel's own directory (beside its connection file), which
        the provisioner made for this kernel and removes after it."""
        tmp = tempfile.gettempdir()
        if not os.statvfs(tmp).f_flag & os.ST_NOEXEC:
            return None
        connection_file = getattr(self.parent, "abs_connection_file", "") or ""
        return os.path.dirname(connection_file) or None

    # ---- directives ------------------------------------------------------------------
    def _directives(self, code: str) -> str:
        """Apply the leading ``%`` lines; return the rest of the cell."""
        lines = code.splitlines(keepends=True)
        while lines and (lines[0].strip() == "" or lines[0].lstrip().startswith("%")):
            line = lines.pop(0).strip()
            if not line:
                continue
            name, _, arg = line[1:].partition(" ")
            value = json.loads(arg) if arg.strip() else None
            if name == "cd":
                os.chdir(value)
            elif name == "env":
                _set_env(value or {})
            elif name == "env_push":
                self.env_stack.append({k: os.environ.get(k) for k in value or {}})
                _set_env(value or {})
            elif name == "env_pop":
                if self.env_stack:
                    _set_env(self.env_stack.pop())
            else:
                raise ValueError(f"unknown directive %{name} (known: %cd, %env, %env_push, %env_pop)")
        return "".join(lines)

    # ---- execution -------------------------------------------------------------------
    def do_execute(self, code: str, silent: bool, store_history: bool = True, user_expressions: Any = None,
                   allow_stdin: bool = False, **kwargs: Any) -> dict[str, Any]:
        self.silent = silent
        try:
            program = self._directives(code)
        except (ValueError, TypeError, OSError) as exc:  # bad JSON, bad directive, no such directory
            return self._error("DirectiveError", str(exc))
        if not program.strip():
            return self._ok()
        if not _PACKAGE_CLAUSE.search(program):
            program = "package main\n\n" + program
        try:
            with open(os.path.join(self.build_dir, "main.go"), "w") as fh:
                fh.write(program)
            self._ensure_module()
            built, build_log = self._run([self.go, "build", "-o", "cell", "."], cwd=self.build_dir, env=_build_env())
            if built != 0:
                return self._error("CompileError", _compile_summary(build_log))
            status, stderr_tail = self._run([os.path.join(self.build_dir, "cell")], cwd=os.getcwd())
        except KeyboardInterrupt:
            return self._error("KeyboardInterrupt", "interrupted")
        except OSError as exc:  # no go, no space, a directory we cannot run programs from
            return self._error(type(exc).__name__, str(exc))
        if status == 0:
            return self._ok()
        panic = _PANIC.search(stderr_tail)
        if status == 2 and panic and "\ngoroutine " in stderr_tail:
            # panic("") prints "panic: " and nothing more; an error always says something
            return self._error("panic", panic.group(1).strip() or "(a panic with an empty value; its goroutine trace is on stderr)")
        return self._error("SystemExit", str(status if status > 0 else 128 - status))

    def _ensure_module(self) -> None:
        if not self.module_ready:
            # A module of its own, so that imports resolve through go.mod (and
            # GOFLAGS=-mod=mod adds what a cell imports).
            subprocess.run([self.go, "mod", "init", "era.cell"], cwd=self.build_dir, capture_output=True, check=False)
            self.module_ready = True

    def _run(self, argv: list[str], cwd: str, env: dict[str, str] | None = None) -> tuple[int, str]:
        """Run ``argv``, streaming its output; return its status and the tail of its stderr."""
        out: queue.Queue = queue.Queue()
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, start_new_session=True)
        readers = [start_reader(process.stdout, "stdout", out), start_reader(process.stderr, "stderr", out)]
        closed: set[str] = set()
        tail: list[str] = []

        def emit(stream: str, text: str) -> None:
            if stream == "stderr":
                tail.append(text)
                if sum(map(len, tail)) > 2 * _STDERR_TAIL:
                    tail[:] = ["".join(tail)[-_STDERR_TAIL:]]
            self._stream(stream, text)

        def done(stream: str, item: Any) -> bool:
            if item is EOF:
                closed.add(stream)
            return len(closed) == 2

        try:
            relay(out, emit, done)
            status = process.wait()
        except KeyboardInterrupt:
            kill_group(process)
            process.wait()
            raise
        finally:
            for reader in readers:
                reader.join(timeout=1)
            for pipe in (process.stdout, process.stderr):
                pipe.close()
        # Whatever the program left running in its session goes with it.
        kill_group(process)
        return status, "".join(tail)[-_STDERR_TAIL:]

    # ---- replies -----------------------------------------------------------------------
    def _stream(self, name: str, text: str) -> None:
        if not self.silent:
            self.send_response(self.iopub_socket, "stream", {"name": name, "text": text})

    def _ok(self) -> dict[str, Any]:
        return {"status": "ok", "execution_count": self.execution_count, "payload": [], "user_expressions": {}}

    def _error(self, ename: str, evalue: str) -> dict[str, Any]:
        content = {"ename": ename, "evalue": evalue, "traceback": [f"{ename}: {evalue}"] if evalue else [ename]}
        if not self.silent:
            self.send_response(self.iopub_socket, "error", content)
        return {"status": "error", "execution_count": self.execution_count, **content}

    def do_shutdown(self, restart: bool) -> dict[str, Any]:
        shutil.rmtree(self.build_dir, ignore_errors=True)
        return {"status": "ok", "restart": restart}


def _set_env(values: dict[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = str(value)


def _default_go_env(scratch: str) -> None:
    """Go's settings where the sandbox needs them; whatever the environment says wins.

    HOME may be read-only or shared, so the build cache lives with the kernel; modules
    are resolved at build time from the module cache (GOMODCACHE, where a session's
    setup puts them) and else the proxy; no toolchain is ever downloaded.
    """
    home = os.environ.get("HOME") or scratch
    defaults = {
        "GOCACHE": os.path.join(scratch, "cache"),
        "GOPATH": os.path.join(home, "go"),
        "GOFLAGS": "-mod=mod",
        "GOTOOLCHAIN": "local",
        "GOTELEMETRY": "off",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def _build_env() -> dict[str, str]:
    """The environment of ``go build``: the kernel's, except that "no proxy" with a
    module cache (what a session's setup sets) means "resolve from that cache": with
    GOPROXY=off go cannot even pick the version of a module the cache holds."""
    env = dict(os.environ)
    if env.get("GOPROXY") == "off" and env.get("GOMODCACHE"):
        env["GOPROXY"] = "file://" + os.path.join(env["GOMODCACHE"], "cache", "download")
    return env


def _compile_summary(log: str) -> str:
    lines = [line for line in log.strip().splitlines() if line and not line.startswith("#")]
    summary = "\n".join(lines[:5]) or "go build failed"
    if any(hint in log for hint in _NO_PROXY_HINTS):
        summary += ("\nGo modules are fetched when a program is built; this session cannot reach a module proxy "
                    "(no internet access). Install them with the session's setup (go: [...]) or allow internet access.")
    return summary


if __name__ == "__main__":
    IPKernelApp.launch_instance(kernel_class=GoKernel)
