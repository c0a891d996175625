"""Processes the server starts as ``python -m <module>`` (the fork launcher's zygote, root;
``pip config``, for setup's registries) get the working directory first on ``sys.path``.
The server's may be writable by somebody else (a shared directory, a user's checkout):
a module planted there must never be imported by them (SECURITY.md: untrusted code never
reaches the host)."""

from __future__ import annotations

import os
from pathlib import Path

PLANTED = "open({marker!r}, 'w').write('imported')\nraise ImportError('planted')\n"


def plant(directory: Path, modules: list[str]) -> Path:
    marker = directory / "IMPORTED"
    for module in modules:
        path = directory / module
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(PLANTED.format(marker=str(marker)))
    return marker


def test_the_zygote_never_imports_from_the_servers_working_directory(tmp_path, monkeypatch):
    from era_kernel.provisioning.zygote import Zygote

    marker = plant(tmp_path, ["fcntl.py", "json.py", "uuid.py"])  # each imported by the zygote
    monkeypatch.chdir(tmp_path)
    zygote = Zygote()
    try:
        zygote.wait_ready()
    finally:
        zygote.sock.close()
        zygote.process.wait(timeout=10)
    assert not marker.exists()


def test_pip_config_never_imports_from_the_servers_working_directory(tmp_path, monkeypatch):
    from era_kernel.egress.registries import pip_config

    marker = plant(tmp_path, ["pip/__init__.py", "pip/__main__.py"])
    monkeypatch.chdir(tmp_path)
    pip_config(dict(os.environ))
    assert not marker.exists()
