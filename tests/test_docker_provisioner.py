"""The era-docker provisioner against a real Docker engine (SECURITY.md 8, 9, 10, 17-21).

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
import socket
import tempfile
import time
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
    return {c["Id"] for c in client.api.containers(all=True, filters={"label": "era.managed=1"})}


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


async def test_container_and_ipc_dir_removed_after_shutdown(docker_client, python_image, kernelspecs, workspace,
                                                           runtime_dir):
    import docker.errors

    async with docker_kernel(kernelspecs, **era_options(workspace, runtime_dir)) as (km, kc):
        container_id, kernel_dir = km.provisioner.container_id, km.provisioner.kernel_dir
        assert (await run(kc, "1"))[0] == "ok"
        await km.shutdown_kernel()  # the graceful path: shutdown request, wait, cleanup
    assert not kernel_dir.exists()
    with pytest.raises(docker.errors.NotFound):
        docker_client.api.inspect_container(container_id)


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


async def test_interrupt_message_and_signal(docker_client, python_image, kernelspecs, workspace, runtime_dir):
    import signal

    async with docker_kernel(kernelspecs, **era_options(workspace, runtime_dir)) as (km, kc):
        for interrupt in (km.interrupt_kernel, lambda: km.signal_kernel(signal.SIGINT)):
            msg_id = kc.execute("import time; time.sleep(60)")
            await kc.get_iopub_msg(timeout=10)  # busy
            started = time.monotonic()
            await _sleep(0.5)
            await interrupt()
            reply = await _reply(kc, msg_id, timeout=10)
            assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
            assert time.monotonic() - started < 5


async def test_restart_gives_a_fresh_container(docker_client, python_image, kernelspecs, workspace, runtime_dir):
    async with docker_kernel(kernelspecs, **era_options(workspace, runtime_dir)) as (km, kc):
        first = km.provisioner.container_id
        await run(kc, "x = 1")
        await km.restart_kernel()
        await kc.wait_for_ready(timeout=60)
        assert km.provisioner.container_id != first
        assert first not in managed_containers(docker_client)
        status, _, content = await run(kc, "x")
        assert status == "error" and content["ename"] == "NameError"


# ---------------------------------------------------------------------------- isolation (18-21)

PROBE_PROCESSES = r"""
import json, os
procs = {}
for pid in os.listdir('/proc'):
    if pid.isdigit():
        try:
            status = dict(l.split(':', 1) for l in open(f'/proc/{pid}/status').read().splitlines() if ':' in l)
        except OSError:
            continue
        procs[pid] = {k: status[k].strip() for k in ('Name', 'Uid', 'NoNewPrivs', 'CapEff', 'CapPrm', 'CapBnd')}
try:
    open('/usr/era-probe', 'w'); rootfs = 'writable'
except OSError as e:
    rootfs = e.errno
import subprocess
tools = {t: subprocess.run(argv, capture_output=True).returncode for t, argv in
         {'mount': ['mount', '-t', 'tmpfs', 'x', '/mnt'], 'unshare': ['unshare', '--user', '--map-root-user', 'true'],
          'sudo_su': ['su', '-c', 'true']}.items()}
print(json.dumps({'procs': procs, 'rootfs': rootfs, 'uid': os.getuid(), 'gid': os.getgid(), 'tools': tools}))
"""


async def test_no_privileges_anywhere(docker_client, python_image, kernelspecs, workspace, runtime_dir):
    async with docker_kernel(kernelspecs, **era_options(workspace, runtime_dir)) as (km, kc):
        await run(kc, "import subprocess; bg = subprocess.Popen(['sleep', '30'])")  # a child process counts too
        probe = await run_json(kc, PROBE_PROCESSES)
    assert probe["uid"] == KERNEL_UID and probe["gid"] == KERNEL_UID
    assert probe["rootfs"] == 30  # EROFS
    assert all(code != 0 for code in probe["tools"].values()), probe["tools"]
    assert len(probe["procs"]) >= 3  # init, kernel, sleep (and the probe's own)
    for pid, status in probe["procs"].items():
        assert status["NoNewPrivs"] == "1", (pid, status)
        assert status["CapEff"] == "0000000000000000", (pid, status)
        assert status["CapPrm"] == "0000000000000000", (pid, status)
        assert all(u != "0" for u in status["Uid"].split()), (pid, status)


@pytest.fixture
def host_listener():
    """A TCP service on the host's loopback, as the ERA server or a database would be."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


