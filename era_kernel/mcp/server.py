"""The MCP server on the official SDK (``mcp``): its low-level ``Server`` with our tool
list, tool calls and ERA's session resources, and the stdio transport behind ``era mcp``.

Which API client answers a request is a parameter (``tools_for``): ``era mcp`` has one
client for its whole life; the server's ``/mcp`` route makes one per caller, with the
caller's own key (``era_server/mcp_routes.py``)."""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import threading
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

import mcp_types as types
from mcp.server.lowlevel import Server

import era_client

from .handlers import EraTools, UnknownTool
from .tools import TOOLS

log = logging.getLogger("era.mcp")
INSTRUCTIONS = ("Runs code in sandboxes of an ERA Kernel server. One-shot tools (era_python, era_node, era_shell, "
                "...) start fresh each call; for work that builds on earlier steps create a session "
                "(era_create_session) and use era_run_in_session. Long work: era_start_run, then era_get_run.")

ToolsFor = Callable[[Any], EraTools]


def build_server(tools_for: ToolsFor, version: str = "0.1.0") -> Server:
    """``tools_for(ctx)``: the ``EraTools`` that answers this request."""

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult.model_validate({"tools": TOOLS})

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        try:
            result = await tools_for(ctx).call(params.name, params.arguments)
        except UnknownTool as exc:
            result_dict = {"content": [{"type": "text", "text": f"Error: {exc}. Call tools/list for the tools."}],
                           "isError": True}
            return types.CallToolResult.model_validate(result_dict)
        return types.CallToolResult.model_validate(result.as_dict())

    async def list_resources(ctx: Any, params: Any) -> types.ListResourcesResult:
        return types.ListResourcesResult.model_validate({"resources": await tools_for(ctx).list_resources()})

    async def read_resource(ctx: Any, params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
        contents = await tools_for(ctx).read_resource(str(params.uri))
        return types.ReadResourceResult.model_validate({"contents": contents})

    return Server("era-kernel", version=version, instructions=INSTRUCTIONS, on_list_tools=list_tools,
                  on_call_tool=call_tool, on_list_resources=list_resources, on_read_resource=read_resource)


async def serve_stdio(url: str, api_key: str | None) -> None:
    """MCP over this process's stdin/stdout, every tool calling the server at ``url``."""
    from mcp.server.stdio import stdio_server

    client = era_client.AsyncClient(url, api_key or "")
    tools = EraTools(client)
    server = build_server(lambda ctx: tools)
    try:
        async with stdio_server() as (read_stream, write_stream):
            await server.run(read_stream, write_stream, server.create_initialization_options())
    finally:
        await client.close()


@asynccontextmanager
async def embedded_server(extra_env: dict[str, str] | None = None) -> AsyncIterator[tuple[str, str]]:
    """A private ERA Kernel server for ``era mcp --embedded``: a child process on a loopback
    port the OS picks, with a random key, stopped with us. A separate process keeps the
    engine's kernels, signals and logs away from the MCP conversation on our stdout.
    Yields ``(url, api_key)``."""
    import anyio

    from era_kernel.config import _default_data_dir

    key = secrets.token_urlsafe(24)
    env = dict(os.environ, ERA_API_KEY=key, ERA_HOST="127.0.0.1", ERA_LOG_LEVEL="INFO", **(extra_env or {}))
    # A data directory of its own: two servers must never share a store, and an `era
    # serve` may well be running on ours. Sessions persist there between MCP sessions.
    env["ERA_DATA_DIR"] = os.path.join(os.environ.get("ERA_DATA_DIR") or _default_data_dir(), "mcp-embedded")
    # -P: python -m would put the caller's working directory first on sys.path, and an
    # agent host starts us in whatever project it has open; a json.py there must not run.
    proc = subprocess.Popen([sys.executable, "-P", "-m", "era_server", "--port", "0"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=_die_with_parent)
    port: list[int] = []
    listening = threading.Event()

    def read_logs() -> None:  # its log lines go to our stderr; the "listening" one names its port
        import json

        assert proc.stderr is not None
        for line in proc.stderr:
            if not port and '"event": "listening"' in line:
                port.append(json.loads(line)["port"])
                listening.set()
            elif '"level": "INFO"' not in line:
                sys.stderr.write(line)
        listening.set()

    threading.Thread(target=read_logs, daemon=True).start()
    try:
        await anyio.to_thread.run_sync(listening.wait, 60)
        if not port:
            raise RuntimeError("the embedded ERA server did not start (see the lines above)")
        url = f"http://127.0.0.1:{port[0]}"
        async with era_client.AsyncClient(url, key) as probe:
            for _ in range(600):  # until the engine is ready (kernels pooled, store open)
                if (await probe.health()).get("ready"):
                    break
                await anyio.sleep(0.05)
        yield url, key
    finally:
        proc.terminate()
        try:
            await anyio.to_thread.run_sync(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _die_with_parent() -> None:
    """In the child: SIGTERM when we die, however we die (an MCP client may SIGKILL us)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the finally below still stops it on a normal exit


async def serve_stdio_embedded() -> None:
    async with embedded_server() as (url, key):
        await serve_stdio(url, key)
