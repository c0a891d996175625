"""Package setup end to end, on both provisioners: real pip and npm against the real
registries (PyPI, npm; the only network these tests use besides loopback), real sandboxes,
and real kernels that see the environment read-only through the launch extras. Setup
commands run per session, in a ``CommandSandbox`` on a directory of the test's own.

Docker: the era/python image has no node, so npm setup is local-only for now; on Docker
an npm setup must fail with a clear message and leave the session usable.

The module shares one data directory and store, so environments built by one test are
cache hits for the next; every test still asks for what it needs and passes alone.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import time
from pathlib import Path

import pytest

from era_kernel.config import Settings
from era_kernel.kernel import SessionKernel
from era_kernel.provisioning.base import LaunchOptions
from era_kernel.kernelspecs import EraKernelSpecManager
from era_kernel.languages import get_language
from era_kernel.setup import SetupManager
from era_kernel.setup.cache import archive_key
from era_kernel.setup.session import CommandSandbox
from era_kernel.setup.spec import env_key
from era_kernel.workspaces import Workspace, WorkspaceStore

from .conftest import kernel_processes, require_docker, short_tmpdir

UID = 100_000 + 4242 if os.getuid() == 0 else os.getuid()
PIP_SPEC = {"pip": ["requests==2.32.3", "pydantic==2.10.6"],
            "commands": ["python -c 'import requests, pydantic; print(requests.__version__, pydantic.VERSION)' "
                         "> versions.txt"]}
NPM_SPEC = {"npm": ["ms", "chalk@4.1.2"]}

both = pytest.mark.parametrize("provisioner", ["local", "docker"])


@pytest.fixture(scope="module")
def shared_dir():
    path = short_tmpdir("ers")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def settings(shared_dir):
    return Settings.from_env({}, data_dir=str(shared_dir / "data"), runtime_dir=str(shared_dir / "rt"))


@pytest.fixture
def store(shared_dir):
    return WorkspaceStore.from_url(f"file://{shared_dir / 'store'}", durable=False)


@pytest.fixture
async def setups(settings, store):
    manager = SetupManager(settings, store)
    yield manager
    await manager.shutdown()


@pytest.fixture(autouse=True)
def docker_engine(request):
    """Docker cases skip without an engine and the era/python image (fail under ERA_REQUIRE_DOCKER=1)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("provisioner") == "docker":
        require_docker()


class Recorder:
    """on_log / on_status of one session, with arrival times."""

    def __init__(self):
        self.lines: list[tuple[float, str]] = []
        self.statuses: list[tuple[float, str, dict | None]] = []

    def log(self, line: str) -> None:
        self.lines.append((time.monotonic(), line))

    async def status(self, status: str, result: dict | None) -> None:
        self.statuses.append((time.monotonic(), status, result))

    @property
    def final(self) -> tuple[str, dict]:
        _, status, result = self.statuses[-1]
        return status, result

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def sandbox_for(setups: SetupManager, provisioner: str, uid: int = UID) -> CommandSandbox:
    """A session's directories as the engine makes them: a workspace of ``uid``'s and a
    /tmp (root's, sticky), under the module's data directory."""
    base = setups.settings.data_dir / "test-sessions" / secrets.token_hex(4)
    (base / "tmp").mkdir(parents=True)
    os.chmod(base / "tmp", 0o1777)
    (base / "ws").mkdir(mode=0o700)
    if os.getuid() == 0:
        os.chown(base / "ws", uid, uid)
    return CommandSandbox(setups.settings, provisioner, "python", base / "ws", base / "tmp", uid)


async def run_setup(setups: SetupManager, spec: dict, provisioner: str, sid: str | None = None,
                    timeout: float = 600, sandbox: CommandSandbox | None = None) -> Recorder:
    rec = Recorder()
    sid = sid or f"s-{secrets.token_hex(4)}"
    rec.sandbox = sandbox or sandbox_for(setups, provisioner)
    await setups.start(sid, "python", provisioner, UID, setups.normalize(spec), rec.log, rec.status, rec.sandbox)
    await setups.wait(sid, timeout)
    return rec


async def start_kernel(settings: Settings, setups: SetupManager, provisioner: str, spec: dict | None,
                       workspace: Path) -> SessionKernel:
    """A real session kernel launched the way the engine will: `era` options plus the extras."""
    extras = await setups.launch_extras("python", provisioner, spec)
    await Workspace(workspace).create(uid=UID)
    language = get_language("python")
    launch = LaunchOptions.from_settings(settings, provisioner, workspace, uid=UID, env=dict(extras["env"]),
                                         readonly=tuple(extras["readonly"]))
    cwd = "/workspace" if provisioner == "docker" else str(workspace)
    kernel = SessionKernel(EraKernelSpecManager(), language.kernelspec_name(provisioner), launch,
                           extras["startup"] + language.startup_cells(cwd, {}, None), start_timeout=60)
    await kernel.start()
    return kernel


async def run_code(kernel: SessionKernel, code: str) -> str:
    outcome = await kernel.execute(code, timeout=60)
    assert outcome.status == "ok", outcome.collector.error
    return "".join(outcome.collector.stdout)


async def env_dir(setups: SetupManager, provisioner: str, spec: dict) -> Path:
    return Path((await setups.launch_extras("python", provisioner, spec))["readonly"][0])


def leftovers(settings: Settings) -> list[str]:
    staging = settings.data_dir / "envs" / ".staging"
    return sorted(p.name for p in staging.iterdir()) if staging.is_dir() else []


# ---- pip and commands, then a kernel imports them ---------------------------------------------

@both
async def test_pip_and_commands_then_the_kernel_imports_the_pinned_versions(settings, setups, provisioner, tmp_path):
    rec = await run_setup(setups, PIP_SPEC, provisioner)
    status, result = rec.final
    assert status == "completed", result
    assert [s for _, s, _ in rec.statuses] == ["running", "completed"]
    assert result["error"] is None and result["source"] in ("built", "cache", "store")
    assert result["duration"] and result["duration_ms"] > 0 and result["logs"]
    if result["source"] == "built":
        assert "Successfully installed" in result["logs"] and "requests-2.32.3" in rec.text()
    root = await env_dir(setups, provisioner, PIP_SPEC)
    # The command ran after pip, in the session's sandbox, with the environment importable.
    assert (rec.sandbox.workspace / "versions.txt").read_text().split() == ["2.32.3", "2.10.6"]
    assert not (root / "versions.txt").exists()

    kernel = await start_kernel(settings, setups, provisioner, PIP_SPEC, tmp_path / "ws")
    try:
        out = await run_code(kernel, (
            "import os, requests, pydantic\n"
            "print(requests.__version__, pydantic.VERSION)\n"
            "print(requests.__file__)\n"
            "try:\n"
            "    open(os.path.join(os.environ['ERA_SETUP_DIR'], 'x'), 'w')\n"
            "except OSError as exc:\n"
            "    print('read-only', exc.errno)\n"))
    finally:
        await kernel.stop(now=True)
    versions, path, readonly = out.splitlines()
    # The host venv has other versions of both: the environment's must win.
    assert versions == "2.32.3 2.10.6"
    assert path.startswith(str(root) + "/python/")
    assert readonly.startswith("read-only")


# ---- npm: node requires the packages through NODE_PATH ---------------------------------------------

async def test_npm_packages_are_required_by_node_from_the_kernel(settings, setups, tmp_path):
    if not shutil.which("node"):
        pytest.skip("node is not installed on this machine")
    rec = await run_setup(setups, NPM_SPEC, "local")
    status, result = rec.final
    assert status == "completed", result
    root = await env_dir(setups, "local", NPM_SPEC)
    assert (root / "node" / "node_modules" / "ms" / "package.json").is_file()
    kernel = await start_kernel(settings, setups, "local", NPM_SPEC, tmp_path / "ws")
    try:
        out = await run_code(kernel, (
            "import os, subprocess\n"
            "print(os.environ['NODE_PATH'])\n"
            "r = subprocess.run(['node', '-e', \"const ms = require('ms'), chalk = require('chalk');"
            " console.log(ms(60000), typeof chalk.red, require.resolve('ms'))\"],"
            " capture_output=True, text=True)\n"
            "print(r.stdout.strip() or r.stderr)\n"))
    finally:
        await kernel.stop(now=True)
    node_path, node_out = out.splitlines()
    assert node_path == f"{root}/node/node_modules"
    assert node_out.startswith("1m function ") and node_out.split()[2].startswith(str(root))