async def test_no_network_by_default(docker_client, python_image, kernelspecs, workspace, runtime_dir, host_listener):
    port = host_listener.getsockname()[1]
    code = f"""
import json, socket
results = {{}}
for name, addr in {{'host_loopback': ('127.0.0.1', {port}), 'metadata': ('169.254.169.254', 80),
                    'public': ('1.1.1.1', 53)}}.items():
    s = socket.socket(); s.settimeout(3)
    try:
        s.connect(addr); results[name] = 'connected'
    except OSError as e:
        results[name] = type(e).__name__
    finally:
        s.close()
try:
    socket.getaddrinfo('example.com', 80); results['dns'] = 'resolved'
except OSError as e:
    results['dns'] = type(e).__name__
results['interfaces'] = sorted(n for _, n in socket.if_nameindex())
print(json.dumps(results))
"""
    async with docker_kernel(kernelspecs, **era_options(workspace, runtime_dir)) as (km, kc):
        results = await run_json(kc, code)
    assert "connected" not in results.values() and results["dns"] != "resolved", results
    assert results["interfaces"] == ["lo"]
    with pytest.raises(BlockingIOError):
        host_listener.accept()  # nothing reached the host's service


async def test_host_files_and_other_kernels_invisible(docker_client, python_image, kernelspecs, tmp_path, runtime_dir):
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("host secret")
    secret.chmod(0o644)
    ws_a, ws_b = tmp_path / "a", tmp_path / "b"
    for ws in (ws_a, ws_b):
        ws.mkdir()
        os.chown(ws, KERNEL_UID, KERNEL_UID) if os.getuid() == 0 else None
    (ws_b / "b-private.txt").write_text("b's data")
    async with docker_kernel(kernelspecs, **era_options(ws_b, runtime_dir)) as (km_b, _):
        b_dir = km_b.provisioner.kernel_dir
        code = f"""
import json, os
paths = {[str(secret), str(ws_b / 'b-private.txt'), str(b_dir / 'connection.json'), '/etc/shadow',
          str(Path(runtime_dir) / 'k')]!r}
seen = {{}}
for p in paths:
    try:
        seen[p] = os.listdir(p) if os.path.isdir(p) else open(p).read()[:40]
    except OSError as e:
        seen[p] = type(e).__name__
print(json.dumps(seen))
"""
        async with docker_kernel(kernelspecs, **era_options(ws_a, runtime_dir)) as (km_a, kc_a):
            seen = await run_json(kc_a, code)
            own = km_a.provisioner.kernel_dir.name
    assert seen[str(secret)] == "FileNotFoundError"
    assert seen[str(ws_b / "b-private.txt")] == "FileNotFoundError"
    assert seen[str(b_dir / "connection.json")] == "FileNotFoundError"
    assert seen["/etc/shadow"] in ("PermissionError", "FileNotFoundError")
    assert seen[str(Path(runtime_dir) / "k")] == [own]  # only its own IPC directory


async def test_kernel_env_holds_only_what_we_pass(docker_client, python_image, kernelspecs, workspace, runtime_dir,
                                                  monkeypatch):
    monkeypatch.setenv("ERA_API_KEY", "server-token")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "aws-id")
    values = {"INJECT": "$(touch /tmp/pwned)", "TICKS": "`touch /tmp/pwned2`", "MULTI": "line1\nline2; rm -rf /"}
    options = era_options(workspace, runtime_dir, env=values)
    async with docker_kernel(kernelspecs, env=dict(os.environ), **options) as (km, kc):
        env = await run_json(kc, "import os, json; print(json.dumps(dict(os.environ)))")
        exists = await run_json(kc, "import os, json; print(json.dumps([os.path.exists('/tmp/pwned'), "
                                    "os.path.exists('/tmp/pwned2')]))")
    assert not any(k.startswith(("AWS_", "ERA_")) for k in env), sorted(env)
    assert "server-token" not in json.dumps(env) and "aws-secret" not in json.dumps(env)
    for key, value in values.items():
        assert env[key] == value
    assert exists == [False, False] and not os.path.exists("/tmp/pwned")


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


async def test_root_uid_and_bad_env_refused(docker_client, kernelspecs, workspace, runtime_dir):
    refused = ({"uid": 0}, {"uid": -5}, {"uid": "abc"}, {"uid": True}, {"memory": 1024}, {"pids": -1},
               {"cpus": "lots"}, {"env": {"BAD NAME": "x"}}, {"env": {"A=B": "x"}}, {"env": {"NUL": "a\0b"}},
               {"env": ["A=1"]}, {"labels": {"era.managed": "0"}}, {"labels": {"x": "a\nb"}})
    for era in refused:
        options = era_options(workspace, runtime_dir)
        options["era"].update(era)
        with pytest.raises(BadRequest):
            async with docker_kernel(kernelspecs, **options):
                pass


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


# ---------------------------------------------------------------------------- limits (8, 9)

FORK_BOMB = r"""
import json, os, time
children, failure = [], None
for _ in range(2000):
    try:
        pid = os.fork()
    except OSError as e:
        failure = e.errno
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    children.append(pid)
print(json.dumps({'forked': len(children), 'errno': failure}))
"""


def _process_identity(pid: str) -> tuple[str, str] | None:
    """(pid, start time): a pid number alone may be reused by an unrelated process."""
    try:
        return pid, Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


