"""A real jupyter_server on loopback (the tests put it in front of ERA as its gateway, or
load ERA's kernelspecs and provisioners into it), and one REST call to it."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import urllib.request
from pathlib import Path

from .loopback import free_port, wait_answering


def start_jupyter_server(root: Path, env: dict[str, str], *args: str) -> tuple[subprocess.Popen, str, str]:
    """A real jupyter_server on a free loopback port with a fresh token, once it answers:
    ``(process, base URL, token)``. The caller stops it (``loopback.stop_process``)."""
    port, token = free_port(), secrets.token_hex(16)
    proc = subprocess.Popen([sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root",
                             "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
                             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
        return True

    try:
        wait_answering(answers, proc, 60, "jupyter_server", interval=0.2)
    except RuntimeError as exc:
        proc.kill()
        raise RuntimeError(f"{exc} {proc.stderr.read().decode()[-2000:]}") from None
    return proc, base, token


def jupyter_api(base: str, token: str, path: str, body: dict | None = None, method: str | None = None) -> dict:
    """One REST call to a jupyter_server started by ``start_jupyter_server``."""
    request = urllib.request.Request(f"{base}{path}", method=method or ("POST" if body is not None else "GET"),
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        raw = response.read()
        return json.loads(raw) if raw else {}