async def test_npm_on_docker_fails_clearly_and_the_session_stays_usable(settings, setups, tmp_path):
    require_docker()
    rec = await run_setup(setups, {"npm": ["ms"]}, "docker")
    status, result = rec.final
    assert status == "failed"
    assert "npm is not installed in image" in result["error"]
    kernel = await start_kernel(settings, setups, "docker", {"npm": ["ms"]}, tmp_path / "ws")
    try:
        assert (await run_code(kernel, "print(6 * 7)")).strip() == "42"
    finally:
        await kernel.stop(now=True)


# ---- the cache: a second session, and a host that only has the store ----------------------------

@both
async def test_second_session_with_the_same_spec_reuses_the_environment_at_once(setups, provisioner):
    first = await run_setup(setups, PIP_SPEC, provisioner)
    assert first.final[0] == "completed"
    # Same packages, other order and spelling: the same environment.
    same = {"pip": ["Pydantic==2.10.6", "requests == 2.32.3"], "commands": PIP_SPEC["commands"]}
    started = time.perf_counter()
    second = await run_setup(setups, same, provisioner)
    elapsed = time.perf_counter() - started
    status, result = second.final
    assert status == "completed" and result["source"] == "cache"
    assert result["env"] == first.final[1]["env"]
    assert elapsed < 1.0, f"cache hit took {elapsed:.3f}s"
    assert "using cached environment" in second.text()


async def test_a_host_without_the_directory_restores_the_environment_from_the_store(settings, store, tmp_path):
    setups = SetupManager(settings, store)
    try:
        spec = {"pip": ["requests==2.32.3"]}
        built = await run_setup(setups, spec, "local")
        assert built.final[0] == "completed"
        key = built.final[1]["env"]
        assert len(await store.get_archive(archive_key(key))) > 1000  # one object per environment
        # A fresh host: same store, empty data directory.
        other = Settings.from_env({}, data_dir=str(tmp_path / "other-host"), runtime_dir=str(settings.runtime_dir))
        fresh = SetupManager(other, store)
        restored = await run_setup(fresh, spec, "local")
        status, result = restored.final
        assert status == "completed" and result["source"] == "store" and result["env"] == key
        assert "restored environment" in restored.text()
        assert (fresh.cache.final(key) / "python" / "requests" / "__init__.py").is_file()
        # A kernel restarted on yet another host: ensure() restores without building.
        third = SetupManager(Settings.from_env({}, data_dir=str(tmp_path / "third-host"),
                                               runtime_dir=str(settings.runtime_dir)), store)
        assert (await third.launch_extras("python", "local", spec))["readonly"] == []
        assert await third.ensure("python", "local", spec)
        assert (await third.launch_extras("python", "local", spec))["readonly"] == [str(third.cache.final(key))]
    finally:
        await setups.shutdown()


# ---- failures: the tool's message, nothing cached, the session usable ---------------------------

FAILURES = {
    "pip-missing": ({"pip": ["era-no-such-package-4242"]}, "No matching distribution found for era-no-such-package"),
    "npm-missing": ({"npm": ["era-no-such-package-4242"]}, "404"),
    "command-fails": ({"commands": ["echo about to fail; echo 'boom: disk on fire' >&2; exit 3"]},
                      "boom: disk on fire"),
    "command-timeout": ({"commands": ["echo started; sleep 120; echo never"]}, "timed out after 3s"),
}


