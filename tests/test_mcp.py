"""MCP against a real server with real kernels: the SDK's own client (``mcp.ClientSession``)
over stdio (``era mcp``) and over streamable HTTP (``/mcp``), ERA's raw JSON-RPC on
``/mcp/v1``, and the key refused where it is missing."""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys

import anyio
import httpx2
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from era_kernel.mcp.tools import ERA_TOOL_NAMES, TOOLS
from era_kernel.workspaces.volumes import release_everything_under
from tests.support.era_server import ServerProcess

KEY = "mcp-test-key-0b7e"
AUTH = {"Authorization": f"Bearer {KEY}"}
PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c63f8cfc0f01f0005000201a5b1e3a90000000049454e44ae426082")).decode()


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(env={"ERA_API_KEY": KEY}).start()
    yield srv
    srv.cleanup()


def texts(result) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


def session_id_from(result) -> str:
    return texts(result).split("Session ID: ")[1].split()[0]


async def exercise(client: ClientSession) -> None:
    """What every transport must do: list tools, keep state in a session across two
    calls, write and read a file, return an image as image content, read a resource."""
    await client.initialize()
    names = {tool.name for tool in (await client.list_tools()).tools}
    assert ERA_TOOL_NAMES <= names, ERA_TOOL_NAMES - names
    run_schema = next(t for t in (await client.list_tools()).tools if t.name == "era_run_in_session").input_schema
    assert run_schema["required"] == ["session_id", "code"]

    created = await client.call_tool("era_create_session", {"language": "python"})
    assert not created.is_error, texts(created)
    sid = session_id_from(created)
    try:
        first = await client.call_tool("era_run_in_session", {"session_id": sid, "code": "secret = 6 * 7"})
        assert not first.is_error, texts(first)
        second = await client.call_tool("era_run_in_session", {"session_id": sid, "code": "print(secret)"})
        assert "Stdout:\n42" in texts(second)  # state kept between calls

        up = await client.call_tool("era_upload_file", {"session_id": sid, "path": "notes/a.txt", "content": "héllo"})
        assert not up.is_error, texts(up)
        wrote = await client.call_tool("era_run_in_session", {"session_id": sid, "code":
                                                              "open('made.txt','w').write(open('notes/a.txt').read()*2)"})
        assert not wrote.is_error, texts(wrote)
        read = await client.call_tool("era_read_file", {"session_id": sid, "path": "made.txt"})
        assert "héllohéllo" in texts(read)
        listed = await client.call_tool("era_list_files", {"session_id": sid})
        assert "notes/a.txt" in texts(listed) and "made.txt" in texts(listed)

        image = await client.call_tool("era_run_in_session", {"session_id": sid, "code":
                                       "import base64\nfrom IPython.display import Image, display\n"
                                       f"display(Image(base64.b64decode('{PNG}')))"})
        images = [c for c in image.content if c.type == "image"]
        assert len(images) == 1 and images[0].mime_type == "image/png" and images[0].data == PNG

        resources = (await client.list_resources()).resources
        assert {f"session://{sid}", f"session://{sid}/files"} <= {str(r.uri) for r in resources}
        doc = await client.read_resource(f"session://{sid}")
        assert json.loads(doc.contents[0].text)["id"] == sid
    finally:
        deleted = await client.call_tool("era_delete_session", {"session_id": sid})
        assert not deleted.is_error, texts(deleted)


def stdio_params(*args: str, env: dict[str, str] | None = None) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=["-m", "era_kernel.cli", "mcp", *args],
                                 env=dict(os.environ, **(env or {})))


async def test_stdio_against_a_real_server(server):
    with anyio.fail_after(120):
        async with stdio_client(stdio_params("--url", server.base, env={"ERA_API_KEY": KEY})) as (r, w):
            async with ClientSession(r, w) as client:
                await exercise(client)


async def test_streamable_http_on_the_servers_port(server):
    with anyio.fail_after(120):
        async with httpx2.AsyncClient(headers=AUTH, timeout=httpx2.Timeout(30, read=120)) as http:
            async with streamable_http_client(f"{server.base}/mcp", http_client=http) as (r, w):
                async with ClientSession(r, w) as client:
                    await exercise(client)


