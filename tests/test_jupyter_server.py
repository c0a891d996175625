"""What JupyterLab sees: a real jupyter_server lists our kernelspecs, starts one of ours
through its sessions API, and runs code over its channels WebSocket."""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest
from tornado.websocket import websocket_connect

from era_kernel.kernelspecs import install
from tests.support.jupyter_server import jupyter_api, start_jupyter_server
from tests.support.loopback import stop_process

from .conftest import require_docker


@pytest.fixture(scope="module")
def jupyter_server(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("jupyter-prefix")
    root = tmp_path_factory.mktemp("notebooks")
    root.chmod(0o777)  # kernels run as an unprivileged uid
    install(prefix=str(prefix))
    env = dict(os.environ, JUPYTER_PATH=str(prefix / "share" / "jupyter"), JUPYTER_RUNTIME_DIR=str(prefix / "rt"))
    proc, base, token = start_jupyter_server(root, env, "--KernelSpecManager.ensure_native_kernel=False")
    yield base, token
    stop_process(proc)


def test_kernel_picker_lists_era_kernelspecs(jupyter_server):
    base, token = jupyter_server
    specs = jupyter_api(base, token, "/api/kernelspecs")["kernelspecs"]
    assert specs["era-python"]["spec"]["display_name"] == "Python 3 (ERA sandbox)"
    assert specs["era-python-local"]["spec"]["display_name"] == "Python 3 (ERA local sandbox)"
    assert specs["era-python"]["spec"]["metadata"]["kernel_provisioner"]["provisioner_name"] == "era-docker"


@pytest.mark.parametrize("kernel_name", ["era-python-local", "era-python"])
async def test_jupyter_server_session_runs_code_on_our_kernel(jupyter_server, kernel_name):
    if kernel_name == "era-python":
        require_docker()
    base, token = jupyter_server
    session = jupyter_api(base, token, "/api/sessions", {"path": f"t-{kernel_name}.ipynb", "type": "notebook",
                                                  "kernel": {"name": kernel_name}})
    kernel_id = session["kernel"]["id"]
    try:
        ws = await websocket_connect(f"{base.replace('http', 'ws')}/api/kernels/{kernel_id}/channels?token={token}")
        msg_id = uuid.uuid4().hex
        ws.write_message(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "t", "session": uuid.uuid4().hex,
                       "version": "5.3", "date": ""},
            "parent_header": {}, "metadata": {}, "channel": "shell",
            "content": {"code": "import os; print('answer', 6 * 7, os.getuid() != 0)", "silent": False,
                        "store_history": True, "user_expressions": {}, "allow_stdin": False},
        }))
        texts = []
        deadline = time.time() + 60
        while time.time() < deadline:
            message = json.loads(await ws.read_message())
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if message["msg_type"] == "stream":
                texts.append(message["content"]["text"])
            if message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
                break
        ws.close()
        assert "".join(texts) == "answer 42 True\n"
    finally:
        jupyter_api(base, token, f"/api/sessions/{session['id']}", method="DELETE")
