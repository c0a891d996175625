"""Commands, background processes and terminals in a session: ``engine.commands``.

Every process runs in the session's kernel's own sandbox, through one supervisor per
kernel (``channel.py``): same uid, filesystem view, workspace, ``/tmp``, network
namespace and cgroup (or container) as the kernel, so a server one command starts
answers the next command and the kernel on ``localhost``, and everything counts against
the session's one memory and pids limit. A session without a live kernel gets one
started (as a run would), which is also why a command counts as activity for culling.

Lifetimes: a foreground command ends with its timeout (its process group is killed; 124).
Background processes and terminals outlive the request that started them and end with
the session's kernel: deleting the session, stopping or restarting its kernel (ERA's VM
stop, a restart after a stuck timeout), culling an idle kernel and the server stopping
all kill them; their record then says ``killed`` and why. A terminal also ends when its
socket closes (hang-up). Nothing here assembles a shell string from request fields: a
string ``cmd`` is one argv element, run by ``bash -c`` only when the caller asks.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
import time
from typing import Any, Awaitable, Callable

from .. import models
from ..errors import BadRequest, Busy, Conflict, KernelFailed, NotFound, SetupPending
from ..kernel.outputs import format_duration
from ..provisioning.commands import TIMEOUT_EXIT, _Capture
from .channel import SupervisorChannel, open_channel
from .history import ProcessHistory
from .process import Listener, Process

log = logging.getLogger("era.commands")

CONTAINER_WORKSPACE = "/workspace"
MAX_LIVE = 64  # processes running at once per session (beside the session's own pids limit)
MAX_ENDED = 100  # ended processes whose record and output are kept per session
MAX_STDIN = 1024**2  # bytes of stdin in one request
BACKGROUND_OUTPUT = 1024**2  # characters of output a background process keeps (its ring)
KILL_GRACE = 5.0  # seconds for a killed process group to be reported gone
SIGNALS = {name: getattr(signal, f"SIG{name}") for name in
           ("HUP", "INT", "QUIT", "KILL", "TERM", "USR1", "USR2", "CONT", "STOP", "TSTP", "WINCH")}
TERMINAL_ARGV = ["bash", "-l"]


class _Session:
    def __init__(self) -> None:
        self.channel: SupervisorChannel | None = None
        self.lock = asyncio.Lock()
        self.processes: dict[int, Process] = {}  # supervisor id -> process, oldest first
        self.next_key = 1


class CommandService:
    """Handed, by the engine, what it needs: ``record(sid)`` (the SessionRecord; NotFound),
    ``kernel(sid)`` (the live kernel, started when there is none), ``workspace(record)``
    (its directory on the host), ``setup_wait(sid, timeout)``, ``watch`` (lifecycle
    events: a deleted session's processes are forgotten) and ``sync(record)`` (a
    persistent session's workspace pushed to the store, as after a run; an error sentence
    or None). ``history``: where background processes' records and output are kept
    beyond this server (history.py); None keeps them in memory only."""

    def __init__(self, settings: Any, *, record: Callable[[str], Awaitable[Any]],
                 kernel: Callable[[str], Awaitable[Any]], workspace: Callable[[Any], Any],
                 setup_wait: Callable[[str, float], Awaitable[None]], watch: Callable[[Callable], Any],
                 sync: Callable[[Any], Awaitable[str | None]], history: ProcessHistory | None = None) -> None:
        self.settings = settings
        self.session_env: Callable[[str], dict[str, str]] = lambda session_id: {}  # the engine's (storage token)
        self._record, self._kernel, self._workspace, self._setup_wait = record, kernel, workspace, setup_wait
        self._sync = sync
        self.history = history
        self.sessions: dict[str, _Session] = {}
        watch(self._lifecycle)

    # ---- the supervisor of a session's kernel ----------------------------------------------
    async def _channel(self, sid: str) -> SupervisorChannel:
        kernel = await self._kernel(sid)
        state = self.sessions.setdefault(sid, _Session())
        async with state.lock:
            channel = state.channel
            if channel is None or channel.kernel is not kernel or channel.closed.is_set():
                if channel is not None:
                    await channel.close()
                state.channel = await open_channel(kernel)
            return state.channel

    def _lifecycle(self, event: Any) -> None:
        if type(event).__name__ == "SessionDeleted":
            state = self.sessions.pop(event.session_id, None)
            if state is not None and state.channel is not None:
                asyncio.ensure_future(state.channel.close())  # its kernel is stopping too; this is quicker

    async def shutdown(self) -> None:
        for state in list(self.sessions.values()):
            if state.channel is not None:
                await state.channel.close()
        self.sessions.clear()

    # ---- starting processes ----------------------------------------------------------------
    def _cwd(self, record: Any, cwd: str | None) -> str:
        """The working directory inside the sandbox: the workspace or a directory below it
        (400 naming ``cwd`` for anything else). Lexical: what a path inside the workspace
        resolves to is the sandbox's business, since the process runs there anyway."""
        root = CONTAINER_WORKSPACE if record.provisioner == "docker" else str(self._workspace(record).resolve())
        if not cwd:
            return root
        if "\0" in cwd or "\\" in cwd:
            raise BadRequest("field 'cwd' must be a path inside the workspace", field="cwd")
        path = os.path.normpath(cwd if cwd.startswith("/") else os.path.join(root, cwd))
        if path != root and not path.startswith(root + "/"):
            raise BadRequest("field 'cwd' must be a path inside the workspace (relative to it, or absolute "
                             "below it)", field="cwd")
        return path

    @staticmethod
    def _argv(req: models.SessionCommand) -> list[str]:
        if req.shell:
            if not isinstance(req.cmd, str):
                raise BadRequest("with 'shell', field 'cmd' must be a string (the script for bash -c)", field="cmd")
            return ["bash", "-c", req.cmd, "bash", *req.args]  # args are $1...; the script is never rebuilt
        return [*([req.cmd] if isinstance(req.cmd, str) else req.cmd), *req.args]

    async def _spawn(self, sid: str, argv: list[str], *, kind: str, cwd: str, env: dict[str, str],
                     stdin: bytes | None, keep_stdin: bool, limit: int, pty: tuple[int, int] | None = None,
                     listener: Listener | None = None, kept: bool = False) -> tuple[Process, SupervisorChannel]:
        channel = await self._channel(sid)
        state = self.sessions[sid]
        if sum(p.running for p in state.processes.values()) >= MAX_LIVE:
            raise Busy(f"{MAX_LIVE} processes are already running in this session; wait for one to end, or signal "
                       "one (POST .../processes/{pid}/signal)")
        key, state.next_key = state.next_key, state.next_key + 1
        process = Process(key, argv, kind, limit)
        if listener is not None:
            process.listeners.append(listener)
        if kept and self.history is not None:
            self.history.follow(sid, process)  # listening before it can print
        state.processes[key] = process
        self._forget_ended(state)

        def on_event(event: dict[str, Any]) -> None:
            kind_ = event.get("ev")
            if kind_ == "out":
                process.output(event["s"], base64.b64decode(event["d"]))
            elif kind_ == "started":
                process.started_as(event["pid"])
            elif kind_ == "exit":
                process.ended("exited", event["code"])
            elif kind_ == "failed":
                process.reason = f"{event.get('field')}: {event.get('error')}"
                process.ended("failed", event.get("code", 127), process.reason)
            elif kind_ == "lost":
                process.ended("killed", None, "the session's kernel stopped, and its processes with it")

        channel.handlers[key] = on_event
        message: dict[str, Any] = {"op": "spawn", "id": key, "argv": argv, "cwd": cwd, "env": env,
                                   "keep_stdin": keep_stdin}
        if stdin:
            message["stdin"] = base64.b64encode(stdin).decode()
        if pty is not None:
            message.update(pty=True, rows=pty[0], cols=pty[1])
        await channel.request(message)
        await process.started_event.wait()
        if process.state == "failed":
            state.processes.pop(key, None)
            where, _, why = (process.reason or "cmd: cannot start").partition(": ")
            if where == "cwd":
                raise BadRequest(f"field 'cwd': {why} (a directory inside the workspace)", field="cwd")
            raise BadRequest(f"field 'cmd': cannot start {argv[0][:80]!r}: {why}", field="cmd")
        return process, channel

    @staticmethod
    def _forget_ended(state: _Session) -> None:
        ended = [k for k, p in state.processes.items() if not p.running]
        for key in ended[:max(0, len(ended) - MAX_ENDED)]:
            del state.processes[key]

    def _env(self, record: Any, extra: dict[str, str]) -> dict[str, str]:
        # What the kernel's startup cells give its code (launcher.startup_cells), over the
        # kernel process's own environment (the supervisor's): so `env` in a command, `!env`
        # in the kernel and `env` in the Bash kernel agree.
        return {"ERA_SESSION": "true", "ERA_SESSION_ID": record.id, "ERA_LANGUAGE": record.language,
                **self.session_env(record.id), **record.env, **extra}

    async def run(self, sid: str, body: Any, *, on_output: Callable[[dict[str, Any]], None] | None = None,
                  on_start: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """``POST .../commands``: the result of a foreground command (``{exit_code, stdout,
        stderr, duration, duration_ms, pid, timed_out, truncated}``), or for ``background``
        the process's document at once. ``on_output(event)``: each ``stdout``/``stderr``
        event as it comes (SSE, WebSocket); ``on_start({pid})``: once it runs, before any of its output."""
        record = await self._record(sid)
        req = models.parse(models.SessionCommand, body)
        stdin = req.stdin.encode() if req.stdin is not None else None
        if stdin is not None and len(stdin) > MAX_STDIN:
            raise BadRequest(f"field 'stdin' is {len(stdin)} bytes; the limit is {MAX_STDIN} (send more with "
                             "POST .../processes/{pid}/stdin)", field="stdin")
        argv, cwd = self._argv(req), self._cwd(record, req.cwd)
        env = self._env(record, req.env)
        if req.background:
            if self.history is not None:
                await self.history.ready(sid)
            process, _ = await self._spawn(sid, argv, kind="background", cwd=cwd, env=env, stdin=stdin,
                                           keep_stdin=True, limit=BACKGROUND_OUTPUT, kept=True)
            if record.persistent:
                asyncio.ensure_future(self._sync_when_done(record, process))
            return process.document()
        return await self._foreground(record, argv, cwd=cwd, env=env, stdin=stdin,
                                      timeout=req.timeout or record.default_timeout, on_output=on_output,
                                      on_start=on_start)

    async def _sync_when_done(self, record: Any, process: Process) -> None:
        await process.done.wait()
        if process.state == "exited":  # a killed one went with its session's kernel (or the session)
            note = await self._sync(record)
            if note:
                log.warning("session %s: %s", record.id, note)

    async def _foreground(self, record: Any, argv: list[str], *, cwd: str, env: dict[str, str], stdin: bytes | None,
                          timeout: float, on_output: Callable | None = None,
                          on_start: Callable | None = None) -> dict[str, Any]:
        sid = record.id
        limit = self.settings["ERA_OUTPUT_LIMIT"]
        out, err = _Capture("stdout", limit, None), _Capture("stderr", limit, None)

        forwarded = {"stdout": 0, "stderr": 0}

        def listener(event: dict[str, Any]) -> None:
            if event["type"] == "start" and on_start is not None:
                on_start({"pid": event["pid"]})
            elif event["type"] == "raw":
                (out if event["stream"] == "stdout" else err).feed(event["data"])
            elif on_output is not None and event["type"] in forwarded:
                # A stream gets what the answer keeps, no more: a flood to a slow client
                # must not pile up in its queue (the answer says `truncated`).
                room = limit - forwarded[event["type"]]
                if room > 0:
                    content = event["content"][:room]
                    forwarded[event["type"]] += len(content)
                    on_output({"type": event["type"], "content": content, "pid": event["pid"]})

        # Its own ring stays small: the answer carries the output (bounded by ERA_OUTPUT_LIMIT).
        process, channel = await self._spawn(sid, argv, kind="command", cwd=cwd, env=env, stdin=stdin,
                                             keep_stdin=False, limit=64 * 1024, listener=listener)
        # From the process's start: a kernel the command had to wait for is not its time.
        began = process.began
        timed_out = False
        try:
            await asyncio.wait_for(process.done.wait(), timeout)
        except asyncio.TimeoutError:
            timed_out = True
        finally:
            if process.running:  # a timeout, or the caller went away: the whole group goes
                await self._kill(channel, process)
        code = TIMEOUT_EXIT if timed_out else process.exit_code
        self.sessions[sid].processes.pop(process.key, None)  # answered: listed only while it ran
        if process.state == "killed" and not timed_out:
            raise KernelFailed(process.reason or "the process was killed")
        seconds = time.perf_counter() - began
        note = await self._sync(record)  # a persistent session keeps what the command wrote, as after a run
        stderr = err.text() + (f"\n[era] {note}\n" if note else "")
        return {"exit_code": code, "stdout": out.text(), "stderr": stderr, "duration": format_duration(seconds),
                "duration_ms": round(seconds * 1000, 3), "pid": process.pid, "timed_out": timed_out,
                "truncated": out.truncated or err.truncated}

    async def _kill(self, channel: SupervisorChannel, process: Process) -> None:
        try:
            await channel.request({"op": "signal", "id": process.key, "sig": int(signal.SIGKILL)})
            await asyncio.wait_for(asyncio.shield(process.done.wait()), KILL_GRACE)
        except (KernelFailed, asyncio.TimeoutError):
            process.ended("killed", None, "killed")

    async def vm_run(self, sid: str, body: Any) -> dict[str, Any]:
        """ERA's ``POST /api/vm/{id}/run {command, timeout?, envs?}``: ``bash -c command``
        in the session's sandbox, here. A command sent while the session's setup runs waits
        for it, within its own timeout."""
        record = await self._record(sid)
        req = models.parse(models.CommandRequest, body)
        timeout = req.timeout or record.default_timeout
        started = time.monotonic()
        try:
            await self._setup_wait(sid, timeout)
        except TimeoutError:
            raise SetupPending(f"the session's package setup is still running after {timeout:g}s; "
                               "retry once setup_status is completed or failed") from None
        left = max(0.1, timeout - (time.monotonic() - started))
        return await self._foreground(record, ["bash", "-c", req.command], cwd=self._cwd(record, None),
                                      env=self._env(record, req.envs), stdin=None, timeout=left)

    # ---- following processes --------------------------------------------------------------
    async def list(self, sid: str) -> list[dict[str, Any]]:
        """Processes of earlier servers (kept, history.py) first, then this server's."""
        await self._record(sid)
        state = self.sessions.get(sid)
        held = list(state.processes.values()) if state else []
        earlier = await self._earlier(sid, held)
        return [{k: v for k, v in d.items() if k != "journal_id"} for d in earlier] + [p.document() for p in held]

    async def _earlier(self, sid: str, held: list[Process]) -> list[dict[str, Any]]:
        if self.history is None:
            return []
        return await self.history.earlier(sid, {p.journal_id for p in held if p.journal_id})

    async def process(self, sid: str, pid: Any) -> Process:
        """The session's process with this pid (the newest, if a pid came round again):
        this server's, else one an earlier server kept (ended; its output from the store)."""
        await self._record(sid)
        if isinstance(pid, str):
            if not pid.isdigit() or len(pid) > 9:
                raise NotFound(f"no process {pid[:20]!r} in this session")
            pid = int(pid)
        state = self.sessions.get(sid)
        held = list(state.processes.values()) if state else []
        for process in reversed(held):
            if process.pid == pid:
                return process
        for doc in reversed(await self._earlier(sid, held)):
            if doc["pid"] == pid:
                return await self.history.restore(sid, doc)
        raise NotFound(f"no process {pid} in this session (GET .../processes lists them)")

    async def output(self, sid: str, pid: Any, after: int = 0, *, limit: int = 1000,
                     wait: float = 0.0) -> dict[str, Any]:
        """Output events after ``after``; ``wait`` seconds for some while it runs (long-poll)."""
        process = await self.process(sid, pid)
        page = process.read(after, limit)
        if not page["events"] and wait > 0 and process.running:
            try:
                await asyncio.wait_for(process.changed.wait(), wait)
            except asyncio.TimeoutError:
                pass
            page = process.read(after, limit)
        return page

    async def write_stdin(self, sid: str, pid: Any, body: Any) -> dict[str, Any]:
        await self._record(sid)
        req = models.parse(models.ProcessInput, body)  # a bad body is a 400 whatever the pid
        data = req.data.encode()
        if len(data) > MAX_STDIN:
            raise BadRequest(f"field 'data' is {len(data)} bytes; the limit is {MAX_STDIN} per request", field="data")
        process = await self.process(sid, pid)
        channel = self._live_channel(sid, process)
        if data:
            await channel.request({"op": "stdin", "id": process.key, "data": base64.b64encode(data).decode()})
        if req.eof:
            await channel.request({"op": "eof", "id": process.key})
        return {"pid": process.pid, "written": len(data), "eof": req.eof}

    async def send_signal(self, sid: str, pid: Any, body: Any) -> dict[str, Any]:
        await self._record(sid)
        req = models.parse(models.ProcessSignal, body)
        name = req.signal.upper().removeprefix("SIG")
        if name not in SIGNALS:
            raise BadRequest(f"field 'signal' must be one of {', '.join(SIGNALS)} (got {req.signal[:20]!r})",
                             field="signal")
        process = await self.process(sid, pid)
        channel = self._live_channel(sid, process)
        await channel.request({"op": "signal", "id": process.key, "sig": int(SIGNALS[name])})
        return {"pid": process.pid, "signal": f"SIG{name}"}

    def _live_channel(self, sid: str, process: Process) -> SupervisorChannel:
        state = self.sessions.get(sid)
        channel = state.channel if state else None
        if not process.running or channel is None or channel.closed.is_set():
            raise Conflict(f"process {process.pid} has ended ({process.state}, exit code {process.exit_code})",
                           field="pid")
        return channel

    # ---- terminals -------------------------------------------------------------------------
    async def open_terminal(self, sid: str, rows: int, cols: int, listener: Listener) -> Process:
        """A login shell on a new pty in the session's sandbox; ``listener`` gets its raw
        output (``{"type": "raw", "data": bytes}``) and its ``exit`` event."""
        record = await self._record(sid)
        env = self._env(record, {"TERM": "xterm-256color"})
        process, _ = await self._spawn(sid, list(TERMINAL_ARGV), kind="terminal", cwd=self._cwd(record, None),
                                       env=env, stdin=None, keep_stdin=True, limit=64 * 1024, pty=(rows, cols),
                                       listener=listener)
        return process

    async def terminal_input(self, sid: str, process: Process, data: bytes) -> None:
        await self._live_channel(sid, process).request(
            {"op": "stdin", "id": process.key, "data": base64.b64encode(data).decode()})

    async def terminal_resize(self, sid: str, process: Process, rows: int, cols: int) -> None:
        await self._live_channel(sid, process).request({"op": "resize", "id": process.key, "rows": rows, "cols": cols})

    async def hang_up(self, sid: str, process: Process) -> None:
        """The terminal's socket closed: SIGHUP to its group (what closing a terminal sends),
        then SIGKILL for whatever ignored it."""
        try:
            channel = self._live_channel(sid, process)
            await channel.request({"op": "signal", "id": process.key, "sig": int(signal.SIGHUP)})
            await asyncio.wait_for(asyncio.shield(process.done.wait()), 2.0)
        except (Conflict, KernelFailed):
            return
        except asyncio.TimeoutError:
            await self._kill(channel, process)
