"""``era doctor``'s gVisor line: OK when the engine knows both runtimes and runsc starts a
sandbox here, WARN naming the missing runtime otherwise, and the same through the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from era_kernel.config import Settings
from era_kernel.doctor import _gvisor

from .conftest import require_gvisor


def test_doctor_reports_gvisor_like_its_other_checks():
    require_gvisor()
    name, status, detail = _gvisor(Settings.from_env({}))
    assert (name, status) == ("gvisor", "OK"), detail
    assert "runsc" in detail and "runsc-net" in detail
    if os.getuid() == 0:
        assert "starts a sandbox" in detail, detail  # it really ran `runsc do /bin/true`
    name, status, detail = _gvisor(Settings.from_env({"ERA_DOCKER_GVISOR_RUNTIME": "runsc-absent"}))
    assert (name, status) == ("gvisor", "WARN") and "runsc-absent" in detail, detail
    cli = subprocess.run([str(Path(sys.executable).parent / "era"), "doctor"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "ERA_DOCKER_GVISOR_NET_RUNTIME": "runsc-gone"})
    line = [ln for ln in cli.stdout.splitlines() if "gvisor:" in ln]
    assert line and line[0].startswith("WARN") and "runsc-gone" in line[0], cli.stdout + cli.stderr
