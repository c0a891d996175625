"""The steps of a setup: which program runs with which arguments and environment.

Shared by both runners, so that pip, npm and go behave the same in bubblewrap
and in a container; only the paths of the tools differ (``Toolchain``). Packages are
passed after ``--`` so that nothing in a spec can become an option; commands run as
``bash -c`` inside the sandbox and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

from .layout import EnvLayout


class SetupFailed(Exception):
    """A setup cannot complete; the message is what the user sees as the error."""


class StepTimeout(SetupFailed):
    pass


@dataclass(frozen=True)
class Step:
    kind: str  # pip | npm | go | command
    title: str  # what the log shows before the step's output
    argv: list[str]
    timeout: float  # seconds; the whole setup's remaining time bounds it too


@dataclass(frozen=True)
class Toolchain:
    """The programs as the sandbox sees them."""

    python: str  # an interpreter with pip (the kernel's own, so wheels match it)
    base_path: str  # PATH inside the sandbox before the environment's bin dirs
    npm: str = "npm"
    go: str = "go"
    bash: str = "bash"


def plan(spec: dict[str, list[str]], layout: EnvLayout, tools: Toolchain, *, setup_timeout: float,
         command_timeout: float) -> list[Step]:
    """pip, then npm, then go, into the shared environment; then ``commands`` when the
    dict has any (a session's commands run in its own sandbox instead: ``session.py``)."""
    steps: list[Step] = []
    if spec.get("pip"):
        steps.append(Step("pip", "pip install " + " ".join(spec["pip"]), [
            tools.python, "-m", "pip", "install", "--target", layout.python, "--no-cache-dir",
            "--progress-bar", "off", "--no-input", "--disable-pip-version-check", "--no-warn-script-location",
            "--", *spec["pip"]], setup_timeout))
    if spec.get("npm"):
        steps.append(Step("npm", "npm install " + " ".join(spec["npm"]), [
            tools.npm, "install", "--prefix", layout.node_prefix, "--no-audit", "--no-fund",
            "--no-update-notifier", "--loglevel=http", "--foreground-scripts", "--", *spec["npm"]], setup_timeout))
    if spec.get("go"):
        steps.append(Step("go", "go mod download " + " ".join(spec["go"]), [
            tools.go, "mod", "download", "-x", "--", *spec["go"]], setup_timeout))
    for command in spec.get("commands", []):
        first = command.splitlines()[0] if command else ""
        title = first[:200] + (" ..." if len(first) > 200 or "\n" in command else "")
        steps.append(Step("command", f"$ {title}", [tools.bash, "-c", command], command_timeout))
    return steps


def step_env(layout: EnvLayout, tools: Toolchain, *, home: str, ca_bundle: str | None) -> dict[str, str]:
    """The whole environment of a step: nothing of the server's own variables."""
    env = {
        "HOME": home, "TMPDIR": "/tmp", "LANG": "C.UTF-8",
        "PATH": ":".join([*layout.bin_dirs, tools.base_path]),
        "PYTHONUNBUFFERED": "1", "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "npm_config_cache": f"{home}/.npm", "npm_config_update_notifier": "false",
        "npm_config_fund": "false", "npm_config_audit": "false",
        # Go: downloads into the environment; keep the module cache deletable (a failed
        # setup is removed), never fetch a different toolchain.
        "GOPATH": f"{home}/go", "GOCACHE": f"{home}/.cache/go-build", "GOFLAGS": "-modcacherw",
        "GOTOOLCHAIN": "local",
        # glibc reserves 64 MiB of address space per thread arena; under RLIMIT_AS that
        # reservation, not real use, would run out first (as for local kernels).
        "MALLOC_ARENA_MAX": "2",
        **layout.step_env(),
    }
    if ca_bundle:
        # Registries are reached through the host's trust store (it may hold a proxy's CA).
        env.update(PIP_CERT=ca_bundle, SSL_CERT_FILE=ca_bundle, REQUESTS_CA_BUNDLE=ca_bundle,
                   NODE_EXTRA_CA_CERTS=ca_bundle, CURL_CA_BUNDLE=ca_bundle, GIT_SSL_CAINFO=ca_bundle)
    return env