async def test_fork_bomb_is_contained(docker_client, python_image, kernelspecs, workspace, runtime_dir):
    import errno

    async with docker_kernel(kernelspecs, **era_options(workspace, runtime_dir, pids=64)) as (km, kc):
        result = await run_json(kc, FORK_BOMB, timeout=60)
        assert result["errno"] == errno.EAGAIN and result["forked"] < 64
        container_id = km.provisioner.container_id
        top = docker_client.api.top(container_id, ps_args="-eLf")  # threads count against the limit too
        pid_column = top["Titles"].index("PID")
        host_pids = {row[pid_column] for row in top["Processes"]}
        assert result["forked"] <= len(host_pids) <= 64
        identities = {i for i in map(_process_identity, host_pids) if i}
        # The kernel still answers (it may itself fail to start a thread while the table
        # is full), and recovers once the children are gone.
        assert (await run(kc, "1"))[0] in ("ok", "error")
        answer = await run(kc, "import signal\nfor p in children[:5]: os.kill(p, signal.SIGKILL)\n"
                               "for p in children[:5]: os.waitpid(p, 0)\nprint(1 + 1)")
        assert answer[1].strip() == "2", answer
    # Shutdown removed the container and every process that was in it (SECURITY.md 9).
    assert container_id not in managed_containers(docker_client)
    deadline = time.monotonic() + 10
    while any(_process_identity(pid) == (pid, start) for pid, start in identities) and time.monotonic() < deadline:
        await _sleep(0.2)
    assert not [pid for pid, start in identities if _process_identity(pid) == (pid, start)]


async def test_memory_bomb_is_contained(docker_client, python_image, kernelspecs, workspace, runtime_dir):
    limit = 128 * 1024**2
    async with docker_kernel(kernelspecs, **era_options(workspace, runtime_dir, memory=limit)) as (km, kc):
        container_id = km.provisioner.container_id
        msg_id = kc.execute("hog = []\nwhile True:\n    hog.append(b'x' * (16 * 1024**2))")
        outcome = None
        deadline = time.monotonic() + 60
        while outcome is None and time.monotonic() < deadline:
            try:
                reply = await _reply(kc, msg_id, timeout=1)
                outcome = reply["content"].get("ename")
            except TimeoutError:
                if not await km.is_alive():
                    state = docker_client.api.inspect_container(container_id)["State"]
                    outcome = "OOMKilled" if state["OOMKilled"] else f"exit {state['ExitCode']}"
        assert outcome in ("MemoryError", "OOMKilled"), outcome
        assert outcome == "MemoryError" or km.provisioner.oom_killed
        # The host side (this test process) keeps working, and so does the engine.
        assert docker_client.ping()
        assert sum(range(10**6)) == 499999500000


async def test_limits_from_session_options(docker_client, python_image, kernelspecs, workspace, runtime_dir):
    options = era_options(workspace, runtime_dir, memory=256 * 1024**2, cpus=0.5, pids=100)
    async with docker_kernel(kernelspecs, **options) as (km, _):
        host = docker_client.api.inspect_container(km.provisioner.container_id)["HostConfig"]
    assert (host["Memory"], host["NanoCpus"], host["PidsLimit"]) == (256 * 1024**2, 5 * 10**8, 100)


# ---------------------------------------------------------------------------- orphans (10)


async def test_reap_orphan_containers(docker_client, python_image):
    from era_kernel.provisioning.docker import reap_orphan_containers

    labels = {"era.managed": "1", "era.kernel": "test-orphan"}
    created = docker_client.containers.create(python_image, ["sleep", "60"], labels=labels, network_mode="none")
    running = docker_client.containers.run(python_image, ["sleep", "60"], labels={**labels, "era.kernel": "test-run"},
                                           network_mode="none", detach=True)
    kept = docker_client.containers.create(python_image, ["sleep", "60"], labels={**labels, "era.kernel": "keep-me"},
                                           network_mode="none")
    unrelated = docker_client.containers.create(python_image, ["sleep", "60"], network_mode="none")
    try:
        assert docker_client.api.inspect_container(created.id)["State"]["Status"] == "created"
        removed = await reap_orphan_containers(docker_client, keep={"keep-me"})
        assert removed >= 2
        remaining = managed_containers(docker_client)
        assert created.id not in remaining and running.id not in remaining and kept.id in remaining
        assert docker_client.api.inspect_container(unrelated.id)  # not ours: untouched
    finally:
        for container in (kept, unrelated):
            container.remove(force=True)


# ---------------------------------------------------------------------------- helpers


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


async def _reply(kc, msg_id: str, timeout: float) -> dict:
    import asyncio
    import queue

    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        try:
            reply = await kc.get_shell_msg(timeout=remaining)
        except (queue.Empty, asyncio.TimeoutError):
            raise TimeoutError from None
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply
