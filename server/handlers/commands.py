"""Commands, background processes and terminals in a session (``engine.commands``).

``POST .../commands`` answers a foreground command's result, or with ``?stream=true`` its
output as Server-Sent Events; ``"background": true`` answers 202 with the process at
once. ``.../processes[/{pid}[/output, /stream, /stdin, /signal]]`` follow and drive
background processes. ``.../terminal`` is a WebSocket on a new pty: binary frames
(or plain text) in are keystrokes, binary frames out are the terminal's output, and a
text frame ``{"type": "resize", "rows", "cols"}`` resizes it; closing the socket hangs
up the shell. Handlers only frame: every rule lives in ``era_kernel/commands``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from era_kernel.errors import BadRequest, EraError

from ..apidoc import Op
from ..errors import http_status
from .base import BaseHandler, dumps
from .sse import END, KEEPALIVE_SECONDS, SseHandler
from .sockets import BoundedSocket

PROCESS_ERRORS = (400, 401, 404, 409, 503)
MAX_WAIT_SECONDS = 60.0


def _frame(event: dict[str, Any], with_id: bool = False) -> str:
    head = f"id: {event['seq']}\n" if with_id and event.get("seq") is not None else ""
    return f"{head}event: {event['type']}\ndata: {dumps(event)}\n\n"


class CommandsHandler(SseHandler):
    SESSION_ROUTE = True
    API = {"post": Op("Run a command in the session's sandbox, beside its kernel", body="SessionCommand",
                      response="CommandResult", also=((202, "ProcessInfo"),), errors=(400, 404, 409, 413, 429, 503),
                      query={"stream": "`true`: the output as Server-Sent Events (`start` {pid}, `stdout`/`stderr` "
                                       "{content}, last `done` {exit_code, duration, pid, timed_out, truncated})"},
                      description="`cmd` is an argv list, or a program name; with `shell: true` a string run by "
                                  "`bash -c` (`args` are `$1`...). Runs as the session's uid in its kernel's "
                                  "sandbox (workspace as the working directory, or `cwd` inside it; same network, "
                                  "/tmp, limits and environment). Past `timeout` its process group is killed and "
                                  "`exit_code` is 124. With `background: true`, 202 with the process document "
                                  "(`pid`) at once; follow it under `.../processes/{pid}`.")}

    async def post(self, sid: str) -> None:
        body = self.json_body()
        if self.query("stream") in ("true", "1"):
            await self._stream(sid, body)
            return
        result = await self.engine.commands.run(sid, body)
        self.send_json(result, status=202 if isinstance(body, dict) and body.get("background") is True else 200)

    async def _stream(self, sid: str, body: Any) -> None:
        if isinstance(body, dict) and body.get("background"):
            raise BadRequest("a stream follows its command: send 'background' without ?stream, then follow "
                             ".../processes/{pid}/stream", field="background")
        queue: asyncio.Queue = asyncio.Queue()

        async def run() -> dict[str, Any]:
            try:
                return await self.engine.commands.run(
                    sid, body, on_output=queue.put_nowait,
                    on_start=lambda doc: queue.put_nowait({"type": "start", "pid": doc["pid"]}))
            finally:
                queue.put_nowait(END)

        # The command belongs to the server: a client that goes away does not stop it (its timeout does).
        task = self.services.spawn(run())

        def closing(error: BaseException | None) -> list[str]:
            if error is not None:
                message = error.message if isinstance(error, EraError) else "internal server error"
                return [_frame({"type": "error", "error": message, "status_code": http_status(error)})]
            result = task.result()
            return [_frame({"type": "done", **{k: result[k] for k in (
                "exit_code", "duration", "duration_ms", "pid", "timed_out", "truncated")}})]

        await self.relay(queue, task, _frame, closing, EraError("the server is shutting down"))


class ProcessesHandler(BaseHandler):
    SESSION_ROUTE = True
    API = {"get": Op("The session's processes: background ones, terminals and running commands",
                     response="ProcessList", errors=(401, 404, 503),
                     description="Each: `pid` (in the sandbox), `cmd`, `kind` (command, background, terminal), "
                                 "`started`, `state` (running, exited, killed, failed), `exit_code`, `ended`, "
                                 "`reason`. Ended ones are kept (the last 100) until the session is deleted; background "
                                 "processes of an earlier server process are listed too (from the store).")}

    async def get(self, sid: str) -> None:
        processes = await self.engine.commands.list(sid)
        self.send_json({"processes": processes, "count": len(processes)})


class ProcessHandler(BaseHandler):
    SESSION_ROUTE = True
    API = {"get": Op("One process of the session", response="ProcessInfo", errors=(401, 404, 503))}

    async def get(self, sid: str, pid: str) -> None:
        self.send_json((await self.engine.commands.process(sid, pid)).document())


class ProcessOutputHandler(BaseHandler):
    SESSION_ROUTE = True
    API = {"get": Op("A process's output after an offset (its bounded ring buffer)", response="ProcessOutput",
                     errors=(400, 401, 404, 503),
                     query={"after": "events with seq greater than this (default 0)",
                            "wait": "seconds (up to 60) to wait while there is nothing new and it runs",
                            "limit": "events at most (1-10000, default 1000)"},
                     description="`events`: `stdout`/`stderr` {seq, content} and last `exit` {seq, exit_code, "
                                 "state}; `next`: the seq to ask after next; `dropped`: true when events after "
                                 "`after` fell out of the ring (1 MiB of output per process). A background process of an "
                                 "earlier server process is read back from the run journal.")}

    async def get(self, sid: str, pid: str) -> None:
        after = self.int_query("after", 0, 0, 2**62)
        limit = self.int_query("limit", 1000, 1, 10_000)
        wait = self.int_query("wait", 0, 0, int(MAX_WAIT_SECONDS))
        self.send_json(await self.engine.commands.output(sid, pid, after, limit=limit, wait=float(wait)))


class ProcessStreamHandler(SseHandler):
    SESSION_ROUTE = True
    API = {"get": Op("A process's output as Server-Sent Events: what the ring holds after an offset, then live",
                     response="sse", errors=(400, 401, 404, 503),
                     query={"after": "start after this seq (default 0; the Last-Event-ID header wins)"},
                     description="Events `stdout`/`stderr` {seq, content}, last `exit` {exit_code, state}, each "
                                 "with `id:` = its seq; the stream ends after `exit`.")}

    async def get(self, sid: str, pid: str) -> None:
        last = self.request.headers.get("Last-Event-ID")
        after = int(last) if last and last.isdigit() else self.int_query("after", 0, 0, 2**62)
        commands = self.engine.commands
        process = await commands.process(sid, pid)  # 404 as JSON, before the stream starts
        self.start_stream()
        while True:
            page = process.read(after, 1000)
            frames = "".join(_frame(e, with_id=True) for e in page["events"])
            after = page["next"]
            ended = not process.running and after >= process.seq
            if not frames and not ended:
                try:
                    await asyncio.wait_for(process.changed.wait(), KEEPALIVE_SECONDS)
                    continue
                except asyncio.TimeoutError:
                    frames = ": keepalive\n\n"
            if not await self.send_frames(frames):
                return
            if ended:
                self.finish()
                return


class ProcessStdinHandler(BaseHandler):
    SESSION_ROUTE = True
    API = {"post": Op("Write to a background process's stdin", body="ProcessInput", response="ProcessStdinResult",
                      errors=PROCESS_ERRORS,
                      description="`data` (text, at most 1 MiB per request) then, with `eof`, its stdin is "
                                  "closed. 409 once the process has ended.")}

    async def post(self, sid: str, pid: str) -> None:
        self.send_json(await self.engine.commands.write_stdin(sid, pid, self.json_body()))


class ProcessSignalHandler(BaseHandler):
    SESSION_ROUTE = True
    API = {"post": Op("Send a signal to a process's group", body="ProcessSignal", response="ProcessSignalResult",
                      errors=PROCESS_ERRORS,
                      description="Allowed: HUP, INT, QUIT, KILL, TERM, USR1, USR2, CONT, STOP, TSTP, WINCH. "
                                  "409 once the process has ended.")}

    async def post(self, sid: str, pid: str) -> None:
        self.send_json(await self.engine.commands.send_signal(sid, pid, self.json_body()))


class TerminalSocket(BoundedSocket):
    """A pty in the session's sandbox over a WebSocket (what xterm.js's attach addon speaks)."""

    QUERY_TOKEN = True  # browsers cannot set headers on a WebSocket
    GONE_REASON = "session deleted"
    API = {"get": Op("WebSocket: a terminal (a login shell on a new pty) in the session's sandbox",
                     response="websocket", errors=(400, 401, 403, 404, 429),
                     query={"token": "the API key, for clients that cannot send headers",
                            "rows": "initial rows (default 24)", "cols": "initial columns (default 80)"},
                     description=__doc__ or "")}

    def initialize(self, services: Any, auth: bool) -> None:
        super().initialize(services, auth)
        self.process = None
        self._early: list[bytes] = []  # keystrokes sent before the shell was up
        self._opening: asyncio.Task | None = None

    async def prepare(self) -> None:
        sid = await self.handshake()
        self.size = (self._dimension("rows", 24), self._dimension("cols", 80))
        await self.services.engine.get(sid)  # an unknown session: 404, no upgrade
        self.take_slot()

    def _dimension(self, name: str, default: int) -> int:
        raw = self.get_query_argument(name, None)
        if raw is None:
            return default
        if not raw.isdigit() or not 1 <= int(raw) <= 1000:
            raise BadRequest(f"query parameter '{name}' must be an integer from 1 to 1000", field=name)
        return int(raw)

    def open(self, sid: str) -> None:
        self.set_nodelay(True)  # a keystroke's echo goes out now, not after Nagle's 40 ms
        self._opening = self.services.spawn(self._open(sid))

    async def _open(self, sid: str) -> None:
        try:
            self.process = await self.services.engine.commands.open_terminal(sid, *self.size, self._on_output)
        except EraError as err:
            self.close(1011, err.message[:120])
            return
        if self._closed:  # the client left while the shell started: hang it up
            await self.services.engine.commands.hang_up(self.session_id, self.process)
            return
        for data in self._early:
            await self._input(data)
        self._early.clear()

    def _on_output(self, event: dict[str, Any]) -> None:
        if event["type"] == "raw":
            self.send_frame(event["data"])
        elif event["type"] == "exit":
            self.close(1000, f"exited {event.get('exit_code')}")

    async def _input(self, data: bytes) -> None:
        try:
            await self.services.engine.commands.terminal_input(self.session_id, self.process, data)
        except EraError:
            pass  # the shell is gone: its exit closes the socket

    def on_message(self, message: str | bytes) -> None:
        if isinstance(message, str):
            control = _control(message)
            if control is not None:
                if self.process is not None:
                    self.services.spawn(self.services.engine.commands.terminal_resize(
                        self.session_id, self.process, control[0], control[1]))
                else:
                    self.size = control
                return
            message = message.encode()
        if self.process is None:
            self._early.append(message)
        else:
            self.services.spawn(self._input(message))

    def on_close(self) -> None:
        super().on_close()
        if self.process is not None:
            self.services.spawn(self.services.engine.commands.hang_up(self.session_id, self.process))


def _control(text: str) -> tuple[int, int] | None:
    """``{"type": "resize", "rows", "cols"}`` -> (rows, cols); any other text is keystrokes."""
    if not text.startswith("{"):
        return None
    try:
        msg = json.loads(text)
    except ValueError:
        return None
    if not isinstance(msg, dict) or msg.get("type") != "resize":
        return None
    rows, cols = msg.get("rows"), msg.get("cols")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1000 for v in (rows, cols)):
        return None
    return rows, cols
