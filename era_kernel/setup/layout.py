"""Where things go inside an environment directory, and how a kernel is pointed at them.

One environment directory holds everything a setup produced::

    <env>/python/            pip install --target (importable: sys.path, PYTHONPATH)
    <env>/python/bin/        console scripts of those packages (PATH)
    <env>/node/              npm install --prefix: node_modules/, package.json, lock
    <env>/node/node_modules/ NODE_PATH; its .bin/ is on PATH
    <env>/go/pkg/mod/        GOMODCACHE of `go mod download`
    <env>/.era-env.json      written last: what was built, from which spec, when
    <env>/...                whatever `commands` wrote (their working directory)

The directory is built, and later seen by kernels, at the same absolute path, so tools
that record absolute paths (a venv made by a command, say) keep working.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

MANIFEST = ".era-env.json"


@dataclass(frozen=True)
class EnvLayout:
    root: str  # the environment's path as both the setup step and the kernel see it

    @property
    def python(self) -> str:
        return f"{self.root}/python"

    @property
    def node_prefix(self) -> str:
        return f"{self.root}/node"

    @property
    def node_modules(self) -> str:
        return f"{self.root}/node/node_modules"

    @property
    def go_modcache(self) -> str:
        return f"{self.root}/go/pkg/mod"

    @property
    def bin_dirs(self) -> list[str]:
        return [f"{self.python}/bin", f"{self.node_modules}/.bin"]

    def step_env(self) -> dict[str, str]:
        """Variables every setup step sees: later steps (and commands) can use what earlier
        ones installed, and know where to put their own output."""
        return {"ERA_SETUP_DIR": self.root, "PYTHONPATH": self.python, "NODE_PATH": self.node_modules,
                "GOMODCACHE": self.go_modcache,
                # `pip install x` in a command lands in the environment, not the read-only venv.
                "PIP_TARGET": self.python}

    def kernel_env(self, spec: dict[str, list[str]]) -> dict[str, str]:
        """Variables set at kernel launch: seen by the kernel process and its children."""
        env = {"ERA_SETUP_DIR": self.root, "NODE_PATH": self.node_modules}
        if spec.get("pip") or spec.get("commands"):
            # From interpreter start, so a requested version wins even over a module the
            # kernel itself imports before any startup cell runs (six, via dateutil).
            env["PYTHONPATH"] = self.python
        if spec.get("go"):
            # The kernel has no network: resolve modules from the environment's cache
            # only; their checksums were verified when the setup downloaded them.
            env.update(GOMODCACHE=self.go_modcache, GOFLAGS="-mod=mod", GOPROXY="off", GOSUMDB="off")
        return env

    def python_startup_cell(self) -> str:
        """Make the environment importable in a Python kernel, ahead of the kernel's own
        site-packages (a requested version must win over one the image happens to have).

        ``site.addsitedir`` also runs the ``.pth`` files some packages rely on; the
        entries it adds are then moved to the front. PYTHONPATH and PATH reach
        subprocesses (``!pip list``, ``subprocess.run([sys.executable, ...])``).
        """
        return (
            "import os as _era_os, site as _era_site, sys as _era_sys\n"
            f"_era_dir = {json.dumps(self.python)}\n"
            "_era_before = list(_era_sys.path)\n"
            "_era_site.addsitedir(_era_dir)\n"
            "_era_sys.path[:] = [p for p in _era_sys.path if p not in _era_before] + _era_before\n"
            "_era_os.environ['PYTHONPATH'] = _era_os.pathsep.join(\n"
            "    [_era_dir] + [p for p in _era_os.environ.get('PYTHONPATH', '').split(_era_os.pathsep) if p])\n"
            f"_era_os.environ['PATH'] = _era_os.pathsep.join({json.dumps(self.bin_dirs)}"
            " + [_era_os.environ.get('PATH', '/usr/bin:/bin')])\n"
            "del _era_os, _era_site, _era_sys, _era_dir, _era_before"
        )