@both
@pytest.mark.parametrize("case", sorted(FAILURES))
async def test_failed_setup_reports_the_tools_error_and_caches_nothing(settings, store, provisioner, case, tmp_path):
    spec, expected = FAILURES[case]
    if case == "npm-missing" and provisioner == "docker":
        pytest.skip("npm setup is local-only for now (the era/python image has no node)")
    spec = {k: [v.replace("4242", secrets.token_hex(3)) if k != "commands" else v for v in vs]
            for k, vs in spec.items()}
    setups = SetupManager(settings.replace(ERA_SETUP_COMMAND_TIMEOUT=3.0), store)
    started = time.perf_counter()
    try:
        rec = await run_setup(setups, spec, provisioner)
    finally:
        await setups.shutdown()
    status, result = rec.final
    assert status == "failed"
    assert expected in result["error"], result["error"]
    assert expected in result["logs"]  # the live log said it too
    if case == "command-fails":
        assert "exit 3" in result["error"]
    if case == "command-timeout":
        assert time.perf_counter() - started < 30
        assert "never" not in result["logs"].splitlines()  # the echo after the sleep never ran
        assert not kernel_processes("sleep 120; echo never")  # the step was killed, all of it
    assert result["success"] is False and result["error"] == result["error"].strip()
    key = result["env"]
    assert leftovers(settings) == [], "a failed setup left staging directories"
    if case.startswith("command"):
        assert key is None  # commands alone need no shared environment
        assert result["commands_run"] == spec["commands"]
        if case == "command-fails":
            assert result["stdout"] == "about to fail\n" and result["stderr"] == "boom: disk on fire\n"
    else:
        assert key and not setups.cache.final(key).exists()
        assert result["stderr"] and expected in result["stderr"]  # the tool's words, as ERA gives them
        with pytest.raises(Exception):
            await store.get_archive(archive_key(key))
    if provisioner == "docker":
        import docker

        client = docker.from_env()
        assert not client.containers.list(all=True, filters={"label": "era.managed=1"}) or key is None or \
            not client.containers.list(all=True, filters={"label": f"era.setup={key}"})
        assert not client.containers.list(all=True, filters={"label": "era.command=1"})
    # The session works without its environment.
    extras = await setups.launch_extras("python", provisioner, spec)
    assert extras["readonly"] == [] and "ERA_SETUP_DIR" not in extras["env"]
    kernel = await start_kernel(settings, setups, provisioner, spec, tmp_path / "ws")
    try:
        assert (await run_code(kernel, "print(6 * 7)")).strip() == "42"
    finally:
        await kernel.stop(now=True)


# ---- sandbox, live logs, sharing and cancelling -----------------------------------------------------

@both
async def test_setup_runs_sandboxed_as_the_session_uid_with_live_logs(settings, setups, provisioner):
    token = secrets.token_hex(4)
    spec = {"pip": PIP_SPEC["pip"], "commands": [
        f"echo first-{token}; sleep 2; echo second-{token}",
        "id -u; grep NoNewPrivs /proc/self/status",
        "touch /usr/era-escape 2>/dev/null && echo WROTE-HOST || echo host-read-only",
        f"ls {settings.data_dir / 'sessions'} 2>/dev/null && echo SAW-DATA || echo data-hidden",
        # The shared environment is every session's: read-only to a session's commands.
        "touch \"$ERA_SETUP_DIR/x\" 2>/dev/null && echo env-writable || echo env-read-only",
    ]}
    rec = await run_setup(setups, spec, provisioner)
    status, result = rec.final
    assert status == "completed", result
    when = {line: t for t, line in rec.lines}
    # Streamed as printed, not collected at the end.
    assert when[f"second-{token}"] - when[f"first-{token}"] > 1.5
    assert when[f"second-{token}"] < rec.statuses[-1][0]
    lines = [line for _, line in rec.lines]
    assert str(UID) in lines and any(line.split() == ["NoNewPrivs:", "1"] for line in lines)
    assert "host-read-only" in lines and "WROTE-HOST" not in lines
    assert "data-hidden" in lines and "SAW-DATA" not in lines
    assert "env-read-only" in lines and "env-writable" not in lines
    # Shared environments belong to the server and are read-only for every sandbox uid.
    root = setups.cache.final(result["env"])
    assert root.stat().st_uid == os.getuid() and not root.stat().st_mode & 0o022


