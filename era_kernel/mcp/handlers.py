"""What each tool does: one async method per tool, each a thin call to the public API
through ``era_client.AsyncClient``, answered as MCP content (``results.py``).

Errors are answered, not raised: a model reads the tool result, so a 404, a refused
key or an unreachable server becomes text that says what happened and what to do, with
``isError`` set. Only an unknown tool name is a protocol error (``UnknownTool``)."""

from __future__ import annotations

import base64
import json
from typing import Any, Awaitable, Callable

import era_client
from era_client import errors as client_errors

from . import results
from .results import Content, text
from .tools import TOOL_NAMES

MAX_FILE_TEXT = 100_000
GET_RUN_WAIT = 10.0


class UnknownTool(Exception):
    pass


class ToolResult:
    def __init__(self, content: list[Content], is_error: bool = False) -> None:
        self.content = content
        self.is_error = is_error

    def as_dict(self) -> dict[str, Any]:
        return {"content": self.content, "isError": self.is_error}


def hint_for(error: client_errors.EraError, args: dict[str, Any]) -> str:
    if isinstance(error, client_errors.NotFound) and args.get("session_id"):
        return "Check the id with era_list_sessions, or create a session with era_create_session."
    if isinstance(error, client_errors.Unauthorized):
        return "The ERA server refused the API key: set ERA_API_KEY to the server's key."
    if isinstance(error, client_errors.RateLimited):
        after = f" after {error.retry_after:g} s" if error.retry_after is not None else " shortly"
        return f"The server is busy; try again{after}."
    if isinstance(error, client_errors.ServiceUnavailable):
        return "The server is starting or stopping; try again shortly."
    if isinstance(error, client_errors.ConnectionLost):
        return "Is the ERA server running and is ERA_URL right?"
    if isinstance(error, client_errors.BadRequest) and error.field:
        return f"Fix the argument '{error.field}' and call again."
    return ""


class EraTools:
    """The tools and resources over one API client (local or remote server alike)."""

    def __init__(self, client: era_client.AsyncClient) -> None:
        self.client = client
        self._handlers: dict[str, Callable[[dict[str, Any]], Awaitable[ToolResult]]] = {
            name: getattr(self, name) for name in TOOL_NAMES}

    async def call(self, name: str, args: dict[str, Any] | None) -> ToolResult:
        handler = self._handlers.get(name)
        if handler is None:
            raise UnknownTool(f"unknown tool {name!r}")
        args = dict(args or {})
        try:
            return await handler(args)
        except client_errors.EraError as error:
            status = f" (HTTP {error.status_code})" if error.status_code else ""
            message = f"Error{status}: {error.message}"
            hint = hint_for(error, args)
            return ToolResult([text(f"{message}\n{hint}".strip())], is_error=True)
        except (KeyError, TypeError) as error:
            return ToolResult([text(f"Error: missing or invalid argument {error}; see the tool's input schema.")],
                              is_error=True)

    # ---- one-shot runs --------------------------------------------------------------------
    async def _execute(self, args: dict[str, Any], language: str) -> ToolResult:
        extra = {"allowInternetAccess": args["allowInternetAccess"]} if "allowInternetAccess" in args else {}
        result = await self.client.execute(args["code"], language, timeout=args.get("timeout"),
                                           env=args.get("envs"), files=args.get("files"), **extra)
        content, failed = results.run_content(result.raw, f"era://runs/{result.run_id or 'execute'}",
                                              " (or use a session and era_start_run for long work)")
        return ToolResult(content, failed)

    async def era_execute_code(self, args: dict[str, Any]) -> ToolResult:
        return await self._execute(args, args["language"])

    async def era_python(self, args: dict[str, Any]) -> ToolResult:
        return await self._execute(args, "python")

    async def era_node(self, args: dict[str, Any]) -> ToolResult:
        return await self._execute(args, "node")

    async def era_typescript(self, args: dict[str, Any]) -> ToolResult:
        return await self._execute(args, "typescript")

    async def era_deno(self, args: dict[str, Any]) -> ToolResult:
        return await self._execute(args, "deno")

    async def era_shell(self, args: dict[str, Any]) -> ToolResult:
        command = args["command"]
        if not args.get("session_id"):
            return await self._execute({"code": command, "timeout": args.get("timeout")}, "bash")
        return await self._shell_in_session(args["session_id"], command, args.get("timeout"))

    async def _shell_in_session(self, sid: str, command: str, timeout: float | None) -> ToolResult:
        # ERA's local-agent route: the command runs beside the session's kernel, in its
        # sandbox (workspace, /tmp, network policy, limits), whatever its language.
        doc = await self.client.call(era_client._transport.Call(
            "POST", f"/api/vm/{sid}/run", json={k: v for k, v in (("command", command), ("timeout", timeout))
                                                if v is not None}))
        content, failed = results.run_content(doc, f"era://sessions/{sid}/shell")
        return ToolResult(content, failed)

    # ---- sessions ------------------------------------------------------------------------
    async def era_create_session(self, args: dict[str, Any]) -> ToolResult:
        extra = {"allowInternetAccess": args["allowInternetAccess"]} if "allowInternetAccess" in args else {}
        session = await self.client.sessions.create(args.get("language", "python"), persistent=args.get("persistent"),
                                                    default_timeout=args.get("default_timeout"), **extra)
        return ToolResult([text(f"Session created successfully!\n\nSession ID: {session.id}\nLanguage: "
                                f"{session.language}\nPersistent: {session.info.get('persistent')}\n\nYou can now "
                                "use era_run_in_session to execute code in this session; variables and files stay "
                                "between runs. Delete it with era_delete_session when done.")])

    async def era_run_in_session(self, args: dict[str, Any]) -> ToolResult:
        sid = args["session_id"]
        session = await self.client.sessions.get(sid)
        result = await session.run(args["code"], timeout=args.get("timeout"), env=args.get("env"))
        content, failed = results.run_content(result.raw, f"era://sessions/{sid}/runs/{result.run_id}",
                                              " or use era_start_run for long work")
        return ToolResult(content, failed)

    async def era_list_sessions(self, args: dict[str, Any]) -> ToolResult:
        sessions = await self.client.sessions.list()
        if not sessions:
            return ToolResult([text("No active sessions.")])
        lines = [f"- {s['id']}\n  Language: {s.get('language')}\n  Persistent: {s.get('persistent')}\n"
                 f"  Created: {s.get('created_at')}" for s in sessions]
        return ToolResult([text(f"Active Sessions ({len(sessions)}):\n\n" + "\n\n".join(lines))])

    async def era_get_session(self, args: dict[str, Any]) -> ToolResult:
        session = await self.client.sessions.get(args["session_id"])
        return ToolResult([text(json.dumps(session.info, indent=2))])

    async def era_delete_session(self, args: dict[str, Any]) -> ToolResult:
        session = await self.client.sessions.get(args["session_id"])
        await session.delete()
        return ToolResult([text(f"Session {session.id} deleted successfully.")])

    async def era_update_session(self, args: dict[str, Any]) -> ToolResult:
        updates = {k: args[k] for k in ("default_timeout", "allowInternetAccess", "allowPublicAccess") if k in args}
        if not updates:
            return ToolResult([text("Error: give at least one of default_timeout, allowInternetAccess or "
                                    "allowPublicAccess to update.")], True)
        session = await self.client.sessions.get(args["session_id"])
        await session.patch(**updates)
        return ToolResult([text(f"Session {session.id} updated successfully.\n\nUpdated fields:\n"
                                f"{json.dumps(updates, indent=2)}")])

    # ---- files ---------------------------------------------------------------------------
    async def era_upload_file(self, args: dict[str, Any]) -> ToolResult:
        session = await self.client.sessions.get(args["session_id"])
        written = await session.files.write(args["path"], args["content"])
        return ToolResult([text(f"File uploaded successfully: {args['path']} ({written.get('size')} bytes)\n"
                                f"Session: {session.id}")])

    async def era_read_file(self, args: dict[str, Any]) -> ToolResult:
        sid, path = args["session_id"], args["path"]
        data = await (await self.client.sessions.get(sid)).files.read(path)
        mime = next((m for ext, m in ((".png", "image/png"), (".jpg", "image/jpeg"), (".jpeg", "image/jpeg"),
                                      (".gif", "image/gif"), (".webp", "image/webp")) if path.lower().endswith(ext)),
                    None)
        if mime is not None and len(data) * 4 // 3 <= results.MAX_IMAGE_BYTES:
            return ToolResult([text(f"File: {path} ({len(data):,} bytes)"),
                               {"type": "image", "data": base64.b64encode(data).decode("ascii"), "mimeType": mime}])
        try:
            body = data.decode("utf-8")
        except UnicodeDecodeError:
            return ToolResult([text(f"File: {path} is binary ({len(data):,} bytes) and not shown. Read it with code "
                                    "in a session (era_run_in_session) to inspect it.")])
        return ToolResult([text(f"File: {path}\n\nContent:\n{results.cut(body, MAX_FILE_TEXT, 'the file')}")])

    async def era_list_files(self, args: dict[str, Any]) -> ToolResult:
        sid = args["session_id"]
        files = await (await self.client.sessions.get(sid)).files.list()
        if not files:
            return ToolResult([text(f"No files in session {sid}")])
        lines = "\n".join(f"- {f['path']} ({_size(f.get('size', 0))})" for f in files)
        return ToolResult([text(f"Files in session {sid}:\n\n{lines}")])

    # ---- background runs -------------------------------------------------------------------
    async def era_start_run(self, args: dict[str, Any]) -> ToolResult:
        sid = args["session_id"]
        session = await self.client.sessions.get(sid)
        run = await session.start(args["code"], timeout=args.get("timeout"))
        state = await run.status()
        return ToolResult([text(f"Started run {run.id} in session {sid} (status: {state.status}).\nCall era_get_run "
                                f"with session_id={sid}, run_id={run.id}, after=0 to read its output and result.")])

    async def era_get_run(self, args: dict[str, Any]) -> ToolResult:
        sid, run_id = args["session_id"], args["run_id"]
        after = int(args.get("after") or 0)
        wait = min(60.0, max(0.0, float(args.get("wait", GET_RUN_WAIT))))
        run = (await self.client.sessions.get(sid)).run_by_id(run_id)
        events = [e.raw for e in await run.events(after, wait=wait)]
        state = await run.status()
        next_after = max([after] + [e["seq"] for e in events if e.get("seq") is not None])
        head = f"Run {run_id}: {state.status}" + (f" ({state.reason})" if state.reason else "")
        output = results.events_text(events)
        parts = [head, f"New output (events {after + 1}-{next_after}):\n{output}" if output else "No new output."]
        if state.finished:
            content, failed = results.run_content(state.raw, f"era://sessions/{sid}/runs/{run_id}")
            return ToolResult([text("\n\n".join(parts) + "\n\nThe run has ended. Its result:")] + content, failed)
        parts.append(f"Still {state.status}: call era_get_run again with after={next_after}.")
        return ToolResult([text("\n\n".join(parts))])

    async def era_cancel_run(self, args: dict[str, Any]) -> ToolResult:
        run = (await self.client.sessions.get(args["session_id"])).run_by_id(args["run_id"])
        state = await run.cancel()
        return ToolResult([text(f"Run {run.id}: {state.status}" + (f" ({state.reason})" if state.reason else ""))])

    # ---- resources (ERA's): session://{id} and session://{id}/files ---------------------------
    async def list_resources(self) -> list[dict[str, Any]]:
        resources = []
        for s in await self.client.sessions.list():
            resources.append({"uri": f"session://{s['id']}", "name": f"Session: {s['id']}",
                              "description": f"Metadata for {s.get('language')} session",
                              "mimeType": "application/json"})
            resources.append({"uri": f"session://{s['id']}/files", "name": f"Files in {s['id']}",
                              "description": f"List of files in session {s['id']}", "mimeType": "application/json"})
        return resources

    async def read_resource(self, uri: str) -> list[dict[str, Any]]:
        """Raises ``ValueError`` for a URI that is not ours, ``EraError`` from the API."""
        if not uri.startswith("session://"):
            raise ValueError(f"Invalid resource URI: {uri}")
        sid, _, kind = uri[len("session://"):].partition("/")
        if not sid or kind not in ("", "files"):
            raise ValueError(f"Unknown resource: {uri}")
        session = await self.client.sessions.get(sid)
        value = session.info if kind == "" else {"files": await session.files.list()}
        return [{"uri": uri, "mimeType": "application/json", "text": json.dumps(value, indent=2)}]


def _size(size: int) -> str:
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:g} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    return f"{size:.1f} GB"
