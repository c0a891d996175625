"""ERA's own MCP endpoint, ``POST /mcp/v1``: one JSON-RPC 2.0 message (or a batch) per
request, answered as JSON, the way ERA's Cloudflare server answers it (``initialize``
with ``serverInfo.name`` ``era-agent-mcp``, ``tools/list``, ``tools/call``,
``resources/list``, ``resources/read``).

This is not MCP's streamable HTTP (that is ``/mcp``, served by the SDK): ERA's clients
post bare JSON-RPC without MCP's headers or session, so the SDK's transport would refuse
them. The answers come from the same tool definitions and handlers as every transport.
Tool failures are tool results with ``isError`` (as MCP specifies), not JSON-RPC errors."""

from __future__ import annotations

from typing import Any

from era_client import errors as client_errors

from .handlers import EraTools, UnknownTool
from .tools import TOOLS

PROTOCOL_VERSION = "0.1.0"  # what ERA's endpoint answers; its clients check nothing else
SERVER_INFO = {"name": "era-agent-mcp", "version": "1.0.0"}

PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL_ERROR = -32700, -32600, -32601, -32602, -32603


def error(id_: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "error": {"code": code, "message": message}}


def ok(id_: Any, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "result": result}


async def answer(tools: EraTools, message: Any) -> dict[str, Any] | list[dict[str, Any]] | None:
    """The reply to one message or a batch; None when nothing is owed (notifications)."""
    if isinstance(message, list):
        if not message:
            return error(None, INVALID_REQUEST, "Invalid Request: empty batch")
        replies = [await answer_one(tools, item) for item in message]
        return [r for r in replies if r is not None] or None
    return await answer_one(tools, message)


async def answer_one(tools: EraTools, message: Any) -> dict[str, Any] | None:
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0" or not isinstance(message.get("method"), str):
        return error(message.get("id") if isinstance(message, dict) else None, INVALID_REQUEST,
                     "Invalid Request: expected a JSON-RPC 2.0 object with a string 'method'")
    id_, method = message.get("id"), message["method"]
    params = message.get("params") or {}
    if "id" not in message:
        return None  # a notification (notifications/initialized, ...): no reply
    if not isinstance(params, dict):
        return error(id_, INVALID_PARAMS, "Invalid params: 'params' must be an object")
    try:
        if method == "initialize":
            return ok(id_, {"protocolVersion": PROTOCOL_VERSION, "serverInfo": SERVER_INFO,
                            "capabilities": {"tools": {}, "resources": {"subscribe": False, "listChanged": False}}})
        if method == "ping":
            return ok(id_, {})
        if method == "tools/list":
            return ok(id_, {"tools": TOOLS})
        if method == "tools/call":
            if not isinstance(params.get("name"), str):
                return error(id_, INVALID_PARAMS, "Invalid params: 'name' (the tool) is required")
            arguments = params.get("arguments") or {}
            if not isinstance(arguments, dict):
                return error(id_, INVALID_PARAMS, "Invalid params: 'arguments' must be an object")
            return ok(id_, (await tools.call(params["name"], arguments)).as_dict())
        if method == "resources/list":
            return ok(id_, {"resources": await tools.list_resources()})
        if method == "resources/read":
            if not isinstance(params.get("uri"), str):
                return error(id_, INVALID_PARAMS, "Invalid params: 'uri' is required")
            return ok(id_, {"contents": await tools.read_resource(params["uri"])})
    except UnknownTool as exc:
        return error(id_, INVALID_PARAMS, f"{exc}; tools/list names the tools")
    except ValueError as exc:
        return error(id_, INVALID_PARAMS, str(exc))
    except client_errors.EraError as exc:
        return error(id_, INTERNAL_ERROR, exc.message)
    return error(id_, METHOD_NOT_FOUND, f"Method not found: {method}")
