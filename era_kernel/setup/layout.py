"""Where things go inside an environment directory, and how a kernel is pointed at them.

One environment directory holds everything a setup produced::

    <env>/python/            pip install --target (importable: sys.path, PYTHONPATH)
    <env>/python/bin/        console scripts of those packages (PATH)
    <env>/node/              npm install --prefix: node_modules/, package.json, lock
    <env>/node/node_modules/ NODE_PATH; its .bin/ is on PATH
    <env>/go/pkg/mod/        GOMODCACHE of `go mod download`
    <env>/.era-env.json      written last: what was built, from which spec, when

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
        """Variables every package step sees: later steps can use what earlier ones
        installed, and know where to put their own output."""
        return {"ERA_SETUP_DIR": self.root, "PYTHONPATH": self.python, "NODE_PATH": self.node_modules,
                "GOMODCACHE": self.go_modcache,
                # A build script's own `pip install` lands in the environment, not the read-only venv.
                "PIP_TARGET": self.python}

    def kernel_env(self, packages: dict[str, list[str]], session_site: str | None = None) -> dict[str, str]:
        """Variables set at kernel launch: seen by the kernel process and its children.
        ``session_site``: the session's own package directory (its commands' ``pip
        install``), ahead of the shared one."""
        env = {"ERA_SETUP_DIR": self.root, "NODE_PATH": self.node_modules}
        python = [p for p in (session_site, self.python if packages.get("pip") else None) if p]
        if python:
            # From interpreter start, so a requested version wins even over a module the
            # kernel itself imports before any startup cell runs (six, via dateutil).
            env["PYTHONPATH"] = ":".join(python)
        if packages.get("go"):
            # The kernel has no network: resolve modules from the environment's cache
            # only; their checksums were verified when the setup downloaded them.
            env.update(GOMODCACHE=self.go_modcache, GOFLAGS="-mod=mod", GOPROXY="off", GOSUMDB="off")
        return env

    def command_env(self, base_path: str, session_site: str, ca_bundle: str | None) -> dict[str, str]:
        """Variables of a session's setup commands: the shared environment on their paths
        (read-only to them), ``pip install`` into the session's own directory, the host's
        trust store for registries."""
        env = {"ERA_SETUP_DIR": self.root, "NODE_PATH": self.node_modules,
               "PATH": ":".join([f"{session_site}/bin", *self.bin_dirs, base_path]),
               "PYTHONPATH": f"{session_site}:{self.python}", "PIP_TARGET": session_site,
               "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "npm_config_update_notifier": "false",
               "npm_config_fund": "false", "npm_config_audit": "false", "GOTOOLCHAIN": "local"}
        if ca_bundle:
            env.update(PIP_CERT=ca_bundle, SSL_CERT_FILE=ca_bundle, REQUESTS_CA_BUNDLE=ca_bundle,
                       NODE_EXTRA_CA_CERTS=ca_bundle, CURL_CA_BUNDLE=ca_bundle, GIT_SSL_CAINFO=ca_bundle)
        return env

    def python_startup_cell(self, session_site: str | None = None) -> str:
        """Make the environment importable in a Python kernel, ahead of the kernel's own
        site-packages (a requested version must win over one the image happens to have).

        ``site.addsitedir`` also runs the ``.pth`` files some packages rely on; the
        entries it adds are then moved to the front. PYTHONPATH and PATH reach
        subprocesses (``!pip list``, ``subprocess.run([sys.executable, ...])``).
        ``session_site`` (the session's own packages) goes first; it need not exist yet
        (a run may ``pip install`` into it later).
        """
        dirs = [p for p in (session_site, self.python) if p]
        bins = ([f"{session_site}/bin"] if session_site else []) + self.bin_dirs
        return python_startup_cell(dirs, bins)


def python_startup_cell(dirs: list[str], bins: list[str]) -> str:
    """The cell that puts ``dirs`` first on a Python kernel's path (``.pth`` files run)
    and ``bins`` first on its PATH, for the kernel and its subprocesses."""
    return (
        "import os as _era_os, site as _era_site, sys as _era_sys\n"
        f"_era_dirs = {json.dumps(dirs)}\n"
        "_era_before = list(_era_sys.path)\n"
        "for _era_dir in _era_dirs:\n"
        "    _era_site.addsitedir(_era_dir)\n"
        "_era_sys.path[:] = [p for p in _era_dirs if p in _era_sys.path] + [\n"
        "    p for p in _era_sys.path if p not in _era_before and p not in _era_dirs] + [\n"
        "    p for p in _era_before if p not in _era_dirs]\n"
        "_era_os.environ['PYTHONPATH'] = _era_os.pathsep.join(\n"
        "    _era_dirs + [p for p in _era_os.environ.get('PYTHONPATH', '').split(_era_os.pathsep)\n"
        "                 if p and p not in _era_dirs])\n"
        f"_era_os.environ['PATH'] = _era_os.pathsep.join({json.dumps(bins)}"
        " + [_era_os.environ.get('PATH', '/usr/bin:/bin')])\n"
        "del _era_os, _era_site, _era_sys, _era_dirs, _era_dir, _era_before"
    )
