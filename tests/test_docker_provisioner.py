"""What only the era-docker provisioner does, against a real Docker engine (docs/security.md
cases 8-10, 17-19): the exact container configuration, images, labels, limits as Docker sees
them, the egress network and the reaping of orphaned containers. What every provisioner
promises (isolation, privileges, network, environment, limits, interrupt, restart,
stop, IPC seal) is checked for this one too in tests/conformance/test_provisioner_*.py.

Needs an engine (``eval "$(scripts/bootstrap-docker.sh)"``) and the ``era/python``
image (built here on first use; the debootstrap base needs root). Without an engine
these tests skip, unless ``ERA_REQUIRE_DOCKER=1``, where they fail.
Every kernel runs with network ``none`` (or ``host`` for the one configuration check),
so no test traffic leaves loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from era_kernel.errors import BadRequest, KernelFailed

KERNEL_NAME = "era-docker-python"
KERNEL_UID = 1000


def _require_engine():
    try:
        import docker

        client = docker.from_env(timeout=10)
        client.ping()
        return client
    except Exception as exc:  # no engine, no DOCKER_HOST, no SDK
        message = f"no Docker engine answers ({exc}); run: eval \"$(scripts/bootstrap-docker.sh)\""
        if os.environ.get("ERA_REQUIRE_DOCKER") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def docker_client():
    return _require_engine()


@pytest.fixture(scope="module")
def python_image(docker_client):
    from era_kernel.images import build_image

    try:
        return build_image("python", client=docker_client, show_progress=False)
    except Exception as exc:
        if os.environ.get("ERA_REQUIRE_DOCKER") == "1":
            raise
        pytest.skip(f"cannot build era/python: {exc}")


@pytest.fixture
def runtime_dir():
    # Short on purpose: IPC socket paths must stay under 107 bytes.
    path = tempfile.mkdtemp(prefix="era-t", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def workspace(tmp_path):
    path = tmp_path / "ws"
    path.mkdir()
    if os.getuid() == 0:
        os.chown(path, KERNEL_UID, KERNEL_UID)
    return path


@pytest.fixture
def kernelspecs(tmp_path):
    return make_kernelspec(tmp_path / "kernels", KERNEL_NAME)


def make_kernelspec(root: Path, name: str, *, language: str = "python", config: dict | None = None,
                    interrupt_mode: str = "message") -> Path:
    spec_dir = root / name
    spec_dir.mkdir(parents=True)
    provisioner = {"provisioner_name": "era-docker", "config": config or {}}
    spec = {"argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "ERA Python (Docker)", "language": language, "interrupt_mode": interrupt_mode,
            "metadata": {"kernel_provisioner": provisioner}}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return root


@contextlib.asynccontextmanager
async def docker_kernel(kernel_dirs: Path, *, name: str = KERNEL_NAME, **start_kwargs):
    from jupyter_client import AsyncKernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dirs)]))
    await km.start_kernel(**start_kwargs)
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        yield km, kc
    finally:
        kc.stop_channels()
        if km.has_kernel:
            await km.shutdown_kernel(now=True)


async def run(kc, code: str, timeout: float = 30) -> tuple[str, str, dict]:
    """Execute code; return (status, stdout, reply content)."""
    out: list[str] = []

    def hook(msg):
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            out.append(msg["content"]["text"])

    reply = await kc.execute_interactive(code, output_hook=hook, timeout=timeout)
    return reply["content"]["status"], "".join(out), reply["content"]


async def run_json(kc, code: str, timeout: float = 30):
    status, out, content = await run(kc, code, timeout)
    assert status == "ok", content
    return json.loads(out.strip().splitlines()[-1])


def era_options(workspace, runtime_dir, **extra):
    return {"era": {"workspace": str(workspace), "runtime_dir": runtime_dir, "uid": KERNEL_UID, **extra}}


def managed_containers(client) -> set[str]:
    """Our containers: other ERA servers may be starting and stopping theirs on the engine."""
    owner = f"era.owner={os.getpid()}"
    return {c["Id"] for c in client.api.containers(all=True, filters={"label": ["era.managed=1", owner]})}


# ---------------------------------------------------------------------------- basics


async def test_execute_and_exact_container_config(docker_client, python_image, kernelspecs, workspace, runtime_dir):
    async with docker_kernel(kernelspecs, **era_options(workspace, runtime_dir, labels={"era.session": "s1"})) as (km, kc):
        status, out, _ = await run(kc, "import os\nprint(6 * 7, os.getcwd())\nopen('made-inside.txt', 'w').write('hi')")
        assert status == "ok" and out.split() == ["42", "/workspace"]
        made = workspace / "made-inside.txt"
        assert made.read_text() == "hi" and made.stat().st_uid == KERNEL_UID

        attrs = docker_client.api.inspect_container(km.provisioner.container_id)
        host, config = attrs["HostConfig"], attrs["Config"]
        assert host["Privileged"] is False and host["CapDrop"] == ["ALL"] and not host["CapAdd"]
        assert host["ReadonlyRootfs"] is True and host["SecurityOpt"] == ["no-new-privileges"]
        assert host["NetworkMode"] == "none" and not host["Binds"] and not host["Devices"]
        assert host["Memory"] == 512 * 1024**2 and host["MemorySwap"] == 512 * 1024**2
        assert host["NanoCpus"] == 10**9 and host["PidsLimit"] == 256 and host["Init"] is True
        assert set(host["Tmpfs"]) == {"/tmp"}
        assert config["User"] == f"{KERNEL_UID}:{KERNEL_UID}" and config["WorkingDir"] == "/workspace"
        mounts = {m["Destination"]: m for m in attrs["Mounts"]}
        assert set(mounts) == {"/workspace", str(km.provisioner.kernel_dir)}
        assert mounts["/workspace"]["Source"] == str(workspace.resolve()) and mounts["/workspace"]["RW"]
        labels = config["Labels"]
        assert labels["era.managed"] == "1" and labels["era.session"] == "s1"
        assert labels["era.kernel"] == km.provisioner.kernel_dir.name


async def test_plain_jupyter_launch_uses_config_and_settings(docker_client, python_image, tmp_path, workspace,
                                                            runtime_dir, monkeypatch):
    """No era dict (a plain Jupyter app): kernelspec provisioner config, then ERA_* settings."""
    monkeypatch.setenv("ERA_RUNTIME_DIR", runtime_dir)
    kernels = make_kernelspec(tmp_path / "plain", "plain", config={"pids_limit": 99, "memory_limit": 300 * 1024**2})
    async with docker_kernel(kernels, name="plain", cwd=str(workspace)) as (km, kc):
        assert str(km.provisioner.kernel_dir).startswith(runtime_dir)
        host = docker_client.api.inspect_container(km.provisioner.container_id)["HostConfig"]
        assert host["PidsLimit"] == 99 and host["Memory"] == 300 * 1024**2
        assert (await run_json(kc, "import os, json; print(json.dumps([os.getuid(), os.getcwd()]))")) == [1000, "/workspace"]


# ---------------------------------------------------------------------------- requests

@pytest.mark.parametrize("image", ["--privileged", "-v /:/host", "era/python:latest --privileged", "a b",
                                   "era/python;id", "$(id)", "ERA/Python", "era/python:\nlatest"])
async def test_bad_image_names_refused(docker_client, kernelspecs, workspace, runtime_dir, image):
    before = managed_containers(docker_client)
    with pytest.raises(BadRequest):
        async with docker_kernel(kernelspecs, **era_options(workspace, runtime_dir, image=image)):
            pass
    assert managed_containers(docker_client) == before
    kernels_root = Path(runtime_dir) / "k"
    assert not kernels_root.exists() or not list(kernels_root.iterdir())  # nothing left behind


@pytest.mark.parametrize("language", ["--privileged", "-v /:/host", "python --rm"])
async def test_bad_language_names_refused(docker_client, tmp_path, workspace, runtime_dir, language):
    kernels = make_kernelspec(tmp_path / "bad", "bad", language=language)
    with pytest.raises(BadRequest):
        async with docker_kernel(kernels, name="bad", **era_options(workspace, runtime_dir)):
            pass


async def test_too_little_memory_and_bad_labels_refused(docker_client, kernelspecs, workspace, runtime_dir):
    """Options only a container has; the common ones are in the conformance suite."""
    before = managed_containers(docker_client)
    for era, field in (({"memory": 1024}, "memory"), ({"labels": {"era.managed": "0"}}, "labels"),
                       ({"labels": {"x": "a\nb"}}, "labels")):
        options = era_options(workspace, runtime_dir)
        options["era"].update(era)
        with pytest.raises(BadRequest) as refused:
            async with docker_kernel(kernelspecs, **options):
                pass
        assert refused.value.field == field
    assert managed_containers(docker_client) == before


async def test_network_access_falls_back_to_host_without_egress_network(docker_client, python_image, tmp_path,
                                                                      workspace, runtime_dir):
    """This engine has no bridge: allow_network means host networking (documented exposure)."""
    import docker.errors

    try:
        docker_client.networks.get("era-egress")
        pytest.skip("an era-egress network exists on this engine")
    except docker.errors.NotFound:
        pass
    async with docker_kernel(make_kernelspec(tmp_path / "k1", "k1"), name="k1",
                             **era_options(workspace, runtime_dir, allow_network=True)) as (km, _):
        assert docker_client.api.inspect_container(km.provisioner.container_id)["HostConfig"]["NetworkMode"] == "host"
    strict = make_kernelspec(tmp_path / "k2", "k2", config={"host_network_fallback": False})
    with pytest.raises(KernelFailed):
        async with docker_kernel(strict, name="k2", **era_options(workspace, runtime_dir, allow_network=True)):
            pass


# ---------------------------------------------------------------------------- limits (cases 8, 9)

async def test_limits_from_session_options(docker_client, python_image, kernelspecs, workspace, runtime_dir):
    options = era_options(workspace, runtime_dir, memory=256 * 1024**2, cpus=0.5, pids=100)
    async with docker_kernel(kernelspecs, **options) as (km, _):
        host = docker_client.api.inspect_container(km.provisioner.container_id)["HostConfig"]
    assert (host["Memory"], host["NanoCpus"], host["PidsLimit"]) == (256 * 1024**2, 5 * 10**8, 100)


# ---------------------------------------------------------------------------- orphans (case 10)


async def test_reap_orphan_containers(docker_client, python_image):
    from era_kernel.provisioning.docker import reap_orphan_containers
    from era_kernel.provisioning.owner import me

    # Owned by this (live) process, so the reapers of other ERA servers starting on the same
    # engine meanwhile leave them alone: this call is told to take them for orphans.
    owner, started = me()
    labels = {"era.managed": "1", "era.kernel": f"test-orphan-{owner}", "era.owner": str(owner),
              "era.owner_start": str(started)}
    keep = f"keep-me-{owner}"
    created = docker_client.containers.create(python_image, ["sleep", "60"], labels=labels, network_mode="none")
    running = docker_client.containers.run(python_image, ["sleep", "60"],
                                           labels={**labels, "era.kernel": f"test-run-{owner}"},
                                           network_mode="none", detach=True)
    kept = docker_client.containers.create(python_image, ["sleep", "60"], labels={**labels, "era.kernel": keep},
                                           network_mode="none")
    unrelated = docker_client.containers.create(python_image, ["sleep", "60"], network_mode="none")
    try:
        assert docker_client.api.inspect_container(created.id)["State"]["Status"] == "created"
        removed = await reap_orphan_containers(docker_client, keep={keep})
        assert removed >= 2
        remaining = managed_containers(docker_client)
        assert created.id not in remaining and running.id not in remaining and kept.id in remaining
        assert docker_client.api.inspect_container(unrelated.id)  # not ours: untouched
    finally:
        for container in (kept, unrelated):
            container.remove(force=True)


