"""The tool definitions: ERA's tool names and input schemas (its MCP server's
``tools.ts``), so an ERA MCP user switches by changing the URL, plus tools for background
runs. Descriptions are written for a model: when a one-shot run fits, when a session does.

Plain JSON-schema dicts: the MCP SDK server and the ``/mcp/v1`` JSON-RPC endpoint both
answer ``tools/list`` from this one list."""

from __future__ import annotations

from typing import Any

from ..models import EGRESS_POLICY_SCHEMA

ONE_SHOT = ("Runs in a fresh sandbox that is discarded afterwards: nothing (variables, files, installed packages) "
            "survives the call. To keep state across calls, use era_create_session and era_run_in_session instead.")
LANGUAGES = ["python", "node", "typescript", "go", "deno", "bash"]

TIMEOUT = {"type": "number", "description": "Execution timeout in seconds (default: 30). On timeout the run is "
                                            "interrupted and the result says so."}
INTERNET = {"anyOf": [{"type": "boolean"}, EGRESS_POLICY_SCHEMA],
            "description": "Allow internet access: true, false, or an egress policy {allow: [...], deny: [...]} of "
                           "host patterns and CIDRs (default: the server's setting, off unless its operator allows "
                           "it)"}
SESSION_ID = {"type": "string", "description": "Session ID from era_create_session"}