async def test_sessions_with_the_same_new_spec_share_one_build(settings, tmp_path):
    # A data directory of its own and no store: the build is certain to happen here.
    setups = SetupManager(settings.replace(ERA_DATA_DIR=str(tmp_path / "data")))
    token = secrets.token_hex(4)
    spec = {"pip": ["six==1.16.0"], "commands": [f"echo ran-{token} > mine.txt; echo ran-{token}"]}
    a, b = Recorder(), Recorder()
    try:
        a.sandbox, b.sandbox = sandbox_for(setups, "local"), sandbox_for(setups, "local", UID + 1)
        await setups.start("share-a", "python", "local", UID, setups.normalize(spec), a.log, a.status, a.sandbox)
        await asyncio.sleep(0.3)
        await setups.start("share-b", "python", "local", UID + 1, setups.normalize(spec), b.log, b.status, b.sandbox)
        await asyncio.gather(setups.wait("share-a", 300), setups.wait("share-b", 300))
    finally:
        await setups.shutdown()
    assert a.final[0] == b.final[0] == "completed", (a.final, b.final)
    assert a.final[1]["source"] == b.final[1]["source"] == "built"
    assert a.final[1]["env"] == b.final[1]["env"]
    assert "joining the setup" in b.text()
    assert [line for _, line in a.lines].count("Successfully installed six-1.16.0") == 1  # one pip run, seen by both
    assert [line for _, line in b.lines].count("Successfully installed six-1.16.0") == 1
    # The command is each session's own: it ran once in each sandbox.
    for rec in (a, b):
        assert [line for _, line in rec.lines].count(f"ran-{token}") == 1
        assert (rec.sandbox.workspace / "mine.txt").read_text() == f"ran-{token}\n"
        assert rec.final[1]["commands_run"] == spec["commands"]


async def test_cancel_kills_the_build_and_leaves_nothing(settings, setups):
    token = secrets.token_hex(4)
    rec = Recorder()
    await setups.start("to-cancel", "python", "local", UID, setups.normalize(
        {"commands": [f"echo go; sleep 60; echo {token}"]}), rec.log, rec.status, sandbox_for(setups, "local"))
    for _ in range(100):
        if any(line == "go" for _, line in rec.lines):
            break
        await asyncio.sleep(0.1)
    assert kernel_processes(f"sleep 60; echo {token}")
    await setups.cancel("to-cancel")  # returns once the step is killed and its staging removed
    assert not kernel_processes(f"sleep 60; echo {token}")
    assert leftovers(settings) == []
    assert [s for _, s, _ in rec.statuses] == ["running"]  # cancel reports nothing more
    assert not setups.running("to-cancel")


async def test_a_run_can_wait_for_setup_with_a_bound(setups):
    spec = setups.normalize({"commands": [f"sleep 2; echo {secrets.token_hex(4)}"]})
    rec = Recorder()
    await setups.start("waiter", "python", "local", UID, spec, rec.log, rec.status, sandbox_for(setups, "local"))
    with pytest.raises(TimeoutError):
        await setups.wait("waiter", 0.2)
    assert setups.running("waiter")
    await setups.wait("waiter", 60)
    assert rec.final[0] == "completed"
    await setups.wait("unknown-session", 0.01)  # nothing to wait for


async def test_the_environment_is_named_by_its_key(setups):
    from era_kernel.setup.runner_local import LocalRunner

    spec = setups.normalize({"pip": ["requests==2.32.3"], "commands": ["true"]})
    rec = await run_setup(setups, spec, "local")
    assert rec.final[0] == "completed"
    [root] = (await setups.launch_extras("python", "local", spec))["readonly"]
    assert Path(root).name == rec.final[1]["env"] == env_key("python", LocalRunner.identity(), spec)
    assert (Path(root) / "python" / "requests" / "__init__.py").is_file()


async def test_a_local_step_is_bounded_as_a_whole(settings, store):
    """docs/security.md case 8 for setup: four children of one step, 100 MiB each, under a 256 MiB
    ERA_SETUP_MEMORY: the step's cgroup caps their sum and the log says why some died."""
    if os.getuid() != 0:
        pytest.skip("step cgroups need root")
    from era_kernel.provisioning import cgroups

    if not cgroups.support():
        pytest.skip(cgroups.support().reason)
    manager = SetupManager(settings.replace(ERA_SETUP_MEMORY=256 * 1024**2), store)
    hog = "b = b'x' * (100 << 20); import time; time.sleep(3)"
    spec = {"commands": [f"for i in 1 2 3 4; do python -S -c \"{hog}\" & done; wait; echo step-done"]}
    try:
        rec = await run_setup(manager, spec, "local")
    finally:
        await manager.shutdown()
    text = rec.text()
    assert "step-done" in text and "Killed" in text, text
    assert "killed for exceeding its memory limit (ERA_SETUP_MEMORY)" in text, text
    mine = [p.name for base in cgroups.support().bases for p in base.iterdir()
            if (".setup-" in p.name or ".cmd-" in p.name) and p.name.startswith(f"{os.getpid()}.")]
    assert not mine, "the step's cgroup is removed"
