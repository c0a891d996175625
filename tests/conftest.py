"""Shared fixtures: a real engine on real kernels, in throwaway directories."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from era_kernel.config import Settings
from era_kernel.sessions import SessionManager
from era_kernel.workspaces.volumes import release_everything_under

ROOT = Path(__file__).resolve().parent.parent


def short_tmpdir(prefix: str = "era") -> Path:
    # IPC socket paths must stay under 107 bytes: pytest's tmp_path is too deep.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def require_docker() -> None:
    """Skip without a Docker engine and the era/python image, fail under ERA_REQUIRE_DOCKER=1."""
    try:
        from era_kernel.images.build import current_image

        if current_image("python") is None:
            raise RuntimeError("the era/python image is not built (era images build)")
    except Exception as exc:
        message = f"Docker provisioner unavailable: {exc}"
        if os.environ.get("ERA_REQUIRE_DOCKER") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_cluster():
    """One throwaway PostgreSQL cluster for the whole test session (tests/support/postgres.py).
    Skipped without PostgreSQL's server binaries or psycopg; fails under ERA_REQUIRE_POSTGRES=1."""
    from .support.postgres import PostgresCluster, find_bin_dir

    try:
        import psycopg  # noqa: F401

        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL's server (initdb) is not installed (apt-get install postgresql)")
        cluster = PostgresCluster(bin_dir).start()
    except Exception as exc:
        message = f"PostgreSQL unavailable: {exc}"
        if os.environ.get("ERA_REQUIRE_POSTGRES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    yield cluster
    cluster.stop()


def require_gvisor() -> None:
    """require_docker, and the engine has gVisor's runtime (scripts/bootstrap-docker.sh
    registers it); skip without it, fail under ERA_REQUIRE_GVISOR=1."""
    require_docker()
    try:
        from era_kernel.config import Settings
        from era_kernel.provisioning.docker import shared_docker_client

        runtimes = shared_docker_client().info().get("Runtimes") or {}
        wanted = [Settings.from_env({})[name] for name in ("ERA_DOCKER_GVISOR_RUNTIME", "ERA_DOCKER_GVISOR_NET_RUNTIME")]
        missing = [name for name in wanted if name not in runtimes]
        if missing:
            raise RuntimeError(f"the Docker engine has no runtime {', '.join(missing)} (scripts/bootstrap-docker.sh)")
    except Exception as exc:
        message = f"gVisor unavailable: {exc}"
        if os.environ.get("ERA_REQUIRE_GVISOR") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session", autouse=True)
def registries_read_once_per_configuration():
    """Every engine reads the operator's pip, npm and Go configuration when it starts
    (era_kernel/egress/registries.py derive: three tool processes, about a second of CPU,
    in a thread the test's event loop then waits for when it closes). Hundreds of
    in-process engines would read the same answer: in this test process it is read once
    per environment and ERA_SETUP_EGRESS_ALLOW, by the real derive. Tests that call
    derive themselves (imported by name) and server subprocesses read it afresh."""
    from era_kernel.egress import registries

    real = registries.derive
    answers: dict = {}

    def derive_once(settings, environ=None):
        environ = os.environ if environ is None else environ
        key = (tuple(sorted((k, v) for k, v in environ.items() if k != "PYTEST_CURRENT_TEST")),  # pytest's, per test
               str(settings["ERA_SETUP_EGRESS_ALLOW"] or ""))
        if key not in answers:
            answers[key] = real(settings, environ)
        return answers[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registries, "derive", derive_once)
        yield


@pytest.fixture
def era_settings(request, tmp_path):
    """Engine settings in throwaway directories. Parametrize indirectly with a
    provisioner name ("local", "docker") to run a module on both."""
    provisioner = getattr(request, "param", "local")
    if provisioner == "docker":
        require_docker()
    runtime = short_tmpdir("ert")
    # No warm pool by default: each test's engine would start kernels nobody uses.
    # tests/test_engine_pool.py turns it on.
    # Nor a stock of workspace volumes made ahead (test_workspace_volumes.py tests it).
    settings = Settings.from_env({}, data_dir=str(tmp_path / "data"), runtime_dir=str(runtime),
                                 provisioner=provisioner, pool_size=0, workspace_volume_stock=0)
    yield settings
    # Workspace volumes an engine did not release (a test that never shut it down, a
    # killed child process): unmounted, their loop devices detached.
    release_everything_under(settings.data_dir)
    shutil.rmtree(runtime, ignore_errors=True)


# Engine-level suites that must hold on both provisioners run under this (the one way to
# say so). What a provisioner itself promises is checked, per provisioner, by
# tests/conformance/test_provisioner_*.py.
both_provisioners = pytest.mark.parametrize("era_settings", ["local", "docker"], indirect=True)


@pytest.fixture
async def engine(era_settings):
    manager = SessionManager(era_settings)
    await manager.start()
    yield manager
    await manager.shutdown()


@pytest.fixture
async def session(engine):
    """A ready Python session on the default (local) provisioner."""
    doc = await engine.create({"language": "python"})
    yield doc["id"]
    try:
        await engine.delete(doc["id"])
    except Exception:
        pass


def kernel_processes(marker: str) -> list[int]:
    """Pids whose command line mentions ``marker`` (a runtime or kernel dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd and int(entry.name) != os.getpid():
                pids.append(int(entry.name))
    return pids