async def test_streamable_http_refuses_a_missing_or_wrong_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        async with httpx2.AsyncClient(headers=headers) as http:
            answer = await http.post(f"{server.base}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                                     headers={"Accept": "application/json, text/event-stream"})
            assert answer.status_code == 401, answer.text
            assert "API key" in answer.json()["error"]
        with pytest.raises(Exception):
            with anyio.fail_after(30):
                async with streamable_http_client(f"{server.base}/mcp", http_client=http) as (r, w):
                    async with ClientSession(r, w) as client:
                        await client.initialize()


async def test_stdio_with_a_wrong_key_says_so_in_the_tool_result(server):
    with anyio.fail_after(60):
        async with stdio_client(stdio_params("--url", server.base, env={"ERA_API_KEY": "wrong"})) as (r, w):
            async with ClientSession(r, w) as client:
                await client.initialize()
                result = await client.call_tool("era_list_sessions", {})
                assert result.is_error and "401" in texts(result) and "ERA_API_KEY" in texts(result)


def rpc(server, body, headers=AUTH):
    status, data = server.request("POST", "/mcp/v1", body, headers)
    return status, (json.loads(data) if data else None)


def test_era_jsonrpc_endpoint(server):
    status, init = rpc(server, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}})
    assert status == 200 and init["id"] == 1
    assert init["result"]["serverInfo"]["name"] == "era-agent-mcp"
    _, listed = rpc(server, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
    assert [t["name"] for t in listed["result"]["tools"]] == [t["name"] for t in TOOLS]
    _, called = rpc(server, {"jsonrpc": "2.0", "id": "c", "method": "tools/call",
                             "params": {"name": "era_python", "arguments": {"code": "print(2 ** 10)"}}})
    assert called["id"] == "c" and not called["result"]["isError"]
    assert "Stdout:\n1024" in called["result"]["content"][0]["text"]
    _, made = rpc(server, {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                           "params": {"name": "era_create_session", "arguments": {"language": "python"}}})
    sid = made["result"]["content"][0]["text"].split("Session ID: ")[1].split()[0]
    _, resources = rpc(server, {"jsonrpc": "2.0", "id": 4, "method": "resources/list"})
    assert f"session://{sid}/files" in [r["uri"] for r in resources["result"]["resources"]]
    _, read = rpc(server, {"jsonrpc": "2.0", "id": 5, "method": "resources/read",
                           "params": {"uri": f"session://{sid}/files"}})
    assert json.loads(read["result"]["contents"][0]["text"])["files"] is not None
    # Protocol errors are JSON-RPC errors; a notification gets no body.
    assert rpc(server, {"jsonrpc": "2.0", "id": 6, "method": "nope"})[1]["error"]["code"] == -32601
    assert rpc(server, {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                        "params": {"name": "era_nope"}})[1]["error"]["code"] == -32602
    assert rpc(server, b'{"jsonrpc": "2.0", "id": 8, "meth')[1]["error"]["code"] == -32700
    assert rpc(server, {"jsonrpc": "2.0", "method": "notifications/initialized"}) == (202, None)
    # Without the key: the API's 401, before anything is read.
    status, body = rpc(server, {"jsonrpc": "2.0", "id": 9, "method": "tools/list"}, headers={})
    assert status == 401 and body["status_code"] == 401
    rpc(server, {"jsonrpc": "2.0", "id": 10, "method": "tools/call",
                 "params": {"name": "era_delete_session", "arguments": {"session_id": sid}}})


def call(server, name, **arguments):
    _, reply = rpc(server, {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                            "params": {"name": name, "arguments": arguments}})
    result = reply["result"]
    return result, "\n".join(c.get("text", "") for c in result["content"])


def test_errors_and_timeouts_say_what_happened_and_what_to_do(server):
    result, text = call(server, "era_run_in_session", session_id="absent-session", code="1")
    assert result["isError"] and "404" in text and "era_create_session" in text
    result, text = call(server, "era_python", code="import time\nprint('start', flush=True)\ntime.sleep(30)",
                        timeout=1)
    assert result["isError"] and "Exit Code: 124" in text and "timeout" in text and "start" in text
    result, text = call(server, "era_python", code="1/0")
    assert result["isError"] and "ZeroDivisionError: division by zero" in text and "\x1b[" not in text
    result, text = call(server, "era_python", code="print('x' * 100_000)")
    assert "characters of stdout cut here" in text and len(text) < 30_000
    result, text = call(server, "era_python", code="from IPython.display import HTML\nHTML('<b>bold</b>')")
    assert {"type": "resource", "resource": {"uri": result["content"][1]["resource"]["uri"], "mimeType": "text/html",
                                             "text": "<b>bold</b>"}} in result["content"]


def test_shell_and_background_runs(server):
    result, text = call(server, "era_shell", command="echo $((6*7)); echo oops >&2; exit 3")
    assert result["isError"] and "Stdout:\n42" in text and "oops" in text and "Exit Code: 3" in text
    _, made = call(server, "era_create_session", language="python")
    sid = made.split("Session ID: ")[1].split()[0]
    try:
        _, text = call(server, "era_shell", command="echo hi > from_shell.txt && ls", session_id=sid)
        assert "from_shell.txt" in text
        # Beside the kernel, in its sandbox: the kernel reads what the command wrote.
        _, text = call(server, "era_run_in_session", session_id=sid, code="print(open('from_shell.txt').read())")
        assert "hi" in text
        _, text = call(server, "era_start_run", session_id=sid,
                       code="import time\nfor i in range(4):\n    print('tick', i, flush=True); time.sleep(0.3)")
        run_id = text.split("Started run ")[1].split()[0]
        seen, after, finished = "", 0, False
        for _ in range(40):
            result, text = call(server, "era_get_run", session_id=sid, run_id=run_id, after=after, wait=2)
            seen += text
            if "The run has ended" in text:
                finished = True
                break
            after = int(text.split("after=")[1].split(".")[0])
        assert finished and all(f"tick {i}" in seen for i in range(4))
    finally:
        call(server, "era_delete_session", session_id=sid)


async def test_embedded_engine_over_stdio(tmp_path):
    from tests.conftest import short_tmpdir

    runtime = short_tmpdir("em")
    env = {"ERA_POOL_SIZE": "0", "ERA_DATA_DIR": str(tmp_path / "data"), "ERA_RUNTIME_DIR": str(runtime)}
    try:
        with anyio.fail_after(120):
            async with stdio_client(stdio_params("--embedded", env=env)) as (r, w):
                async with ClientSession(r, w) as client:
                    await client.initialize()
                    result = await client.call_tool("era_python", {"code": "print('embedded', 40 + 2)"})
                    assert not result.is_error and "embedded 42" in texts(result)
    finally:
        release_everything_under(tmp_path)  # volumes of a server that was killed rather than stopped
        shutil.rmtree(runtime, ignore_errors=True)


async def test_the_embedded_server_never_imports_from_the_callers_working_directory(tmp_path):
    """An agent host starts `era mcp --embedded` in whatever project it has open; a module
    planted there (SECURITY.md: untrusted code never reaches the host) must not be imported
    by the server it starts, which may run as root."""
    from tests.conftest import short_tmpdir
    from tests.test_working_directory import plant

    project = tmp_path / "project"
    marker = plant(project, ["json.py", "uuid.py", "era_kernel/__init__.py"])  # each imported by era_server
    runtime = short_tmpdir("ew")
    era = os.path.join(os.path.dirname(sys.executable), "era")  # a console script: its own cwd is not on sys.path
    env = dict(os.environ, ERA_POOL_SIZE="0", ERA_DATA_DIR=str(tmp_path / "data"), ERA_RUNTIME_DIR=str(runtime))
    try:
        with anyio.fail_after(120):
            params = StdioServerParameters(command=era, args=["mcp", "--embedded"], env=env, cwd=str(project))
            async with stdio_client(params) as (r, w):
                async with ClientSession(r, w) as client:
                    await client.initialize()
                    result = await client.call_tool("era_python", {"code": "print('from', 'the project')"})
                    assert not result.is_error and "from the project" in texts(result)
    finally:
        release_everything_under(tmp_path)
        shutil.rmtree(runtime, ignore_errors=True)
    assert not marker.exists()