def _obj(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def _language_tool(name: str, label: str, example: str) -> dict[str, Any]:
    return {"name": name,
            "description": f"Execute {label} code in an isolated sandbox and return its output. {ONE_SHOT} "
                           f"Example: {example}",
            "inputSchema": _obj({"code": {"type": "string", "description": f"{label} code to execute. Newlines and "
                                                                            "indentation are preserved."},
                                 "timeout": TIMEOUT, "allowInternetAccess": INTERNET}, ["code"])}


TOOLS: list[dict[str, Any]] = [
    _language_tool("era_python", "Python 3", "print('Hello World')"),
    _language_tool("era_node", "Node.js/JavaScript", "console.log('Hello from Node!')"),
    _language_tool("era_typescript", "TypeScript", "const x: string = 'Hello'; console.log(x)"),
    _language_tool("era_deno", "Deno (TypeScript/JavaScript)", "console.log('Hello from Deno!')"),
    {"name": "era_shell",
     "description": "Run a shell command (bash): file operations, system info, package installs, git. Without "
                    "session_id it runs in a fresh sandbox that is discarded afterwards; with session_id it runs "
                    "in that session's sandbox, where files it writes stay. Example: ls -la",
     "inputSchema": _obj({"command": {"type": "string", "description": "Shell command to execute"},
                          "session_id": {"type": "string", "description": "Optional: run in this session's sandbox. "
                                                                          "If not provided, uses a fresh sandbox."},
                          "timeout": TIMEOUT}, ["command"])},
    {"name": "era_execute_code",
     "description": f"Execute code in any supported language ({', '.join(LANGUAGES)}). {ONE_SHOT} Prefer the "
                    "language tools (era_python, era_node, ...) for simple runs.",
     "inputSchema": _obj({"code": {"type": "string", "description": "The code to execute"},
                          "language": {"type": "string", "description": "Programming language", "enum": LANGUAGES},
                          "files": {"type": "object", "description": "Optional files to create before execution "
                                                                    "(filename -> text content)"},
                          "envs": {"type": "object", "description": "Optional environment variables"},
                          "timeout": TIMEOUT, "allowInternetAccess": INTERNET}, ["code", "language"])},
    {"name": "era_create_session",
     "description": "Create a persistent execution session: a live interpreter whose variables, imports and files "
                    "stay between era_run_in_session calls. Use it for multi-step work (load data, then analyse it); "
                    "use era_python and friends for single independent snippets. Delete it with era_delete_session "
                    "when done.",
     "inputSchema": _obj({"language": {"type": "string", "description": "Programming language for the session",
                                       "enum": LANGUAGES},
                          "persistent": {"type": "boolean", "description": "Keep files in durable storage "
                                                                          "(default: false)"},
                          "allowInternetAccess": INTERNET,
                          "default_timeout": {"type": "number", "description": "Default timeout for executions in "
                                                                               "this session (seconds)"}},
                         ["language"])},
    {"name": "era_run_in_session",
     "description": "Execute code in an existing session. Variables, imports and files from earlier runs are still "
                    "there. For work longer than a minute or two, use era_start_run and poll era_get_run instead.",
     "inputSchema": _obj({"session_id": SESSION_ID, "code": {"type": "string", "description": "Code to execute"},
                          "timeout": {"type": "number", "description": "Execution timeout in seconds"},
                          "env": {"type": "object", "description": "Environment variables for this execution"}},
                         ["session_id", "code"])},
    {"name": "era_list_sessions", "description": "List all sessions, with their language and creation time",
     "inputSchema": _obj({})},
    {"name": "era_get_session", "description": "Get details about a specific session (language, files, settings, "
                                               "kernel state)",
     "inputSchema": _obj({"session_id": {"type": "string", "description": "Session ID to query"}}, ["session_id"])},
    {"name": "era_delete_session", "description": "Delete a session: its interpreter, files and history",
     "inputSchema": _obj({"session_id": {"type": "string", "description": "Session ID to delete"}}, ["session_id"])},
    {"name": "era_update_session", "description": "Update session configuration (default timeout, network access)",
     "inputSchema": _obj({"session_id": {"type": "string", "description": "Session ID to update"},
                          "default_timeout": {"type": "number", "description": "Default execution timeout in "
                                                                               "seconds for all runs in this session"},
                          "allowInternetAccess": {"type": "boolean", "description": "Allow outbound internet access"},
                          "allowPublicAccess": {"type": "boolean", "description": "Allow inbound requests via proxy"}},
                         ["session_id"])},
    {"name": "era_upload_file", "description": "Write a text file into a session's workspace (the code's working "
                                              "directory)",
     "inputSchema": _obj({"session_id": {"type": "string", "description": "Target session ID"},
                          "path": {"type": "string", "description": "File path in the session workspace"},
                          "content": {"type": "string", "description": "File content"}},
                         ["session_id", "path", "content"])},
    {"name": "era_read_file", "description": "Read a file from a session's workspace (text as text, images as "
                                            "images)",
     "inputSchema": _obj({"session_id": {"type": "string", "description": "Source session ID"},
                          "path": {"type": "string", "description": "File path to read"}}, ["session_id", "path"])},
    {"name": "era_list_files", "description": "List all files in a session's workspace, with sizes",
     "inputSchema": _obj({"session_id": {"type": "string", "description": "Session ID to query"}}, ["session_id"])},
    # ---- background runs (ours): long work that outlives one tool call ------------------------
    {"name": "era_start_run",
     "description": "Start code in a session in the background and return at once with a run_id. Use it for work "
                    "that may take minutes (training, downloads, long loops); then call era_get_run to read its "
                    "output as it comes and its result when done.",
     "inputSchema": _obj({"session_id": SESSION_ID, "code": {"type": "string", "description": "Code to execute"},
                          "timeout": {"type": "number", "description": "Execution timeout in seconds"}},
                         ["session_id", "code"])},
    {"name": "era_get_run",
     "description": "A background run's status and its output after event number `after` (pass the `next_after` "
                    "of the previous call to get only what is new). Waits up to `wait` seconds for new output.",
     "inputSchema": _obj({"session_id": SESSION_ID, "run_id": {"type": "string", "description": "from era_start_run"},
                          "after": {"type": "integer", "description": "return output after this event number "
                                                                      "(default 0: from the start)"},
                          "wait": {"type": "number", "description": "seconds to wait for new output, 0-60 "
                                                                    "(default 10)"}},
                         ["session_id", "run_id"])},
    {"name": "era_cancel_run", "description": "Cancel a background run: a queued run is dropped, a running one "
                                             "interrupted",
     "inputSchema": _obj({"session_id": SESSION_ID, "run_id": {"type": "string", "description": "from era_start_run"}},
                         ["session_id", "run_id"])},
]

TOOL_NAMES = frozenset(tool["name"] for tool in TOOLS)
ERA_TOOL_NAMES = frozenset({"era_python", "era_node", "era_typescript", "era_deno", "era_shell", "era_execute_code",
                            "era_create_session", "era_run_in_session", "era_list_sessions", "era_get_session",
                            "era_delete_session", "era_update_session", "era_upload_file", "era_read_file",
                            "era_list_files"})
